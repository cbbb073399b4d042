import os
import subprocess

import pytest
import torch
import torch.nn.functional as F
from tiny import vqgan_config
from transformers import AutoConfig, AutoModel

from mmfuse import MmfuseVQGANConfig, MmfuseVQGANModel
from mmfuse.modeling_vqgan import codebook_perplexity


def build_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return MmfuseVQGANModel(MmfuseVQGANConfig(**vqgan_config(**overrides))).eval()


def random_pixels(batch_size=2, side=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch_size, 3, side, side, generator=generator) * 2 - 1


def test_config_grid_from_downsampling():
    config = MmfuseVQGANConfig()
    assert config.downsample_factor == 16
    assert config.grid_size == 32
    assert config.num_codes == 1024
    assert config.codebook_size == 8192
    assert config.attn_resolutions == [32]


def test_config_rejects_bad_sizes():
    with pytest.raises(ValueError, match=r"resolution=30 is not divisible by the downsampling factor 4"):
        MmfuseVQGANConfig(**vqgan_config(resolution=30))
    with pytest.raises(ValueError, match=r"norm_num_groups=5 does not divide the channel count 12"):
        MmfuseVQGANConfig(**vqgan_config(norm_num_groups=5))
    with pytest.raises(ValueError, match=r"codebook_normalization='cosine'"):
        MmfuseVQGANConfig(**vqgan_config(codebook_normalization="cosine"))


def test_forward_shapes_and_statistics():
    model = build_model()
    outputs = model(random_pixels(batch_size=3))
    assert outputs.reconstruction.shape == (3, 3, 24, 24)
    assert outputs.codes.shape == (3, 6, 6)
    assert outputs.codes.dtype == torch.long
    assert outputs.latents.shape == (3, 5, 6, 6)
    expected_perplexity, expected_usage = codebook_perplexity(outputs.codes, 37)
    assert torch.allclose(outputs.perplexity, expected_perplexity)
    assert outputs.codebook_usage == expected_usage
    expected_loss = outputs.reconstruction_loss + outputs.codebook_loss + 0.25 * outputs.commitment_loss
    assert torch.allclose(outputs.loss, expected_loss)


def test_encode_decode_round_trip_dims():
    model = build_model()
    pixel_values = random_pixels()
    codes = model.encode(pixel_values)
    assert codes.shape == (2, 6, 6)
    assert int(codes.min()) >= 0
    assert int(codes.max()) < 37
    assert torch.equal(codes, model(pixel_values).codes)
    decoded = model.decode(codes)
    assert decoded.shape == (2, 3, 24, 24)
    assert torch.equal(model.decode(codes.view(2, 36)), decoded)
    # Decoding the codes must give what forward reconstructs from the straight-through latents.
    assert torch.allclose(decoded, model(pixel_values).reconstruction, atol=1e-5)


def test_codes_are_nearest_entries():
    model = build_model()
    pixel_values = random_pixels()
    latents = model.encode_latents(pixel_values).permute(0, 2, 3, 1).reshape(-1, 5)
    expected = torch.cdist(latents, model.quantize.embedding.weight).argmin(dim=1)
    assert torch.equal(model.encode(pixel_values).flatten(), expected)


def test_l2_codes_maximise_cosine_similarity():
    model = build_model(codebook_normalization="l2")
    pixel_values = random_pixels()
    latents = model.encode_latents(pixel_values).permute(0, 2, 3, 1).reshape(-1, 5)
    similarity = F.normalize(latents, dim=1) @ F.normalize(model.quantize.embedding.weight, dim=1).t()
    assert torch.equal(model.encode(pixel_values).flatten(), similarity.argmax(dim=1))
    codes = model.encode(pixel_values)
    decoder_input = model.quantize.lookup(codes)
    assert torch.allclose(decoder_input.norm(dim=1), torch.ones(2, 6, 6))


def test_straight_through_gradient_reaches_encoder():
    model = build_model().train()
    outputs = model(random_pixels())
    outputs.reconstruction_loss.backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.decoder.conv_out.weight.grad.abs().sum() > 0
    # The reconstruction loss reaches the codebook only through the codebook loss, never through the decoder.
    assert model.quantize.embedding.weight.grad is None or model.quantize.embedding.weight.grad.abs().sum() == 0


