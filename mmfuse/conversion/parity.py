"""Proof that a converted model equals its source: strict key mapping, logits and greedy tokens.

Converters rename checkpoint keys with an explicit table (`map_keys`), load them so that every
source tensor is used and every parameter is set (`load_strictly`), and compare the two models
on the same inputs (`compare_outputs`) before anything is written.
"""

import json
import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from ..cli import CommandError
from ..modeling_common import TRANSFORMERS_MAJOR

CHECKPOINT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# `from_pretrained` keywords that load a model in fp32, where parity checks run.
FP32_LOAD_KWARGS = {"dtype": torch.float32} if TRANSFORMERS_MAJOR >= 5 else {"torch_dtype": torch.float32}
# `from_pretrained` keywords that pick the PIL image-processor backend, whose resize MmfuseImageProcessor
# reproduces; with torchvision installed, 5.x otherwise picks the torch backend.
PIL_BACKEND_KWARGS = {"backend": "pil"} if TRANSFORMERS_MAJOR >= 5 else {"use_fast": False}


class ParityError(CommandError):
    """The converted model does not reproduce its source; nothing is written."""


@dataclass
class ModelOutputs:
    """Outputs a parity check compares: logits on fixed inputs and the greedy continuation."""

    logits: torch.Tensor  # [batch_size, seq_len, vocab_size], fp32
    new_tokens: list = field(default_factory=list)  # one list of generated token ids per prompt


@dataclass
class ParityReport:
    max_logit_difference: float
    num_compared_logits: int
    new_tokens: list


def add_parity_arguments(parser) -> None:
    """Add the parity-check options that every converter shares besides --tolerance."""
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=8,
        help="Number of greedy tokens that both models generate in the parity check.",
    )


def require_folder(path: str, what: str, required_files=("config.json",)) -> None:
    """Raise `CommandError` unless `path` is a readable folder that contains `required_files`."""
    if not os.path.exists(path):
        raise CommandError(f"{what} {path} does not exist; pass the folder that contains config.json.")
    if not os.path.isdir(path):
        raise CommandError(f"{what} {path} is not a folder; pass the folder that contains config.json.")
    if not os.access(path, os.R_OK | os.X_OK):
        raise CommandError(f"{what} {path} is not readable; check its permissions.")
    for name in required_files:
        file_path = os.path.join(path, name)
        if not os.path.isfile(file_path):
            raise CommandError(f"{what} {path} has no {name}; pass a folder written by save_pretrained.")
        if not os.access(file_path, os.R_OK):
            raise CommandError(f"{file_path} is not readable; check its permissions.")


def read_checkpoint(folder: str) -> dict:
    """Read every tensor of a transformers checkpoint folder (safetensors or .bin, sharded or not)."""

    def load_one(path):
        if path.endswith(".safetensors"):
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)

    for name in CHECKPOINT_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            if not name.endswith(".index.json"):
                return load_one(path)
            with open(path, encoding="utf-8") as file:
                shards = sorted(set(json.load(file)["weight_map"].values()))
            state_dict = {}
            for shard in shards:
                state_dict.update(load_one(os.path.join(folder, shard)))
            return state_dict
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise CommandError(f"could not read the weights in {path}: {error}") from error
    raise CommandError(f"{folder} contains no weights; expected one of {', '.join(CHECKPOINT_FILES)}.")


