import json
import os

import pytest
from PIL import Image

from mmfuse.cli import main
from mmfuse.training.data import FASHION_MNIST_DIR, JsonLinesDataset, VisionTextCollator
from mmfuse.training.evaluate import (
    evaluate_dataset,
    evaluate_easy_vqa,
    evaluate_fashion_mnist,
    exact_match_accuracy,
    format_markdown_table,
    generate_answers,
    named_classes,
    write_report,
)
from mmfuse.training.trainer import train

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


def write_colour_folder(folder, count: int):
    """A JSON-lines dataset of solid red and blue squares whose answer is their colour."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "data.jsonl"), "w", encoding="utf-8") as file:
        for index in range(count):
            colour = "red" if index % 2 == 0 else "blue"
            name = f"{index}.png"
            Image.new("RGB", (30, 30), tuple(value + index for value in COLOURS[colour])).save(
                os.path.join(folder, name)
            )
            file.write(json.dumps({"image": name, "prompt": "What color is the shape?", "answer": colour}) + "\n")
    return folder


def test_exact_match_normalises():
    assert exact_match_accuracy(["Yes.", "RED", "blue circle"], ["yes", "red", "blue"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"Got 1 predictions for 2 references"):
        exact_match_accuracy(["yes"], ["yes", "no"])


def test_named_classes():
    assert named_classes("a photo of a T-shirt.") == ["t-shirt"]
    assert named_classes("a photo of a shirt") == ["shirt"]
    assert named_classes("an ankle boot or a sneaker") == ["sneaker", "ankle boot"]
    assert named_classes("a boot") == []


def test_batched_generation_matches_single(tiny_projection):
    model, processor = tiny_projection
    dataset = [
        {
            "image": Image.new("RGB", (30, 30), (index * 60, 10, 200)),
            "image_id": str(index),
            "prompt": prompt,
            "answer": "",
        }
        for index, prompt in enumerate(["what?", "is there a red circle in the image?", "what color is the shape?"])
    ]
    batched = generate_answers(model, processor, dataset, batch_size=3, max_new_tokens=6, progress=False)
    collator = VisionTextCollator(processor, for_generation=True)
    for example, answer in zip(dataset, batched):
        inputs = collator([example])
        inputs.pop("image_ids")
        output = model.generate(
            **inputs, max_new_tokens=6, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id
        )
        single = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert answer == single.strip()
    assert any(batched)


def test_trained_model_answers_colours(tiny_projection, tmp_path):
    model, processor = tiny_projection
    dataset = JsonLinesDataset(write_colour_folder(str(tmp_path / "data"), 8))
    result = train(
        model,
        processor,
        dataset,
        str(tmp_path / "model"),
        stage="full",
        batch_size=8,
        max_steps=12,
        learning_rate=1e-2,
        save_final_model=False,
    )
    metrics = evaluate_dataset(result.model, processor, dataset, batch_size=4, max_new_tokens=4, progress=False)
    assert metrics["num_examples"] == 8
    assert [example["prediction"] for example in metrics["examples"]] == ["red", "blue"] * 4
    assert metrics["accuracy"] == 1.0


def test_easy_vqa_evaluation_fields(tiny_projection):
    model, processor = tiny_projection
    metrics = evaluate_easy_vqa(model, processor, limit=4, batch_size=4, max_new_tokens=3, progress=False)
    assert metrics["num_examples"] == 4
    predictions = [example["prediction"] for example in metrics["examples"]]
    answers = [example["answer"] for example in metrics["examples"]]
    assert metrics["accuracy"] == exact_match_accuracy(predictions, answers)
    assert all(example["image_id"].startswith("easy_vqa/test/") for example in metrics["examples"])


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_evaluation_fields(tiny_projection):
    model, processor = tiny_projection
    metrics = evaluate_fashion_mnist(model, processor, limit=3, batch_size=3, max_new_tokens=3, progress=False)
    assert metrics["num_examples"] == 3
    assert 0.0 <= metrics["class_accuracy"] <= 1.0
    assert all(example["answer"].startswith("a photo of ") for example in metrics["examples"])


def test_report_files(tmp_path):
    results = {
        "easy_vqa": {"accuracy": 0.9123, "num_examples": 100, "examples": []},
        "fashion_mnist": {"accuracy": 0.5, "class_accuracy": 0.75, "num_examples": 8, "examples": []},
    }
    json_path, markdown_path = write_report(results, str(tmp_path / "out"))
    with open(json_path, encoding="utf-8") as file:
        assert json.load(file) == results
    with open(markdown_path, encoding="utf-8") as file:
        table = file.read()
    assert table == format_markdown_table(results)
    assert "| easy_vqa | 100 | 91.2% | - |" in table
    assert "| fashion_mnist | 8 | 50.0% | 75.0% |" in table


def test_train_and_evaluate_commands(tiny_projection, tmp_path, capsys):
    model, processor = tiny_projection
    model.save_pretrained(tmp_path / "start")
    processor.save_pretrained(tmp_path / "start")
    data = write_colour_folder(str(tmp_path / "data"), 4)

    status = main(
        ["train", "--model", str(tmp_path / "start"), "--dataset", data, "--output", str(tmp_path / "trained")]
        + ["--stage", "lora", "--max-steps", "2", "--batch-size", "2", "--lora-rank", "2"]
    )
    assert status == 0
    assert "for 2 steps" in capsys.readouterr().out
    assert os.path.isfile(tmp_path / "trained" / "model.safetensors")

    status = main(
        ["evaluate", "--model", str(tmp_path / "trained"), "--datasets", data, "--output", str(tmp_path / "eval")]
        + ["--max-new-tokens", "2", "--batch-size", "4"]
    )
    assert status == 0
    assert f"| {data} | 4 |" in capsys.readouterr().out
    with open(tmp_path / "eval" / "results.json", encoding="utf-8") as file:
        assert len(json.load(file)[data]["examples"]) == 4


def test_command_errors(tiny_projection, tmp_path, capsys):
    model, processor = tiny_projection
    model.save_pretrained(tmp_path / "start")
    processor.save_pretrained(tmp_path / "start")
    arguments = ["train", "--model", str(tmp_path / "start"), "--output", str(tmp_path / "out")]
    assert main(arguments + ["--dataset", "mnist"]) == 1
    assert "Dataset 'mnist' is neither one of" in capsys.readouterr().err
    assert main(arguments + ["--dataset", "easy_vqa", "--stage", "all"]) == 1
    assert "--stage 'all' is invalid" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tmp_path / "missing")]) == 1
    assert "is not a model folder" in capsys.readouterr().err
