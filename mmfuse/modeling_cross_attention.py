"""Cross-attention fusion (Flamingo style): vision tower -> Perceiver resampler -> gated cross-attention.

The image stays out of the LM context. A Perceiver resampler turns each image into
`resampler_num_latents` latents, and gated cross-attention blocks, inserted before chosen
decoder layers of an unmodified transformers LM, let the text tokens read those latents.

How the blocks enter the LM: each chosen decoder layer is replaced in the LM's layer list by
`MmfuseGatedDecoderLayer`, a module that keeps the original layer as its child `decoder_layer`
and runs its `gated_cross_attention` block on the hidden states first. The per-call image
conditioning (`MmfuseImageContext`) travels as the keyword argument `image_context` of the LM's
forward call: Llama, Qwen2 and GPT-2 (transformers 4.57 and 5.x) pass their extra keyword
arguments on to every decoder layer. Nothing is stored on the layers between calls, and no class
is rewritten. The wrapper stays outside the LM layer's own gradient checkpointing, so gradients
reach the blocks even when the LM is frozen and checkpointing is reentrant. An LM whose decoder
loop drops keyword arguments is detected after the call and rejected with NotImplementedError.

Media-location masking: each token attends to the latents of the most recent image marker at or
before it (or to all earlier images with `only_attend_immediate_media=False`). Tokens that attend
to no image get exactly zero from the cross-attention.

Caching: the keys and values of every block's cross-attention are computed once, when the
images are encoded, and carried through `generate` in `MmfuseImageCache` (model keyword
`image_cache`), so decode steps never see `pixel_values` again.

Known issues: an image marker that the model generates has no image; the tokens after it keep
attending to the last image of their row. The gated blocks themselves are not checkpointed.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin
from transformers.activations import ACT2FN
from transformers.utils import logging

from .configuration_common import vision_has_cls_token
from .configuration_cross_attention import MmfuseCrossAttentionConfig
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
    select_vision_features,
)

logger = logging.get_logger(__name__)

# Keyword under which the image conditioning flows through the LM's forward to its decoder layers.
IMAGE_CONTEXT_KWARG = "image_context"


@dataclass
class MmfuseCrossAttentionModelOutputWithPast(MmfuseModelOutputWithPast):
    """Base model output plus the image cache that later decode steps reuse."""

    image_cache: object | None = None


@dataclass
class MmfuseCrossAttentionCausalLMOutputWithPast(MmfuseCausalLMOutputWithPast):
    """Head output plus the image cache that later decode steps reuse."""

    image_cache: object | None = None


class MmfuseImageCache:
    """Cross-attention keys and values of the images of a batch, computed once per prompt.

    Attributes:
        key_values: one `(key, value)` pair per gated block, each
            `[batch_size, num_heads, num_images * num_latents, head_dim]`.
        images_per_row: `[batch_size]`, number of images of each row.
        image_counts: `[batch_size]`, image markers seen up to the last processed token.
    """

    def __init__(
        self, key_values: list, images_per_row: torch.LongTensor, image_counts: torch.LongTensor, num_latents
    ):
        self.key_values = key_values
        self.images_per_row = images_per_row
        self.image_counts = image_counts
        self.num_latents = num_latents

    @property
    def max_images(self) -> int:
        return self.key_values[0][0].shape[2] // self.num_latents if self.key_values else 0


class MmfuseImageContext:
    """Per-call image conditioning that the gated decoder layers read from their keyword arguments."""

    def __init__(self, key_values: list, attention_mask: torch.Tensor, token_has_image: torch.BoolTensor):
        self.key_values = key_values
        self.attention_mask = attention_mask  # [batch_size, 1, seq_len, num_images * num_latents], additive
        self.token_has_image = token_has_image  # [batch_size, seq_len]
        self.num_visits = 0


def media_location_mask(
    image_counts: torch.LongTensor, images_per_row: torch.LongTensor, max_images: int, immediate: bool
) -> torch.BoolTensor:
    """Return which images each token may attend to.

    Args:
        image_counts: `[batch_size, seq_len]`, image markers at or before each token.
        images_per_row: `[batch_size]`, images available to each row.

    Returns:
        `[batch_size, seq_len, max_images]`, True where the token attends to the image.
    """
    # A marker without an image (one the model generated) leaves the token on the row's last image.
    counts = torch.minimum(image_counts, images_per_row[:, None])
    image_index = torch.arange(max_images, device=counts.device)
    if immediate:
        return image_index == (counts[..., None] - 1)
    return image_index < counts[..., None]


class MmfusePerceiverAttention(nn.Module):
    """Latents attend to the concatenation of the image features and themselves."""

    def __init__(self, config: MmfuseCrossAttentionConfig):
        super().__init__()
        width = config.vision_feature_size
        self.num_heads = config.resampler_num_heads
        self.head_dim = config.resampler_head_dim
        inner = self.num_heads * self.head_dim
        self.context_norm = nn.LayerNorm(width)
        self.latents_norm = nn.LayerNorm(width)
        self.q_proj = nn.Linear(width, inner, bias=False)
        self.k_proj = nn.Linear(width, inner, bias=False)
        self.v_proj = nn.Linear(width, inner, bias=False)
        self.o_proj = nn.Linear(inner, width, bias=False)

    def _heads(self, states: torch.Tensor) -> torch.Tensor:
        batch, length, _ = states.shape
        return states.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Map `[num_images, num_patches, width]` and `[num_images, num_latents, width]` to the latents' shape."""
        context = self.context_norm(context)
        latents = self.latents_norm(latents)
        keys_input = torch.cat([context, latents], dim=1)
        query = self._heads(self.q_proj(latents))
        key = self._heads(self.k_proj(keys_input))
        value = self._heads(self.v_proj(keys_input))
        attended = nn.functional.scaled_dot_product_attention(query, key, value)
        attended = attended.transpose(1, 2).flatten(2)  # [num_images, num_latents, num_heads * head_dim]
        return self.o_proj(attended)


