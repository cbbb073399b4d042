"""Saved folders load through transformers' Auto classes where mmfuse is not importable.

Each check runs a fresh interpreter (`tests/subprocess_helpers.py`) under this environment's
transformers and under 4.57 (`MMFUSE_COMPAT_PYTHON`), and compares its logits and greedy tokens
with the process that saved the folder.
"""

import json
import os
import re
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from subprocess_helpers import compat_python, run_hub_worker
from tiny import vision_config

from mmfuse.modeling_common import TRANSFORMERS_MAJOR

TEXTS = ["<image><image>What is in the picture?", "<image>Describe the image."]
GENERATE_KWARGS = {"do_sample": False, "max_new_tokens": 6}


def random_images(count=3, width=64, height=48):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8) for _ in range(count)]


def hub_request(**extra) -> dict:
    images = [torch.from_numpy(image) for image in random_images()]
    return {"text": TEXTS, "images": images, "generate_kwargs": GENERATE_KWARGS, **extra}


def expected_outputs(model, processor) -> dict:
    """Inputs, logits and greedy tokens of the saving process for the request of `hub_request`."""
    from PIL import Image

    images = [Image.fromarray(image) for image in random_images()]
    inputs = dict(processor(text=TEXTS, images=images, padding=True, return_tensors="pt"))
    with torch.no_grad():
        logits = model(**inputs).logits
        base_last_hidden_state = model.model(**inputs).last_hidden_state
    tokens = model.generate(**inputs, **GENERATE_KWARGS)
    return {"inputs": inputs, "logits": logits, "tokens": tokens, "base_last_hidden_state": base_last_hidden_state}


def save_folder(model, processor, folder) -> str:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def tensor_names(folder) -> list:
    with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as weights:
        return list(weights.keys())


def assert_same_outputs(output: dict, expected: dict):
    for name, value in expected["inputs"].items():
        assert torch.equal(output["inputs"][name], value), f"processor output {name} differs"
    assert torch.equal(output["logits"], expected["logits"])
    assert torch.equal(output["tokens"], expected["tokens"])


def test_saved_folder_carries_hub_code(tiny_projection, tmp_path):
    model, processor = tiny_projection
    folder = save_folder(model, processor, tmp_path / "model")
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as file:
        config = json.load(file)

    assert config["auto_map"] == {
        "AutoConfig": "configuration_projection.MmfuseProjectionConfig",
        "AutoModel": "modeling_projection.MmfuseProjectionModel",
        "AutoModelForImageTextToText": "modeling_projection.MmfuseProjectionForConditionalGeneration",
    }
    assert config["custom_pipelines"] == {
        "image-to-text": {
            "impl": "pipeline_image_to_text.MmfuseImageToTextPipeline",
            "pt": ["AutoModelForImageTextToText"],
            "tf": [],
            "type": "multimodal",
        }
    }
    python_files = sorted(name for name in os.listdir(folder) if name.endswith(".py"))
    assert "pipeline_image_to_text.py" in python_files
    for reference in config["auto_map"].values():
        assert f"{reference.split('.')[0]}.py" in python_files
    for name in python_files:
        with open(os.path.join(folder, name), encoding="utf-8") as file:
            source = file.read()
        assert not re.search(r"^\s*(from|import)\s+mmfuse\b", source, flags=re.MULTILINE), name
        assert not re.search(r"^\s*from\s+\.\.", source, flags=re.MULTILINE), name


@pytest.mark.slow
def test_loads_without_mmfuse(tiny_projection, hub_python, tmp_path):
    model, processor = tiny_projection
    folder = save_folder(model, processor, tmp_path / "model")
    expected = expected_outputs(model, processor)

    output = run_hub_worker(folder, hub_python, hub_request(base_model=True), tmp_path)

    assert output["mmfuse_importable"] is False
    if hub_python != sys.executable:
        assert output["transformers_version"].startswith("4.57"), output["transformers_version"]
    assert output["config_class"] == "MmfuseProjectionConfig"
    assert output["processor_class"] == "MmfuseProjectionProcessor"
    assert output["model_class"] == "MmfuseProjectionForConditionalGeneration"
    assert output["base_model_class"] == "MmfuseProjectionModel"
    assert output["missing_keys"] == []
    assert output["unexpected_keys"] == []
    assert output["mismatched_keys"] == []
    assert_same_outputs(output, expected)
    assert torch.equal(output["base_last_hidden_state"], expected["base_last_hidden_state"])


@pytest.mark.slow
@pytest.mark.parametrize("tower", ["clip_vision_model", "siglip_vision_model"])
def test_round_trip_through_transformers_457(make_projection, tower, tmp_path):
    """A folder saved here loads in 4.57 with the trained tower, and 4.57's re-save loads back here."""
    if TRANSFORMERS_MAJOR < 5:
        pytest.skip("this environment is the 4.57 one; the round trip starts from transformers 5")
    python_457 = compat_python()
    model, processor = make_projection(vision=vision_config(tower))
    folder = save_folder(model, processor, tmp_path / "saved_by_5")
    expected = expected_outputs(model, processor)
    # transformers 5 drops the `vision_model.` level that 4.57 expects, so 4.57 must rename the keys.
    assert any(name.startswith("model.vision_tower.embeddings.") for name in tensor_names(folder))

    folder_457 = str(tmp_path / "saved_by_457")
    output_457 = run_hub_worker(folder, python_457, hub_request(save_to=folder_457), tmp_path / "run_457")

    assert output_457["transformers_version"].startswith("4.57"), output_457["transformers_version"]
    assert output_457["missing_keys"] == []
    assert output_457["unexpected_keys"] == []
    assert_same_outputs(output_457, expected)
    assert any(name.startswith("model.vision_tower.vision_model.embeddings.") for name in tensor_names(folder_457))
    with open(os.path.join(folder_457, "config.json"), encoding="utf-8") as file:
        assert "image-to-text" in json.load(file)["custom_pipelines"]
    assert os.path.isfile(os.path.join(folder_457, "pipeline_image_to_text.py"))

    output_5 = run_hub_worker(folder_457, sys.executable, hub_request(), tmp_path / "run_5")

    assert output_5["mmfuse_importable"] is False
    assert output_5["missing_keys"] == []
    assert output_5["unexpected_keys"] == []
    assert_same_outputs(output_5, expected)
