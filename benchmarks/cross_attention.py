"""Cross-attention fusion against transformers' Idefics with identical weights, at 1 to 16 images per prompt.

A random `IdeficsForVisionText2Text` is saved and converted with `mmfuse convert idefics`'s own functions, and
the two models' prefill logits are compared before anything is timed. Idefics keeps the resampled latents
between decode steps, but every gated layer projects them to keys and values again at every step. mmfuse
projects them once, at the prefill, and carries the keys and values in its image cache.
"""

import tempfile

import torch
from transformers import IdeficsConfig, IdeficsForVisionText2Text

from mmfuse.conversion.idefics import convert_config, convert_model
from mmfuse.modeling_cross_attention import media_location_mask

from .builders import cross_attention_interval, model_sizes, resampler_sizes
from .measure import PeakMemory, alternate, decode_step_seconds, format_timing, format_value, plain_table

IMAGE_COUNTS = (1, 4, 16)
TINY_IMAGE_COUNTS = (1, 2)


def idefics_config(tiny: bool) -> IdeficsConfig:
    """Build an Idefics config with the LM, vision tower and resampler sizes of the other sections."""
    sizes = model_sizes(tiny)
    vision, text = sizes["vision"], sizes["text"]
    resampler = resampler_sizes(tiny)
    return IdeficsConfig(
        vocab_size=text["vocab_size"],
        additional_vocab_size=0,
        hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"],
        num_hidden_layers=text["num_hidden_layers"],
        num_attention_heads=text["num_attention_heads"],
        max_position_embeddings=text["max_position_embeddings"],
        cross_layer_interval=cross_attention_interval(tiny),
        use_resampler=True,
        pad_token_id=text["pad_token_id"],
        bos_token_id=text["bos_token_id"],
        eos_token_id=text["eos_token_id"],
        vision_config={
            "embed_dim": vision["hidden_size"],
            "intermediate_size": vision["intermediate_size"],
            "num_hidden_layers": vision["num_hidden_layers"],
            "num_attention_heads": vision["num_attention_heads"],
            "image_size": vision["image_size"],
            "patch_size": vision["patch_size"],
        },
        perceiver_config={
            "resampler_n_latents": resampler["resampler_num_latents"],
            "resampler_depth": resampler["resampler_depth"],
            "resampler_n_heads": resampler["resampler_num_heads"],
            "resampler_head_dim": resampler["resampler_head_dim"],
        },
    )


def build_models(tiny: bool) -> tuple:
    """Return `(mmfuse model, Idefics model)` with the same weights, both in eval mode."""
    torch.manual_seed(0)
    source_config = idefics_config(tiny)
    idefics = IdeficsForVisionText2Text(source_config).eval()
    with torch.no_grad():
        for name, parameter in idefics.named_parameters():
            if "alpha_" in name:
                parameter.fill_(0.5)  # open gates, as after training, so the image paths do real work
    image_token_id = source_config.vocab_size - 1
    with tempfile.TemporaryDirectory() as folder:
        idefics.save_pretrained(folder)
        model, _ = convert_model(folder, convert_config(source_config, image_token_id), source_config)
    return model.eval(), idefics


def prompts(config, num_images: int, text_tokens: int = 16) -> tuple:
    """Return `(mmfuse inputs, Idefics inputs)`: one row with `num_images` markers, each followed by 4 text tokens."""
    generator = torch.Generator().manual_seed(num_images)
    vocab_size = config.text_config.vocab_size
    pieces = []
    for _ in range(num_images):
        pieces += [torch.tensor([config.image_token_id]), torch.randint(3, vocab_size - 1, (4,), generator=generator)]
    pieces.append(torch.randint(3, vocab_size - 1, (text_tokens,), generator=generator))
    input_ids = torch.cat(pieces)[None]
    size = config.vision_config.image_size
    pixel_values = torch.randn(num_images, 3, size, size, generator=generator)
    attention_mask = torch.ones_like(input_ids)

    image_counts = torch.cumsum(input_ids == config.image_token_id, dim=1)
    image_attention_mask = media_location_mask(image_counts, torch.tensor([num_images]), num_images, immediate=True)
    mmfuse_inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
    idefics_inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values[None],  # Idefics takes [batch_size, num_images, 3, height, width]
        "image_attention_mask": image_attention_mask.long(),
    }
    return mmfuse_inputs, idefics_inputs


def run(settings, output_dir: str) -> dict:
    """Compare decode step time, peak memory and context length of mmfuse and Idefics."""
    model, idefics = build_models(settings.tiny)
    results = {"decode_steps": settings.decode_steps, "rows": []}

    mmfuse_inputs, idefics_inputs = prompts(model.config, num_images=2)
    with torch.no_grad():
        difference = (model(**mmfuse_inputs).logits - idefics(**idefics_inputs).logits).abs().max()
    results["max_logit_difference"] = float(difference)

    for num_images in TINY_IMAGE_COUNTS if settings.tiny else IMAGE_COUNTS:
        mmfuse_inputs, idefics_inputs = prompts(model.config, num_images)
        mmfuse_memory, idefics_memory = PeakMemory(), PeakMemory()
        mmfuse_decode, idefics_decode = alternate(
            [
                decode_step_seconds(model, mmfuse_inputs, settings.decode_steps, peak_memory=mmfuse_memory),
                decode_step_seconds(idefics, idefics_inputs, settings.decode_steps, peak_memory=idefics_memory),
            ],
            settings.repeats,
        )
        results["rows"].append(
            {
                "num_images": num_images,
                "context_length": int(mmfuse_inputs["input_ids"].shape[1]),
                "mmfuse_decode": mmfuse_decode.as_dict(),
                "idefics_decode": idefics_decode.as_dict(),
                "decode_ratio": mmfuse_decode.median / idefics_decode.median,
                "mmfuse_peak_mib": mmfuse_memory.peak_bytes / 2**20,
                "idefics_peak_mib": idefics_memory.peak_bytes / 2**20,
            }
        )
    return results


def markdown(results: dict) -> str:
    rows = [
        [
            entry["num_images"],
            entry["context_length"],
            format_timing(entry["mmfuse_decode"]),
            format_timing(entry["idefics_decode"]),
            f"{entry['decode_ratio']:.2f}",
            format_value(entry["mmfuse_peak_mib"], "MiB"),
            format_value(entry["idefics_peak_mib"], "MiB"),
        ]
        for entry in results["rows"]
    ]
    headers = [
        "images",
        "context tokens (both)",
        "decode step, mmfuse",
        "decode step, Idefics",
        "mmfuse / Idefics",
        "peak memory growth of generate, mmfuse",
        "same, Idefics",
    ]
    lines = [
        "## Cross-attention fusion vs transformers' Idefics (identical weights)",
        "",
        f"Both models take one marker token per image. Prefill logits differ by at most "
        f"{results['max_logit_difference']:.1e}. Greedy `generate` of {results['decode_steps']} tokens; a decode "
        "step is the gap between two generation steps. Peak memory is the growth of the resident set size "
        "(sampled every 2 ms) during the first, untimed `generate` call.",
        "",
        plain_table(headers, rows),
        "",
    ]
    return "\n".join(lines)