def map_keys(state_dict: dict, table, source: str) -> dict:
    """Rename checkpoint keys with an explicit table of `(source pattern, target prefix)` rules.

    Each pattern is a regular expression matched at the start of the key; the matched prefix is
    replaced by the target prefix. Every key must match exactly one rule, so the result does not
    depend on the order of the table, and two source keys must never map to one target key.
    """
    compiled = [(re.compile(pattern), target) for pattern, target in table]
    mapped = {}
    origin = {}
    for key, tensor in state_dict.items():
        matches = [(pattern, target) for pattern, target in compiled if pattern.match(key)]
        if not matches:
            raise CommandError(
                f"weight {key!r} in {source} matches no rule of the key table; it is not a known layout."
            )
        if len(matches) > 1:
            raise CommandError(
                f"weight {key!r} in {source} matches {len(matches)} rules of the key table "
                f"({', '.join(pattern.pattern for pattern, _ in matches)}); the table is ambiguous."
            )
        pattern, target = matches[0]
        new_key = target + key[pattern.match(key).end() :]
        if new_key in mapped:
            raise CommandError(f"weights {origin[new_key]!r} and {key!r} in {source} both map to {new_key!r}.")
        mapped[new_key] = tensor
        origin[new_key] = key
    return mapped


def load_strictly(model: torch.nn.Module, state_dict: dict, source: str, tied_keys=()) -> None:
    """Load `state_dict` into `model` so that every tensor is used and every parameter is set.

    Keys in `tied_keys` may be absent because the model shares them with another parameter
    (an output embedding tied to the input embedding).
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict) - set(tied_keys))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise CommandError(
            f"the weights in {source} do not fit the converted model: {len(missing)} missing "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}."
        )
    mismatched = [key for key, tensor in state_dict.items() if tensor.shape != expected[key].shape]
    if mismatched:
        key = mismatched[0]
        raise CommandError(
            f"weight {key!r} in {source} has shape {tuple(state_dict[key].shape)}, the converted model "
            f"expects {tuple(expected[key].shape)} ({len(mismatched)} mismatched in total)."
        )
    model.load_state_dict(state_dict, strict=False)
    if tied_keys:
        model.tie_weights()


def synthetic_images(size: int, count: int = 2, seed: int = 0) -> list:
    """Return `count` square RGB test images of `size` pixels: smooth gradients plus noise.

    The odd side and the texture make a wrong resize, crop or channel order change pixel values.
    """
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 255.0, size)
    images = []
    for index in range(count):
        red = np.add.outer(ramp, ramp) / 2.0
        green = np.add.outer(ramp[::-1], ramp) / 2.0
        blue = np.full((size, size), 40.0 + 60.0 * index)
        pixels = np.stack([red, green, blue], axis=-1) + rng.normal(0.0, 25.0, (size, size, 3))
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return images


@torch.no_grad()
def model_outputs(model, inputs: dict, max_new_tokens: int, pad_token_id: int | None = None) -> ModelOutputs:
    """Run a transformers model on `inputs`: fp32 logits and `max_new_tokens` greedy tokens per prompt."""
    model.eval()
    logits = model(**inputs).logits.float()
    generated = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_token_id
    )
    prompt_length = inputs["input_ids"].shape[1] if "input_ids" in inputs else 0
    return ModelOutputs(logits=logits, new_tokens=generated[:, prompt_length:].tolist())


def compare_outputs(reference: ModelOutputs, converted: ModelOutputs, tolerance: float) -> ParityReport:
    """Raise `ParityError` unless logits agree within `tolerance` and greedy tokens are identical."""
    if reference.logits.shape != converted.logits.shape:
        raise ParityError(
            f"parity check failed: logits have shape {tuple(converted.logits.shape)}, the source "
            f"gives {tuple(reference.logits.shape)}; nothing was written."
        )
    difference = float((reference.logits - converted.logits).abs().max())
    if not difference <= tolerance:  # also catches NaN
        raise ParityError(
            f"parity check failed: logits differ from the source by up to {difference:.3e} "
            f"(tolerance {tolerance:.1e}); nothing was written."
        )
    if reference.new_tokens != converted.new_tokens:
        raise ParityError(
            f"parity check failed: greedy tokens {converted.new_tokens} differ from the source's "
            f"{reference.new_tokens}; nothing was written."
        )
    return ParityReport(
        max_logit_difference=difference,
        num_compared_logits=reference.logits.numel(),
        new_tokens=converted.new_tokens,
    )
