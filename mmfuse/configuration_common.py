"""Configuration helpers shared by the mmfuse fusion types.

This file is Hub code: it is copied into every saved model folder and imports only
`transformers` and the standard library, so a folder loads where mmfuse is not installed.
"""

from transformers import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

# Vision towers whose sequence output starts with one class token before the patch tokens.
# Towers not listed here (SigLIP, timm convolutional nets, ...) return patch tokens only.
VISION_TOWERS_WITH_CLS_TOKEN = frozenset(
    {"clip_vision_model", "vit", "deit", "dinov2", "beit", "data2vec-vision", "vit_mae", "vit_msn"}
)

# Towers whose output is a 2D feature map [batch_size, channels, height, width] that is
# flattened into a sequence of `height * width` tokens.
FEATURE_MAP_VISION_TOWERS = frozenset({"timm_wrapper", "resnet", "convnext", "convnextv2", "efficientnet"})


def build_sub_config(value, name: str, default_model_type: str) -> PretrainedConfig:
    """Turn a sub-config given as None, a dict or a config object into a config object."""
    if value is None:
        return CONFIG_MAPPING[default_model_type]()
    if isinstance(value, PretrainedConfig):
        return value
    if isinstance(value, dict):
        value = dict(value)
        model_type = value.pop("model_type", default_model_type)
        if model_type not in CONFIG_MAPPING:
            raise ValueError(
                f"`{name}` has model_type {model_type!r}, which this transformers version does not know; "
                "upgrade transformers or pick a model type from transformers.models.auto.CONFIG_MAPPING."
            )
        return CONFIG_MAPPING[model_type](**value)
    raise TypeError(f"`{name}` must be a dict or a PretrainedConfig, got {type(value).__name__}.")


def vision_hidden_size(vision_config: PretrainedConfig) -> int:
    """Return the width of one vision feature token."""
    if vision_config.model_type == "timm_wrapper":
        return vision_config.num_features
    for attribute in ("hidden_size", "embed_dim"):
        if getattr(vision_config, attribute, None):
            return getattr(vision_config, attribute)
    if getattr(vision_config, "hidden_sizes", None):
        return vision_config.hidden_sizes[-1]
    raise ValueError(
        f"Cannot tell the feature width of vision model type {vision_config.model_type!r}: its config has none of "
        "`hidden_size`, `embed_dim`, `hidden_sizes`, `num_features`."
    )


def vision_image_size(vision_config: PretrainedConfig) -> int:
    """Return the square input resolution the vision tower expects, in pixels."""
    if vision_config.model_type == "timm_wrapper":
        input_size = vision_config.pretrained_cfg.get("input_size", (3, 224, 224))
        return int(input_size[-1])
    image_size = getattr(vision_config, "image_size", None)
    if isinstance(image_size, (list, tuple)):
        if image_size[0] != image_size[-1]:
            raise ValueError(
                f"Only square vision inputs are supported, the vision config has image_size={image_size}."
            )
        image_size = image_size[0]
    if not image_size:
        raise ValueError(
            f"The vision config of type {vision_config.model_type!r} has no `image_size`; set it, "
            "for example `vision_config.image_size = 224`."
        )
    return int(image_size)


def vision_grid_size(vision_config: PretrainedConfig) -> int:
    """Return the side of the square grid of patch features the vision tower produces."""
    image_size = vision_image_size(vision_config)
    if vision_config.model_type in FEATURE_MAP_VISION_TOWERS:
        # Convolutional towers downsample by 32 and round up, like TF "same" padding.
        return -(-image_size // 32)
    patch_size = getattr(vision_config, "patch_size", None)
    if isinstance(patch_size, (list, tuple)):
        patch_size = patch_size[0]
    if not patch_size:
        raise ValueError(f"The vision config of type {vision_config.model_type!r} has no `patch_size`.")
    return image_size // patch_size


def vision_has_cls_token(vision_config: PretrainedConfig) -> bool:
    return vision_config.model_type in VISION_TOWERS_WITH_CLS_TOKEN


__all__ = [
    "build_sub_config",
    "vision_grid_size",
    "vision_has_cls_token",
    "vision_hidden_size",
    "vision_image_size",
]