class MmfusePerceiverMLP(nn.Module):
    def __init__(self, config: MmfuseCrossAttentionConfig):
        super().__init__()
        width = config.vision_feature_size
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, config.resampler_intermediate_size, bias=False)
        self.act = ACT2FN[config.resampler_hidden_act]
        self.fc2 = nn.Linear(config.resampler_intermediate_size, width, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(hidden_states))))


class MmfusePerceiverLayer(nn.Module):
    def __init__(self, config: MmfuseCrossAttentionConfig):
        super().__init__()
        self.attention = MmfusePerceiverAttention(config)
        self.mlp = MmfusePerceiverMLP(config)

    def forward(self, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latents = latents + self.attention(context, latents)
        return latents + self.mlp(latents)


class MmfusePerceiverResampler(nn.Module):
    """Compress any number of image features into `resampler_num_latents` latents with learned queries."""

    def __init__(self, config: MmfuseCrossAttentionConfig):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(config.resampler_num_latents, config.vision_feature_size))
        self.layers = nn.ModuleList([MmfusePerceiverLayer(config) for _ in range(config.resampler_depth)])
        self.norm = nn.LayerNorm(config.vision_feature_size)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """Resample `[num_images, num_patches, width]` to `[num_images, num_latents, width]`."""
        latents = self.latents.unsqueeze(0).expand(image_features.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(image_features, latents)
        return self.norm(latents)


class MmfuseGatedCrossAttention(nn.Module):
    """Multi-head attention from text hidden states (queries) to image latents (keys and values)."""

    def __init__(self, config: MmfuseCrossAttentionConfig):
        super().__init__()
        hidden_size = config.text_config.hidden_size
        self.num_heads = config.cross_attention_num_heads
        self.head_dim = hidden_size // self.num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(config.vision_feature_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(config.vision_feature_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def _heads(self, states: torch.Tensor) -> torch.Tensor:
        batch, length, _ = states.shape
        return states.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def project_image(self, latents: torch.Tensor) -> tuple:
        """Turn `[batch_size, num_images * num_latents, width]` into keys and values
        `[batch_size, num_heads, num_images * num_latents, head_dim]`."""
        latents = latents.to(self.k_proj.weight.dtype)
        return self._heads(self.k_proj(latents)), self._heads(self.v_proj(latents))

    def forward(self, hidden_states, key, value, attention_mask) -> torch.Tensor:
        query = self._heads(self.q_proj(hidden_states))
        attended = nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask.to(query.dtype)
        )
        return self.o_proj(attended.transpose(1, 2).flatten(2))  # [batch_size, seq_len, hidden_size]


