"""A saved VQ-token folder loads without mmfuse on both transformers versions and gives the same outputs."""

import numpy as np
import pytest
import torch
import transformers
from subprocess_helpers import run_hub_worker
from test_vq_model import build_vq, random_image


@pytest.fixture(scope="module")
def saved_vq(tmp_path_factory):
    model, processor, _ = build_vq(tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("vq")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor, folder


@pytest.mark.slow
def test_folder_loads_without_mmfuse(saved_vq, hub_python, tmp_path):
    model, processor, folder = saved_vq
    image = random_image(seed=5)
    text = ["<image>What is in the picture?", "a red circle <image>"]
    request = {
        "text": text,
        "images": [torch.from_numpy(np.asarray(image))] * 2,
        "generate_kwargs": {"max_new_tokens": 4, "do_sample": False},
    }
    result = run_hub_worker(folder, hub_python, request, tmp_path)
    assert not result["mmfuse_importable"]
    assert result["model_class"] == "MmfuseVQForConditionalGeneration"
    assert result["missing_keys"] == []
    assert result["unexpected_keys"] == []

    inputs = processor(text=text, images=[image, image], return_tensors="pt", padding=True)
    assert torch.equal(result["inputs"]["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(result["logits"], logits, rtol=0, atol=1e-5)
    assert torch.equal(result["tokens"], tokens)


@pytest.mark.skipif(not hasattr(transformers, "AutoModelForMultimodalLM"), reason="no any-to-any task before 5.x")
def test_any_to_any_pipeline_generates_image(saved_vq, monkeypatch):
    model, _, folder = saved_vq
    try:
        import torchvision  # noqa: F401
    except ImportError:
        # NOTE: the any-to-any pipeline demands torchvision for every model that reads images. This processor
        # never uses it, so the test skips only that import check.
        monkeypatch.setattr("transformers.pipelines.any_to_any.requires_backends", lambda *args: None)
    generator = transformers.pipeline("any-to-any", model=str(folder), trust_remote_code=True)
    output = generator(text="a red circle", generation_mode="image", generate_kwargs={"seed": 4})
    image = output[0]["generated_image"]
    assert image.size == (12, 12)

    inputs = generator.processor(text="a red circle", return_tensors="pt")
    expected = model.generate_images(**inputs, seed=4).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(expected))
