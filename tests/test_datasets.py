import gzip
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mmfuse.training.data import (
    FASHION_MNIST_DIR,
    IGNORE_INDEX,
    EasyVQADataset,
    FashionMNISTDataset,
    JsonLinesDataset,
    VisionTextCollator,
    caption_for_label,
    load_dataset,
    normalize_answer,
    read_idx,
)


def write_idx(path, array: np.ndarray):
    """Write `array` (uint8) as a gzipped IDX file: 0, 0, type 0x08, rank, big-endian sizes, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(size).to_bytes(4, "big") for size in array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


def write_fashion_folder(folder, images: np.ndarray, labels: np.ndarray, split="test"):
    prefix = "t10k" if split == "test" else "train"
    write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), images)
    write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), labels)


def write_jsonl_folder(folder, records, image_names=("a.png", "b.png")):
    for index, name in enumerate(image_names):
        Image.new("RGB", (20, 20), (index * 100, 0, 0)).save(os.path.join(folder, name))
    with open(os.path.join(folder, "data.jsonl"), "w", encoding="utf-8") as file:
        for record in records:
            file.write((record if isinstance(record, str) else json.dumps(record)) + "\n")


def test_easy_vqa_full_split_sizes():
    assert len(EasyVQADataset("train")) == 38575
    assert len(EasyVQADataset("test")) == 9673


def test_easy_vqa_example_fields():
    from easy_vqa import get_answers

    dataset = EasyVQADataset("test", limit=20, seed=3)
    assert len(dataset) == 20
    for example in dataset:
        assert os.path.isfile(example["image"])
        assert example["image_id"].startswith("easy_vqa/test/")
        assert example["prompt"].endswith("?")
        assert example["answer"] in get_answers()


def test_easy_vqa_limit_is_seeded():
    first = [example["prompt"] for example in EasyVQADataset("train", limit=10, seed=1)]
    again = [example["prompt"] for example in EasyVQADataset("train", limit=10, seed=1)]
    other = [example["prompt"] for example in EasyVQADataset("train", limit=10, seed=2)]
    assert first == again
    assert first != other


def test_invalid_split_names_choices():
    with pytest.raises(ValueError, match=r"split='validation' is invalid; use 'train' or 'test'"):
        EasyVQADataset("validation")


def test_caption_articles():
    assert caption_for_label("sneaker") == "a photo of a sneaker"
    assert caption_for_label("ankle boot") == "a photo of an ankle boot"


def test_normalize_answer():
    assert normalize_answer("  Yes.") == "yes"
    assert normalize_answer("A photo of a T-shirt!") == "a photo of a tshirt"
    assert normalize_answer("red \n circle") == "red circle"


def test_read_idx_roundtrip(tmp_path):
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    write_idx(tmp_path / "x.gz", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz"), array)


def test_read_idx_rejects_bad_files(tmp_path):
    with gzip.open(tmp_path / "magic.gz", "wb") as file:
        file.write(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1, 0, 0, 0, 0]))  # float32 type code
    with pytest.raises(ValueError, match=r"not an IDX file of unsigned bytes"):
        read_idx(tmp_path / "magic.gz")
    with gzip.open(tmp_path / "short.gz", "wb") as file:
        file.write(bytes([0, 0, 0x08, 1, 0, 0, 0, 4, 7, 7]))
    with pytest.raises(ValueError, match=r"declares shape \(4,\) \(4 bytes\) but contains 2 bytes"):
        read_idx(tmp_path / "short.gz")


def test_fashion_mnist_from_idx_files(tmp_path):
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    images[1, 5, 7] = 200
    write_fashion_folder(tmp_path, images, np.array([7, 9, 0], dtype=np.uint8))
    dataset = FashionMNISTDataset("test", root=str(tmp_path), image_size=56)
    assert len(dataset) == 3
    example = dataset[1]
    assert example["answer"] == "a photo of an ankle boot"
    assert example["label"] == "ankle boot"
    assert example["image_id"] == "fashion_mnist/test/1"
    assert example["image"].size == (56, 56)
    # Nearest-neighbour upscaling by 2 turns pixel (row 5, column 7) into a 2x2 block.
    assert np.asarray(example["image"])[10:12, 14:16].tolist() == [[200, 200], [200, 200]]
    assert dataset[0]["answer"] == "a photo of a sneaker"
    assert dataset[2]["answer"] == "a photo of a t-shirt"


def test_fashion_mnist_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist"):
        FashionMNISTDataset("test", root=str(tmp_path))


def test_fashion_mnist_count_mismatch(tmp_path):
    write_fashion_folder(tmp_path, np.zeros((3, 28, 28), dtype=np.uint8), np.zeros(2, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"images \(3, 28, 28\), labels \(2,\)"):
        FashionMNISTDataset("test", root=str(tmp_path))


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_installed_files():
    dataset = FashionMNISTDataset("test")
    assert len(dataset) == 10000
    assert np.bincount(dataset.labels).tolist() == [1000] * 10
    # The first test image of Fashion-MNIST is an ankle boot (label 9).
    assert dataset[0]["answer"] == "a photo of an ankle boot"
    assert dataset[0]["image"].size == (28, 28)
    assert len(FashionMNISTDataset("train", limit=5)) == 5


def test_jsonl_folder_loads(tmp_path):
    records = [
        {"image": "a.png", "prompt": "What colour?", "answer": "black"},
        {"image": "b.png", "prompt": "What colour?", "answer": "dark red"},
    ]
    write_jsonl_folder(tmp_path, records)
    dataset = JsonLinesDataset(str(tmp_path))
    assert len(dataset) == 2
    assert dataset[1]["answer"] == "dark red"
    assert dataset[1]["image_id"] == "b.png"
    assert dataset[1]["image"] == os.path.join(str(tmp_path), "b.png")
    assert len(load_dataset(str(tmp_path), limit=1)) == 1


@pytest.mark.parametrize(
    "bad_line, error, message",
    [
        ('{"image": "a.png", "prompt": "Q?"}', ValueError, r"line 2: missing key\(s\) \['answer'\]"),
        ('{"image": "gone.png", "prompt": "Q?", "answer": "A"}', FileNotFoundError, r"line 2: image file 'gone.png'"),
        ("{not json", ValueError, r"line 2: invalid JSON"),
        ('["a.png", "Q?", "A"]', ValueError, r"line 2: expected a JSON object, got list"),
        ('{"image": "a.png", "prompt": "Q?", "answer": 3}', TypeError, r"line 2: 'answer' must be a string, got int"),
    ],
)
def test_jsonl_errors_name_line(tmp_path, bad_line, error, message):
    write_jsonl_folder(tmp_path, [{"image": "a.png", "prompt": "Q?", "answer": "A"}, bad_line])
    with pytest.raises(error, match=message):
        JsonLinesDataset(str(tmp_path))


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.jsonl not found"):
        JsonLinesDataset(str(tmp_path))


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match=r"Dataset 'mnist' is neither one of \['easy_vqa', 'fashion_mnist'\]"):
        load_dataset("mnist")


def examples():
    image = Image.new("RGB", (40, 40), (255, 0, 0))
    return [
        {"image": image, "image_id": "red", "prompt": "what color is the shape?", "answer": "red"},
        {"image": image, "image_id": "red", "prompt": "is there a circle in the image?", "answer": "no, it is red"},
    ]


def test_collator_labels_only_answer(tiny_projection):
    model, processor = tiny_projection
    batch = VisionTextCollator(processor)(examples())
    tokenizer = processor.tokenizer
    for row, answer in enumerate(["red", "no, it is red"]):
        labels = batch["labels"][row]
        answer_ids = batch["input_ids"][row][labels != IGNORE_INDEX]
        assert tokenizer.decode(answer_ids) == f"{answer}<|im_end|>\n"
        assert torch.equal(labels[labels != IGNORE_INDEX], answer_ids)
        image_positions = batch["input_ids"][row] == model.config.image_token_id
        assert int(image_positions.sum()) == model.config.num_image_tokens
        assert bool((labels[image_positions] == IGNORE_INDEX).all())
        assert bool((labels[batch["attention_mask"][row] == 0] == IGNORE_INDEX).all())


def test_collator_rows_match_chat_template(tiny_projection):
    _, processor = tiny_projection
    batch = VisionTextCollator(processor)(examples())
    image = examples()[0]["image"]
    conversation = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "what color is the shape?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ]
    reference = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt")
    length = int(batch["attention_mask"][0].sum())
    assert batch["input_ids"][0, :length].tolist() == reference["input_ids"][0].tolist()
    torch.testing.assert_close(batch["pixel_values"][:1], reference["pixel_values"])


def test_collator_padding_sides(tiny_projection):
    _, processor = tiny_projection
    pad_id = processor.tokenizer.pad_token_id
    train_batch = VisionTextCollator(processor)(examples())
    assert train_batch["attention_mask"][0, -1] == 0
    assert train_batch["input_ids"][0, -1] == pad_id
    left_batch = VisionTextCollator(processor, padding_side="left")(examples())
    assert left_batch["attention_mask"][0, 0] == 0
    assert left_batch["labels"][0, 0] == IGNORE_INDEX

    generation_batch = VisionTextCollator(processor, for_generation=True)(examples())
    assert "labels" not in generation_batch
    assert generation_batch["attention_mask"][:, -1].tolist() == [1, 1]
    prompt = processor.tokenizer.decode(generation_batch["input_ids"][1])
    assert prompt.endswith("<|im_start|>assistant\n")
    assert generation_batch["pixel_values"].shape == (2, 3, 30, 30)
    assert generation_batch["image_ids"] == ["red", "red"]


def test_collator_max_length(tiny_projection):
    _, processor = tiny_projection
    with pytest.raises(ValueError, match=r"A row has \d+ tokens but max_length=30"):
        VisionTextCollator(processor, max_length=30)(examples())
    with pytest.raises(ValueError, match=r"padding_side='top' is invalid"):
        VisionTextCollator(processor, padding_side="top")