class MmfuseCrossAttentionMLP(nn.Module):
    """Feed-forward layer of a gated block: `plain` (fc1, act, fc2) or `gated` (Llama-style)."""

    def __init__(self, config: MmfuseCrossAttentionConfig):
        super().__init__()
        hidden_size = config.text_config.hidden_size
        intermediate = config.cross_attention_intermediate_size
        self.gated = config.cross_attention_mlp == "gated"
        self.act = ACT2FN[config.cross_attention_hidden_act]
        if self.gated:
            self.gate_proj = nn.Linear(hidden_size, intermediate, bias=False)
            self.up_proj = nn.Linear(hidden_size, intermediate, bias=False)
            self.down_proj = nn.Linear(intermediate, hidden_size, bias=False)
        else:
            self.fc1 = nn.Linear(hidden_size, intermediate, bias=False)
            self.fc2 = nn.Linear(intermediate, hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))
        return self.fc2(self.act(self.fc1(hidden_states)))


def build_norm(config: MmfuseCrossAttentionConfig) -> nn.Module:
    hidden_size = config.text_config.hidden_size
    if config.cross_attention_norm == "rms_norm":
        return nn.RMSNorm(hidden_size, eps=config.cross_attention_norm_eps)
    return nn.LayerNorm(hidden_size, eps=config.cross_attention_norm_eps)


class MmfuseGatedCrossAttentionBlock(nn.Module):
    """Cross-attention and feed-forward layer, each added to the residual stream behind `tanh(gate)`."""

    def __init__(self, config: MmfuseCrossAttentionConfig):
        super().__init__()
        gate_shape = (config.text_config.hidden_size,) if config.gate_type == "vector" else (1,)
        self.attention_norm = build_norm(config)
        self.cross_attention = MmfuseGatedCrossAttention(config)
        self.mlp_norm = build_norm(config)
        self.mlp = MmfuseCrossAttentionMLP(config)
        # Zero gates make a new block the identity, so the composed model starts as the bare LM.
        self.attention_gate = nn.Parameter(torch.zeros(gate_shape))
        self.mlp_gate = nn.Parameter(torch.zeros(gate_shape))
        self.skip_without_image = config.skip_block_without_image

    def forward(self, hidden_states, key, value, attention_mask, token_has_image) -> torch.Tensor:
        """
        Args:
            hidden_states: `[batch_size, seq_len, hidden_size]`.
            key, value: `[batch_size, num_heads, num_images * num_latents, head_dim]`.
            attention_mask: `[batch_size, 1, seq_len, num_images * num_latents]`, additive.
            token_has_image: `[batch_size, seq_len]`, False for tokens that attend to no image.
        """
        no_image = ~token_has_image[..., None]
        attended = self.cross_attention(self.attention_norm(hidden_states), key, value, attention_mask)
        attended = attended.masked_fill(no_image, 0.0)
        hidden_states = hidden_states + torch.tanh(self.attention_gate) * attended

        transformed = self.mlp(self.mlp_norm(hidden_states))
        if self.skip_without_image:
            transformed = transformed.masked_fill(no_image, 0.0)
        return hidden_states + torch.tanh(self.mlp_gate) * transformed


class MmfuseGatedDecoderLayer(nn.Module):
    """One LM decoder layer with a gated cross-attention block that runs on its input first.

    The original layer stays a child (`decoder_layer`), so its weights keep their names below
    this module, and attributes that the LM's decoder loop reads (`attention_type`, ...) are
    looked up on it.
    """

    def __init__(self, decoder_layer: nn.Module, block: MmfuseGatedCrossAttentionBlock, block_index: int):
        super().__init__()
        self.gated_cross_attention = block
        self.decoder_layer = decoder_layer
        self.block_index = block_index

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["decoder_layer"], name)

    def forward(self, *args, **kwargs):
        context = kwargs.pop(IMAGE_CONTEXT_KWARG, None)
        if context is not None:
            context.num_visits += 1
            key, value = context.key_values[self.block_index]
            positional = bool(args)
            hidden_states = args[0] if positional else kwargs["hidden_states"]
            hidden_states = self.gated_cross_attention(
                hidden_states, key, value, context.attention_mask, context.token_has_image
            )
            if positional:
                args = (hidden_states,) + tuple(args[1:])
            else:
                kwargs["hidden_states"] = hidden_states
        return self.decoder_layer(*args, **kwargs)


