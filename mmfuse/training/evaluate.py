"""Evaluation by batched greedy generation: easy-VQA answer accuracy and Fashion-MNIST caption accuracy.

A prediction counts when it equals the reference after `normalize_answer` (lower case, no
punctuation, single spaces). Fashion-MNIST also reports `class_accuracy`: the share of captions
that name the right class and no other one.
"""

import json
import os
import re

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers.utils import logging

from .data import FASHION_MNIST_CLASSES, EasyVQADataset, FashionMNISTDataset, VisionTextCollator, normalize_answer

logger = logging.get_logger(__name__)

RESULTS_JSON = "results.json"
RESULTS_MARKDOWN = "results.md"


@torch.no_grad()
def generate_answers(
    model,
    processor,
    dataset,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    progress: bool = True,
) -> list:
    """Return the model's greedy answer to every example of `dataset`, in order.

    Prompts are rendered with the processor's chat template and padded on the left, so each
    answer is the same as when its prompt is generated alone.
    """
    collator = VisionTextCollator(processor, for_generation=True)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
    tokenizer = processor.tokenizer
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers = []
    try:
        for batch in tqdm(loader, desc="generating", disable=not progress):
            batch.pop("image_ids")
            batch = {name: tensor.to(device) for name, tensor in batch.items()}
            output_ids = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = output_ids[:, batch["input_ids"].shape[1] :]
            answers.extend(text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return answers


def exact_match_accuracy(predictions: list, references: list) -> float:
    """Return the share of predictions equal to their reference after `normalize_answer`."""
    if len(predictions) != len(references):
        raise ValueError(f"Got {len(predictions)} predictions for {len(references)} references; pass one each.")
    if not references:
        raise ValueError("There are no references to score; evaluate on at least one example.")
    matches = sum(
        normalize_answer(prediction) == normalize_answer(reference)
        for prediction, reference in zip(predictions, references)
    )
    return matches / len(references)


def named_classes(caption: str) -> list:
    """Return the Fashion-MNIST class names that occur as whole words in `caption`.

    Both sides go through `normalize_answer`, so "t-shirt" becomes "tshirt" and "shirt" does not match it.
    """
    text = normalize_answer(caption)
    found = []
    for class_name in FASHION_MNIST_CLASSES:
        pattern = r"\b" + re.escape(normalize_answer(class_name)) + r"\b"
        if re.search(pattern, text):
            found.append(class_name)
    return found


def evaluate_dataset(model, processor, dataset, batch_size: int = 16, max_new_tokens: int = 16, progress=True) -> dict:
    """Return `{"accuracy", "num_examples", "examples"}` for any dataset of prompt/answer examples."""
    predictions = generate_answers(model, processor, dataset, batch_size, max_new_tokens, progress)
    examples = [dataset[index] for index in range(len(dataset))]
    references = [example["answer"] for example in examples]
    return {
        "accuracy": exact_match_accuracy(predictions, references),
        "num_examples": len(references),
        "examples": [
            {
                "image_id": example.get("image_id"),
                "prompt": example["prompt"],
                "answer": reference,
                "prediction": prediction,
            }
            for example, reference, prediction in zip(examples, references, predictions)
        ],
    }


def evaluate_easy_vqa(model, processor, limit: int | None = None, seed: int = 0, **options) -> dict:
    """Return answer accuracy on the easy-VQA test split (all 9,673 questions when `limit` is None)."""
    return evaluate_dataset(model, processor, EasyVQADataset("test", limit=limit, seed=seed), **options)


def evaluate_fashion_mnist(model, processor, limit: int | None = None, seed: int = 0, **options) -> dict:
    """Return caption accuracy and class accuracy on Fashion-MNIST test images (all 10,000 when `limit` is None)."""
    dataset = FashionMNISTDataset("test", limit=limit, seed=seed)
    results = evaluate_dataset(model, processor, dataset, **options)
    labels = [dataset[index]["label"] for index in range(len(dataset))]
    class_hits = sum(
        named_classes(example["prediction"]) == [label] for example, label in zip(results["examples"], labels)
    )
    results["class_accuracy"] = class_hits / len(labels)
    return results


EVALUATIONS = {"easy_vqa": evaluate_easy_vqa, "fashion_mnist": evaluate_fashion_mnist}


def format_markdown_table(results: dict) -> str:
    """Return a markdown table with one row per evaluated dataset."""
    lines = ["| dataset | examples | accuracy | class accuracy |", "|---|---:|---:|---:|"]
    for name, metrics in results.items():
        class_accuracy = metrics.get("class_accuracy")
        class_cell = "-" if class_accuracy is None else f"{class_accuracy:.1%}"
        lines.append(f"| {name} | {metrics['num_examples']} | {metrics['accuracy']:.1%} | {class_cell} |")
    return "\n".join(lines) + "\n"


def write_report(results: dict, output_dir: str) -> tuple[str, str]:
    """Write `results.json` (metrics and every prediction) and `results.md` (the table); return both paths."""
    os.makedirs(output_dir, exist_ok=True)
    json_path = os.path.join(output_dir, RESULTS_JSON)
    markdown_path = os.path.join(output_dir, RESULTS_MARKDOWN)
    with open(json_path, "w", encoding="utf-8") as file:
        json.dump(results, file, indent=2, ensure_ascii=False)
        file.write("\n")
    with open(markdown_path, "w", encoding="utf-8") as file:
        file.write(format_markdown_table(results))
    return json_path, markdown_path


__all__ = [
    "EVALUATIONS",
    "evaluate_dataset",
    "evaluate_easy_vqa",
    "evaluate_fashion_mnist",
    "exact_match_accuracy",
    "format_markdown_table",
    "generate_answers",
    "named_classes",
    "write_report",
]
