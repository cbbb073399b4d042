"""`mmfuse convert chameleon`: codes and logits of a tiny random ChameleonForConditionalGeneration."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from subprocess_helpers import run_hub_worker
from tiny import build_tokenizer
from transformers import AutoTokenizer, ChameleonConfig, ChameleonForConditionalGeneration

from mmfuse.cli import main
from mmfuse.conversion.parity import synthetic_images

CODEBOOK_SIZE = 24
# 8 px images, one downsampling: a 4x4 grid of 16 codes. GroupNorm has 32 groups in Chameleon's tokenizer.
TINY_CHAMELEON_VQ = {
    "embed_dim": 8,
    "num_embeddings": CODEBOOK_SIZE,
    "latent_channels": 16,
    "resolution": 8,
    "base_channels": 32,
    "channel_multiplier": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [4],
}


def image_token_name(code: int) -> str:
    # Chameleon spells a code's digits as letters A-J between "IMGIMG" and a closing character.
    return "IMGIMG" + "".join(chr(ord("A") + int(digit)) for digit in str(code)) + "Z"


def build_chameleon(folder, shuffled: bool):
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<image>", "<racm3:break>", "<eoss>"], special_tokens=True)
    codes = list(range(CODEBOOK_SIZE))
    if shuffled:
        codes = codes[7:] + codes[:7]  # image-token ids no longer follow code order
    tokenizer.add_tokens([image_token_name(code) for code in codes])
    config = ChameleonConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        vq_config=TINY_CHAMELEON_VQ,
        vocabulary_map=tokenizer.get_vocab(),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = ChameleonForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chameleon")
    source = build_chameleon(folder / "source", shuffled=True)
    assert main(["convert", "chameleon", "--input", str(folder / "source"), "--output", str(folder / "out")]) == 0
    return source, folder


def chameleon_inputs(folder):
    from mmfuse import MmfuseVQProcessor

    processor = MmfuseVQProcessor.from_pretrained(folder)
    prompt = "<image>What is in the picture?"
    return processor(text=[prompt, prompt], images=synthetic_images(8, seed=3), return_tensors="pt")


def test_converted_codes_and_logits_match(converted):
    from mmfuse import MmfuseVQForConditionalGeneration

    source, folder = converted
    model = MmfuseVQForConditionalGeneration.from_pretrained(folder / "out").eval()
    inputs = chameleon_inputs(folder / "out")
    assert model.config.code_token_ids is not None  # the shuffled ids need the explicit table

    with torch.no_grad():
        source_codes = source.model.vqmodel.encode(inputs["pixel_values"]).image_tokens
        codes = model.vqmodel.encode(inputs["pixel_values"]).flatten()
        assert torch.equal(codes, source_codes.flatten())
        expected_ids = source.model.vocabulary_mapping.convert_img2bpe(source_codes).view(2, -1)
        assert torch.equal(model.get_image_tokens(inputs["pixel_values"]), expected_ids.long())

        reference = source.lm_head(source.model(**inputs).last_hidden_state)
        logits = model(**inputs).logits
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-4)

    # Chameleon sets image-token logits to the dtype minimum; every other column is the head's output.
    with torch.no_grad():
        masked = source(**inputs).logits
    text_columns = torch.ones(logits.shape[-1], dtype=torch.bool)
    text_columns[source.model.vocabulary_mapping.image_tokens] = False
    torch.testing.assert_close(logits[..., text_columns], masked[..., text_columns], rtol=0, atol=1e-4)


def test_converted_image_processor_matches_source(tmp_path):
    try:
        from transformers.models.chameleon.image_processing_pil_chameleon import ChameleonImageProcessorPil
    except ImportError:  # transformers 4.x: the slow processor resizes with PIL
        from transformers import ChameleonImageProcessor as ChameleonImageProcessorPil

    from mmfuse import MmfuseVQProcessor

    build_chameleon(tmp_path / "source", shuffled=False)
    source = ChameleonImageProcessorPil(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    source.save_pretrained(tmp_path / "source")
    assert main(["convert", "chameleon", "--input", str(tmp_path / "source"), "--output", str(tmp_path / "out")]) == 0

    image_processor = MmfuseVQProcessor.from_pretrained(tmp_path / "out").image_processor
    assert image_processor.crop_to_square
    assert image_processor.resample == "lanczos"
    rng = np.random.default_rng(0)
    for height, width in [(13, 21), (21, 13), (8, 8), (40, 17)]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        expected = source(image, return_tensors="pt")["pixel_values"]
        pixel_values = image_processor(image, return_tensors="pt")["pixel_values"]
        assert pixel_values.shape == expected.shape == (1, 3, 8, 8)
        torch.testing.assert_close(pixel_values, expected, rtol=0, atol=1e-5, msg=f"{height}x{width} image")


def test_contiguous_image_tokens_store_offset(tmp_path):
    build_chameleon(tmp_path / "source", shuffled=False)
    assert main(["convert", "chameleon", "--input", str(tmp_path / "source"), "--output", str(tmp_path / "out")]) == 0
    from mmfuse import MmfuseVQConfig

    config = MmfuseVQConfig.from_pretrained(tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "source")
    assert config.code_token_ids is None
    assert config.image_token_offset == tokenizer.convert_tokens_to_ids(image_token_name(0))


def test_failed_parity_writes_nothing(converted, capsys):
    _, folder = converted
    output = folder / "rejected"
    arguments = ["convert", "chameleon", "--input", str(folder / "source"), "--output", str(output)]
    assert main(arguments + ["--tolerance", "-1"]) == 1
    assert "parity check failed" in capsys.readouterr().err
    assert not os.path.exists(output)


@pytest.mark.slow
def test_converted_folder_loads_without_mmfuse(converted, hub_python, tmp_path):
    source, folder = converted
    inputs = chameleon_inputs(folder / "out")
    result = run_hub_worker(folder / "out", hub_python, {"inputs": dict(inputs)}, tmp_path)
    assert not result["mmfuse_importable"]
    assert result["model_class"] == "MmfuseVQForConditionalGeneration"
    with torch.no_grad():
        reference = source.lm_head(source.model(**inputs).last_hidden_state)
    torch.testing.assert_close(result["logits"], reference, rtol=0, atol=1e-4)
