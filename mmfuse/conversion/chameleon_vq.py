"""Mapping of transformers' `ChameleonVQVAE` (the image tokenizer inside Chameleon) onto `MmfuseVQGANModel`.

`ChameleonVQVAE` has an encoder, a codebook, `quant_conv` and `post_quant_conv` but no decoder, so the result
is an encode-only tokenizer (`has_decoder=False`) that gives the same codes for the same images. The Chameleon
converter uses these functions for the tokenizer part of a full Chameleon checkpoint.
"""

import torch

from ..cli import CommandError
from ..configuration_vqgan import MmfuseVQGANConfig
from ..modeling_vqgan import MmfuseVQGANModel
from .parity import load_strictly, map_keys

# Chameleon's module names are the mmfuse VQ-GAN's, so every key keeps its name.
CHAMELEON_VQ_KEY_TABLE = (
    (r"encoder\.", "encoder."),
    (r"quantize\.", "quantize."),
    (r"quant_conv\.", "quant_conv."),
    (r"post_quant_conv\.", "post_quant_conv."),
)

# GroupNorm groups that transformers' Chameleon and Janus VQ modules hard-code.
REFERENCE_NORM_NUM_GROUPS = 32


def reject_double_latent(vq_config, source: str) -> None:
    if getattr(vq_config, "double_latent", False):
        raise CommandError(
            f"{source} has double_latent=True, which the mmfuse VQ-GAN does not support (its encoder output then "
            "has twice the channels that quant_conv takes); convert a tokenizer with double_latent=False."
        )


def vqgan_config_from_chameleon(vq_config) -> MmfuseVQGANConfig:
    """Return the encode-only `MmfuseVQGANConfig` equivalent to a `ChameleonVQVAEConfig`."""
    reject_double_latent(vq_config, "the Chameleon VQ config")
    attn_type = getattr(vq_config, "attn_type", "vanilla")
    # transformers 4.57 spells "no attention" None, but 5.25 configs take only strings, so "none" is accepted too.
    if attn_type not in ("vanilla", None, "none"):
        raise CommandError(
            f"the Chameleon VQ config has attn_type={attn_type!r}; only 'vanilla' (self-attention blocks) and None "
            "or 'none' (no attention) have an mmfuse equivalent."
        )
    uses_attention = attn_type == "vanilla"
    return MmfuseVQGANConfig(
        resolution=vq_config.resolution,
        in_channels=vq_config.in_channels,
        out_channels=vq_config.in_channels,
        base_channels=vq_config.base_channels,
        channel_multipliers=list(vq_config.channel_multiplier),
        num_res_blocks=vq_config.num_res_blocks,
        attn_resolutions=list(vq_config.attn_resolutions or []) if uses_attention else [],
        mid_attention=uses_attention,
        dropout=vq_config.dropout,
        norm_num_groups=REFERENCE_NORM_NUM_GROUPS,
        latent_channels=vq_config.latent_channels,
        embed_dim=vq_config.embed_dim,
        codebook_size=vq_config.num_embeddings,
        codebook_normalization="none",
        commitment_beta=getattr(vq_config, "beta", 0.25),
        has_decoder=False,
    )


def vqgan_state_dict_from_chameleon(state_dict: dict, prefix: str = "", source: str = "the Chameleon VQ weights"):
    """Return the `MmfuseVQGANModel` state dict of the `ChameleonVQVAE` weights under `prefix`.

    `prefix` selects the tokenizer inside a bigger checkpoint, e.g. `"model.vqmodel."` for
    `ChameleonForConditionalGeneration`; keys outside it are ignored, every key inside it must map.
    """
    selected = {key[len(prefix) :]: tensor for key, tensor in state_dict.items() if key.startswith(prefix)}
    if not selected:
        raise CommandError(f"{source} contain no key that starts with {prefix!r}; no VQ tokenizer found.")
    return map_keys(selected, CHAMELEON_VQ_KEY_TABLE, source)


def convert_chameleon_vqvae(chameleon_vqvae: torch.nn.Module) -> MmfuseVQGANModel:
    """Build an encode-only `MmfuseVQGANModel` with the weights of a transformers `ChameleonVQVAE`."""
    model = MmfuseVQGANModel(vqgan_config_from_chameleon(chameleon_vqvae.config))
    state_dict = vqgan_state_dict_from_chameleon(chameleon_vqvae.state_dict())
    load_strictly(model, state_dict, "the ChameleonVQVAE")
    return model.eval()


__all__ = [
    "CHAMELEON_VQ_KEY_TABLE",
    "convert_chameleon_vqvae",
    "vqgan_config_from_chameleon",
    "vqgan_state_dict_from_chameleon",
]
