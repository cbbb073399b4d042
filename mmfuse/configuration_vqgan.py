"""Configuration of the VQ-GAN image tokenizer (taming-transformers layout).

This file is Hub code: it imports only `transformers` and the standard library.
"""

from transformers import PretrainedConfig

CODEBOOK_NORMALIZATIONS = ("none", "l2", "l2_decode")


class MmfuseVQGANConfig(PretrainedConfig):
    r"""
    Configuration of a convolutional VQ-GAN: an encoder that downsamples an image to a grid of latents, a
    codebook that replaces each latent by its nearest entry (a code), and a decoder that turns the codes back
    into pixels. The module layout matches transformers' `ChameleonVQVAE` and `JanusVQVAE`, so their weights
    load without renaming.

    Args:
        resolution (`int`, *optional*, defaults to 512):
            Side of the square input image, in pixels. Images of another size are rejected.
        in_channels (`int`, *optional*, defaults to 3):
            Channels of the input image.
        out_channels (`int`, *optional*, defaults to 3):
            Channels of the decoded image.
        base_channels (`int`, *optional*, defaults to 128):
            Channels after the first convolution; every level multiplies it by its channel multiplier.
        channel_multipliers (`list[int]`, *optional*, defaults to `[1, 1, 2, 2, 4]`):
            One multiplier per resolution level. Every level but the last halves the resolution, so the
            downsampling factor is `2 ** (len(channel_multipliers) - 1)`.
        num_res_blocks (`int`, *optional*, defaults to 2):
            Residual blocks per encoder level; the decoder has one more per level.
        attn_resolutions (`list[int]`, *optional*):
            Feature-map sides at which every residual block is followed by a self-attention block. Defaults to
            the code grid side alone (attention at the lowest resolution, as in taming-transformers and Janus).
        mid_attention (`bool`, *optional*, defaults to `True`):
            Whether the middle blocks of encoder and decoder have a self-attention block between their two
            residual blocks.
        dropout (`float`, *optional*, defaults to 0.0):
            Dropout inside the residual blocks.
        norm_num_groups (`int`, *optional*, defaults to 32):
            Groups of every GroupNorm; must divide every channel count.
        latent_channels (`int`, *optional*, defaults to 256):
            Channels of the encoder output and of the decoder input.
        embed_dim (`int`, *optional*, defaults to 256):
            Dimension of one codebook entry (`quant_conv` maps `latent_channels` to it).
        codebook_size (`int`, *optional*, defaults to 8192):
            Number of codebook entries, i.e. of distinct codes.
        codebook_normalization (`str`, *optional*, defaults to `"none"`):
            `"none"`: nearest entry by Euclidean distance, entries used as stored (taming, Chameleon).
            `"l2"`: latents and entries are L2-normalised before the lookup and the normalised entry is
            decoded (cosine distance, as in ViT-VQGAN and LlamaGen).
            `"l2_decode"`: nearest entry by plain Euclidean distance, but the entry is L2-normalised before
            it is decoded (transformers' `JanusVQVAE`).
        commitment_beta (`float`, *optional*, defaults to 0.25):
            Weight of the commitment loss in the total loss.
        has_decoder (`bool`, *optional*, defaults to `True`):
            Set to `False` for an encode-only tokenizer (Chameleon ships no decoder weights); such a model
            cannot `decode`.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Kept for transformers' tooling; convolutions use PyTorch's default initialisation and the codebook
            a uniform one in `[-1 / codebook_size, 1 / codebook_size]`.
    """

    model_type = "mmfuse_vqgan"

    def __init__(
        self,
        resolution=512,
        in_channels=3,
        out_channels=3,
        base_channels=128,
        channel_multipliers=(1, 1, 2, 2, 4),
        num_res_blocks=2,
        attn_resolutions=None,
        mid_attention=True,
        dropout=0.0,
        norm_num_groups=32,
        latent_channels=256,
        embed_dim=256,
        codebook_size=8192,
        codebook_normalization="none",
        commitment_beta=0.25,
        has_decoder=True,
        initializer_range=0.02,
        **kwargs,
    ):
        if not channel_multipliers:
            raise ValueError("channel_multipliers is empty; give one multiplier per level, e.g. [1, 1, 2, 2, 4].")
        self.resolution = int(resolution)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.base_channels = int(base_channels)
        self.channel_multipliers = [int(multiplier) for multiplier in channel_multipliers]
        self.num_res_blocks = int(num_res_blocks)
        self.mid_attention = bool(mid_attention)
        self.dropout = float(dropout)
        self.norm_num_groups = int(norm_num_groups)
        self.latent_channels = int(latent_channels)
        self.embed_dim = int(embed_dim)
        self.codebook_size = int(codebook_size)
        self.commitment_beta = float(commitment_beta)
        self.has_decoder = bool(has_decoder)
        self.initializer_range = initializer_range

        if codebook_normalization not in CODEBOOK_NORMALIZATIONS:
            raise ValueError(
                f"codebook_normalization={codebook_normalization!r} is not supported; use one of "
                f"{CODEBOOK_NORMALIZATIONS}."
            )
        self.codebook_normalization = codebook_normalization

        if self.resolution % self.downsample_factor != 0:
            raise ValueError(
                f"resolution={self.resolution} is not divisible by the downsampling factor {self.downsample_factor} "
                f"that {len(self.channel_multipliers)} channel multipliers give; pick a multiple of "
                f"{self.downsample_factor}."
            )
        if attn_resolutions is None:
            attn_resolutions = [self.grid_size]
        self.attn_resolutions = [int(side) for side in attn_resolutions]

        for channels in self.channel_counts:
            if channels % self.norm_num_groups != 0:
                raise ValueError(
                    f"norm_num_groups={self.norm_num_groups} does not divide the channel count {channels} "
                    f"(base_channels={self.base_channels} times a multiplier of {self.channel_multipliers}); "
                    "pick base_channels as a multiple of norm_num_groups."
                )
        super().__init__(**kwargs)

    @property
    def channel_counts(self) -> list[int]:
        """Channels of every resolution level, from the input side to the code grid."""
        return [self.base_channels * multiplier for multiplier in self.channel_multipliers]

    @property
    def downsample_factor(self) -> int:
        """Pixels per code along one side."""
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def grid_size(self) -> int:
        """Side of the square grid of codes one image becomes."""
        return self.resolution // self.downsample_factor

    @property
    def num_codes(self) -> int:
        """Codes per image, `grid_size ** 2`."""
        return self.grid_size**2


__all__ = ["MmfuseVQGANConfig"]
