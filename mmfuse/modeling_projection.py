"""Projection fusion (LLaVA style): vision tower -> projector -> image features replace placeholders.

The processor expands every `<image>` into `config.num_image_tokens` placeholder tokens; the
model encodes the images, projects the features to the LM width and writes them, in order,
over the placeholders' input embeddings before the LM runs.
"""

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin
from transformers.activations import ACT2FN
from transformers.utils import logging

from .configuration_common import vision_has_cls_token
from .configuration_projection import MmfuseProjectionConfig
from .modeling_common import (
    CACHE_FIELD,
    MmfuseCausalLMOutputWithPast,
    MmfuseLMHeadMixin,
    MmfuseModelOutputWithPast,
    MmfusePreTrainedModel,
    cache_argument_name,
    cache_from_kwargs,
    has_cached_tokens,
    image_token_mask,
    output_cache,
    scatter_image_features,
    select_vision_features,
)

logger = logging.get_logger(__name__)


def repeat_images_per_prompt(images: torch.Tensor, images_per_prompt: list, expand_size: int) -> torch.Tensor:
    """Repeat each prompt's block of images `expand_size` times, keeping the images' order.

    `images` is `[num_images, ...]` with the images of all prompts in reading order; the result is
    `[num_images * expand_size, ...]` and matches input ids repeated with `repeat_interleave`.
    """
    blocks = images.split(images_per_prompt, dim=0)
    return torch.cat([block.repeat(expand_size, *([1] * (block.dim() - 1))) for block in blocks], dim=0)


