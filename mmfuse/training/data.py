"""Image + text datasets and the collator that turns them into chat-formatted training batches.

Every dataset yields examples of one form, a dict with

- `image`: a PIL image or a path to an image file,
- `image_id`: a string that names the image uniquely within the dataset (the feature cache keys on it),
- `prompt`: the user's text about the image,
- `answer`: the text the model learns to produce.

so the collator and the training and evaluation code work for every dataset and fusion type.
"""

import gzip
import json
import os
import string

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Class names in label order, as the Fashion-MNIST README lists them, worded for captions.
FASHION_MNIST_CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
FASHION_MNIST_PROMPT = "What is in the picture?"
JSON_LINES_FILE = "data.jsonl"
JSON_LINES_KEYS = ("image", "prompt", "answer")
IGNORE_INDEX = -100


def caption_for_label(class_name: str) -> str:
    """Return the caption `a photo of a sneaker` / `a photo of an ankle boot` for a class name."""
    article = "an" if class_name[0] in "aeiou" else "a"
    return f"a photo of {article} {class_name}"


def normalize_answer(text: str) -> str:
    """Lower-case `text`, drop punctuation and collapse whitespace, for exact-match scoring."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} is invalid; use 'train' or 'test'.")


def select_indices(num_examples: int, limit: int | None, seed: int) -> np.ndarray:
    """Return all indices, or `limit` of them drawn without replacement by a seeded generator."""
    if limit is None or limit >= num_examples:
        return np.arange(num_examples)
    if limit < 1:
        raise ValueError(f"limit={limit} is invalid; pass a positive number of examples or None for all.")
    return np.sort(np.random.default_rng(seed).choice(num_examples, size=limit, replace=False))


class EasyVQADataset(Dataset):
    """Questions and one-word answers about 64x64 images of one coloured shape (the `easy-vqa` package).

    Args:
        split: `"train"` (38,575 questions about 4,000 images) or `"test"` (9,673 about 1,000).
        limit: keep this many questions, drawn at random with `seed`; None keeps all.
    """

    def __init__(self, split: str = "train", limit: int | None = None, seed: int = 0):
        check_split(split)
        try:
            import easy_vqa
        except ImportError as error:
            raise ImportError("EasyVQADataset needs the easy-vqa package: `pip install easy-vqa`.") from error
        if split == "train":
            questions, answers, image_ids = easy_vqa.get_train_questions()
            self.image_paths = easy_vqa.get_train_image_paths()
        else:
            questions, answers, image_ids = easy_vqa.get_test_questions()
            self.image_paths = easy_vqa.get_test_image_paths()
        self.split = split
        indices = select_indices(len(questions), limit, seed)
        self.questions = [questions[index] for index in indices]
        self.answers = [answers[index] for index in indices]
        self.image_ids = [image_ids[index] for index in indices]

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, index: int) -> dict:
        image_id = self.image_ids[index]
        return {
            "image": self.image_paths[image_id],
            "image_id": f"easy_vqa/{self.split}/{image_id}",
            "prompt": self.questions[index],
            "answer": self.answers[index],
        }


def read_idx(path: str) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format: magic, dimension sizes, big-endian uint8 data)."""
    with gzip.open(path, "rb") as file:
        data = file.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {data[:4].hex()}, expected 000008xx).")
    num_dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * dim : 8 + 4 * dim], "big") for dim in range(num_dims))
    offset = 4 + 4 * num_dims
    expected = int(np.prod(shape))
    if len(data) - offset != expected:
        raise ValueError(f"{path} declares shape {shape} ({expected} bytes) but contains {len(data) - offset} bytes.")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


