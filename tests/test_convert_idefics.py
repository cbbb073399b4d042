"""`mmfuse convert idefics`: a tiny random Idefics checkpoint becomes an mmfuse_cross_attention folder."""

import sys

import pytest
import torch
from PIL import Image
from subprocess_helpers import run_hub_worker
from test_pipelines import PROMPT, random_image
from tiny import build_tokenizer
from tokenizers import processors
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    IdeficsConfig,
    IdeficsForVisionText2Text,
    IdeficsImageProcessor,
    IdeficsProcessor,
)

from mmfuse.cli import main
from mmfuse.conversion.idefics import IMAGE_BOUNDARY_TOKEN, IMAGE_TOKEN, parity_inputs

IMAGE_TOKEN_ID = 97
MAX_NEW_TOKENS = 6


def idefics_config(**overrides) -> IdeficsConfig:
    values = {
        "vocab_size": 101,
        "additional_vocab_size": 0,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "cross_layer_interval": 2,
        "use_resampler": True,
        "vision_config": {
            "embed_dim": 24,
            "image_size": 30,
            "patch_size": 6,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 37,
        },
        "perceiver_config": {
            "resampler_n_latents": 5,
            "resampler_depth": 2,
            "resampler_n_heads": 2,
            "resampler_head_dim": 12,
        },
    }
    values.update(overrides)
    return IdeficsConfig(**values)


def save_source(folder, seed=0, **overrides) -> IdeficsForVisionText2Text:
    torch.manual_seed(seed)
    model = IdeficsForVisionText2Text(idefics_config(**overrides)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "alpha_" in name:
                parameter.normal_(0.0, 0.5)  # trained gates, so the image paths take part
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("alpha_type", ["float", "vector"])
def test_converted_folder_matches_source(tmp_path, alpha_type):
    source = save_source(tmp_path / "idefics", alpha_type=alpha_type)
    output = tmp_path / "converted"

    status = main(
        [
            "convert",
            "idefics",
            "--input",
            str(tmp_path / "idefics"),
            "--output",
            str(output),
            "--image-token-id",
            str(IMAGE_TOKEN_ID),
        ]
    )

    assert status == 0
    model = AutoModelForImageTextToText.from_pretrained(output).eval()
    assert type(model).__name__ == "MmfuseCrossAttentionForConditionalGeneration"
    source_inputs, converted_inputs = parity_inputs(model.config, 30)
    with torch.no_grad():
        reference = source(**source_inputs).logits
        converted = model(**converted_inputs).logits
    assert (reference - converted).abs().max() < 1e-4
    # The image paths matter: another image changes the logits after the first marker.
    converted_inputs["pixel_values"] = converted_inputs["pixel_values"].flip(-1)
    with torch.no_grad():
        changed = model(**converted_inputs).logits
    assert not torch.allclose(changed[:, 2:], converted[:, 2:], atol=1e-4)


@pytest.mark.parametrize(
    ("overrides", "option"),
    [
        ({"qk_layer_norms": True}, "qk_layer_norms=True"),
        ({"use_resampler": False}, "use_resampler=False"),
        ({"additional_vocab_size": 2}, "additional_vocab_size=2"),
        ({"cross_layer_interval": 3}, "cross_layer_interval=3"),
    ],
)
def test_rejects_options_without_counterpart(tmp_path, capsys, overrides, option):
    save_source(tmp_path / "idefics", **overrides)
    output = tmp_path / "converted"

    status = main(
        [
            "convert",
            "idefics",
            "--input",
            str(tmp_path / "idefics"),
            "--output",
            str(output),
            "--image-token-id",
            str(IMAGE_TOKEN_ID),
        ]
    )

    assert status == 1
    assert option in capsys.readouterr().err
    assert not output.exists()


def idefics_tokenizer():
    """The tiny BPE tokenizer with Idefics' image tokens, adding BOS itself as Idefics' Llama tokenizer does."""
    tokenizer = build_tokenizer()
    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, IMAGE_BOUNDARY_TOKEN]})
    return tokenizer


