"""Cache of frozen-vision-tower outputs, so the tower runs once per image instead of once per step.

A model takes part when it offers `get_vision_features(pixel_values)` (the vision tower's output,
before the connector) and accepts the same tensor back as the `vision_features` argument of
`forward`. With the tower frozen, that output depends only on the image, so it is computed the
first time an image id appears and reused for every later step and epoch.
"""

import inspect

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)


def supports_feature_cache(model: torch.nn.Module) -> bool:
    """True when `model` can run on precomputed vision features (see the module docstring)."""
    if not hasattr(model, "get_vision_features"):
        return False
    return "vision_features" in inspect.signature(model.forward).parameters


def vision_tower_is_frozen(model: torch.nn.Module) -> bool:
    tower = getattr(model, "vision_tower", None)
    if tower is None:
        return False
    return not any(parameter.requires_grad for parameter in tower.parameters())


class VisionFeatureCache:
    """Vision tower outputs by image id, kept on the CPU.

    Attributes:
        num_computed: number of images the vision tower has encoded through this cache.
    """

    def __init__(self):
        self.features = {}
        self.num_computed = 0

    def __len__(self) -> int:
        return len(self.features)

    def __contains__(self, image_id) -> bool:
        return image_id in self.features

    @torch.no_grad()
    def vision_features(self, model: torch.nn.Module, image_ids: list, pixel_values: torch.Tensor) -> torch.Tensor:
        """Return `[num_images, num_patches, vision_feature_size]` features for a batch of images.

        Args:
            model: the unwrapped mmfuse model (not a DDP or PEFT wrapper).
            image_ids: one id per image, in the order of `pixel_values`.
            pixel_values: `[num_images, num_channels, height, width]`; only rows whose id is not
                cached yet go through the vision tower.
        """
        if len(image_ids) != pixel_values.shape[0]:
            raise ValueError(
                f"Got {len(image_ids)} image ids for {pixel_values.shape[0]} images; the collator must give one "
                "`image_ids` entry per image."
            )
        if any(image_id is None for image_id in image_ids):
            raise ValueError(
                "An example has no `image_id`, so its vision features cannot be cached; give every example "
                "an `image_id` or train without the feature cache."
            )
        missing = [index for index, image_id in enumerate(image_ids) if image_id not in self.features]
        # The same image can appear twice in one batch; encode it once.
        first_missing = {}
        for index in missing:
            first_missing.setdefault(image_ids[index], index)
        if first_missing:
            rows = list(first_missing.values())
            tower = model.vision_tower
            was_training = tower.training
            tower.eval()  # dropout off: cached features must not depend on the step that computed them
            try:
                computed = model.get_vision_features(pixel_values[rows])
            finally:
                tower.train(was_training)
            for image_id, features in zip(first_missing, computed):
                self.features[image_id] = features.detach().cpu()
            self.num_computed += len(rows)
        device = pixel_values.device
        return torch.stack([self.features[image_id] for image_id in image_ids]).to(device)


__all__ = ["VisionFeatureCache", "supports_feature_cache", "vision_tower_is_frozen"]
