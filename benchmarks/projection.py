"""Projection fusion against transformers' Llava with identical weights, and against the bare LM."""

import torch
from transformers import AutoModelForCausalLM, LlavaConfig, LlavaForConditionalGeneration

from mmfuse import MmfuseProjectionConfig, MmfuseProjectionForConditionalGeneration

from .measure import PeakMemory, markdown_table, row, time_call, value_row


def model_sizes(tiny: bool) -> dict:
    """Vision and text configs: a realistic small size by default, a tiny one for smoke tests."""
    if tiny:
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        vision.update(image_size=32, patch_size=8)
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        text.update(num_key_value_heads=4, vocab_size=512)
    else:
        vision = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6)
        vision.update(image_size=224, patch_size=16)
        text = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=12, num_attention_heads=8)
        text.update(num_key_value_heads=8, vocab_size=32000)
    vision["model_type"] = "clip_vision_model"
    text.update(model_type="llama", max_position_embeddings=4096, pad_token_id=0, eos_token_id=2, bos_token_id=1)
    return {"vision": vision, "text": text}


def build_models(tiny: bool):
    """Return (mmfuse model, Llava model, bare LM) sharing every weight value, in eval mode."""
    sizes = model_sizes(tiny)
    image_token_id = sizes["text"]["vocab_size"] - 1
    torch.manual_seed(0)
    config = MmfuseProjectionConfig(
        vision_config=sizes["vision"], text_config=sizes["text"], image_token_id=image_token_id
    )
    model = MmfuseProjectionForConditionalGeneration(config).eval()

    llava_config = LlavaConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_index=image_token_id,
        image_seq_length=config.num_image_tokens,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
    )
    llava = LlavaForConditionalGeneration(llava_config).eval()
    # mmfuse's projection type uses Llava's module names, so the state dicts map one to one.
    llava.load_state_dict(model.state_dict(), strict=True)

    language_model = AutoModelForCausalLM.from_config(config.text_config).eval()
    language_model.model.load_state_dict(model.model.language_model.state_dict(), strict=True)
    language_model.lm_head.load_state_dict(model.lm_head.state_dict(), strict=True)
    return model, llava, language_model


def prompt_inputs(config, batch_size: int, num_images: int = 1, text_tokens: int = 16) -> dict:
    generator = torch.Generator().manual_seed(0)
    vocab = config.text_config.vocab_size - 1
    rows = []
    for _ in range(batch_size):
        text = torch.randint(3, vocab, (text_tokens,), generator=generator)
        images = torch.full((num_images * config.num_image_tokens,), config.image_token_id)
        rows.append(torch.cat([images, text]))
    input_ids = torch.stack(rows)
    size = config.vision_config.image_size
    pixel_values = torch.randn(batch_size * num_images, 3, size, size, generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values}


def generate_call(model, inputs, new_tokens: int):
    def call():
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    return call


def prefill_call(model, inputs):
    def call():
        with torch.no_grad():
            model(**inputs, use_cache=True)

    return call


def decode_per_token(model, inputs, new_tokens: int, repeats: int):
    """Seconds per decode step: generate N tokens minus generate 1 token, divided by N - 1."""
    long = time_call(generate_call(model, inputs, new_tokens), repeats=repeats)
    short = time_call(generate_call(model, inputs, 1), repeats=repeats)
    per_token = (long.median - short.median) / (new_tokens - 1)
    return per_token, long, short


def run(settings, output_dir: str) -> dict:
    """Compare prefill, decode, memory and end-to-end generate of mmfuse and Llava."""
    model, llava, language_model = build_models(settings.tiny)
    repeats, new_tokens = settings.repeats, settings.new_tokens
    results = {"new_tokens": new_tokens, "num_image_tokens": model.config.num_image_tokens, "rows": []}

    single = prompt_inputs(model.config, batch_size=1)
    mmfuse_prefill = time_call(prefill_call(model, single), repeats=repeats)
    llava_prefill = time_call(prefill_call(llava, single), repeats=repeats)
    results["rows"].append(row("prefill, batch 1", mmfuse_prefill, llava_prefill))

    mmfuse_decode, _, _ = decode_per_token(model, single, new_tokens, repeats)
    llava_decode, _, _ = decode_per_token(llava, single, new_tokens, repeats)
    results["rows"].append(value_row("decode per token, batch 1", "s", mmfuse_decode, llava_decode))

    for batch_size in (1, 8):
        inputs = prompt_inputs(model.config, batch_size=batch_size)
        mmfuse_time = time_call(generate_call(model, inputs, new_tokens), repeats=repeats)
        llava_time = time_call(generate_call(llava, inputs, new_tokens), repeats=repeats)
        results["rows"].append(row(f"generate {new_tokens} tokens, batch {batch_size}", mmfuse_time, llava_time))

    with PeakMemory() as mmfuse_memory:
        generate_call(model, single, new_tokens)()
    with PeakMemory() as llava_memory:
        generate_call(llava, single, new_tokens)()
    results["rows"].append(
        value_row(
            "peak memory growth of generate, batch 1",
            "MiB",
            mmfuse_memory.peak_bytes / 2**20,
            llava_memory.peak_bytes / 2**20,
        )
    )

    # Decode overhead against the LM alone at the same context length.
    text_only = {"input_ids": torch.randint(3, model.config.text_config.vocab_size - 1, single["input_ids"].shape)}
    text_only["attention_mask"] = torch.ones_like(text_only["input_ids"])
    lm_decode, _, _ = decode_per_token(language_model, text_only, new_tokens, repeats)
    results["decode_overhead"] = {
        "context_length": int(single["input_ids"].shape[1]),
        "bare_lm_s": lm_decode,
        "projection_s": mmfuse_decode,
        "ratio": mmfuse_decode / lm_decode,
    }
    return results


def markdown(results: dict) -> str:
    overhead = results["decode_overhead"]
    lines = [
        "## Projection fusion vs transformers' Llava (identical weights)",
        "",
        f"{results['num_image_tokens']} image tokens per image; generate runs {results['new_tokens']} greedy tokens.",
        "",
        markdown_table(results["rows"], reference_name="Llava"),
        "",
        "## Decode overhead against the bare LM",
        "",
        f"At a context of {overhead['context_length']} tokens, one projection-fusion decode step takes "
        f"{overhead['projection_s'] * 1e3:.2f} ms against {overhead['bare_lm_s'] * 1e3:.2f} ms for the LM alone "
        f"(ratio {overhead['ratio']:.2f}).",
        "",
    ]
    return "\n".join(lines)
