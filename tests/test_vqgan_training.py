import os

import pytest
import torch
from PIL import Image
from tiny import vqgan_config
from torch import nn
from transformers import AutoModel

from mmfuse import MmfuseVQGANConfig, MmfuseVQGANModel
from mmfuse.cli import main
from mmfuse.training.vqgan import (
    DeadCodeRestarter,
    EMACodebook,
    VQGANTrainingArguments,
    evaluate_vqgan,
    flat_lookup_vectors,
    images_from_pixel_values,
    load_images,
    pixel_values_from_images,
    train_vqgan,
)


def build_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return MmfuseVQGANModel(MmfuseVQGANConfig(**vqgan_config(**overrides)))


def shape_images(count=24, side=24, seed=0):
    """uint8 images `[count, 3, side, side]`: one coloured rectangle on white, like easy-VQA."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.full((count, 3, side, side), 255, dtype=torch.uint8)
    for index in range(count):
        top, left = torch.randint(0, side // 2, (2,), generator=generator).tolist()
        colour = torch.randint(0, 256, (3, 1, 1), generator=generator).to(torch.uint8)
        images[index, :, top : top + side // 3, left : left + side // 3] = colour
    return images


def test_ema_update_matches_manual_computation():
    embedding = nn.Embedding(4, 2)
    with torch.no_grad():
        embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0], [-3.0, 2.0]]))
    initial = embedding.weight.detach().clone()
    ema = EMACodebook(embedding, decay=0.9, epsilon=1e-5)
    latents = torch.tensor([[0.2, 0.0], [0.0, 0.4], [1.5, 1.0], [1.0, 2.0], [0.9, 0.3]])
    codes = torch.tensor([0, 0, 1, 1, 1])
    ema.update(latents, codes)

    counts = torch.tensor([2.0, 3.0, 0.0, 0.0])
    sums = torch.stack([latents[:2].sum(0), latents[2:].sum(0), torch.zeros(2), torch.zeros(2)])
    cluster_size = 0.9 * torch.ones(4) + 0.1 * counts
    embed_sum = 0.9 * initial + 0.1 * sums
    total = cluster_size.sum()
    smoothed = (cluster_size + 1e-5) / (total + 4 * 1e-5) * total
    expected = embed_sum / smoothed[:, None]
    assert torch.allclose(ema.cluster_size, cluster_size)
    assert torch.allclose(ema.embed_sum, embed_sum)
    assert torch.allclose(embedding.weight, expected, atol=1e-6)
    # Unused entries stay put (up to the smoothing), used ones move towards their latents' mean.
    assert torch.allclose(embedding.weight[2:], initial[2:], atol=1e-4)
    assert (embedding.weight[1] - latents[2:].mean(0)).norm() < (initial[1] - latents[2:].mean(0)).norm()
    assert embedding.weight.requires_grad is False


def test_dead_code_restart_revives_collapsed_codebook():
    model = build_model().eval()
    pixel_values = torch.rand(8, 3, 24, 24, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        latents = model.encode_latents(pixel_values)
        flat_latents = flat_lookup_vectors(model, latents)
        # Collapse: entry 0 sits at the latents' mean, every other entry far away.
        model.quantize.embedding.weight.fill_(100.0)
        model.quantize.embedding.weight[0] = flat_latents.mean(0)
    codes = model.encode(pixel_values)
    assert len(torch.unique(codes)) == 1

    restarter = DeadCodeRestarter(codebook_size=37, seed=0)
    restarter.observe(flat_latents, codes)
    restarted = restarter.restart(model.quantize)
    assert sorted(restarted.tolist()) == list(range(1, 37))
    used_after = len(torch.unique(model.encode(pixel_values)))
    assert used_after > 20
    # Usage is counted afresh after every restart.
    assert int(restarter.usage.sum()) == 0


def test_training_run_writes_samples_and_folder(tmp_path):
    model = build_model(codebook_normalization="l2")
    images = shape_images()
    args = VQGANTrainingArguments(num_steps=6, batch_size=4, sample_every=3, restart_every=2, show_progress=False)
    result = train_vqgan(model, images, str(tmp_path), args, eval_images=images[:8])

    assert [os.path.basename(path) for path in result.sample_paths] == ["step_000003.png", "step_000006.png"]
    with Image.open(result.sample_paths[-1]) as grid:
        assert grid.size == (8 * 24, 2 * 24)
    assert len(result.history) == 6
    assert set(result.before) == {"codebook_usage", "perplexity", "l1", "mse", "psnr"}
    assert result.after["l1"] < result.before["l1"]

    loaded = AutoModel.from_pretrained(tmp_path).eval()
    pixel_values = pixel_values_from_images(images_from_pixel_values(images[:2].float() / 127.5 - 1), 24)
    assert torch.equal(loaded.encode(pixel_values), model.eval().encode(pixel_values))
    assert evaluate_vqgan(loaded, images[:8]) == pytest.approx(result.after)


def test_training_with_discriminator_and_gradient_codebook(tmp_path):
    model = build_model()
    args = VQGANTrainingArguments(
        num_steps=3,
        batch_size=4,
        codebook_update="gradient",
        discriminator=True,
        discriminator_start_step=2,
        sample_every=10,
        show_progress=False,
    )
    result = train_vqgan(model, shape_images(8), str(tmp_path), args)
    assert "discriminator_loss" not in result.history[0]
    assert "discriminator_loss" in result.history[1]
    assert model.quantize.embedding.weight.requires_grad


def test_training_rejects_wrong_image_size(tmp_path):
    with pytest.raises(ValueError, match=r"\[batch_size, 3, 24, 24\].*got \[1, 3, 32, 32\]"):
        train_vqgan(build_model(), shape_images(4, side=32), str(tmp_path))


def test_training_arguments_validated():
    with pytest.raises(ValueError, match=r"codebook_update must be 'ema' or 'gradient', got 'kmeans'"):
        VQGANTrainingArguments(codebook_update="kmeans")


def test_load_images_from_folder(tmp_path):
    for index, size in enumerate([(40, 30), (20, 20)]):
        Image.new("RGB", size, (index * 100, 50, 200)).save(tmp_path / f"image_{index}.png")
    images = load_images("folder", 16, folder=str(tmp_path))
    assert images.shape == (2, 3, 16, 16)
    assert images.dtype == torch.uint8
    assert images[1, :, 0, 0].tolist() == [100, 50, 200]
    with pytest.raises(ValueError, match=r"needs an existing image folder, got '.*missing'"):
        load_images("folder", 16, folder=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty contains no image files"):
        load_images("folder", 16, folder=str(tmp_path / "empty"))


@pytest.mark.skipif(
    not os.path.exists("/usr/share/datasets/fashion-mnist"), reason="apt package dataset-fashion-mnist missing"
)
def test_train_vqgan_command_on_fashion_mnist(tmp_path, capsys):
    output = tmp_path / "vqgan"
    arguments = ["train-vqgan", "--dataset", "fashion-mnist", "--output", str(output), "--resolution", "16"]
    arguments += ["--base-channels", "8", "--channel-multipliers", "1,2", "--norm-num-groups", "4"]
    arguments += ["--latent-channels", "4", "--embed-dim", "3", "--codebook-size", "16", "--steps", "3"]
    arguments += ["--batch-size", "4", "--sample-every", "2", "--limit", "16", "--eval-images", "8"]
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    assert "codebook_usage" in printed
    assert sorted(os.listdir(output / "samples")) == ["step_000002.png", "step_000003.png"]
    model = AutoModel.from_pretrained(output)
    assert model.config.grid_size == 8
    assert model.config.codebook_size == 16
