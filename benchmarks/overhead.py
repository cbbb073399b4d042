"""Decode overhead of each fusion type against the bare LM at the same context length."""

from .builders import BUILDERS, build_language_model, prompt_inputs, text_inputs
from .measure import alternate, decode_step_seconds, format_timing, plain_table


def run(settings, output_dir: str) -> dict:
    """Time the decode steps of each fusion type with one image, and of the bare LM on as many text tokens."""
    language_model = build_language_model(settings.tiny)
    vocab_size = language_model.config.vocab_size
    results = {"decode_steps": settings.decode_steps, "rows": []}
    for fusion_type, build in BUILDERS.items():
        model = build(settings.tiny)
        inputs = prompt_inputs(model, num_images=1)
        context_length = int(inputs["input_ids"].shape[1])
        fused, bare = alternate(
            [
                decode_step_seconds(model, inputs, settings.decode_steps),
                decode_step_seconds(language_model, text_inputs(context_length, vocab_size), settings.decode_steps),
            ],
            settings.repeats,
        )
        results["rows"].append(
            {
                "fusion_type": fusion_type,
                "context_length": context_length,
                "fused": fused.as_dict(),
                "bare_lm": bare.as_dict(),
                "ratio": fused.median / bare.median,
            }
        )
        del model
    return results


def markdown(results: dict) -> str:
    rows = [
        [
            entry["fusion_type"],
            entry["context_length"],
            format_timing(entry["fused"]),
            format_timing(entry["bare_lm"]),
            f"{entry['ratio']:.2f}",
        ]
        for entry in results["rows"]
    ]
    lines = [
        "## Decode overhead against the bare LM",
        "",
        f"One image per prompt, greedy `generate` of {results['decode_steps']} tokens; a decode step is the gap "
        "between two generation steps (prefill excluded). The bare LM decodes a random text prompt of the same "
        "context length.",
        "",
        plain_table(
            ["fusion type", "context tokens", "decode step, fusion model", "decode step, bare LM", "ratio"], rows
        ),
        "",
    ]
    return "\n".join(lines)
