"""Configuration of the projection fusion type (LLaVA style)."""

from transformers import AutoConfig, PretrainedConfig

from .configuration_common import (
    build_sub_config,
    vision_grid_size,
    vision_has_cls_token,
    vision_hidden_size,
)

PROJECTOR_TYPES = ("linear", "mlp2x_gelu", "pixel_shuffle", "avg_pool")
TOKEN_REDUCING_PROJECTORS = ("pixel_shuffle", "avg_pool")
FEATURE_SELECT_STRATEGIES = ("default", "full")


class MmfuseProjectionConfig(PretrainedConfig):
    r"""
    Configuration of a vision tower, a projector and a causal LM whose input embeddings take the
    projected image features in place of the image placeholder tokens.

    Args:
        vision_config (`dict` or `PretrainedConfig`, *optional*):
            Config of any vision model that transformers builds with `AutoModel.from_config`
            (CLIP, SigLIP, ViT, timm through `timm_wrapper`, ...). Defaults to a CLIP vision tower.
        text_config (`dict` or `PretrainedConfig`, *optional*):
            Config of any causal LM that transformers builds with `AutoModelForCausalLM.from_config`.
            Defaults to Llama.
        projector_type (`str`, *optional*, defaults to `"mlp2x_gelu"`):
            `"linear"` (one linear layer), `"mlp2x_gelu"` (linear, GELU, linear), `"pixel_shuffle"`
            (folds each `projector_downsample x projector_downsample` block of patches into one token,
            then a linear layer) or `"avg_pool"` (averages each such block, then linear, GELU, linear).
        projector_downsample (`int`, *optional*, defaults to 2):
            Side of the block of patches merged into one token by the token-reducing projectors.
        projector_bias (`bool`, *optional*, defaults to `True`):
            Whether the projector's linear layers have a bias.
        projector_hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation between the two layers of the MLP projectors.
        vision_feature_layer (`int` or `list[int]`, *optional*, defaults to -2):
            Index of the vision hidden state that is projected; a list concatenates several layers
            along the feature dimension.
        vision_feature_select_strategy (`str`, *optional*, defaults to `"default"`):
            `"default"` drops the class token of towers that have one; `"full"` keeps every token.
        image_token (`str`, *optional*, defaults to `"<image>"`):
            Placeholder that the processor expands to `num_image_tokens` copies.
        image_token_id (`int`, *optional*):
            Vocabulary id of `image_token`, set when the tokenizer learns the token.
    """

    model_type = "mmfuse_projection"
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        projector_type="mlp2x_gelu",
        projector_downsample=2,
        projector_bias=True,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_token="<image>",
        image_token_id=None,
        **kwargs,
    ):
        self.vision_config = build_sub_config(vision_config, "vision_config", "clip_vision_model")
        self.text_config = build_sub_config(text_config, "text_config", "llama")

        if projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type={projector_type!r} is not supported; use one of {PROJECTOR_TYPES}.")
        if vision_feature_select_strategy not in FEATURE_SELECT_STRATEGIES:
            raise ValueError(
                f"vision_feature_select_strategy={vision_feature_select_strategy!r} is not supported; "
                f"use one of {FEATURE_SELECT_STRATEGIES}."
            )
        if isinstance(vision_feature_layer, (list, tuple)):
            if not vision_feature_layer:
                raise ValueError("vision_feature_layer is an empty list; give at least one layer index.")
            vision_feature_layer = [int(layer) for layer in vision_feature_layer]
        self.projector_type = projector_type
        self.projector_downsample = int(projector_downsample)
        self.projector_bias = projector_bias
        self.projector_hidden_act = projector_hidden_act
        self.vision_feature_layer = vision_feature_layer
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token = image_token
        self.image_token_id = image_token_id

        kwargs.setdefault("tie_word_embeddings", getattr(self.text_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)
        self._check_token_reduction()

    def _check_token_reduction(self):
        if self.projector_type not in TOKEN_REDUCING_PROJECTORS:
            return
        if self.vision_feature_select_strategy == "full" and vision_has_cls_token(self.vision_config):
            raise ValueError(
                f"projector_type={self.projector_type!r} needs a square grid of patches, but "
                "vision_feature_select_strategy='full' keeps the class token; use 'default'."
            )
        grid = vision_grid_size(self.vision_config)
        if grid % self.projector_downsample != 0:
            raise ValueError(
                f"projector_downsample={self.projector_downsample} does not divide the vision grid of "
                f"{grid}x{grid} patches; pick a divisor of {grid}."
            )

    @property
    def num_feature_layers(self) -> int:
        return 1 if isinstance(self.vision_feature_layer, int) else len(self.vision_feature_layer)

    @property
    def vision_feature_size(self) -> int:
        """Width of the vision features that enter the projector."""
        return vision_hidden_size(self.vision_config) * self.num_feature_layers

    @property
    def num_image_tokens(self) -> int:
        """Number of LM positions one image fills, derived from the vision config."""
        grid = vision_grid_size(self.vision_config)
        if self.projector_type in TOKEN_REDUCING_PROJECTORS:
            return (grid // self.projector_downsample) ** 2
        keeps_cls = self.vision_feature_select_strategy == "full" and vision_has_cls_token(self.vision_config)
        return grid * grid + int(keeps_cls)


__all__ = ["MmfuseProjectionConfig"]
