"""Training of the VQ-GAN image tokenizer: reconstruction, straight-through quantization, codebook upkeep.

A codebook trained by gradients alone tends to collapse: a few entries win every lookup and the rest
never move. Two defences run here, both on by default:

- EMA codebook updates (VQ-VAE-2): each entry moves to an exponential moving average of the encoder
  outputs assigned to it, instead of following the codebook-loss gradient.
- Dead-code restarts (Jukebox, SoundStream): entries that no lookup chose for `restart_every` steps are
  moved onto randomly drawn recent encoder outputs, where lookups will find them.

An optional PatchGAN discriminator with hinge loss sharpens reconstructions; it is off by default.
"""

import glob
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from ..modeling_vqgan import MmfuseVQGANModel, codebook_perplexity
from .data import FASHION_MNIST_DIR, FASHION_MNIST_FILES, open_image, read_idx, select_indices

logger = logging.get_logger(__name__)

DATASETS = ("easy-vqa", "fashion-mnist", "folder")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")


# ----------------------------------------------------------------------------------------------------------------
# Images


def pixel_values_from_images(images, resolution: int) -> torch.Tensor:
    """Turn PIL images into `[batch_size, 3, resolution, resolution]` floats in `[-1, 1]`.

    Non-square images are centre-cropped to a square before the bicubic resize.
    """
    return uint8_to_pixel_values(torch.stack([square_uint8(image, resolution) for image in images]))


