"""A saved VQ-token folder loads without mmfuse on both transformers versions and gives the same outputs."""

import importlib.util
import sys

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from subprocess_helpers import run_hub_worker
from test_pipelines import PROMPT, TEXT_ONLY_PROMPT, chat, generated_text, pipeline_calls
from test_pipelines import random_image as random_array
from test_vq_model import build_vq, random_image


@pytest.fixture(scope="module")
def saved_vq(tmp_path_factory):
    model, processor, _ = build_vq(tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("vq")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor, folder


def expected_pipeline_texts(model, processor) -> dict:
    """Texts of `model.generate` for the calls of `test_pipelines.pipeline_calls`, in the saving process."""
    image, other_image = Image.fromarray(random_array(0)), Image.fromarray(random_array(1))

    def caption(text, images=None):
        return generated_text(model, processor.tokenizer, processor(text=text, images=images, return_tensors="pt"))

    chat_inputs = processor.apply_chat_template(
        chat(image), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    return {
        "bare": caption("<image>", [image]),
        "prompt": caption("<image>" + PROMPT, [image]),
        "other": caption("<image>", [other_image]),
        "chat": generated_text(model, processor.tokenizer, chat_inputs),
        # Text generation forbids image tokens outside an image span, so the reference is the model's own
        # `generate` rather than the plain LM.
        "text_only": caption(TEXT_ONLY_PROMPT),
    }


@pytest.mark.slow
def test_folder_and_pipelines_without_mmfuse(saved_vq, hub_python, tmp_path):
    """Loading, `generate` and both text pipelines in one worker, which saves a process start per version."""
    model, processor, folder = saved_vq
    image = random_image(seed=5)
    text = ["<image>What is in the picture?", "a red circle <image>"]
    request = {
        "text": text,
        "images": [torch.from_numpy(np.asarray(image))] * 2,
        "generate_kwargs": {"max_new_tokens": 4, "do_sample": False},
        "pipelines": pipeline_calls(),
    }
    expected = expected_pipeline_texts(model, processor)
    # A model that stops at once would make every pipeline comparison below trivially true.
    assert all(expected.values()), expected

    result = run_hub_worker(folder, hub_python, request, tmp_path)
    assert not result["mmfuse_importable"]
    if hub_python != sys.executable:
        assert result["transformers_version"].startswith("4.57"), result["transformers_version"]
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

    bare, prompted, batched, raw, chatted, text_only = result["pipelines"]
    assert bare["pipeline_class"] == "MmfuseImageToTextPipeline"
    assert bare["output"] == [{"generated_text": expected["bare"]}]
    assert prompted["output"] == [{"generated_text": expected["prompt"]}]
    assert batched["output"] == [[{"generated_text": expected["bare"]}], [{"generated_text": expected["other"]}]]
    assert raw["pipeline_class"] == "ImageTextToTextPipeline"
    assert raw["output"] == [{"generated_text": expected["prompt"]}]
    assert chatted["output"] == [{"generated_text": expected["chat"]}]
    assert text_only["output"] == [{"generated_text": expected["text_only"]}]


def torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


# transformers 5.25's any-to-any pipeline calls `requires_backends(self, "torchvision")` in `__init__` for every
# model whose `input_modalities` include images, although this processor never uses torchvision. Declaring the
# model text-only, or shipping a pipeline class that skips that check, would only hide the requirement, so the
# test runs where torchvision is installed: the timm environment (`make test` runs the `timm` marker there).
@pytest.mark.timm
@pytest.mark.skipif(not hasattr(transformers, "AutoModelForMultimodalLM"), reason="no any-to-any task before 5.x")
@pytest.mark.skipif(
    not torchvision_available(), reason="the any-to-any pipeline needs torchvision, see `make venv-timm`"
)
def test_any_to_any_pipeline_generates_image(saved_vq):
    model, _, folder = saved_vq
    generator = transformers.pipeline("any-to-any", model=str(folder), trust_remote_code=True)
    output = generator(text="a red circle", generation_mode="image", generate_kwargs={"seed": 4})
    image = output[0]["generated_image"]
    assert image.size == (12, 12)

    inputs = generator.processor(text="a red circle", return_tensors="pt")
    expected = model.generate_images(**inputs, seed=4).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(expected))