class MmfuseProjector(nn.Module):
    """Map vision features to the LM's embedding width, optionally merging neighbouring patches.

    `linear` and `mlp2x_gelu` keep one token per patch; `pixel_shuffle` folds each
    `downsample x downsample` block of patches into the channel dimension and `avg_pool`
    averages it, so both divide the number of tokens by `downsample ** 2`.
    """

    def __init__(self, config: MmfuseProjectionConfig):
        super().__init__()
        self.projector_type = config.projector_type
        self.downsample = config.projector_downsample
        in_features = config.vision_feature_size
        out_features = config.text_config.hidden_size
        bias = config.projector_bias

        if self.projector_type == "pixel_shuffle":
            in_features = in_features * self.downsample**2
        self.linear_1 = nn.Linear(in_features, out_features, bias=bias)
        if self.projector_type in ("mlp2x_gelu", "avg_pool"):
            self.act = ACT2FN[config.projector_hidden_act]
            self.linear_2 = nn.Linear(out_features, out_features, bias=bias)

    def _merge_patches(self, image_features: torch.Tensor) -> torch.Tensor:
        num_images, num_patches, channels = image_features.shape
        grid = int(num_patches**0.5)
        if grid * grid != num_patches:
            raise ValueError(
                f"projector_type={self.projector_type!r} needs a square grid of patches, got {num_patches} "
                "patches; use vision_feature_select_strategy='default' to drop the class token."
            )
        step = self.downsample
        if self.projector_type == "avg_pool":
            grid_features = image_features.transpose(1, 2).reshape(num_images, channels, grid, grid)
            pooled = nn.functional.avg_pool2d(grid_features, kernel_size=step, stride=step)
            return pooled.flatten(2).transpose(1, 2)  # [num_images, (grid / step) ** 2, channels]

        blocks = image_features.reshape(num_images, grid // step, step, grid // step, step, channels)
        blocks = blocks.permute(0, 1, 3, 2, 4, 5)  # [num_images, rows, cols, step, step, channels]
        return blocks.reshape(num_images, (grid // step) ** 2, step * step * channels)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """Project `[num_images, num_patches, vision_feature_size]` to `[num_images, num_image_tokens, hidden_size]`."""
        if self.projector_type in ("pixel_shuffle", "avg_pool"):
            image_features = self._merge_patches(image_features)
        hidden_states = self.linear_1(image_features)
        if hasattr(self, "linear_2"):
            hidden_states = self.linear_2(self.act(hidden_states))
        return hidden_states


class MmfuseProjectionPreTrainedModel(MmfusePreTrainedModel):
    config_class = MmfuseProjectionConfig
    config: MmfuseProjectionConfig

    def _init_weights(self, module):
        # Only the projector is mmfuse's own; the vision tower and the LM initialise themselves.
        if isinstance(module, MmfuseProjector):
            std = getattr(self.config.text_config, "initializer_range", 0.02)
            for layer in module.modules():
                if isinstance(layer, nn.Linear):
                    layer.weight.data.normal_(mean=0.0, std=std)
                    if layer.bias is not None:
                        layer.bias.data.zero_()


class MmfuseProjectionModel(MmfuseProjectionPreTrainedModel):
    """Vision tower, projector and LM backbone without a language-modeling head."""

    def __init__(self, config: MmfuseProjectionConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = MmfuseProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self._lm_cache_argument = cache_argument_name(self.language_model)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_vision_features(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """Run the vision tower and return the projector's input.

        Args:
            pixel_values: `[num_images, num_channels, height, width]`.

        Returns:
            `[num_images, num_patches, vision_feature_size]`. With a frozen vision tower these can be
            computed once per image and passed to `forward` as `vision_features`.
        """
        drop_cls_token = self.config.vision_feature_select_strategy == "default" and vision_has_cls_token(
            self.config.vision_config
        )
        return select_vision_features(
            self.vision_tower, pixel_values, self.config.vision_feature_layer, drop_cls_token
        )

    def get_image_features(
        self, pixel_values: torch.FloatTensor | None = None, vision_features: torch.FloatTensor | None = None
    ) -> torch.FloatTensor:
        """Encode and project images, or project precomputed vision features.

        Args:
            pixel_values: `[num_images, num_channels, height, width]`.
            vision_features: `[num_images, num_patches, vision_feature_size]` from `get_vision_features`;
                when given, the vision tower does not run.

        Returns:
            `[num_images, num_image_tokens, hidden_size]` in the projector's dtype.
        """
        if vision_features is None:
            vision_features = self.get_vision_features(pixel_values)
        projector_dtype = self.multi_modal_projector.linear_1.weight.dtype
        return self.multi_modal_projector(vision_features.to(projector_dtype))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        cache=None,
        vision_features: torch.FloatTensor | None = None,
        **kwargs,
    ) -> MmfuseModelOutputWithPast:
        """
        Args:
            input_ids: `[batch_size, seq_len]` with `config.num_image_tokens` image tokens per image.
            pixel_values: `[num_images, num_channels, height, width]`, images in the order of their
                placeholders, row by row.
            attention_mask: `[batch_size, seq_len]`, 0 at padding.
            vision_features: `[num_images, num_patches, vision_feature_size]`, precomputed vision tower
                output (`get_vision_features`) used instead of `pixel_values`.
        """
        cache = cache_from_kwargs(past_key_values, cache, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        image_features = None
        if pixel_values is not None and vision_features is not None:
            raise ValueError("Pass either `pixel_values` or precomputed `vision_features`, not both.")
        images = pixel_values if vision_features is None else vision_features
        if images is not None:
            if input_ids is None:
                raise ValueError("Images need `input_ids` to locate the image tokens; pass `input_ids`.")
            placeholder_mask = image_token_mask(input_ids, self.config.image_token_id)
            # Check the counts before the vision tower runs, so a bad batch fails fast.
            num_images = images.shape[0]
            num_placeholders = int(placeholder_mask.sum())
            if num_placeholders != num_images * self.config.num_image_tokens:
                raise ValueError(
                    f"Image features and image tokens do not match: tokens: {num_placeholders}, features: "
                    f"{num_images * self.config.num_image_tokens} ({num_images} images of "
                    f"{self.config.num_image_tokens} tokens each). Give one image per `{self.config.image_token}` "
                    "and let the processor expand the placeholders."
                )
            image_features = self.get_image_features(pixel_values, vision_features)
            inputs_embeds = scatter_image_features(inputs_embeds, placeholder_mask, image_features)
        elif input_ids is not None and self.config.image_token_id is not None and cache is None:
            num_placeholders = int((input_ids == self.config.image_token_id).sum())
            if num_placeholders:
                raise ValueError(
                    f"Image features and image tokens do not match: tokens: {num_placeholders}, features: 0. "
                    "Pass `pixel_values` for the images, or remove the image tokens from the text."
                )

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **{self._lm_cache_argument: cache},
            **kwargs,
        )
        return MmfuseModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
            **{CACHE_FIELD: output_cache(outputs)},
        )


class MmfuseProjectionForConditionalGeneration(MmfuseLMHeadMixin, MmfuseProjectionPreTrainedModel, GenerationMixin):
    """Projection-fusion vision-language model with a language-modeling head."""

    def __init__(self, config: MmfuseProjectionConfig):
        super().__init__(config)
        self.model = MmfuseProjectionModel(config)
        self.init_lm_head()
        self.post_init()

    def get_vision_features(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """Return the projector's input `[num_images, num_patches, vision_feature_size]` for `pixel_values`."""
        return self.model.get_vision_features(pixel_values)

    def get_image_features(
        self, pixel_values: torch.FloatTensor | None = None, vision_features: torch.FloatTensor | None = None
    ) -> torch.FloatTensor:
        """Return projected features `[num_images, num_image_tokens, hidden_size]` for `pixel_values`."""
        return self.model.get_image_features(pixel_values, vision_features)

    @property
    def vision_tower(self):
        return self.model.vision_tower

    @property
    def multi_modal_projector(self):
        return self.model.multi_modal_projector

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache=None,
        vision_features: torch.FloatTensor | None = None,
        supervised_logits_only: bool = False,
        **kwargs,
    ) -> MmfuseCausalLMOutputWithPast:
        """
        Args:
            input_ids: `[batch_size, seq_len]`.
            pixel_values: `[num_images, num_channels, height, width]`.
            vision_features: `[num_images, num_patches, vision_feature_size]`, precomputed vision tower
                output used instead of `pixel_values` (see `get_vision_features`).
            labels: `[batch_size, seq_len]`; positions of image tokens, of padding (attention mask 0)
                and with value -100 do not count in the loss.
            supervised_logits_only: with `labels`, run the LM head only where a label counts in the
                loss (the same loss, computed faster; training uses it).

        Returns:
            `MmfuseCausalLMOutputWithPast` with `logits` `[batch_size, seq_len, vocab_size]`, or
            `[num_supervised, vocab_size]` when `supervised_logits_only` is set with `labels`.
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            cache=cache,
            vision_features=vision_features,
            **kwargs,
        )

        logits, loss = self.compute_logits_and_loss(
            outputs.last_hidden_state, labels, input_ids, attention_mask, logits_to_keep, supervised_logits_only
        )

        return MmfuseCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            **{CACHE_FIELD: output_cache(outputs)},
        )

    def prepare_inputs_for_generation(self, *args, pixel_values=None, vision_features=None, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        # Images enter the prefill step only; later steps read them from the KV cache.
        cache = model_inputs.get("cache", model_inputs.get("past_key_values"))
        if not has_cached_tokens(cache):
            model_inputs["pixel_values"] = pixel_values
            model_inputs["vision_features"] = vision_features
        return model_inputs

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        # Beam search and `num_return_sequences` repeat every tensor along dim 0 as if it held one
        # row per prompt, but images are stacked one per placeholder: a prompt with two images would
        # hand its copies [a, a, b, b] instead of [a, b, a, b]. Repeat each prompt's images as a block.
        images = {key: model_kwargs.pop(key, None) for key in ("pixel_values", "vision_features")}
        expanded_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        for key, value in images.items():
            if value is not None and expand_size > 1 and input_ids is not None:
                counts = self.images_per_prompt(input_ids)
                # On a count mismatch the images stay as they are and `forward` reports both counts.
                if sum(counts) == value.shape[0]:
                    value = repeat_images_per_prompt(value, counts, expand_size)
            model_kwargs[key] = value
        return expanded_ids, model_kwargs

    def images_per_prompt(self, input_ids: torch.LongTensor) -> list:
        """Return the number of images each row of `input_ids` `[batch_size, seq_len]` holds."""
        counts = (input_ids == self.config.image_token_id).sum(dim=1) // self.config.num_image_tokens
        return counts.tolist()


__all__ = [
    "MmfuseProjectionForConditionalGeneration",
    "MmfuseProjectionModel",
    "MmfuseProjectionPreTrainedModel",
    "MmfuseProjector",
]
