"""The VQ-GAN image tokenizer: convolutional encoder, vector quantizer and decoder.

The layout follows taming-transformers, and module names follow transformers' `ChameleonVQVAE` and
`JanusVQVAE` (`encoder.down.0.block.0.norm1`, `quantize.embedding`, `quant_conv`, ...), so their state
dicts load key for key. The attention, downsampling and distance arithmetic is written exactly as they
write it, so the same weights give bit-identical codes.

This file is Hub code: it imports only `torch`, `transformers` and the standard library.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput, logging

from .configuration_vqgan import MmfuseVQGANConfig

try:  # transformers 5.x: init functions that leave weights loaded from a checkpoint untouched
    from transformers import initialization as init
except ImportError:  # transformers 4.x initialises only the weights a checkpoint lacks
    from torch.nn import init

logger = logging.get_logger(__name__)


@dataclass
class MmfuseVQGANOutput(ModelOutput):
    """Output of `MmfuseVQGANModel.forward`.

    Args:
        loss: `reconstruction_loss + codebook_loss + commitment_beta * commitment_loss`.
        reconstruction: `[batch_size, out_channels, resolution, resolution]`, decoded from the quantized
            latents with the straight-through estimator, so gradients reach the encoder.
        reconstruction_loss: mean L1 or squared error between `reconstruction` and the input.
        codebook_loss: mean squared distance from the codebook entries to the (detached) latents.
        commitment_loss: mean squared distance from the latents to the (detached) entries, unweighted.
        perplexity: `exp` of the entropy of the code histogram of this batch; at most `codebook_size`.
        codebook_usage: fraction of the `codebook_size` codes that occur in this batch.
        codes: `[batch_size, grid_size, grid_size]` codebook indices.
        latents: `[batch_size, embed_dim, grid_size, grid_size]` encoder output after `quant_conv`, before
            quantization (used by dead-code restarts and EMA codebook updates).
    """

    loss: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    codebook_loss: torch.FloatTensor | None = None
    commitment_loss: torch.FloatTensor | None = None
    perplexity: torch.FloatTensor | None = None
    codebook_usage: torch.FloatTensor | None = None
    codes: torch.LongTensor | None = None
    latents: torch.FloatTensor | None = None


def swish(hidden_states: torch.Tensor) -> torch.Tensor:
    # Written as x * sigmoid(x), like the reference implementations, rather than F.silu, so results match
    # them bit for bit. Callers pass a fresh norm output, so without autograd it is multiplied in place,
    # which saves one allocation per call (about 4% of a CPU encode).
    if torch.is_grad_enabled() and hidden_states.requires_grad:
        return hidden_states * torch.sigmoid(hidden_states)
    return hidden_states.mul_(torch.sigmoid(hidden_states))


def group_norm(config: MmfuseVQGANConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=config.norm_num_groups, num_channels=channels, eps=1e-6, affine=True)


def codebook_perplexity(codes: torch.LongTensor, codebook_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the perplexity of the code histogram and the fraction of codes that occur in `codes`."""
    counts = torch.bincount(codes.flatten(), minlength=codebook_size).float()
    probabilities = counts / counts.sum()
    entropy = -(probabilities * torch.log(probabilities.clamp_min(1e-10))).sum()
    return entropy.exp(), (counts > 0).float().mean()