class FashionMNISTDataset(Dataset):
    """Fashion-MNIST product photos with captions built from their labels ("a photo of a sneaker").

    Args:
        split: `"train"` (60,000 images) or `"test"` (10,000).
        root: folder with the gzipped IDX files; Debian's `dataset-fashion-mnist` package installs
            them in `/usr/share/datasets/fashion-mnist`.
        limit: keep this many images, drawn at random with `seed`; None keeps all.
        image_size: side in pixels the 28x28 grey images are upscaled to (nearest neighbour);
            None keeps 28.
    """

    def __init__(
        self,
        split: str = "train",
        root: str = FASHION_MNIST_DIR,
        limit: int | None = None,
        seed: int = 0,
        image_size: int | None = None,
        prompt: str = FASHION_MNIST_PROMPT,
    ):
        check_split(split)
        image_file, label_file = (os.path.join(root, name) for name in FASHION_MNIST_FILES[split])
        for path in (image_file, label_file):
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"Fashion-MNIST file {path} not found; install Debian's package with "
                    "`apt-get install dataset-fashion-mnist` or pass `root=` the folder with the IDX files."
                )
        images, labels = read_idx(image_file), read_idx(label_file)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"Fashion-MNIST files disagree: images {images.shape}, labels {labels.shape}; expected "
                "[num_images, height, width] and [num_images]."
            )
        self.split = split
        self.indices = select_indices(len(labels), limit, seed)
        self.images = images
        self.labels = labels
        self.image_size = image_size
        self.prompt = prompt

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        source_index = int(self.indices[index])
        image = Image.fromarray(self.images[source_index], mode="L")
        if self.image_size is not None:
            image = image.resize((self.image_size, self.image_size), resample=Image.NEAREST)
        class_name = FASHION_MNIST_CLASSES[int(self.labels[source_index])]
        return {
            "image": image,
            "image_id": f"fashion_mnist/{self.split}/{source_index}",
            "prompt": self.prompt,
            "answer": caption_for_label(class_name),
            "label": class_name,
        }


class JsonLinesDataset(Dataset):
    """A user's own image + text pairs: a folder with `data.jsonl` and the image files.

    Each line of `data.jsonl` is an object `{"image": "relative/path.png", "prompt": "...", "answer": "..."}`
    whose image path is relative to the folder. Every line and image file is checked when the
    dataset is built, so a broken line fails before training starts.
    """

    def __init__(self, folder: str, file_name: str = JSON_LINES_FILE):
        path = os.path.join(folder, file_name)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} not found; a JSON-lines dataset folder needs a {file_name} with one "
                '{"image": ..., "prompt": ..., "answer": ...} object per line.'
            )
        self.folder = folder
        self.examples = []
        with open(path, encoding="utf-8") as file:
            for line_number, line in enumerate(file, start=1):
                if line.strip():
                    self.examples.append(self._parse_line(path, line_number, line))
        if not self.examples:
            raise ValueError(f"{path} contains no examples; add one JSON object per line.")

    def _parse_line(self, path: str, line_number: int, line: str) -> dict:
        location = f"{path}, line {line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{location}: invalid JSON ({error.msg}); write one JSON object per line.") from error
        if not isinstance(record, dict):
            raise ValueError(f"{location}: expected a JSON object, got {type(record).__name__}.")
        missing = [key for key in JSON_LINES_KEYS if key not in record]
        if missing:
            raise ValueError(
                f"{location}: missing key(s) {missing}; every line needs {list(JSON_LINES_KEYS)}, found "
                f"{sorted(record)}."
            )
        for key in JSON_LINES_KEYS:
            if not isinstance(record[key], str):
                raise TypeError(f"{location}: {key!r} must be a string, got {type(record[key]).__name__}.")
        image_path = os.path.join(self.folder, record["image"])
        if not os.path.isfile(image_path):
            raise FileNotFoundError(
                f"{location}: image file {record['image']!r} not found (looked for {image_path}); image paths "
                "are relative to the dataset folder."
            )
        return {
            "image": image_path,
            "image_id": record["image"],
            "prompt": record["prompt"],
            "answer": record["answer"],
        }

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return dict(self.examples[index])


