"""Configuration of the cross-attention fusion type (Flamingo style)."""

from transformers import AutoConfig, PretrainedConfig

from .configuration_common import build_sub_config, vision_hidden_size

FEATURE_SELECT_STRATEGIES = ("default", "full")
MLP_TYPES = ("plain", "gated")
NORM_TYPES = ("layer_norm", "rms_norm")
GATE_TYPES = ("float", "vector")


class MmfuseCrossAttentionConfig(PretrainedConfig):
    r"""
    Configuration of a vision tower, a Perceiver resampler and a causal LM into which gated
    cross-attention blocks are inserted.

    Args:
        vision_config (`dict` or `PretrainedConfig`, *optional*):
            Config of any vision model that transformers builds with `AutoModel.from_config`.
            Defaults to a CLIP vision tower.
        text_config (`dict` or `PretrainedConfig`, *optional*):
            Config of any causal LM that transformers builds with `AutoModel.from_config` and whose
            decoder loop passes its keyword arguments on to the decoder layers (Llama, Qwen2, GPT-2, ...).
            Defaults to Llama.
        vision_feature_layer (`int`, *optional*, defaults to -1):
            Index of the vision hidden state that the resampler reads.
        vision_feature_select_strategy (`str`, *optional*, defaults to `"full"`):
            `"full"` keeps every token; `"default"` drops the class token of towers that have one.
        resampler_num_latents (`int`, *optional*, defaults to 64): learned queries per image.
        resampler_depth (`int`, *optional*, defaults to 2): number of resampler layers.
        resampler_num_heads (`int`, *optional*, defaults to 8): attention heads of the resampler.
        resampler_head_dim (`int`, *optional*, defaults to 64): width of one resampler head.
        resampler_intermediate_size (`int`, *optional*): width of the resampler feed-forward layer;
            defaults to 4 times the vision feature width.
        resampler_hidden_act (`str`, *optional*, defaults to `"gelu"`): activation of the resampler feed-forward layer.
        cross_attention_every_n_layers (`int`, *optional*, defaults to 4):
            A gated cross-attention block runs before decoder layers 0, n, 2n, ...
        cross_attention_layers (`list[int]`, *optional*):
            Explicit decoder layer indices that get a block; overrides `cross_attention_every_n_layers`.
        cross_attention_num_heads (`int`, *optional*): heads of the gated cross-attention; defaults to the LM's.
        cross_attention_intermediate_size (`int`, *optional*): width of the block's feed-forward layer;
            defaults to 4 times the LM hidden size.
        cross_attention_hidden_act (`str`, *optional*, defaults to `"gelu"`): activation of that layer.
        cross_attention_mlp (`str`, *optional*, defaults to `"plain"`):
            `"plain"` (linear, activation, linear) or `"gated"` (down(act(gate(x)) * up(x)), as in Llama).
        cross_attention_norm (`str`, *optional*, defaults to `"layer_norm"`): `"layer_norm"` or `"rms_norm"`.
        cross_attention_norm_eps (`float`, *optional*, defaults to 1e-5): epsilon of those norms.
        gate_type (`str`, *optional*, defaults to `"float"`):
            `"float"` (one tanh gate per sub-layer) or `"vector"` (one gate per hidden channel).
            Gates start at 0, so a new model computes exactly what the LM computes.
        only_attend_immediate_media (`bool`, *optional*, defaults to `True`):
            Each token attends only to the most recent image at or before it; with `False` it
            attends to all images at or before it.
        skip_block_without_image (`bool`, *optional*, defaults to `True`):
            Tokens that attend to no image skip the whole block, feed-forward layer included, so
            they compute exactly what the LM computes. With `False` only the cross-attention
            output is zeroed for them (Idefics' behaviour) and the gated feed-forward layer still runs.
        image_token (`str`, *optional*, defaults to `"<image>"`): the marker that stands for one image.
        image_token_id (`int`, *optional*): vocabulary id of `image_token`.
    """

    model_type = "mmfuse_cross_attention"
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        resampler_num_latents=64,
        resampler_depth=2,
        resampler_num_heads=8,
        resampler_head_dim=64,
        resampler_intermediate_size=None,
        resampler_hidden_act="gelu",
        cross_attention_every_n_layers=4,
        cross_attention_layers=None,
        cross_attention_num_heads=None,
        cross_attention_intermediate_size=None,
        cross_attention_hidden_act="gelu",
        cross_attention_mlp="plain",
        cross_attention_norm="layer_norm",
        cross_attention_norm_eps=1e-5,
        gate_type="float",
        only_attend_immediate_media=True,
        skip_block_without_image=True,
        image_token="<image>",
        image_token_id=None,
        **kwargs,
    ):
        self.vision_config = build_sub_config(vision_config, "vision_config", "clip_vision_model")
        self.text_config = build_sub_config(text_config, "text_config", "llama")

        for name, value, choices in (
            ("vision_feature_select_strategy", vision_feature_select_strategy, FEATURE_SELECT_STRATEGIES),
            ("cross_attention_mlp", cross_attention_mlp, MLP_TYPES),
            ("cross_attention_norm", cross_attention_norm, NORM_TYPES),
            ("gate_type", gate_type, GATE_TYPES),
        ):
            if value not in choices:
                raise ValueError(f"{name}={value!r} is not supported; use one of {choices}.")
        self.vision_feature_layer = int(vision_feature_layer)
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.resampler_num_latents = int(resampler_num_latents)
        self.resampler_depth = int(resampler_depth)
        self.resampler_num_heads = int(resampler_num_heads)
        self.resampler_head_dim = int(resampler_head_dim)
        self.resampler_intermediate_size = resampler_intermediate_size or 4 * vision_hidden_size(self.vision_config)
        self.resampler_hidden_act = resampler_hidden_act
        self.cross_attention_every_n_layers = int(cross_attention_every_n_layers)
        self.cross_attention_layers = None if cross_attention_layers is None else list(cross_attention_layers)
        hidden_size = self.text_config.hidden_size
        self.cross_attention_num_heads = int(cross_attention_num_heads or self.text_config.num_attention_heads)
        self.cross_attention_intermediate_size = int(cross_attention_intermediate_size or 4 * hidden_size)
        self.cross_attention_hidden_act = cross_attention_hidden_act
        self.cross_attention_mlp = cross_attention_mlp
        self.cross_attention_norm = cross_attention_norm
        self.cross_attention_norm_eps = float(cross_attention_norm_eps)
        self.gate_type = gate_type
        self.only_attend_immediate_media = bool(only_attend_immediate_media)
        self.skip_block_without_image = bool(skip_block_without_image)
        self.image_token = image_token
        self.image_token_id = image_token_id

        if hidden_size % self.cross_attention_num_heads != 0:
            raise ValueError(
                f"cross_attention_num_heads={self.cross_attention_num_heads} does not divide the LM hidden size "
                f"{hidden_size}; pick a divisor of {hidden_size}."
            )
        self.check_cross_attention_layers()

        kwargs.setdefault("tie_word_embeddings", getattr(self.text_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)

    def check_cross_attention_layers(self) -> None:
        """Raise ValueError now, rather than when the model is built, for an invalid layer choice."""
        _ = self.cross_attention_layer_indices

    @property
    def cross_attention_layer_indices(self) -> list:
        """Indices of the decoder layers that a gated cross-attention block runs before."""
        num_layers = self.text_config.num_hidden_layers
        if self.cross_attention_layers is not None:
            indices = sorted({int(index) for index in self.cross_attention_layers})
            if not indices or indices[0] < 0 or indices[-1] >= num_layers:
                raise ValueError(
                    f"cross_attention_layers={self.cross_attention_layers} must be a non-empty list of decoder layer "
                    f"indices between 0 and {num_layers - 1} (the LM has {num_layers} layers)."
                )
            return indices
        if self.cross_attention_every_n_layers < 1:
            raise ValueError(
                f"cross_attention_every_n_layers={self.cross_attention_every_n_layers} is invalid; use 1 or more."
            )
        return list(range(0, num_layers, self.cross_attention_every_n_layers))

    @property
    def vision_feature_size(self) -> int:
        """Width of the vision features, which is also the width of the resampler latents."""
        return vision_hidden_size(self.vision_config)


__all__ = ["MmfuseCrossAttentionConfig"]
