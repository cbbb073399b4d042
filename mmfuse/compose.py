"""Compose a new, untrained vision-language model from a pretrained vision tower and causal LM."""

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging

from .configuration_common import vision_image_size
from .configuration_projection import MmfuseProjectionConfig
from .modeling_projection import MmfuseProjectionForConditionalGeneration
from .processing_common import IMAGENET_MEAN, IMAGENET_STD, MmfuseImageProcessor
from .processing_projection import MmfuseProjectionProcessor

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
        vision_config=vision_model.config.to_dict(),
        text_config=language_model.config.to_dict(),
        image_token=image_token,
        image_token_id=image_token_id,
        **config_kwargs,
    )
    model = MmfuseProjectionForConditionalGeneration(config)
    load_part(model.model.vision_tower, vision_model, "vision tower")
    load_part(model.model.language_model, language_model.get_decoder(), "language model")
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


def load_part(target: torch.nn.Module, source: torch.nn.Module, name: str) -> None:
    """Copy `source`'s weights into `target` with strict key matching."""
    result = target.load_state_dict(source.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"The {name} weights do not match the composed model: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}. Check that the source is a {name} that transformers knows."
        )
