"""Both pipelines on a saved folder, in a fresh process without mmfuse, on transformers 5 and 4.57.

The expected texts come from `model.generate` in the saving process. A text-only prompt through
`image-text-to-text` must give the tokens of the plain LM that the model was composed from.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from subprocess_helpers import run_hub_worker
from transformers import AutoModelForCausalLM, pipeline

MAX_NEW_TOKENS = 5
PROMPT = "What is in the picture?"
TEXT_ONLY_PROMPT = "Describe the image."


def random_image(seed: int, width=64, height=48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def chat(image) -> list:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": PROMPT}]}]


def generated_text(model, tokenizer, inputs) -> str:
    """Greedy continuation of `inputs`, decoded without the prompt and special tokens."""
    tokens = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    return tokenizer.decode(tokens[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def plain_language_model(model):
    """The causal LM inside `model`, as a standalone transformers model with the same weights."""
    language_model = AutoModelForCausalLM.from_config(model.config.text_config).eval()
    language_model.get_decoder().load_state_dict(model.language_model.state_dict())
    language_model.get_output_embeddings().load_state_dict(model.lm_head.state_dict())
    return language_model


def expected_texts(model, processor) -> dict:
    image, other_image = Image.fromarray(random_image(0)), Image.fromarray(random_image(1))

    def caption(text, images):
        return generated_text(model, processor.tokenizer, processor(text=text, images=images, return_tensors="pt"))

    chat_inputs = processor.apply_chat_template(
        chat(image), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    language_model = plain_language_model(model)
    text_inputs = processor.tokenizer(TEXT_ONLY_PROMPT, return_tensors="pt")
    return {
        "bare": caption("<image>", [image]),
        "prompt": caption("<image>" + PROMPT, [image]),
        "other": caption("<image>", [other_image]),
        "raw": caption("<image>" + PROMPT, [image]),
        "chat": generated_text(model, processor.tokenizer, chat_inputs),
        "text_only": generated_text(language_model, processor.tokenizer, text_inputs),
    }


def pipeline_calls() -> list:
    image, other_image = torch.from_numpy(random_image(0)), torch.from_numpy(random_image(1))
    generate = {"max_new_tokens": MAX_NEW_TOKENS}
    text_to_text = {"return_full_text": False, **generate}
    return [
        {"task": "image-to-text", "args": [image], "kwargs": generate},
        {"task": "image-to-text", "args": [image], "kwargs": {"prompt": PROMPT, **generate}},
        {"task": "image-to-text", "args": [[image, other_image]], "kwargs": {"batch_size": 2, **generate}},
        {"task": "image-text-to-text", "kwargs": {"images": [image], "text": "<image>" + PROMPT, **text_to_text}},
        {"task": "image-text-to-text", "kwargs": {"text": chat(image), **text_to_text}},
        {"task": "image-text-to-text", "kwargs": {"text": TEXT_ONLY_PROMPT, **text_to_text}},
    ]


@pytest.mark.slow
def test_pipelines_without_mmfuse(tiny_projection, hub_python, tmp_path):
    model, processor = tiny_projection
    folder = str(tmp_path / "model")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    expected = expected_texts(model, processor)
    # A model that stops at once would make every comparison below trivially true.
    assert all(expected.values()), expected

    output = run_hub_worker(folder, hub_python, {"pipelines": pipeline_calls()}, tmp_path)
    bare, prompted, batched, raw, chatted, text_only = output["pipelines"]

    assert output["mmfuse_importable"] is False
    assert bare["pipeline_class"] == "MmfuseImageToTextPipeline"
    assert bare["output"] == [{"generated_text": expected["bare"]}]
    assert prompted["output"] == [{"generated_text": expected["prompt"]}]
    assert batched["output"] == [[{"generated_text": expected["bare"]}], [{"generated_text": expected["other"]}]]
    assert raw["pipeline_class"] == "ImageTextToTextPipeline"
    assert raw["output"] == [{"generated_text": expected["raw"]}]
    assert chatted["output"] == [{"generated_text": expected["chat"]}]
    assert text_only["output"] == [{"generated_text": expected["text_only"]}]


def test_image_to_text_in_saving_process(tiny_projection, tmp_path):
    """With mmfuse imported, the folder's own pipeline still wins over transformers' task redirect."""
    model, processor = tiny_projection
    folder = str(tmp_path / "model")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    image = Image.fromarray(random_image(0))
    inputs = processor(text="<image>", images=[image], return_tensors="pt")
    expected = generated_text(model, processor.tokenizer, inputs)

    captioner = pipeline("image-to-text", model=folder, trust_remote_code=True)

    assert type(captioner).__name__ == "MmfuseImageToTextPipeline"
    assert captioner(image, max_new_tokens=MAX_NEW_TOKENS) == [{"generated_text": expected}]
    with pytest.raises(ValueError, match="needs an image"):
        captioner()
    with pytest.raises(TypeError, match="one string for all images"):
        captioner(image, prompt=["a", "b"])
