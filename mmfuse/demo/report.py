"""Writing the demo's `results/` folder: metrics.json, metrics.md, loss.png and examples.md."""

import json
import os

METRICS_JSON = "metrics.json"
METRICS_MARKDOWN = "metrics.md"
LOSS_PLOT = "loss.png"
EXAMPLES_MARKDOWN = "examples.md"
IMAGES_DIR = "images"

COMPARISON_COLUMNS = (
    ("tokens per image in LM context", "tokens_per_image", "{}"),
    ("trainable parameters", "trainable_parameters", "{:,}"),
    ("training time (s)", "training_seconds", "{:.0f}"),
    ("training examples seen", "training_examples", "{:,}"),
    ("easy-VQA test accuracy", "easy_vqa_accuracy", "{:.1%}"),
    ("decode speed (ms/token)", "decode_ms_per_token", "{:.1f}"),
    ("text-to-image match", "text_to_image_accuracy", "{:.1%}"),
)


def format_cell(value, template: str) -> str:
    if value is None:
        return "not run"
    return template.format(value)


def format_metrics_table(metrics: dict) -> str:
    """Return the markdown report: the run's settings, then one row per fusion type."""
    settings = metrics["settings"]
    lines = [
        "# mmfuse demo results",
        "",
        f"- command: `{settings['command']}`",
        f"- machine: {settings['machine']}",
        f"- vision tower: {settings['vision']}; language model: {settings['language']}",
        f"- training precision: {settings.get('precision', 'fp32')} (evaluation in fp32)",
        f"- training budget per fusion type: {settings['budget_seconds']:.0f} s; "
        f"easy-VQA test questions scored: {settings['eval_questions']}",
        "",
        "| fusion type | " + " | ".join(title for title, _, _ in COMPARISON_COLUMNS) + " |",
        "|---|" + "---:|" * len(COMPARISON_COLUMNS),
    ]
    for fusion, row in metrics["fusions"].items():
        cells = [format_cell(row.get(key), template) for _, key, template in COMPARISON_COLUMNS]
        lines.append(f"| {fusion} | " + " | ".join(cells) + " |")
    fashion = {fusion: row["fashion_mnist"] for fusion, row in metrics["fusions"].items() if row.get("fashion_mnist")}
    if fashion:
        lines += ["", "| fusion type | Fashion-MNIST captions scored | caption accuracy | class accuracy |"]
        lines.append("|---|---:|---:|---:|")
        for fusion, result in fashion.items():
            lines.append(
                f"| {fusion} | {result['num_examples']} | {result['accuracy']:.1%} | {result['class_accuracy']:.1%} |"
            )
    return "\n".join(lines) + "\n"


def plot_losses(loss_histories: dict, path: str) -> None:
    """Plot the training loss of every fusion type over optimizer steps, stages one after another."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a server
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for fusion, stages in loss_histories.items():
        offset = 0
        for stage, history in stages:
            if not history:
                continue
            steps = [offset + step for step, _ in history]
            axes.plot(steps, [loss for _, loss in history], label=f"{fusion} ({stage})")
            offset = steps[-1]
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("training loss (answer tokens)")
    axes.set_yscale("log")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def format_examples(examples: dict) -> str:
    """Return examples.md: per fusion type, a table of image, question and the model's answer."""
    lines = ["# Example answers", ""]
    for fusion, rows in examples.items():
        lines += [f"## {fusion}", "", "| image | question | answer | expected |", "|---|---|---|---|"]
        for row in rows:
            image = f"![{row['name']}]({IMAGES_DIR}/{row['name']}.png)"
            expected = row.get("expected") or "-"
            lines.append(f"| {image} {row['name']} | {row['question']} | {row['answer']} | {expected} |")
        lines.append("")
    return "\n".join(lines)


def write_results(output_dir: str, metrics: dict, loss_histories: dict, examples: dict, images: dict) -> dict:
    """Write every result file into `output_dir`; return `{file kind: path}`."""
    os.makedirs(os.path.join(output_dir, IMAGES_DIR), exist_ok=True)
    paths = {
        name: os.path.join(output_dir, file)
        for name, file in (
            ("metrics_json", METRICS_JSON),
            ("metrics_markdown", METRICS_MARKDOWN),
            ("loss_plot", LOSS_PLOT),
            ("examples", EXAMPLES_MARKDOWN),
        )
    }
    with open(paths["metrics_json"], "w", encoding="utf-8") as file:
        json.dump(metrics, file, indent=2, ensure_ascii=False)
        file.write("\n")
    with open(paths["metrics_markdown"], "w", encoding="utf-8") as file:
        file.write(format_metrics_table(metrics))
    plot_losses(loss_histories, paths["loss_plot"])
    for name, image in images.items():
        image.convert("RGB").save(os.path.join(output_dir, IMAGES_DIR, f"{name}.png"))
    with open(paths["examples"], "w", encoding="utf-8") as file:
        file.write(format_examples(examples))
    return paths


__all__ = ["format_examples", "format_metrics_table", "plot_losses", "write_results"]
