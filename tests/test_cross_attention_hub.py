"""A saved cross-attention folder loads where mmfuse is not importable, on transformers 5 and 4.57.

Each check runs a fresh interpreter (`tests/subprocess_helpers.py`) and compares its logits,
greedy tokens and pipeline outputs with the process that saved the folder.
"""

import sys

import torch
from PIL import Image
from subprocess_helpers import run_hub_worker
from test_cross_attention_model import compose, open_gates
from test_pipelines import PROMPT, TEXT_ONLY_PROMPT, chat, generated_text, pipeline_calls, random_image

TEXTS = ["<image> What is in <image> the picture?", "Describe the image. <image>"]
GENERATE_KWARGS = {"do_sample": False, "max_new_tokens": 6}


def request_images() -> list:
    return [random_image(seed) for seed in (5, 6, 7)]


def test_loads_without_mmfuse(tokenizer, hub_python, tmp_path):
    """Logits, greedy tokens and both pipelines match the saving process; one worker run per version."""
    model, processor, _ = compose(tokenizer, "qwen2", cross_attention_layers=[1])
    open_gates(model)
    folder = str(tmp_path / "model")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    images = [Image.fromarray(image) for image in request_images()]
    inputs = dict(processor(text=TEXTS, images=images, padding=True, return_tensors="pt"))
    with torch.no_grad():
        logits = model(**inputs).logits
    tokens = model.generate(**inputs, **GENERATE_KWARGS)
    image, other_image = Image.fromarray(random_image(0)), Image.fromarray(random_image(1))

    def caption(text, images=None):
        return generated_text(model, processor.tokenizer, processor(text=text, images=images, return_tensors="pt"))

    chat_inputs = processor.apply_chat_template(
        chat(image), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    expected = {
        "bare": caption("<image>", [image]),
        "prompt": caption("<image>" + PROMPT, [image]),
        "other": caption("<image>", [other_image]),
        "chat": generated_text(model, processor.tokenizer, chat_inputs),
        "text_only": caption(TEXT_ONLY_PROMPT),
    }
    assert all(expected.values()), expected
    request = {
        "text": TEXTS,
        "images": [torch.from_numpy(image) for image in request_images()],
        "generate_kwargs": GENERATE_KWARGS,
        "base_model": True,
        "pipelines": pipeline_calls(),
    }

    output = run_hub_worker(folder, hub_python, request, tmp_path)

    assert output["mmfuse_importable"] is False
    if hub_python != sys.executable:
        assert output["transformers_version"].startswith("4.57"), output["transformers_version"]
    assert output["model_class"] == "MmfuseCrossAttentionForConditionalGeneration"
    assert output["processor_class"] == "MmfuseCrossAttentionProcessor"
    assert output["base_model_class"] == "MmfuseCrossAttentionModel"
    assert output["missing_keys"] == []
    assert output["unexpected_keys"] == []
    assert torch.equal(output["inputs"]["input_ids"], inputs["input_ids"])
    torch.testing.assert_close(output["logits"], logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(output["tokens"], tokens)

    bare, prompted, batched, raw, chatted, text_only = output["pipelines"]
    assert bare["pipeline_class"] == "MmfuseImageToTextPipeline"
    assert bare["output"] == [{"generated_text": expected["bare"]}]
    assert prompted["output"] == [{"generated_text": expected["prompt"]}]
    assert batched["output"] == [[{"generated_text": expected["bare"]}], [{"generated_text": expected["other"]}]]
    assert raw["pipeline_class"] == "ImageTextToTextPipeline"
    assert raw["output"] == [{"generated_text": expected["prompt"]}]
    assert chatted["output"] == [{"generated_text": expected["chat"]}]
    assert text_only["output"] == [{"generated_text": expected["text_only"]}]
