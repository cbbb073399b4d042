"""Projection fusion against transformers' Llava with identical weights."""

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from mmfuse import MmfuseProjectionConfig, MmfuseProjectionForConditionalGeneration

from .builders import model_sizes, prompt_inputs
from .measure import PeakMemory, alternate, call_seconds, decode_step_seconds, markdown_table, row, value_row


def build_models(tiny: bool):
    """Return (mmfuse model, Llava model) sharing every weight value, in eval mode."""
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
    return model, llava


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


def run(settings, output_dir: str) -> dict:
    """Compare prefill, decode, memory and end-to-end generate of mmfuse and Llava."""
    model, llava = build_models(settings.tiny)
    repeats, new_tokens = settings.repeats, settings.new_tokens
    results = {
        "new_tokens": new_tokens,
        "decode_steps": settings.decode_steps,
        "num_image_tokens": model.config.num_image_tokens,
        "rows": [],
    }

    single = prompt_inputs(model, num_images=1, batch_size=1)
    mmfuse_prefill, llava_prefill = alternate(
        [call_seconds(prefill_call(model, single)), call_seconds(prefill_call(llava, single))], repeats
    )
    results["rows"].append(row("prefill, batch 1", mmfuse_prefill, llava_prefill))

    mmfuse_decode, llava_decode = alternate(
        [
            decode_step_seconds(model, single, settings.decode_steps),
            decode_step_seconds(llava, single, settings.decode_steps),
        ],
        repeats,
    )
    results["rows"].append(row("decode step, batch 1", mmfuse_decode, llava_decode))

    for batch_size in (1, 8):
        inputs = prompt_inputs(model, num_images=1, batch_size=batch_size)
        mmfuse_time, llava_time = alternate(
            [
                call_seconds(generate_call(model, inputs, new_tokens)),
                call_seconds(generate_call(llava, inputs, new_tokens)),
            ],
            repeats,
        )
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

    return results


def markdown(results: dict) -> str:
    lines = [
        "## Projection fusion vs transformers' Llava (identical weights)",
        "",
        f"{results['num_image_tokens']} image tokens per image; generate runs {results['new_tokens']} greedy tokens. A decode step is the gap "
        f"between two generation steps of a {results['decode_steps']}-token greedy `generate` (prefill excluded).",
        "",
        markdown_table(results["rows"], reference_name="Llava"),
        "",
    ]
    return "\n".join(lines)
