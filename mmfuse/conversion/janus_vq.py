"""Convert transformers' JanusVQVAE (the Janus image tokenizer) into an mmfuse VQ-GAN folder.

The input is a folder written by `JanusVQVAE.save_pretrained` (model type `janus_vqgan`) or a whole Janus
model (`janus`), whose tokenizer weights sit under `model.vqmodel.`. Before anything is written, both
tokenizers encode the same test images, and the conversion fails unless the codes are identical and the
reconstructions agree within `--tolerance` (fp32).
"""

import torch
from transformers import AutoConfig
from transformers.models.janus.modeling_janus import JanusVQVAE

from ..cli import CommandError
from ..configuration_vqgan import MmfuseVQGANConfig
from ..modeling_vqgan import MmfuseVQGANModel
from ..training.vqgan import pixel_values_from_images
from .chameleon_vq import CHAMELEON_VQ_KEY_TABLE, REFERENCE_NORM_NUM_GROUPS, reject_double_latent
from .output import atomic_output_dir, check_output_dir
from .parity import ParityError, load_strictly, map_keys, read_checkpoint, require_folder, synthetic_images

# Janus names its modules like Chameleon and adds the decoder.
JANUS_VQ_KEY_TABLE = CHAMELEON_VQ_KEY_TABLE + ((r"decoder\.", "decoder."),)
# Key prefix of the image tokenizer inside a whole Janus checkpoint.
JANUS_VQ_PREFIX = "model.vqmodel."


def vqgan_config_from_janus(vq_config) -> MmfuseVQGANConfig:
    """Return the `MmfuseVQGANConfig` equivalent to a `JanusVQVAEConfig`."""
    reject_double_latent(vq_config, "the Janus VQ config")
    downsample_factor = 2 ** (len(vq_config.channel_multiplier) - 1)
    return MmfuseVQGANConfig(
        resolution=vq_config.num_patches * downsample_factor,
        in_channels=vq_config.in_channels,
        out_channels=vq_config.out_channels,
        base_channels=vq_config.base_channels,
        channel_multipliers=list(vq_config.channel_multiplier),
        num_res_blocks=vq_config.num_res_blocks,
        # Janus puts attention after every residual block of the lowest level, whose side is num_patches.
        attn_resolutions=[vq_config.num_patches],
        mid_attention=True,
        dropout=vq_config.dropout,
        norm_num_groups=REFERENCE_NORM_NUM_GROUPS,
        latent_channels=vq_config.latent_channels,
        embed_dim=vq_config.embed_dim,
        codebook_size=vq_config.num_embeddings,
        # JanusVQVAE looks codes up by plain distance but L2-normalises the entries it decodes.
        codebook_normalization="l2_decode",
        commitment_beta=getattr(vq_config, "beta", 0.25),
        has_decoder=True,
    )


def load_janus_vqvae(folder: str) -> tuple:
    """Load the source tokenizer and its state dict from a `janus_vqgan` or `janus` folder."""
    config = AutoConfig.from_pretrained(folder)
    state_dict = read_checkpoint(folder)
    if config.model_type == "janus":
        config = config.vq_config
        state_dict = {
            key[len(JANUS_VQ_PREFIX) :]: tensor
            for key, tensor in state_dict.items()
            if key.startswith(JANUS_VQ_PREFIX)
        }
    elif config.model_type != "janus_vqgan":
        raise CommandError(
            f"{folder} contains a {config.model_type!r} model; pass a folder of a JanusVQVAE ('janus_vqgan') or of a "
            "whole Janus model ('janus')."
        )
    state_dict = {key: tensor.float() if tensor.is_floating_point() else tensor for key, tensor in state_dict.items()}
    source = JanusVQVAE(config)
    load_strictly(source, state_dict, folder)
    return source.eval(), state_dict


def convert_janus_vqvae(janus_config, state_dict: dict, source: str) -> MmfuseVQGANModel:
    """Build an `MmfuseVQGANModel` from a `JanusVQVAEConfig` and its state dict, with strict key matching."""
    model = MmfuseVQGANModel(vqgan_config_from_janus(janus_config))
    load_strictly(model, map_keys(state_dict, JANUS_VQ_KEY_TABLE, source), source)
    return model.eval()


@torch.no_grad()
def check_parity(reference: JanusVQVAE, model: MmfuseVQGANModel, tolerance: float) -> dict:
    """Raise `ParityError` unless both tokenizers give the same codes and close reconstructions."""
    pixel_values = pixel_values_from_images(synthetic_images(model.config.resolution + 3), model.config.resolution)
    batch_size = pixel_values.shape[0]
    reference_codes = reference.encode(pixel_values).image_tokens.view(batch_size, -1)
    codes = model.encode(pixel_values).view(batch_size, -1)
    if not torch.equal(reference_codes, codes):
        mismatched = int((reference_codes != codes).sum())
        raise ParityError(
            f"parity check failed: {mismatched} of {codes.numel()} codes differ from the JanusVQVAE's; "
            "nothing was written."
        )
    reference_pixels = reference.decode(reference_codes)
    difference = float((reference_pixels - model.decode(codes)).abs().max())
    forward_difference = float(
        (reference(pixel_values).decoded_pixel_values - model(pixel_values).reconstruction).abs().max()
    )
    worst = max(difference, forward_difference)
    if not worst <= tolerance:  # also catches NaN
        raise ParityError(
            f"parity check failed: reconstructions differ from the JanusVQVAE's by up to {worst:.3e} "
            f"(tolerance {tolerance:.1e}); nothing was written."
        )
    return {"num_codes": codes.numel(), "max_reconstruction_difference": worst}


def add_arguments(parser) -> None:
    """No options beyond --input, --output, --overwrite and --tolerance."""


def run(args) -> int:
    check_output_dir(args.output, args.overwrite)
    require_folder(args.input, "input folder")
    reference, state_dict = load_janus_vqvae(args.input)
    model = convert_janus_vqvae(reference.config, state_dict, args.input)
    report = check_parity(reference, model, args.tolerance)

    with atomic_output_dir(args.output, args.overwrite) as staging:
        model.save_pretrained(staging)
    config = model.config
    print(
        f"Wrote {args.output} (mmfuse_vqgan, {config.resolution} px images, {config.grid_size}x{config.grid_size} "
        f"codes, codebook of {config.codebook_size}). Parity: {report['num_codes']} codes identical, max "
        f"reconstruction difference {report['max_reconstruction_difference']:.2e}."
    )
    return 0
