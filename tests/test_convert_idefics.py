"""`mmfuse convert idefics`: a tiny random Idefics checkpoint becomes an mmfuse_cross_attention folder."""

import pytest
import torch
from transformers import AutoModelForImageTextToText, IdeficsConfig, IdeficsForVisionText2Text

from mmfuse.cli import main
from mmfuse.conversion.idefics import parity_inputs

IMAGE_TOKEN_ID = 97


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
