"""Context cost per fusion type as the number of images per prompt grows: tokens, KV-cache bytes, prefill time."""

import functools
import os

import torch

from mmfuse.modeling_common import CACHE_FIELD

from .builders import BUILDERS, prompt_inputs
from .measure import cache_bytes, format_timing, plain_table, time_call

IMAGE_COUNTS = (1, 2, 4, 8, 16)
TINY_IMAGE_COUNTS = (1, 2, 4)


def prefill(model, inputs: dict):
    with torch.no_grad():
        return model(**inputs, use_cache=True)


def image_cache_bytes(outputs) -> int:
    """Bytes of the cross-attention keys and values that cross-attention fusion keeps outside the context."""
    image_cache = getattr(outputs, "image_cache", None)
    if image_cache is None:
        return 0
    return sum(tensor.numel() * tensor.element_size() for pair in image_cache.key_values for tensor in pair)


def run(settings, output_dir: str) -> dict:
    """Measure one prefill per fusion type and image count; plot the three figures against the image count."""
    counts = TINY_IMAGE_COUNTS if settings.tiny else IMAGE_COUNTS
    repeats = settings.repeats
    results = {"image_counts": list(counts), "repeats": repeats, "rows": []}
    for fusion_type, build in BUILDERS.items():
        model = build(settings.tiny)
        prefill(model, prompt_inputs(model, 1))  # warm-up, once per model: long prompts take long to prefill
        for num_images in counts:
            inputs = prompt_inputs(model, num_images)
            timing = time_call(functools.partial(prefill, model, inputs), repeats=repeats, warmup=0)
            outputs = prefill(model, inputs)
            results["rows"].append(
                {
                    "fusion_type": fusion_type,
                    "num_images": num_images,
                    "context_length": int(inputs["input_ids"].shape[1]),
                    "kv_cache_bytes": cache_bytes(getattr(outputs, CACHE_FIELD)),
                    "image_cache_bytes": image_cache_bytes(outputs),
                    "prefill": timing.as_dict(),
                }
            )
            del outputs
        del model
    results["plot"] = plot(results, output_dir)
    return results


def plot(results: dict, output_dir: str) -> str:
    """Draw context tokens, cache MiB and prefill seconds against images per prompt into `context_cost.png`."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(1, 3, figsize=(15, 4.5))
    panels = (
        ("tokens in the LM context", lambda entry: entry["context_length"]),
        (
            "KV cache + image keys/values (MiB)",
            lambda entry: (entry["kv_cache_bytes"] + entry["image_cache_bytes"]) / 2**20,
        ),
        ("prefill time (s, median)", lambda entry: entry["prefill"]["median"]),
    )
    for axis, (title, value) in zip(axes, panels):
        for fusion_type in dict.fromkeys(entry["fusion_type"] for entry in results["rows"]):
            entries = [entry for entry in results["rows"] if entry["fusion_type"] == fusion_type]
            axis.plot(
                [entry["num_images"] for entry in entries],
                [value(entry) for entry in entries],
                "o-",
                label=fusion_type,
            )
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("images per prompt")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    path = os.path.join(output_dir, "context_cost.png")
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return os.path.basename(path)


def markdown(results: dict) -> str:
    rows = [
        [
            entry["fusion_type"],
            entry["num_images"],
            entry["context_length"],
            f"{entry['kv_cache_bytes'] / 2**20:.1f}",
            f"{entry['image_cache_bytes'] / 2**20:.1f}",
            format_timing(entry["prefill"]),
        ]
        for entry in results["rows"]
    ]
    headers = ["fusion type", "images", "context tokens", "KV cache (MiB)", "image keys/values (MiB)", "prefill"]
    lines = [
        "## Context cost as the number of images grows",
        "",
        "One prompt with N images and 16 text tokens (cross-attention adds 4 text tokens after each marker). "
        "KV-cache bytes are summed over the cache object that the prefill returns; cross-attention fusion also "
        "keeps every gated layer's image keys and values, outside the context. Prefill: median of "
        f"{results['repeats']} runs (min to max) after one warm-up prefill of one image per model.",
        "",
        plain_table(headers, rows),
        "",
        f"![context cost]({results['plot']})",
        "",
    ]
    return "\n".join(lines)