def open_image(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    with Image.open(image) as opened:
        return opened.convert("RGB")


class VisionTextCollator:
    """Build chat-formatted batches: one image per example, prompt and answer in the processor's chat template.

    With `for_generation=False` (training) every row is the rendered user turn followed by the
    answer and the template's end-of-turn text. `labels` copy `input_ids` on the answer tokens and
    are -100 on the prompt, the image tokens and the padding, so only the answer counts in the loss. With `for_generation=True` rows end with the assistant's generation prompt, have no
    labels and are padded on the left, as `generate` needs.

    Args:
        processor: an mmfuse processor (any fusion type) with a chat template.
        padding_side: `"right"` or `"left"`; generation batches always pad on the left.
        max_length: rows longer than this raise ValueError instead of being cut silently.
    """

    def __init__(self, processor, for_generation: bool = False, padding_side: str = "right", max_length=None):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r} is invalid; use 'left' or 'right'.")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.for_generation = for_generation
        self.padding_side = "left" if for_generation else padding_side
        self.max_length = max_length
        if self.tokenizer.pad_token_id is None:
            raise ValueError("The tokenizer has no pad token; set `tokenizer.pad_token` (e.g. to the EOS token).")

    def render(self, prompt: str, answer: str | None) -> tuple[str, str]:
        """Return `(prompt_text, completion_text)`: the templated user turn and what follows it."""
        # String content in the form the processor gives chat image items: placeholder, newline, text.
        messages = [{"role": "user", "content": f"{self.processor.image_token}\n{prompt}"}]
        prompt_text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        if answer is None:
            return prompt_text, ""
        full_text = self.processor.apply_chat_template(messages + [{"role": "assistant", "content": answer}])
        if not full_text.startswith(prompt_text):
            raise ValueError(
                "The chat template renders the conversation with the answer differently from the prompt alone "
                f"(prompt {prompt_text!r}, full {full_text!r}), so prompt and answer tokens cannot be separated; "
                "use a template whose generation prompt is a prefix of the assistant turn."
            )
        return prompt_text, full_text[len(prompt_text) :]

    def __call__(self, examples: list) -> dict:
        prompts, completions = zip(
            *(self.render(ex["prompt"], None if self.for_generation else ex["answer"]) for ex in examples)
        )
        images = [open_image(example["image"]) for example in examples]
        # The processor expands the image placeholder; the completion is tokenized on its own so
        # that the label boundary falls exactly between prompt and answer tokens.
        encoded = self.processor(text=list(prompts), images=images, add_special_tokens=False)
        completion_ids = self.tokenizer(list(completions), add_special_tokens=False)["input_ids"]

        rows, label_rows = [], []
        for prompt_ids, answer_ids in zip(encoded["input_ids"], completion_ids):
            rows.append(list(prompt_ids) + list(answer_ids))
            label_rows.append([IGNORE_INDEX] * len(prompt_ids) + list(answer_ids))
        longest = max(len(row) for row in rows)
        if self.max_length is not None and longest > self.max_length:
            raise ValueError(
                f"A row has {longest} tokens but max_length={self.max_length}; raise max_length or shorten the "
                "prompt or answer (image tokens count too)."
            )

        batch = {
            "input_ids": self._pad(rows, self.tokenizer.pad_token_id, longest),
            "attention_mask": self._pad([[1] * len(row) for row in rows], 0, longest),
            "pixel_values": torch.as_tensor(np.asarray(encoded["pixel_values"])),
            "image_ids": [example.get("image_id") for example in examples],
        }
        if not self.for_generation:
            batch["labels"] = self._pad(label_rows, IGNORE_INDEX, longest)
        return batch

    def _pad(self, rows: list, value: int, length: int) -> torch.Tensor:
        padded = torch.full((len(rows), length), value, dtype=torch.long)
        for index, row in enumerate(rows):
            if self.padding_side == "right":
                padded[index, : len(row)] = torch.tensor(row, dtype=torch.long)
            else:
                padded[index, length - len(row) :] = torch.tensor(row, dtype=torch.long)
        return padded


DATASETS = {
    "easy_vqa": EasyVQADataset,
    "fashion_mnist": FashionMNISTDataset,
}


def load_dataset(name: str, split: str = "train", limit: int | None = None, seed: int = 0):
    """Return a dataset by name: `easy_vqa`, `fashion_mnist`, or a folder path of a JSON-lines dataset."""
    if name in DATASETS:
        return DATASETS[name](split=split, limit=limit, seed=seed)
    if os.path.isdir(name):
        dataset = JsonLinesDataset(name)
        if limit is not None:
            dataset.examples = [dataset.examples[index] for index in select_indices(len(dataset), limit, seed)]
        return dataset
    raise ValueError(
        f"Dataset {name!r} is neither one of {sorted(DATASETS)} nor a folder; pass a dataset name or a folder "
        f"with {JSON_LINES_FILE}."
    )


__all__ = [
    "DATASETS",
    "EasyVQADataset",
    "FASHION_MNIST_CLASSES",
    "FashionMNISTDataset",
    "JsonLinesDataset",
    "VisionTextCollator",
    "caption_for_label",
    "load_dataset",
    "normalize_answer",
    "read_idx",
]