def find_decoder_layers(language_model: nn.Module, num_layers: int) -> nn.ModuleList:
    """Return the LM's list of decoder layers: the first `nn.ModuleList` with `num_layers` entries."""
    for module in language_model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise NotImplementedError(
        f"Cannot find the {num_layers} decoder layers of {type(language_model).__name__}: it has no nn.ModuleList "
        "of that length. Use an LM whose decoder layers form one nn.ModuleList (Llama, Qwen2, GPT-2, ...)."
    )


class MmfuseCrossAttentionPreTrainedModel(MmfusePreTrainedModel):
    config_class = MmfuseCrossAttentionConfig
    config: MmfuseCrossAttentionConfig
    _no_split_modules = ["MmfuseGatedDecoderLayer"]

    def _init_weights(self, module):
        # Only the resampler and the gated blocks are mmfuse's own; the tower and the LM initialise themselves.
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        if isinstance(module, MmfusePerceiverResampler):
            module.latents.data.normal_(mean=0.0, std=std)
        if isinstance(module, MmfuseGatedCrossAttentionBlock):
            module.attention_gate.data.zero_()
            module.mlp_gate.data.zero_()
        if isinstance(module, (MmfusePerceiverResampler, MmfuseGatedCrossAttentionBlock)):
            for layer in module.modules():
                if isinstance(layer, nn.Linear):
                    layer.weight.data.normal_(mean=0.0, std=std)
                elif isinstance(layer, (nn.LayerNorm, nn.RMSNorm)):
                    layer.weight.data.fill_(1.0)
                    if getattr(layer, "bias", None) is not None:
                        layer.bias.data.zero_()