class MmfuseVQGANResnetBlock(nn.Module):
    def __init__(self, config: MmfuseVQGANConfig, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(config, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = group_norm(config, out_channels)
        self.dropout = nn.Dropout(config.dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        # A 1x1 convolution matches the channels of the residual path where they change.
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)
            if in_channels != out_channels
            else None
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = hidden_states if self.nin_shortcut is None else self.nin_shortcut(hidden_states)
        hidden_states = self.conv1(swish(self.norm1(hidden_states)))
        hidden_states = self.conv2(self.dropout(swish(self.norm2(hidden_states))))
        return residual + hidden_states


class MmfuseVQGANAttnBlock(nn.Module):
    """Single-head self-attention over the positions of a feature map, with 1x1 convolutions as projections."""

    def __init__(self, config: MmfuseVQGANConfig, channels: int):
        super().__init__()
        self.norm = group_norm(config, channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = self.norm(hidden_states)
        batch_size, channels, height, width = normed.shape
        query = self.q(normed).reshape(batch_size, channels, height * width).permute(0, 2, 1)  # [b, hw, c]
        key = self.k(normed).reshape(batch_size, channels, height * width)  # [b, c, hw]
        value = self.v(normed).reshape(batch_size, channels, height * width)  # [b, c, hw]

        attn_weights = F.softmax(torch.bmm(query, key) * (int(channels) ** (-0.5)), dim=2)  # [b, hw_q, hw_k]
        attn_output = torch.bmm(value, attn_weights.permute(0, 2, 1))  # [b, c, hw_q]
        attn_output = attn_output.reshape(batch_size, channels, height, width)
        return hidden_states + self.proj_out(attn_output)


class MmfuseVQGANDownsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Pad right and bottom only, as taming-transformers does, so the output side is exactly half.
        return self.conv(F.pad(hidden_states, pad=(0, 1, 0, 1), mode="constant", value=0))


class MmfuseVQGANUpsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(hidden_states, scale_factor=2.0, mode="nearest"))


class MmfuseVQGANMidBlock(nn.Module):
    def __init__(self, config: MmfuseVQGANConfig, channels: int):
        super().__init__()
        self.block_1 = MmfuseVQGANResnetBlock(config, channels, channels)
        self.attn_1 = MmfuseVQGANAttnBlock(config, channels) if config.mid_attention else nn.Identity()
        self.block_2 = MmfuseVQGANResnetBlock(config, channels, channels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(hidden_states)))


class MmfuseVQGANLevel(nn.Module):
    """Residual blocks of one resolution, each optionally followed by attention, and a resampling layer."""

    def __init__(self, config, in_channels, out_channels, num_blocks, side, resample_class, resample_name):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()
        for _ in range(num_blocks):
            self.block.append(MmfuseVQGANResnetBlock(config, in_channels, out_channels))
            in_channels = out_channels
            if side in config.attn_resolutions:
                self.attn.append(MmfuseVQGANAttnBlock(config, out_channels))
        self.resample_name = resample_name
        if resample_class is not None:
            # Named `downsample` or `upsample`, as in the checkpoints of taming-transformers and transformers.
            self.add_module(resample_name, resample_class(out_channels))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for index, block in enumerate(self.block):
            hidden_states = block(hidden_states)
            if len(self.attn) > 0:
                hidden_states = self.attn[index](hidden_states)
        resample = getattr(self, self.resample_name, None)
        return hidden_states if resample is None else resample(hidden_states)


class MmfuseVQGANEncoder(nn.Module):
    def __init__(self, config: MmfuseVQGANConfig):
        super().__init__()
        channels = config.channel_counts
        self.conv_in = nn.Conv2d(config.in_channels, config.base_channels, kernel_size=3, stride=1, padding=1)
        self.down = nn.ModuleList()
        side, in_channels = config.resolution, config.base_channels
        for level, out_channels in enumerate(channels):
            is_last = level == len(channels) - 1
            self.down.append(
                MmfuseVQGANLevel(
                    config,
                    in_channels,
                    out_channels,
                    config.num_res_blocks,
                    side,
                    None if is_last else MmfuseVQGANDownsample,
                    "downsample",
                )
            )
            in_channels, side = out_channels, side // 2
        self.mid = MmfuseVQGANMidBlock(config, channels[-1])
        self.norm_out = group_norm(config, channels[-1])
        self.conv_out = nn.Conv2d(channels[-1], config.latent_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_states = self.conv_in(pixel_values)
        for level in self.down:
            hidden_states = level(hidden_states)
        hidden_states = self.mid(hidden_states)
        return self.conv_out(swish(self.norm_out(hidden_states)))


class MmfuseVQGANDecoder(nn.Module):
    """Mirror of the encoder. `up[0]` is the lowest resolution and runs first (the order `JanusVQVAE` uses)."""

    def __init__(self, config: MmfuseVQGANConfig):
        super().__init__()
        channels = config.channel_counts
        self.conv_in = nn.Conv2d(config.latent_channels, channels[-1], kernel_size=3, stride=1, padding=1)
        self.mid = MmfuseVQGANMidBlock(config, channels[-1])
        self.up = nn.ModuleList()
        side, in_channels = config.grid_size, channels[-1]
        for level in reversed(range(len(channels))):
            out_channels = channels[level]
            self.up.append(
                MmfuseVQGANLevel(
                    config,
                    in_channels,
                    out_channels,
                    config.num_res_blocks + 1,
                    side,
                    None if level == 0 else MmfuseVQGANUpsample,
                    "upsample",
                )
            )
            in_channels, side = out_channels, side * 2
        self.norm_out = group_norm(config, channels[0])
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.mid(self.conv_in(hidden_states))
        for level in self.up:
            hidden_states = level(hidden_states)
        return self.conv_out(swish(self.norm_out(hidden_states)))


class MmfuseVQGANVectorQuantizer(nn.Module):
    """Nearest-entry lookup in a learned codebook, with the straight-through estimator."""

    def __init__(self, config: MmfuseVQGANConfig):
        super().__init__()
        self.codebook_normalization = config.codebook_normalization
        self.embedding = nn.Embedding(config.codebook_size, config.embed_dim)

    def codebook(self, for_decoding: bool = False) -> torch.Tensor:
        """`[codebook_size, embed_dim]` entries used by the lookup or, with `for_decoding`, passed to the decoder."""
        weight = self.embedding.weight
        if self.codebook_normalization == "l2" or (for_decoding and self.codebook_normalization == "l2_decode"):
            weight = F.normalize(weight, p=2, dim=-1)
        return weight

    def nearest_codes(self, flat_latents: torch.Tensor) -> torch.LongTensor:
        """Return the index of the nearest entry for each row of `flat_latents` `[num_vectors, embed_dim]`."""
        codebook = self.codebook()
        # ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e, written as the reference implementations write it.
        distances = (
            torch.sum(flat_latents**2, dim=1, keepdim=True)
            + torch.sum(codebook**2, dim=1)
            - 2 * torch.einsum("bd,dn->bn", flat_latents, codebook.transpose(0, 1))
        )
        return torch.argmin(distances, dim=1)

    def lookup(self, codes: torch.LongTensor) -> torch.Tensor:
        """Map codes `[batch_size, grid_size, grid_size]` to decoder input `[batch_size, embed_dim, h, w]`."""
        return F.embedding(codes, self.codebook(for_decoding=True)).permute(0, 3, 1, 2).contiguous()

    def forward(self, latents: torch.Tensor):
        """Quantize `latents` `[batch_size, embed_dim, h, w]`.

        Returns the straight-through quantized latents (values of the entries, gradients of the latents),
        the codes `[batch_size, h, w]`, the codebook loss and the unweighted commitment loss.
        """
        if self.codebook_normalization == "l2":
            latents = F.normalize(latents, p=2, dim=1)
        channels_last = latents.permute(0, 2, 3, 1).contiguous()  # [b, h, w, embed_dim]
        codes = self.nearest_codes(channels_last.view(-1, channels_last.shape[-1]))
        codes = codes.view(channels_last.shape[:-1])

        entries = F.embedding(codes, self.codebook())  # [b, h, w, embed_dim]
        codebook_loss = torch.mean((entries - channels_last.detach()) ** 2)
        commitment_loss = torch.mean((entries.detach() - channels_last) ** 2)

        decoded_entries = self.lookup(codes)
        quantized = latents + (decoded_entries - latents).detach()
        return quantized, codes, codebook_loss, commitment_loss


class MmfuseVQGANPreTrainedModel(PreTrainedModel):
    config_class = MmfuseVQGANConfig
    base_model_prefix = "vqgan"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["MmfuseVQGANResnetBlock", "MmfuseVQGANAttnBlock", "MmfuseVQGANVectorQuantizer"]

    def _init_weights(self, module):
        if isinstance(module, nn.Conv2d):
            # PyTorch's default for convolutions (taming-transformers trains with it) instead of transformers' N(0, 0.02).
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1] // module.groups
            init.uniform_(module.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        elif isinstance(module, nn.GroupNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            bound = 1.0 / module.num_embeddings
            init.uniform_(module.weight, -bound, bound)


class MmfuseVQGANModel(MmfuseVQGANPreTrainedModel):
    """VQ-GAN image tokenizer: `encode` turns images into codes, `decode` turns codes back into images.

    Pixel values are expected in `[-1, 1]` (mean 0.5, std 0.5 normalisation); decoded images come out in the
    same range.
    """

    def __init__(self, config: MmfuseVQGANConfig):
        super().__init__(config)
        self.encoder = MmfuseVQGANEncoder(config)
        self.quant_conv = nn.Conv2d(config.latent_channels, config.embed_dim, kernel_size=1)
        self.quantize = MmfuseVQGANVectorQuantizer(config)
        # Kept without a decoder too, because Chameleon's encode-only checkpoint stores its weights.
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.latent_channels, kernel_size=1)
        self.decoder = MmfuseVQGANDecoder(config) if config.has_decoder else None
        self.post_init()

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        """Reject images whose shape differs from `[batch_size, in_channels, resolution, resolution]`."""
        config = self.config
        expected = (config.in_channels, config.resolution, config.resolution)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape [batch_size, {expected[0]}, {expected[1]}, {expected[2]}] for this "
                f"tokenizer (resolution {config.resolution}), got {list(pixel_values.shape)}; resize the images to "
                f"{config.resolution}x{config.resolution} pixels first."
            )

    def check_codes(self, codes: torch.LongTensor) -> torch.LongTensor:
        """Return `codes` as `[batch_size, grid_size, grid_size]` or reject a grid the tokenizer cannot decode."""
        config = self.config
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise TypeError(f"codes must be an integer tensor, got dtype {codes.dtype}.")
        if codes.dim() == 2 and codes.shape[1] == config.num_codes:
            codes = codes.view(codes.shape[0], config.grid_size, config.grid_size)
        if codes.dim() != 3 or tuple(codes.shape[1:]) != (config.grid_size, config.grid_size):
            raise ValueError(
                f"codes must have shape [batch_size, {config.grid_size}, {config.grid_size}] or "
                f"[batch_size, {config.num_codes}] (the code grid of {config.resolution} px images), got "
                f"{list(codes.shape)}."
            )
        if codes.numel() and (codes.min() < 0 or codes.max() >= config.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {config.codebook_size}), got values from {int(codes.min())} to "
                f"{int(codes.max())}."
            )
        return codes

    def encode_latents(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Map `[batch_size, in_channels, resolution, resolution]` to latents `[batch_size, embed_dim, h, w]`."""
        self.check_pixel_values(pixel_values)
        pixel_values = pixel_values.to(self.quant_conv.weight.dtype)
        return self.quant_conv(self.encoder(pixel_values))

    def encode(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """Turn images `[batch_size, in_channels, resolution, resolution]` into codes `[batch_size, h, w]`.

        `h = w = config.grid_size`; every code lies in `[0, codebook_size)`.
        """
        latents = self.encode_latents(pixel_values)
        if self.config.codebook_normalization == "l2":
            latents = F.normalize(latents, p=2, dim=1)
        channels_last = latents.permute(0, 2, 3, 1).contiguous()
        codes = self.quantize.nearest_codes(channels_last.view(-1, channels_last.shape[-1]))
        return codes.view(channels_last.shape[:-1])

    def decode_quantized(self, quantized: torch.Tensor) -> torch.Tensor:
        """Decode quantized latents `[batch_size, embed_dim, h, w]` into pixel values."""
        if self.decoder is None:
            raise NotImplementedError(
                "This VQ-GAN has no decoder (config.has_decoder=False, e.g. converted from Chameleon, which ships "
                "encoder weights only), so it cannot turn codes into pixels; use a tokenizer with a decoder, "
                "trained with `mmfuse train-vqgan` or converted with `mmfuse convert janus-vq`."
            )
        return self.decoder(self.post_quant_conv(quantized))

    def decode(self, codes: torch.LongTensor) -> torch.Tensor:
        """Turn codes `[batch_size, h, w]` (or flat `[batch_size, h * w]`) into pixel values.

        Returns `[batch_size, out_channels, resolution, resolution]`, roughly in `[-1, 1]`.
        """
        codes = self.check_codes(codes)
        if self.decoder is None:
            return self.decode_quantized(None)
        return self.decode_quantized(self.quantize.lookup(codes))

    def forward(self, pixel_values: torch.Tensor, reconstruction_loss_type: str = "l1", **kwargs) -> MmfuseVQGANOutput:
        """Encode, quantize and decode `pixel_values` `[batch_size, in_channels, resolution, resolution]`.

        `reconstruction_loss_type` is `"l1"` or `"mse"`. An encode-only model returns no reconstruction and no
        reconstruction loss.
        """
        if reconstruction_loss_type not in ("l1", "mse"):
            raise ValueError(f"reconstruction_loss_type must be 'l1' or 'mse', got {reconstruction_loss_type!r}.")
        latents = self.encode_latents(pixel_values)

        quantized, codes, codebook_loss, commitment_loss = self.quantize(latents)
        with torch.no_grad():
            perplexity, codebook_usage = codebook_perplexity(codes, self.config.codebook_size)
        loss = codebook_loss + self.config.commitment_beta * commitment_loss

        reconstruction = reconstruction_loss = None
        if self.decoder is not None:
            reconstruction = self.decode_quantized(quantized)
            target = pixel_values.to(reconstruction.dtype)
            if reconstruction_loss_type == "l1":
                reconstruction_loss = F.l1_loss(reconstruction, target)
            else:
                reconstruction_loss = F.mse_loss(reconstruction, target)
            loss = loss + reconstruction_loss

        return MmfuseVQGANOutput(
            loss=loss,
            reconstruction=reconstruction,
            reconstruction_loss=reconstruction_loss,
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
            perplexity=perplexity,
            codebook_usage=codebook_usage,
            codes=codes,
            latents=latents,
        )


__all__ = ["MmfuseVQGANModel", "MmfuseVQGANOutput", "MmfuseVQGANPreTrainedModel"]
