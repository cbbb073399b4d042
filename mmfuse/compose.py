"""Compose a new, untrained vision-language model from a pretrained vision tower and causal LM."""

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging

from .configuration_common import vision_image_size
from .configuration_cross_attention import MmfuseCrossAttentionConfig
from .configuration_projection import MmfuseProjectionConfig
from .configuration_vq import MmfuseVQConfig
from .modeling_cross_attention import MmfuseCrossAttentionForConditionalGeneration
from .modeling_projection import MmfuseProjectionForConditionalGeneration
from .modeling_vq import MmfuseVQForConditionalGeneration
from .processing_common import IMAGENET_MEAN, IMAGENET_STD, MmfuseImageProcessor
from .processing_cross_attention import MmfuseCrossAttentionProcessor
from .processing_projection import MmfuseProjectionProcessor
from .processing_vq import MmfuseVQProcessor

logger = logging.get_logger(__name__)


def add_special_tokens(tokenizer: PreTrainedTokenizerBase, tokens: list) -> list:
    """Add `tokens` as special tokens (skipping known ones) and return their ids in order."""
    missing = [token for token in tokens if token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return [tokenizer.convert_tokens_to_ids(token) for token in tokens]


def vision_normalization(vision_config) -> tuple:
    """Return the (mean, std) normalization the vision tower was trained with."""
    if vision_config.model_type == "timm_wrapper":
        pretrained = vision_config.pretrained_cfg
        return tuple(pretrained.get("mean", IMAGENET_MEAN)), tuple(pretrained.get("std", IMAGENET_STD))
    if vision_config.model_type.startswith("siglip"):
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    if vision_config.model_type.startswith("clip"):
        return (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    return IMAGENET_MEAN, IMAGENET_STD


def backbone_config(model: PreTrainedModel) -> dict:
    """Return a part's config as a dict without loading leftovers.

    The source folder path and a GGUF `quantization_config` describe how the part was loaded,
    not the composed model, whose weights are saved dequantised.
    """
    values = model.config.to_dict()
    for key in ("_name_or_path", "quantization_config"):
        values.pop(key, None)
    return values


def resize_vocabulary(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow the LM's embeddings to cover the tokenizer, initialising new rows at the mean of old ones."""
    vocab_size = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab_size:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)


def compose_projection(
    vision_model: PreTrainedModel,
    language_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    chat_template: str | None = None,
    image_token: str = "<image>",
    **config_kwargs,
):
    """Build an `mmfuse_projection` model and processor around pretrained parts.

    Args:
        vision_model: a transformers vision model (its weights are copied into the vision tower).
        language_model: a transformers causal LM (`...ForCausalLM`).
        tokenizer: the LM's tokenizer; `image_token` is added to it.
        chat_template: defaults to the tokenizer's.
        config_kwargs: other `MmfuseProjectionConfig` arguments (`projector_type`, ...).

    Returns:
        `(model, processor)`; the projector is freshly initialised.
    """
    (image_token_id,) = add_special_tokens(tokenizer, [image_token])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"

    config = MmfuseProjectionConfig(
        vision_config=backbone_config(vision_model),
        text_config=backbone_config(language_model),
        image_token=image_token,
        image_token_id=image_token_id,
        **config_kwargs,
    )
    model = MmfuseProjectionForConditionalGeneration(config)
    load_part(model.model.vision_tower, vision_model, "vision tower")
    load_part(model.model.language_model, language_model.base_model, "language model")
    model.lm_head.load_state_dict(language_model.get_output_embeddings().state_dict())
    resize_vocabulary(model, tokenizer)
    model.config.text_config.vocab_size = model.get_input_embeddings().weight.shape[0]

    mean, std = vision_normalization(config.vision_config)
    image_processor = MmfuseImageProcessor(
        size=vision_image_size(config.vision_config), image_mean=mean, image_std=std
    )
    processor = MmfuseProjectionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=chat_template or tokenizer.chat_template,
        num_image_tokens=config.num_image_tokens,
        image_token=image_token,
    )
    return model, processor


def compose_vq(
    vqgan_model: PreTrainedModel,
    language_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    chat_template: str | None = None,
    image_token: str = "<image>",
    boi_token: str = "<boi>",
    eoi_token: str = "<eoi>",
    **config_kwargs,
):
    """Build an `mmfuse_vq` model and processor around a VQ-GAN image tokenizer and a pretrained LM.

    The three special tokens are added to the tokenizer, then the LM's embeddings and LM head grow by
    `codebook_size` image tokens placed after the text vocabulary. The new rows are sampled around the mean
    of the old ones and the old rows keep their values.

    Args:
        vqgan_model: an `MmfuseVQGANModel` (its weights are copied).
        language_model: a transformers causal LM (`...ForCausalLM`).
        tokenizer: the LM's tokenizer; `image_token`, `boi_token` and `eoi_token` are added to it.
        chat_template: defaults to the tokenizer's.
        config_kwargs: other `MmfuseVQConfig` arguments.

    Returns:
        `(model, processor)`.
    """
    image_token_id, boi_token_id, eoi_token_id = add_special_tokens(tokenizer, [image_token, boi_token, eoi_token])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"

    text_vocab_size = language_model.get_input_embeddings().weight.shape[0]
    # Image tokens go after every row the LM already has, so no text token changes its id or its embedding.
    image_token_offset = max(len(tokenizer), text_vocab_size)
    config = MmfuseVQConfig(
        vqgan_config=backbone_config(vqgan_model),
        text_config=backbone_config(language_model),
        image_token=image_token,
        boi_token=boi_token,
        eoi_token=eoi_token,
        image_token_id=image_token_id,
        boi_token_id=boi_token_id,
        eoi_token_id=eoi_token_id,
        image_token_offset=image_token_offset,
        **config_kwargs,
    )
    model = MmfuseVQForConditionalGeneration(config)
    load_part(model.model.vqmodel, vqgan_model, "image tokenizer")
    load_part(model.model.language_model, language_model.base_model, "language model")
    model.lm_head.load_state_dict(language_model.get_output_embeddings().state_dict())
    model.resize_token_embeddings(image_token_offset + config.codebook_size, mean_resizing=True)
    model.config.text_config.vocab_size = model.get_input_embeddings().weight.shape[0]

    image_processor = MmfuseImageProcessor(
        size=config.image_size, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)
    )
    processor = MmfuseVQProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=chat_template or tokenizer.chat_template,
        num_codes=config.num_codes,
        image_token=image_token,
        boi_token=boi_token,
        eoi_token=eoi_token,
    )
    return model, processor