def square_uint8(image: Image.Image, resolution: int) -> torch.Tensor:
    """Centre-crop `image` to a square, resize it and return `[3, resolution, resolution]` uint8."""
    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != resolution:
        image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def uint8_to_pixel_values(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


def pixel_values_to_uint8(pixel_values: torch.Tensor) -> torch.Tensor:
    return ((pixel_values.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


def images_from_pixel_values(pixel_values: torch.Tensor) -> list:
    """Turn `[batch_size, 3, height, width]` values in `[-1, 1]` (e.g. `model.decode` output) into PIL images."""
    return [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in pixel_values_to_uint8(pixel_values.cpu())]


def load_images(dataset: str, resolution: int, split: str = "train", limit=None, folder=None, seed=0):
    """Load a whole image set as `[num_images, 3, resolution, resolution]` uint8 (small sets fit in memory).

    Args:
        dataset: `"easy-vqa"` (4,000 train and 1,000 test 64x64 images), `"fashion-mnist"` (60,000 and 10,000
            28x28 grey images, repeated over three channels) or `"folder"` (every image file under `folder`).
        limit: keep this many images, drawn with `seed`; None keeps all.
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset={dataset!r} is not supported; use one of {DATASETS}.")
    if dataset == "fashion-mnist":
        images_file = os.path.join(FASHION_MNIST_DIR, FASHION_MNIST_FILES[split][0])
        if not os.path.isfile(images_file):
            raise FileNotFoundError(
                f"{images_file} not found; install Fashion-MNIST with `apt-get install dataset-fashion-mnist`."
            )
        arrays = read_idx(images_file)
        arrays = arrays[select_indices(len(arrays), limit, seed)]
        pil_images = (Image.fromarray(array, mode="L") for array in arrays)
    else:
        paths = easy_vqa_paths(split) if dataset == "easy-vqa" else folder_paths(folder)
        paths = [paths[index] for index in select_indices(len(paths), limit, seed)]
        pil_images = (open_image(path) for path in paths)
    return torch.stack([square_uint8(image, resolution) for image in pil_images])


def easy_vqa_paths(split: str) -> list:
    try:
        import easy_vqa
    except ImportError as error:
        raise ImportError("The easy-vqa dataset needs the easy-vqa package: `pip install easy-vqa`.") from error
    paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
    return [paths[image_id] for image_id in sorted(paths)]


def folder_paths(folder) -> list:
    if not folder or not os.path.isdir(folder):
        raise ValueError(f"dataset='folder' needs an existing image folder, got {folder!r}.")
    paths = sorted(
        path
        for path in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
        if path.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not paths:
        raise ValueError(f"{folder} contains no image files ({', '.join(IMAGE_EXTENSIONS)}).")
    return paths


def save_reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor, path: str) -> None:
    """Save a PNG with the original images in the top row and their reconstructions below."""
    rows = [pixel_values_to_uint8(originals.cpu()), pixel_values_to_uint8(reconstructions.cpu())]
    grid = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)  # [3, 2 * height, n * width]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


# ----------------------------------------------------------------------------------------------------------------
# Codebook upkeep


def flat_lookup_vectors(model: MmfuseVQGANModel, latents: torch.Tensor) -> torch.Tensor:
    """Return the vectors the codebook lookup compares, `[batch_size * h * w, embed_dim]`."""
    if model.config.codebook_normalization == "l2":
        latents = F.normalize(latents, p=2, dim=1)
    return latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])


class EMACodebook:
    """Exponential-moving-average codebook updates with Laplace smoothing of the cluster sizes.

    For every entry k: `N_k <- decay * N_k + (1 - decay) * n_k` and `m_k <- decay * m_k + (1 - decay) * s_k`,
    where `n_k` counts the latents assigned to k in the batch and `s_k` sums them. The entry becomes
    `m_k / N~_k` with `N~_k = (N_k + epsilon) / (N + K * epsilon) * N` and `N = sum_k N_k`. Cluster sizes start
    at 1 and sums at the entries themselves, so an unused entry stays where it is.
    """

    def __init__(self, embedding: nn.Embedding, decay: float = 0.99, epsilon: float = 1e-5):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1), got {decay}.")
        self.embedding = embedding
        self.decay = decay
        self.epsilon = epsilon
        weight = embedding.weight.detach()
        self.cluster_size = torch.ones(weight.shape[0], dtype=torch.float32, device=weight.device)
        self.embed_sum = weight.float().clone()
        embedding.weight.requires_grad_(False)

    @torch.no_grad()
    def update(self, flat_latents: torch.Tensor, codes: torch.LongTensor) -> None:
        """Move the entries towards the mean of `flat_latents` `[num_vectors, embed_dim]` assigned to them."""
        codebook_size = self.cluster_size.shape[0]
        one_hot = F.one_hot(codes.flatten(), codebook_size).float()  # [num_vectors, codebook_size]
        counts = one_hot.sum(dim=0)
        sums = one_hot.t() @ flat_latents.float()  # [codebook_size, embed_dim]
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)

        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.epsilon) / (total + codebook_size * self.epsilon) * total
        self.embedding.weight.copy_((self.embed_sum / smoothed.unsqueeze(1)).to(self.embedding.weight.dtype))

    @torch.no_grad()
    def reset(self, indices: torch.LongTensor) -> None:
        """Make restarted entries their own EMA state again (cluster size 1, sum = the new entry)."""
        self.cluster_size[indices] = 1.0
        self.embed_sum[indices] = self.embedding.weight[indices].float()


class DeadCodeRestarter:
    """Counts code usage and moves entries unused for a whole window onto recent encoder outputs."""

    def __init__(self, codebook_size: int, buffer_size: int = 8192, noise: float = 0.01, seed: int = 0):
        self.usage = torch.zeros(codebook_size, dtype=torch.long)
        self.buffer_size = buffer_size
        self.noise = noise
        self.recent_latents = None
        self.generator = torch.Generator().manual_seed(seed)

    def observe(self, flat_latents: torch.Tensor, codes: torch.LongTensor) -> None:
        """Record one batch: its codes `[num_vectors]` and its lookup vectors `[num_vectors, embed_dim]`."""
        self.usage += torch.bincount(codes.flatten().cpu(), minlength=self.usage.shape[0])
        latents = flat_latents.detach().float().cpu()
        if self.recent_latents is not None:
            latents = torch.cat([latents, self.recent_latents])
        self.recent_latents = latents[: self.buffer_size]

    @torch.no_grad()
    def restart(self, quantizer) -> torch.LongTensor:
        """Move every entry unused since the last call onto a recent latent; return the moved indices.

        Latents are drawn with probability proportional to their squared distance from the nearest entry, as in
        k-means++ seeding. Restarted entries thus go where the codebook fits the encoder output worst. They do
        not land on the many latents of a plain background, which one entry already covers.
        """
        dead = torch.nonzero(self.usage == 0).flatten()
        self.usage.zero_()
        if len(dead) == 0 or self.recent_latents is None:
            return dead[:0]
        codebook = quantizer.codebook().detach().float().cpu()
        distances = torch.cdist(self.recent_latents, codebook).min(dim=1).values ** 2
        if not distances.sum() > 0:
            distances = torch.ones_like(distances)
        picks = torch.multinomial(distances, len(dead), replacement=True, generator=self.generator)
        new_entries = self.recent_latents[picks]
        # A little noise keeps two entries restarted onto the same latent from staying identical.
        new_entries = new_entries + self.noise * new_entries.std() * torch.randn(
            new_entries.shape, generator=self.generator
        )
        weight = quantizer.embedding.weight
        weight[dead.to(weight.device)] = new_entries.to(weight.device, weight.dtype)
        return dead


# ----------------------------------------------------------------------------------------------------------------
# Discriminator


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix): a stack of strided convolutions that scores overlapping patches as real or fake."""

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for index in range(1, num_layers):
            next_width = channels * min(2**index, 8)
            layers += [nn.Conv2d(width, next_width, 4, stride=2, padding=1), nn.GroupNorm(8, next_width)]
            layers.append(nn.LeakyReLU(0.2))
            width = next_width
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Score `[batch_size, channels, height, width]` images; returns `[batch_size, 1, h, w]` patch logits."""
        return self.layers(pixel_values)


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


# ----------------------------------------------------------------------------------------------------------------
# Training


@dataclass
class VQGANTrainingArguments:
    """Settings of `train_vqgan`. Steps count optimizer updates of the tokenizer."""

    num_steps: int = 400
    batch_size: int = 32
    learning_rate: float = 1e-3
    # Squared error with a Euclidean lookup kept the colours of easy-VQA's shapes, where L1 with a cosine lookup
    # reconstructed only the background within the same number of steps.
    reconstruction_loss: str = "mse"
    codebook_update: str = "ema"  # "ema" or "gradient"
    ema_decay: float = 0.95
    restart_dead_codes: bool = True
    restart_every: int = 20
    init_codebook_from_data: bool = True
    discriminator: bool = False
    discriminator_start_step: int = 200
    discriminator_weight: float = 0.1
    discriminator_learning_rate: float = 2e-4
    sample_every: int = 100
    num_samples: int = 8
    seed: int = 0
    show_progress: bool = True

    def __post_init__(self):
        if self.reconstruction_loss not in ("l1", "mse"):
            raise ValueError(f"reconstruction_loss must be 'l1' or 'mse', got {self.reconstruction_loss!r}.")
        if self.codebook_update not in ("ema", "gradient"):
            raise ValueError(f"codebook_update must be 'ema' or 'gradient', got {self.codebook_update!r}.")
        for name in ("num_steps", "batch_size", "restart_every", "sample_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")


@dataclass
class VQGANTrainingResult:
    """Figures of a training run; `before` and `after` come from `evaluate_vqgan` on the evaluation images."""

    before: dict
    after: dict
    history: list = field(default_factory=list)
    sample_paths: list = field(default_factory=list)
    output_dir: str | None = None


@torch.no_grad()
def evaluate_vqgan(model: MmfuseVQGANModel, images: torch.Tensor, batch_size: int = 64) -> dict:
    """Measure reconstruction error and codebook use of `model` on uint8 images `[num_images, 3, h, w]`.

    Returns the mean L1 and squared error on the `[-1, 1]` scale, PSNR in dB on the `[0, 1]` scale, the fraction
    of the codebook used over all images and the perplexity of the code histogram.
    """
    was_training = model.training
    model.eval()
    absolute_error = squared_error = 0.0
    all_codes = []
    for start in range(0, len(images), batch_size):
        pixel_values = uint8_to_pixel_values(images[start : start + batch_size]).to(model.device)
        codes = model.encode(pixel_values)
        all_codes.append(codes.flatten().cpu())
        if model.decoder is not None:
            reconstruction = model.decode(codes).float().clamp(-1, 1)
            absolute_error += float((reconstruction - pixel_values).abs().sum())
            squared_error += float(((reconstruction - pixel_values) ** 2).sum())
    model.train(was_training)

    perplexity, usage = codebook_perplexity(torch.cat(all_codes), model.config.codebook_size)
    metrics = {"codebook_usage": float(usage), "perplexity": float(perplexity)}
    if model.decoder is not None:
        num_values = images.numel()
        mse = squared_error / num_values
        metrics["l1"] = absolute_error / num_values
        metrics["mse"] = mse
        # Values span 2 on the [-1, 1] scale, so the [0, 1]-scale MSE is mse / 4.
        metrics["psnr"] = float(10 * np.log10(1.0 / max(mse / 4, 1e-12)))
    return metrics


def train_vqgan(
    model: MmfuseVQGANModel,
    train_images: torch.Tensor,
    output_dir: str,
    args: VQGANTrainingArguments | None = None,
    eval_images: torch.Tensor | None = None,
) -> VQGANTrainingResult:
    """Train `model` on uint8 images `[num_images, 3, resolution, resolution]` and save it to `output_dir`.

    Reconstruction grids (originals above reconstructions of `eval_images`, or of the first training images)
    go to `output_dir/samples/step_XXXXXX.png` every `sample_every` steps and after the last step. The model is
    saved with `save_pretrained`, so `AutoModel.from_pretrained(output_dir, trust_remote_code=True)` loads it.
    """
    args = args or VQGANTrainingArguments()
    if model.decoder is None:
        raise ValueError("train_vqgan needs a model with a decoder; build it with has_decoder=True.")
    model.check_pixel_values(uint8_to_pixel_values(train_images[:1]))
    eval_images = train_images[: args.num_samples * 8] if eval_images is None else eval_images
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    device = model.device
    samples = uint8_to_pixel_values(eval_images[: args.num_samples]).to(device)

    before = evaluate_vqgan(model, eval_images)
    ema = EMACodebook(model.quantize.embedding, args.ema_decay) if args.codebook_update == "ema" else None
    restarter = DeadCodeRestarter(model.config.codebook_size, seed=args.seed) if args.restart_dead_codes else None
    optimizer = torch.optim.Adam(
        [parameter for parameter in model.parameters() if parameter.requires_grad],
        lr=args.learning_rate,
        betas=(0.5, 0.9),
    )
    discriminator = discriminator_optimizer = None
    if args.discriminator:
        discriminator = PatchDiscriminator(model.config.out_channels).to(device)
        discriminator_optimizer = torch.optim.Adam(
            discriminator.parameters(), lr=args.discriminator_learning_rate, betas=(0.5, 0.9)
        )

    model.train()
    history, sample_paths = [], []
    progress = tqdm(range(1, args.num_steps + 1), desc="train-vqgan", disable=not args.show_progress)
    for step in progress:
        batch_indices = torch.randint(len(train_images), (args.batch_size,), generator=generator)
        pixel_values = uint8_to_pixel_values(train_images[batch_indices]).to(device)

        if step == 1 and args.init_codebook_from_data:
            initialize_codebook(model, pixel_values, ema, generator)
        outputs = model(pixel_values, reconstruction_loss_type=args.reconstruction_loss)
        loss = outputs.loss
        use_discriminator = discriminator is not None and step >= args.discriminator_start_step
        if use_discriminator:
            generator_loss = -discriminator(outputs.reconstruction).mean()
            loss = loss + args.discriminator_weight * generator_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        if use_discriminator:
            discriminator_loss = hinge_discriminator_loss(
                discriminator(pixel_values), discriminator(outputs.reconstruction.detach())
            )
            discriminator_optimizer.zero_grad(set_to_none=True)
            discriminator_loss.backward()
            discriminator_optimizer.step()

        flat_latents = flat_lookup_vectors(model, outputs.latents.detach())
        if ema is not None:
            ema.update(flat_latents, outputs.codes)
        if restarter is not None:
            restarter.observe(flat_latents, outputs.codes)
            if step % args.restart_every == 0:
                restarted = restarter.restart(model.quantize)
                if ema is not None and len(restarted):
                    ema.reset(restarted.to(ema.cluster_size.device))

        record = {
            "step": step,
            "loss": float(loss.detach()),
            "reconstruction_loss": float(outputs.reconstruction_loss.detach()),
            "commitment_loss": float(outputs.commitment_loss.detach()),
            "perplexity": float(outputs.perplexity.detach()),
            "codebook_usage": float(outputs.codebook_usage.detach()),
        }
        if use_discriminator:
            record["generator_loss"] = float(generator_loss.detach())
            record["discriminator_loss"] = float(discriminator_loss.detach())
        history.append(record)
        progress.set_postfix(rec=f"{record['reconstruction_loss']:.4f}", ppl=f"{record['perplexity']:.0f}")
        if step % args.sample_every == 0 or step == args.num_steps:
            sample_paths.append(save_samples(model, samples, output_dir, step))

    model.eval()
    after = evaluate_vqgan(model, eval_images)
    model.save_pretrained(output_dir)
    logger.info("VQ-GAN saved to %s: before %s, after %s", output_dir, before, after)
    return VQGANTrainingResult(
        before=before, after=after, history=history, sample_paths=sample_paths, output_dir=output_dir
    )


@torch.no_grad()
def initialize_codebook(model: MmfuseVQGANModel, pixel_values: torch.Tensor, ema, generator) -> None:
    """Place every codebook entry on a random encoder output of `pixel_values`, so training starts uncollapsed."""
    flat_latents = flat_lookup_vectors(model, model.encode_latents(pixel_values))
    codebook_size = model.config.codebook_size
    picks = torch.randint(len(flat_latents), (codebook_size,), generator=generator).to(flat_latents.device)
    model.quantize.embedding.weight.copy_(flat_latents[picks])
    if ema is not None:
        ema.reset(torch.arange(codebook_size, device=ema.cluster_size.device))


@torch.no_grad()
def save_samples(model: MmfuseVQGANModel, samples: torch.Tensor, output_dir: str, step: int) -> str:
    was_training = model.training
    model.eval()
    reconstructions = model.decode(model.encode(samples))
    model.train(was_training)
    path = os.path.join(output_dir, "samples", f"step_{step:06d}.png")
    save_reconstruction_grid(samples, reconstructions, path)
    return path


__all__ = [
    "DeadCodeRestarter",
    "EMACodebook",
    "PatchDiscriminator",
    "VQGANTrainingArguments",
    "VQGANTrainingResult",
    "evaluate_vqgan",
    "hinge_discriminator_loss",
    "images_from_pixel_values",
    "load_images",
    "pixel_values_from_images",
    "train_vqgan",
]
