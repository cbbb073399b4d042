"""Smoke run of VQ text-to-image on easy-VQA with a tiny VQ-GAN and a tiny random Llama."""

import json
import os

import pytest
import torch
from conftest import config_from_dict
from PIL import Image
from tiny import EASY_VQA_VQGAN as TINY_VQGAN
from tiny import build_tokenizer, text_config
from transformers import AutoModelForCausalLM

pytest.importorskip("easy_vqa")

from mmfuse.demo.text_to_image import (  # noqa: E402
    TextToImageSettings,
    build_training_rows,
    prompt_for,
    run_text_to_image,
)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    output_dir = str(tmp_path_factory.mktemp("text_to_image"))
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    language_model = AutoModelForCausalLM.from_config(config_from_dict(text_config(vocab_size=len(tokenizer))))
    settings = TextToImageSettings(
        vqgan_config=TINY_VQGAN,
        vqgan_batch_size=4,
        trainable_layers=1,
        seeds_per_prompt=1,
        checker_images=40,
        max_train_images=48,
        bf16=True,  # the demo's setting on CPUs with bfloat16 instructions
        show_progress=False,
    )
    # One thread: tiny convolutions with two spinning OpenMP threads ran 30x slower on a loaded 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = run_text_to_image(
            output_dir, 12, language_model=language_model, tokenizer=tokenizer, settings=settings
        )
    finally:
        torch.set_num_threads(threads)
    return output_dir, results, settings


def test_smoke_run_writes_files(smoke_run):
    output_dir, results, _ = smoke_run
    for name in ("generated.png", "reconstructions.png", "text_to_image.json", "vqgan/config.json"):
        assert os.path.isfile(os.path.join(output_dir, name)), name
    with open(os.path.join(output_dir, "text_to_image.json"), encoding="utf-8") as file:
        stored = json.load(file)
    assert stored["accuracy"] == results["accuracy"]


def test_smoke_run_grid_size(smoke_run):
    output_dir, _, settings = smoke_run
    with Image.open(os.path.join(output_dir, "generated.png")) as grid:
        size = grid.size
    # 24 prompts (8 colours x 3 shapes) in rows, one column per seed, plus the 4 px held-out marker bar.
    assert size == (4 + 64 * settings.seeds_per_prompt, 24 * 64)


def test_smoke_run_metrics(smoke_run):
    _, results, settings = smoke_run
    for key in ("accuracy", "seen_accuracy", "held_out_accuracy", "colour_accuracy", "shape_accuracy"):
        assert 0.0 <= results[key] <= 1.0, key
    assert results["num_images"] == 24 * settings.seeds_per_prompt
    assert results["num_held_out_images"] == len(settings.held_out) * settings.seeds_per_prompt
    assert results["tokens_per_image"] == 4 * 4 + 2
    assert results["training"]["steps"] >= 1
    assert results["checker"]["accuracy"] == 1.0
    matches = sum(sample["match"] for sample in results["samples"])
    assert results["accuracy"] == matches / results["num_images"]


def test_held_out_prompts_not_trained(smoke_run):
    _, results, settings = smoke_run
    assert results["held_out_prompts"] == [prompt_for(colour, shape) for colour, shape in settings.held_out]
    assert results["training"]["training_rows"] < settings.max_train_images


def test_training_rows_label_only_the_image_span():
    from mmfuse.compose import compose_vq
    from mmfuse.configuration_vqgan import MmfuseVQGANConfig
    from mmfuse.modeling_vqgan import MmfuseVQGANModel

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    language_model = AutoModelForCausalLM.from_config(config_from_dict(text_config(vocab_size=len(tokenizer))))
    vqgan = MmfuseVQGANModel(MmfuseVQGANConfig(**TINY_VQGAN)).eval()
    model, processor = compose_vq(vqgan, language_model, tokenizer)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    rows = build_training_rows(model, processor, images, [("red", "circle"), ("blue", "triangle")])

    assert len(rows) == 2
    for (input_ids, labels), image in zip(rows, images):
        boi = int((input_ids == processor.boi_token_id).nonzero()[0])
        codes = vqgan.encode(image[None].float() / 127.5 - 1.0).flatten()
        span = input_ids[boi + 1 : boi + 1 + model.config.num_codes]
        assert torch.equal(model.model.token_ids_to_codes(span), codes)
        assert input_ids[boi + 1 + model.config.num_codes] == processor.eoi_token_id
        assert (labels[: boi + 1] == -100).all()
        assert torch.equal(labels[boi + 1 :], input_ids[boi + 1 :])
        assert processor.image_token_id not in input_ids.tolist()
    assert "draw a red circle" in tokenizer.decode(rows[0][0])


def test_invalid_held_out_pair_rejected():
    with pytest.raises(ValueError, match="purple"):
        TextToImageSettings(held_out=(("purple", "circle"),))
