"""Random models of every fusion type around one LM size, and prompts for them.

Weight values do not change speed or memory, so these models are randomly initialised. The sections that
compare against a transformers reference copy the weights between the two models instead.
"""

import torch
from transformers import AutoModelForCausalLM

from mmfuse import (
    MmfuseCrossAttentionConfig,
    MmfuseCrossAttentionForConditionalGeneration,
    MmfuseProjectionConfig,
    MmfuseProjectionForConditionalGeneration,
    MmfuseVQConfig,
    MmfuseVQForConditionalGeneration,
)


def model_sizes(tiny: bool) -> dict:
    """Vision and text configs: a realistic small size by default, a tiny one for smoke tests."""
    if tiny:
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        vision.update(image_size=32, patch_size=8)
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        text.update(num_key_value_heads=4, vocab_size=512)
    else:
        vision = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6)
        vision.update(image_size=224, patch_size=16)
        text = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=12, num_attention_heads=8)
        text.update(num_key_value_heads=8, vocab_size=32000)
    vision["model_type"] = "clip_vision_model"
    text.update(model_type="llama", max_position_embeddings=8192, pad_token_id=0, eos_token_id=2, bos_token_id=1)
    return {"vision": vision, "text": text}


def resampler_sizes(tiny: bool) -> dict:
    """Perceiver resampler and gated cross-attention settings shared by the cross-attention sections."""
    if tiny:
        return dict(resampler_num_latents=4, resampler_depth=1, resampler_num_heads=2, resampler_head_dim=16)
    return dict(resampler_num_latents=64, resampler_depth=2, resampler_num_heads=6, resampler_head_dim=64)


def cross_attention_interval(tiny: bool) -> int:
    return 2 if tiny else 4


def vqgan_sizes(tiny: bool) -> dict:
    """VQ-GAN image tokenizer settings as `MmfuseVQGANConfig` keywords.

    The default is a 128 px tokenizer with Chameleon's five levels, downsampling 16 (an 8x8 grid, 64 codes per
    image), and a codebook of 8192. GroupNorm has 32 groups, as in Chameleon's tokenizer, so that the same sizes build a
    transformers `ChameleonVQVAE`.
    """
    if tiny:
        values = dict(resolution=16, base_channels=32, channel_multipliers=[1, 2, 2], codebook_size=64)
        values.update(latent_channels=16, embed_dim=8)
    else:
        values = dict(resolution=128, base_channels=64, channel_multipliers=[1, 1, 2, 2, 4], codebook_size=8192)
        values.update(latent_channels=64, embed_dim=64)
    values.update(num_res_blocks=1, attn_resolutions=[], mid_attention=True, norm_num_groups=32)
    return values


def build_language_model(tiny: bool):
    """Build the bare LM of every fusion model, in eval mode."""
    torch.manual_seed(0)
    config = MmfuseProjectionConfig(text_config=model_sizes(tiny)["text"]).text_config
    return AutoModelForCausalLM.from_config(config).eval()


def build_projection(tiny: bool) -> MmfuseProjectionForConditionalGeneration:
    sizes = model_sizes(tiny)
    torch.manual_seed(0)
    config = MmfuseProjectionConfig(
        vision_config=sizes["vision"], text_config=sizes["text"], image_token_id=sizes["text"]["vocab_size"] - 1
    )
    return MmfuseProjectionForConditionalGeneration(config).eval()


def build_cross_attention(tiny: bool) -> MmfuseCrossAttentionForConditionalGeneration:
    sizes = model_sizes(tiny)
    torch.manual_seed(0)
    config = MmfuseCrossAttentionConfig(
        vision_config=sizes["vision"],
        text_config=sizes["text"],
        image_token_id=sizes["text"]["vocab_size"] - 1,
        cross_attention_every_n_layers=cross_attention_interval(tiny),
        **resampler_sizes(tiny),
    )
    model = MmfuseCrossAttentionForConditionalGeneration(config).eval()
    with torch.no_grad():
        # Open the zero-initialised gates, as training would, so that the image paths do real work.
        for name, parameter in model.named_parameters():
            if name.endswith(("attention_gate", "mlp_gate")):
                parameter.fill_(0.5)
    return model


def build_vq(tiny: bool) -> MmfuseVQForConditionalGeneration:
    """Build a VQ-token model whose vocabulary is the text vocabulary, three special tokens and the codebook."""
    sizes = model_sizes(tiny)
    vqgan = vqgan_sizes(tiny)
    text = dict(sizes["text"])
    text_vocab_size = text["vocab_size"]
    text["vocab_size"] = text_vocab_size + vqgan["codebook_size"]
    torch.manual_seed(0)
    config = MmfuseVQConfig(
        vqgan_config=vqgan,
        text_config=text,
        # The last three text ids serve as placeholder, begin-of-image and end-of-image tokens.
        image_token_id=text_vocab_size - 3,
        boi_token_id=text_vocab_size - 2,
        eoi_token_id=text_vocab_size - 1,
        image_token_offset=text_vocab_size,
    )
    return MmfuseVQForConditionalGeneration(config).eval()


BUILDERS = {"projection": build_projection, "cross_attention": build_cross_attention, "vq": build_vq}


def random_text(length: int, vocab_size: int, generator: torch.Generator) -> torch.LongTensor:
    # Ids 3 and up, below the special tokens at the end of the text vocabulary.
    return torch.randint(3, vocab_size - 3, (length,), generator=generator)


def prompt_inputs(model, num_images: int, batch_size: int = 1, text_tokens: int = 16) -> dict:
    """Greedy-generation inputs with `num_images` images per row, laid out as the model's processor would.

    projection: `num_image_tokens` placeholders per image; cross_attention: one marker per image followed by
    text; vq: begin-of-image, `num_codes` placeholders and end-of-image per image. `text_tokens` random text
    tokens close every row. Pixel values are Gaussian noise.
    """
    config = model.config
    model_type = config.model_type
    generator = torch.Generator().manual_seed(num_images)
    text_vocab_size = config.image_token_offset if model_type == "mmfuse_vq" else config.text_config.vocab_size
    rows = []
    for _ in range(batch_size):
        pieces = []
        for _ in range(num_images):
            if model_type == "mmfuse_projection":
                pieces.append(torch.full((config.num_image_tokens,), config.image_token_id))
            elif model_type == "mmfuse_cross_attention":
                pieces.append(torch.tensor([config.image_token_id]))
                pieces.append(random_text(4, text_vocab_size, generator))
            else:
                placeholders = torch.full((config.num_codes,), config.image_token_id)
                pieces += [torch.tensor([config.boi_token_id]), placeholders, torch.tensor([config.eoi_token_id])]
        pieces.append(random_text(text_tokens, text_vocab_size, generator))
        rows.append(torch.cat(pieces))
    input_ids = torch.stack(rows)
    size = config.image_size if model_type == "mmfuse_vq" else config.vision_config.image_size
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if num_images:
        inputs["pixel_values"] = torch.randn(batch_size * num_images, 3, size, size, generator=generator)
    return inputs


def text_inputs(length: int, vocab_size: int, batch_size: int = 1) -> dict:
    """Random text prompts of `length` tokens for the bare LM."""
    generator = torch.Generator().manual_seed(length)
    input_ids = torch.stack([random_text(length, vocab_size, generator) for _ in range(batch_size)])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