class MmfuseCrossAttentionModel(MmfuseCrossAttentionPreTrainedModel):
    """Vision tower, Perceiver resampler and LM backbone with gated cross-attention, without a head."""

    def __init__(self, config: MmfuseCrossAttentionConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.resampler = MmfusePerceiverResampler(config)
        self.language_model = AutoModel.from_config(config.text_config)
        decoder_layers = find_decoder_layers(self.language_model, config.text_config.num_hidden_layers)
        for block_index, layer_index in enumerate(config.cross_attention_layer_indices):
            decoder_layers[layer_index] = MmfuseGatedDecoderLayer(
                decoder_layers[layer_index], MmfuseGatedCrossAttentionBlock(config), block_index
            )
        self._lm_cache_argument = cache_argument_name(self.language_model)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def gated_decoder_layers(self) -> list:
        return [module for module in self.language_model.modules() if isinstance(module, MmfuseGatedDecoderLayer)]

    def get_vision_features(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """Run the vision tower and return the resampler's input.

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
        """Encode and resample images, or resample precomputed vision features.

        Args:
            pixel_values: `[num_images, num_channels, height, width]`.
            vision_features: `[num_images, num_patches, vision_feature_size]` from `get_vision_features`;
                used instead of `pixel_values`.

        Returns:
            `[num_images, num_latents, hidden_size]` latents, `hidden_size` being the vision feature width.
        """
        if vision_features is None:
            vision_features = self.get_vision_features(pixel_values)
        return self.resampler(vision_features.to(self.resampler.latents.dtype))

    def build_image_cache(
        self,
        pixel_values: torch.FloatTensor | None,
        images_per_row: torch.LongTensor,
        vision_features: torch.FloatTensor | None = None,
    ):
        """Encode the images and compute every block's cross-attention keys and values once.

        Returns:
            `(image_cache, latents)` with latents `[batch_size, num_images, num_latents, hidden_size]`,
            rows with fewer images padded with zeros.
        """
        latents = self.get_image_features(pixel_values, vision_features)
        batch_size = images_per_row.shape[0]
        max_images = int(images_per_row.max()) if batch_size else 0
        num_latents, width = latents.shape[1:]
        padded = latents.new_zeros(batch_size, max_images, num_latents, width)
        row_of_image = torch.repeat_interleave(torch.arange(batch_size, device=latents.device), images_per_row)
        first_image_of_row = torch.cumsum(images_per_row, 0) - images_per_row
        slot_of_image = torch.arange(latents.shape[0], device=latents.device) - first_image_of_row[row_of_image]
        padded[row_of_image, slot_of_image] = latents

        flat = padded.reshape(batch_size, max_images * num_latents, width)
        key_values = [
            layer.gated_cross_attention.cross_attention.project_image(flat) for layer in self.gated_decoder_layers()
        ]
        image_cache = MmfuseImageCache(key_values, images_per_row, torch.zeros_like(images_per_row), num_latents)
        return image_cache, padded

    def build_image_context(self, input_ids, image_cache: MmfuseImageCache, continues_cache: bool, dtype):
        """Return the conditioning of this call and the image cache with updated marker counts."""
        markers = image_token_mask(input_ids, self.config.image_token_id).long()
        start = image_cache.image_counts if continues_cache else torch.zeros_like(image_cache.image_counts)
        image_counts = start[:, None] + torch.cumsum(markers, dim=1)  # [batch_size, seq_len]
        allowed = media_location_mask(
            image_counts,
            image_cache.images_per_row,
            image_cache.max_images,
            self.config.only_attend_immediate_media,
        )
        token_has_image = allowed.any(dim=-1)
        allowed = allowed.repeat_interleave(image_cache.num_latents, dim=-1)  # one column per latent
        attention_mask = torch.where(
            allowed[:, None], torch.tensor(0.0, dtype=dtype), torch.tensor(torch.finfo(dtype).min, dtype=dtype)
        )
        next_cache = MmfuseImageCache(
            image_cache.key_values, image_cache.images_per_row, image_counts[:, -1], image_cache.num_latents
        )
        return MmfuseImageContext(image_cache.key_values, attention_mask, token_has_image), next_cache

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        image_cache: MmfuseImageCache | None = None,
        cache=None,
        vision_features: torch.FloatTensor | None = None,
        **kwargs,
    ) -> MmfuseCrossAttentionModelOutputWithPast:
        """
        Args:
            input_ids: `[batch_size, seq_len]` with one image marker per image.
            pixel_values: `[num_images, num_channels, height, width]`, images in the order of their
                markers, row by row.
            vision_features: `[num_images, num_patches, vision_feature_size]`, precomputed vision tower
                output (`get_vision_features`) used instead of `pixel_values`.
            attention_mask: `[batch_size, seq_len]`, 0 at padding.
            image_cache: the `image_cache` of an earlier output of the same prompts; decode steps
                pass it instead of `pixel_values`.
        """
        cache = cache_from_kwargs(past_key_values, cache, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        continues_cache = has_cached_tokens(cache)

        if pixel_values is not None and vision_features is not None:
            raise ValueError("Pass either `pixel_values` or precomputed `vision_features`, not both.")
        images = pixel_values if vision_features is None else vision_features
        latents = None
        if images is not None:
            if input_ids is None:
                raise ValueError("Images need `input_ids` to locate the image markers; pass `input_ids`.")
            images_per_row = image_token_mask(input_ids, self.config.image_token_id).sum(dim=1)
            if int(images_per_row.sum()) != images.shape[0]:
                raise ValueError(
                    f"Images and image markers do not match: markers: {int(images_per_row.sum())}, images: "
                    f"{images.shape[0]} (markers per row: {images_per_row.tolist()}). Give exactly one image "
                    f"per `{self.config.image_token}`, in order."
                )
            image_cache, latents = self.build_image_cache(pixel_values, images_per_row, vision_features)
        elif image_cache is None and input_ids is not None and not continues_cache:
            if self.config.image_token_id is not None:
                num_markers = int((input_ids == self.config.image_token_id).sum())
                if num_markers:
                    raise ValueError(
                        f"Images and image markers do not match: markers: {num_markers}, images: 0. Pass "
                        "`pixel_values` for the images, or remove the image markers from the text."
                    )

        lm_kwargs = dict(kwargs)
        context = None
        if image_cache is not None and image_cache.max_images > 0:
            if input_ids is None:
                raise ValueError("Image conditioning needs `input_ids` to locate the image markers; pass `input_ids`.")
            context, image_cache = self.build_image_context(
                input_ids, image_cache, continues_cache, inputs_embeds.dtype
            )
            lm_kwargs[IMAGE_CONTEXT_KWARG] = context

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **{self._lm_cache_argument: cache},
            **lm_kwargs,
        )
        if context is not None and context.num_visits < len(context.key_values):
            raise NotImplementedError(
                f"{type(self.language_model).__name__} does not pass keyword arguments to its decoder layers, so the "
                f"gated cross-attention blocks ran {context.num_visits} of {len(context.key_values)} times. Use an LM "
                "whose decoder loop forwards `**kwargs` to its layers (Llama, Qwen2, GPT-2, ...)."
            )
        return MmfuseCrossAttentionModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=latents,
            image_cache=image_cache,
            **{CACHE_FIELD: output_cache(outputs)},
        )


class MmfuseCrossAttentionForConditionalGeneration(
    MmfuseLMHeadMixin, MmfuseCrossAttentionPreTrainedModel, GenerationMixin
):
    """Cross-attention-fusion vision-language model with a language-modeling head."""

    def __init__(self, config: MmfuseCrossAttentionConfig):
        super().__init__(config)
        self.model = MmfuseCrossAttentionModel(config)
        self.init_lm_head()
        self.post_init()

    def get_vision_features(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """Return the resampler's input `[num_images, num_patches, vision_feature_size]` for `pixel_values`."""
        return self.model.get_vision_features(pixel_values)

    def get_image_features(
        self, pixel_values: torch.FloatTensor | None = None, vision_features: torch.FloatTensor | None = None
    ) -> torch.FloatTensor:
        """Return resampled latents `[num_images, num_latents, vision_feature_size]` for `pixel_values`."""
        return self.model.get_image_features(pixel_values, vision_features)

    @property
    def vision_tower(self):
        return self.model.vision_tower

    @property
    def resampler(self):
        return self.model.resampler

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
        image_cache: MmfuseImageCache | None = None,
        cache=None,
        vision_features: torch.FloatTensor | None = None,
        supervised_logits_only: bool = False,
        **kwargs,
    ) -> MmfuseCrossAttentionCausalLMOutputWithPast:
        """
        Args:
            input_ids: `[batch_size, seq_len]`.
            pixel_values: `[num_images, num_channels, height, width]`.
            labels: `[batch_size, seq_len]`; image markers, padding (attention mask 0) and -100 do not count.
            image_cache: reuse the image keys and values of an earlier call on the same prompts.
            vision_features: `[num_images, num_patches, vision_feature_size]`, precomputed vision tower
                output (`get_vision_features`) used instead of `pixel_values`.
            supervised_logits_only: with `labels`, run the LM head only where a label counts in the
                loss (the same loss, computed faster; training uses it).

        Returns:
            `MmfuseCrossAttentionCausalLMOutputWithPast` with `logits` `[batch_size, seq_len, vocab_size]`,
            or `[num_supervised, vocab_size]` when `supervised_logits_only` is set with `labels`.
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            image_cache=image_cache,
            cache=cache,
            vision_features=vision_features,
            **kwargs,
        )

        logits, loss = self.compute_logits_and_loss(
            outputs.last_hidden_state, labels, input_ids, attention_mask, logits_to_keep, supervised_logits_only
        )

        return MmfuseCrossAttentionCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            image_cache=outputs.image_cache,
            **{CACHE_FIELD: output_cache(outputs)},
        )

    def prepare_inputs_for_generation(
        self, *args, pixel_values=None, vision_features=None, image_cache=None, **kwargs
    ):
        model_inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        # Images enter the first step only; later steps reuse their keys and values from `image_cache`.
        if image_cache is None:
            model_inputs["pixel_values"] = pixel_values
            model_inputs["vision_features"] = vision_features
        else:
            model_inputs["image_cache"] = image_cache
            model_inputs.pop("pixel_values", None)
            model_inputs.pop("vision_features", None)
        return model_inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        if getattr(outputs, "image_cache", None) is not None:
            model_kwargs["image_cache"] = outputs.image_cache
        return model_kwargs

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        # Images are flat across the batch, so repeating each image would misalign rows with several
        # images: repeat each row's group of images instead.
        images = {key: model_kwargs.pop(key, None) for key in ("pixel_values", "vision_features")}
        expanded_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        for key, value in images.items():
            if value is not None and expand_size > 1 and input_ids is not None:
                images_per_row = image_token_mask(input_ids, self.config.image_token_id).sum(dim=1).tolist()
                groups = torch.split(value, images_per_row)
                value = torch.cat([group for group in groups for _ in range(expand_size)])
            model_kwargs[key] = value
        return expanded_ids, model_kwargs


__all__ = [
    "MmfuseCrossAttentionForConditionalGeneration",
    "MmfuseCrossAttentionModel",
    "MmfuseCrossAttentionPreTrainedModel",
    "MmfuseGatedCrossAttentionBlock",
    "MmfuseGatedDecoderLayer",
    "MmfuseImageCache",
    "MmfusePerceiverResampler",
]