def test_codebook_and_commitment_gradients():
    model = build_model().train()
    outputs = model(random_pixels())
    outputs.codebook_loss.backward(retain_graph=True)
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    assert model.encoder.conv_in.weight.grad is None
    model.zero_grad()
    outputs.commitment_loss.backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad is None or model.quantize.embedding.weight.grad.abs().sum() == 0


def test_perplexity_of_known_histogram():
    codes = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    perplexity, usage = codebook_perplexity(codes, codebook_size=16)
    assert torch.allclose(perplexity, torch.tensor(4.0))
    assert usage == 0.25


def test_wrong_image_size_rejected_before_compute():
    model = build_model()
    calls = []
    model.encoder.conv_in.register_forward_hook(lambda *args: calls.append(1))
    message = r"\[batch_size, 3, 24, 24\].*got \[2, 3, 32, 32\]"
    with pytest.raises(ValueError, match=message):
        model.encode(random_pixels(side=32))
    with pytest.raises(ValueError, match=message):
        model(random_pixels(side=32))
    with pytest.raises(ValueError, match=r"got \[2, 1, 24, 24\]"):
        model.encode(random_pixels()[:, :1])
    assert calls == []


def test_wrong_code_grid_rejected_before_compute():
    model = build_model()
    calls = []
    model.decoder.conv_in.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=r"\[batch_size, 6, 6\] or \[batch_size, 36\].*got \[2, 5, 5\]"):
        model.decode(torch.zeros(2, 5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"got \[2, 35\]"):
        model.decode(torch.zeros(2, 35, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 37\), got values from 37 to 37"):
        model.decode(torch.full((1, 6, 6), 37, dtype=torch.long))
    with pytest.raises(TypeError, match=r"integer tensor, got dtype torch.float32"):
        model.decode(torch.zeros(1, 6, 6))
    assert calls == []


def test_encode_only_model():
    model = build_model(has_decoder=False)
    assert model.decoder is None
    codes = model.encode(random_pixels())
    with pytest.raises(NotImplementedError, match=r"has_decoder=False"):
        model.decode(codes)
    outputs = model(random_pixels())
    assert outputs.reconstruction is None
    assert outputs.reconstruction_loss is None
    assert torch.equal(outputs.codes, codes)


def test_auto_classes_resolve_saved_folder(tmp_path):
    model = build_model(codebook_normalization="l2_decode")
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.model_type == "mmfuse_vqgan"
    assert config.auto_map["AutoModel"] == "modeling_vqgan.MmfuseVQGANModel"
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    pixel_values = random_pixels()
    assert torch.equal(loaded.encode(pixel_values), model.encode(pixel_values))
    assert torch.equal(loaded.decode(model.encode(pixel_values)), model.decode(model.encode(pixel_values)))


FRESH_PROCESS_SCRIPT = """
import sys
sys.modules["mmfuse"] = None
try:
    import mmfuse
except ImportError:
    pass
else:
    raise SystemExit("mmfuse is importable")
import torch
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
pixel_values = torch.load(sys.argv[2])
with torch.no_grad():
    codes = model.encode(pixel_values)
    decoded = model.decode(codes)
torch.save({"codes": codes, "decoded": decoded, "module": type(model).__module__}, sys.argv[3])
"""


@pytest.mark.slow
def test_fresh_process_loads_without_mmfuse(tmp_path, hub_python):
    model = build_model()
    folder = tmp_path / "vqgan"
    model.save_pretrained(folder)
    pixel_values = random_pixels()
    torch.save(pixel_values, tmp_path / "pixels.pt")
    script = tmp_path / "load.py"
    script.write_text(FRESH_PROCESS_SCRIPT)

    subprocess.run(
        [hub_python, str(script), str(folder), str(tmp_path / "pixels.pt"), str(tmp_path / "out.pt")],
        check=True,
        cwd=tmp_path,
        # 4.57 caches Hub code under the folder's base name only; a private cache keeps parallel runs apart.
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "HF_MODULES_CACHE": str(tmp_path / "modules")},
        timeout=120,
    )
    result = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        codes = model.encode(pixel_values)
        decoded = model.decode(codes)
    assert result["module"].startswith("transformers_modules")
    assert torch.equal(result["codes"], codes)
    assert torch.allclose(result["decoded"], decoded, atol=1e-6)