def save_source_with_processor(folder) -> tuple:
    """Save a tiny Idefics model with its IdeficsProcessor into `folder`; return both."""
    tokenizer = idefics_tokenizer()
    model = save_source(folder, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, alpha_type="vector")
    # transformers 5 falls back to the PIL backend when torchvision is missing; 4.x has only that one.
    processor = IdeficsProcessor(image_processor=IdeficsImageProcessor(image_size=30), tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return model, processor


def test_rejects_tokenizer_without_bos(tmp_path, capsys):
    """IdeficsProcessor writes BOS as text, so a tokenizer that does not add it gives other token ids."""
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, IMAGE_BOUNDARY_TOKEN]})
    save_source(tmp_path / "idefics", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    processor = IdeficsProcessor(image_processor=IdeficsImageProcessor(image_size=30), tokenizer=tokenizer)
    processor.save_pretrained(tmp_path / "idefics")
    output = tmp_path / "converted"

    status = main(["convert", "idefics", "--input", str(tmp_path / "idefics"), "--output", str(output)])

    assert status == 1
    assert "adds BOS itself" in capsys.readouterr().err
    assert not output.exists()


@pytest.fixture(scope="module")
def converted_idefics(tmp_path_factory):
    """Return `(source_model, source_processor, converted_folder)` for one conversion shared by the tests below."""
    folder = tmp_path_factory.mktemp("idefics")
    source, source_processor = save_source_with_processor(folder / "source")
    output = folder / "converted"
    assert main(["convert", "idefics", "--input", str(folder / "source"), "--output", str(output)]) == 0
    return source, source_processor, str(output)


def images_of(seeds) -> list:
    return [Image.fromarray(random_image(seed)) for seed in seeds]


def test_converted_processor_encodes_like_idefics(converted_idefics):
    _, source_processor, folder = converted_idefics
    processor = AutoProcessor.from_pretrained(folder)
    images = images_of([3, 4, 5])
    items = [images[0], "Is there a cat?", images[1], images[2], "Answer:"]

    source_inputs = source_processor(text=[items], return_tensors="pt")
    inputs = processor(text="<image>Is there a cat?<image><image>Answer:", images=images, return_tensors="pt")

    assert type(processor).__name__ == "MmfuseCrossAttentionProcessor"
    assert processor.image_boundary_token == IMAGE_BOUNDARY_TOKEN
    assert processor.chat_template == source_processor.tokenizer.chat_template
    assert inputs["input_ids"].tolist() == source_inputs["input_ids"].tolist()
    torch.testing.assert_close(inputs["pixel_values"], source_inputs["pixel_values"][0], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_converted_folder_without_mmfuse(converted_idefics, hub_python, tmp_path):
    """A fresh process without mmfuse reproduces the source Idefics' logits, greedy tokens and captions."""
    source, source_processor, folder = converted_idefics
    seeds = [7, 8]
    images = images_of(seeds)
    source_inputs = source_processor(text=[["User:", images[0], PROMPT, images[1], "Assistant:"]], return_tensors="pt")
    caption_inputs = source_processor(text=[[images[0], PROMPT]], return_tensors="pt")
    with torch.no_grad():
        source_logits = source(**source_inputs).logits
    source_tokens = source.generate(**source_inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    caption_tokens = source.generate(**caption_inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    prompt_length = caption_inputs["input_ids"].shape[1]
    caption = source_processor.tokenizer.decode(caption_tokens[0, prompt_length:], skip_special_tokens=True)
    assert caption, "an empty caption would make the pipeline checks trivially true"
    image = torch.from_numpy(random_image(seeds[0]))
    generate = {"max_new_tokens": MAX_NEW_TOKENS}
    request = {
        "text": f"User:<image>{PROMPT}<image>Assistant:",
        "images": [torch.from_numpy(random_image(seed)) for seed in seeds],
        "generate_kwargs": generate,
        "pipelines": [
            {"task": "image-to-text", "args": [image], "kwargs": {"prompt": PROMPT, **generate}},
            {
                "task": "image-text-to-text",
                "kwargs": {"images": [image], "text": "<image>" + PROMPT, "return_full_text": False, **generate},
            },
        ],
    }

    output = run_hub_worker(folder, hub_python, request, tmp_path)

    assert output["mmfuse_importable"] is False
    if hub_python != sys.executable:
        assert output["transformers_version"].startswith("4.57"), output["transformers_version"]
    assert output["processor_class"] == "MmfuseCrossAttentionProcessor"
    assert output["missing_keys"] == []
    assert output["unexpected_keys"] == []
    assert output["inputs"]["input_ids"].tolist() == source_inputs["input_ids"].tolist()
    assert (output["logits"] - source_logits).abs().max() < 1e-4
    assert output["tokens"].tolist() == source_tokens.tolist()
    image_to_text, image_text_to_text = output["pipelines"]
    assert image_to_text["pipeline_class"] == "MmfuseImageToTextPipeline"
    assert image_to_text["output"] == [{"generated_text": caption}]
    assert image_text_to_text["pipeline_class"] == "ImageTextToTextPipeline"
    assert image_text_to_text["output"] == [{"generated_text": caption}]