def load_part(target: torch.nn.Module, source: torch.nn.Module, name: str) -> None:
    """Copy `source`'s weights into `target` with strict key matching."""
    result = target.load_state_dict(source.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"The {name} weights do not match the composed model: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}. Check that the source is a {name} that transformers knows."
        )


def compose_cross_attention(
    vision_model: PreTrainedModel,
    language_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    chat_template: str | None = None,
    image_token: str = "<image>",
    **config_kwargs,
):
    """Build an `mmfuse_cross_attention` model and processor around pretrained parts.

    Args:
        vision_model: a transformers vision model (its weights are copied into the vision tower).
        language_model: a transformers causal LM (`...ForCausalLM`).
        tokenizer: the LM's tokenizer; `image_token` is added to it.
        chat_template: defaults to the tokenizer's.
        config_kwargs: other `MmfuseCrossAttentionConfig` arguments (`cross_attention_every_n_layers`, ...).

    Returns:
        `(model, processor)`; the resampler and the gated blocks are freshly initialised, with
        gates at 0, so the model's logits equal the LM's.
    """
    (image_token_id,) = add_special_tokens(tokenizer, [image_token])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"

    config = MmfuseCrossAttentionConfig(
        vision_config=backbone_config(vision_model),
        text_config=backbone_config(language_model),
        image_token=image_token,
        image_token_id=image_token_id,
        **config_kwargs,
    )
    model = MmfuseCrossAttentionForConditionalGeneration(config)
    load_part(model.model.vision_tower, vision_model, "vision tower")
    load_decoder_with_gated_layers(model.model.language_model, language_model.base_model)
    model.lm_head.load_state_dict(language_model.get_output_embeddings().state_dict())
    resize_vocabulary(model, tokenizer)
    model.config.text_config.vocab_size = model.get_input_embeddings().weight.shape[0]

    mean, std = vision_normalization(config.vision_config)
    image_processor = MmfuseImageProcessor(
        size=vision_image_size(config.vision_config), image_mean=mean, image_std=std
    )
    processor = MmfuseCrossAttentionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=chat_template or tokenizer.chat_template,
        image_token=image_token,
    )
    return model, processor


def load_decoder_with_gated_layers(target: torch.nn.Module, source: torch.nn.Module) -> None:
    """Copy an LM backbone's weights into one whose chosen decoder layers are wrapped with gated blocks.

    A wrapped layer keeps the original one as its child `decoder_layer`, so a source key
    `layers.3.mlp.up_proj.weight` lands on `layers.3.decoder_layer.mlp.up_proj.weight`. The
    gated blocks' own weights stay as initialised; every other key must match exactly.
    """
    target_keys = [key for key in target.state_dict() if ".gated_cross_attention." not in key]
    source_key_of = {key: key.replace(".decoder_layer.", ".") for key in target_keys}
    source_state = source.state_dict()
    missing = [key for key, source_key in source_key_of.items() if source_key not in source_state]
    unexpected = sorted(set(source_state) - set(source_key_of.values()))
    if missing or unexpected:
        raise ValueError(
            f"The language model weights do not match the composed model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}. Check that the source is the LM the config was built from."
        )
    target.load_state_dict({key: source_state[source_key] for key, source_key in source_key_of.items()}, strict=False)
