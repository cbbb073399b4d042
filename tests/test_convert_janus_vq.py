import os

import pytest
import torch
from tiny import text_config
from transformers import ChameleonVQVAEConfig, JanusConfig, JanusForConditionalGeneration, JanusVQVAEConfig
from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE
from transformers.models.janus.modeling_janus import JanusVQVAE

from mmfuse import MmfuseVQGANModel
from mmfuse.cli import CommandError, main
from mmfuse.conversion.chameleon_vq import convert_chameleon_vqvae, vqgan_config_from_chameleon
from mmfuse.conversion.janus_vq import vqgan_config_from_janus

# GroupNorm in both reference implementations has 32 groups, so channel counts are multiples of 32.
TINY_VQ = {
    "embed_dim": 5,
    "num_embeddings": 37,
    "latent_channels": 7,
    "base_channels": 32,
    "channel_multiplier": [1, 2],
    "num_res_blocks": 1,
}


def random_pixels(batch_size=3, side=24, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch_size, 3, side, side, generator=generator) * 2 - 1


@torch.no_grad()
def spread_codebook(model):
    """Place the codebook on encoder outputs of other images, so codes vary across positions and images."""
    latents = model.quant_conv(model.encoder(random_pixels(seed=7)))
    flat_latents = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    picks = torch.randperm(len(flat_latents), generator=torch.Generator().manual_seed(0))[:37]
    model.quantize.embedding.weight.copy_(flat_latents[picks])
    return model


def tiny_janus(seed=0, **overrides):
    torch.manual_seed(seed)
    return spread_codebook(JanusVQVAE(JanusVQVAEConfig(**{**TINY_VQ, "num_patches": 12, **overrides})).eval())


def tiny_chameleon(seed=0, **overrides):
    torch.manual_seed(seed)
    config = ChameleonVQVAEConfig(**{**TINY_VQ, "resolution": 24, "attn_resolutions": [24], **overrides})
    return spread_codebook(ChameleonVQVAE(config).eval())


def test_convert_janus_vq_command(tmp_path, capsys):
    source = tiny_janus()
    source.save_pretrained(tmp_path / "janus")

    assert main(["convert", "janus-vq", "--input", str(tmp_path / "janus"), "--output", str(tmp_path / "out")]) == 0
    assert "codes identical" in capsys.readouterr().out

    converted = MmfuseVQGANModel.from_pretrained(tmp_path / "out").eval()
    assert converted.config.codebook_normalization == "l2_decode"
    assert converted.config.resolution == 24
    pixel_values = random_pixels()
    with torch.no_grad():
        reference_codes = source.encode(pixel_values).image_tokens.view(3, 12, 12)
        codes = converted.encode(pixel_values)
        assert len(torch.unique(codes)) > 5
        assert torch.equal(codes, reference_codes)
        reference_pixels = source.decode(reference_codes.view(3, -1))
        assert (converted.decode(codes) - reference_pixels).abs().max() < 1e-4
        forward_difference = source(pixel_values).decoded_pixel_values - converted(pixel_values).reconstruction
        assert forward_difference.abs().max() < 1e-4


def test_convert_janus_vq_from_whole_janus_model(tmp_path):
    torch.manual_seed(0)
    config = JanusConfig(
        text_config=text_config(),
        vision_config={
            "hidden_size": 24,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 37,
            "image_size": 24,
            "patch_size": 2,
            "projection_dim": 32,
        },
        vq_config={**TINY_VQ, "projection_dim": 32, "image_token_embed_dim": 32},
    )
    janus = JanusForConditionalGeneration(config).eval()
    spread_codebook(janus.model.vqmodel)
    janus.save_pretrained(tmp_path / "janus")

    assert main(["convert", "janus-vq", "--input", str(tmp_path / "janus"), "--output", str(tmp_path / "out")]) == 0
    converted = MmfuseVQGANModel.from_pretrained(tmp_path / "out").eval()
    pixel_values = random_pixels()
    with torch.no_grad():
        reference_codes = janus.model.vqmodel.encode(pixel_values).image_tokens.view(3, 12, 12)
        codes = converted.encode(pixel_values)
        assert torch.equal(codes, reference_codes)
        reference_pixels = janus.model.vqmodel.decode(reference_codes.view(3, -1))
        assert (converted.decode(codes) - reference_pixels).abs().max() < 1e-4


def test_convert_janus_vq_rejects_double_latent():
    with pytest.raises(CommandError, match=r"double_latent=True"):
        vqgan_config_from_janus(JanusVQVAEConfig(**{**TINY_VQ, "num_patches": 12, "double_latent": True}))


def test_convert_janus_vq_refuses_existing_output(tmp_path, capsys):
    tiny_janus().save_pretrained(tmp_path / "janus")
    (tmp_path / "out").mkdir()
    assert main(["convert", "janus-vq", "--input", str(tmp_path / "janus"), "--output", str(tmp_path / "out")]) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err


def test_convert_janus_vq_parity_failure_writes_nothing(tmp_path, monkeypatch, capsys):
    tiny_janus().save_pretrained(tmp_path / "janus")
    # A converter that loses the decoder's last bias must fail the reconstruction check.
    from mmfuse.conversion import janus_vq

    original = janus_vq.convert_janus_vqvae

    def broken(*args, **kwargs):
        model = original(*args, **kwargs)
        with torch.no_grad():
            model.decoder.conv_out.bias.add_(0.01)
        return model

    monkeypatch.setattr(janus_vq, "convert_janus_vqvae", broken)
    assert main(["convert", "janus-vq", "--input", str(tmp_path / "janus"), "--output", str(tmp_path / "out")]) == 1
    assert "reconstructions differ from the JanusVQVAE's" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_chameleon_vq_mapping_gives_identical_codes():
    source = tiny_chameleon()
    converted = convert_chameleon_vqvae(source)
    assert converted.config.has_decoder is False
    assert converted.config.attn_resolutions == [24]
    pixel_values = random_pixels()
    with torch.no_grad():
        reference = source.encode(pixel_values).image_tokens.view(3, 12, 12)
        codes = converted.encode(pixel_values)
    assert len(torch.unique(codes)) > 5
    assert torch.equal(codes, reference)
    with pytest.raises(NotImplementedError, match=r"no decoder"):
        converted.decode(codes)


def test_chameleon_vq_mapping_without_attention():
    source = tiny_chameleon(attn_type="none")
    converted = convert_chameleon_vqvae(source)
    assert converted.config.mid_attention is False
    assert converted.config.attn_resolutions == []
    pixel_values = random_pixels()
    with torch.no_grad():
        assert torch.equal(converted.encode(pixel_values).flatten(), source.encode(pixel_values).image_tokens)


def test_chameleon_vq_rejects_unsupported_options():
    with pytest.raises(CommandError, match=r"double_latent=True"):
        vqgan_config_from_chameleon(ChameleonVQVAEConfig(**{**TINY_VQ, "resolution": 24, "double_latent": True}))
    config = ChameleonVQVAEConfig(**{**TINY_VQ, "resolution": 24})
    config.attn_type = "linear"
    with pytest.raises(CommandError, match=r"attn_type='linear'"):
        vqgan_config_from_chameleon(config)
