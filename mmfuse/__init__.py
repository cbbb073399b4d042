"""mmfuse: turn a pretrained causal LM into a vision-language model.

Importing the package registers every mmfuse model type with transformers' Auto classes, so
`AutoConfig`, `AutoModel`, `AutoModelForImageTextToText` and `AutoProcessor` resolve mmfuse
folders without `trust_remote_code`. Saved folders also carry the Hub code and load without
mmfuse installed, with `trust_remote_code=True`.
"""

import transformers

from .configuration_cross_attention import MmfuseCrossAttentionConfig
from .configuration_projection import MmfuseProjectionConfig
from .configuration_vq import MmfuseVQConfig
from .configuration_vqgan import MmfuseVQGANConfig
from .modeling_cross_attention import (
    MmfuseCrossAttentionForConditionalGeneration,
    MmfuseCrossAttentionModel,
    MmfuseCrossAttentionPreTrainedModel,
)
from .modeling_projection import (
    MmfuseProjectionForConditionalGeneration,
    MmfuseProjectionModel,
    MmfuseProjectionPreTrainedModel,
)
from .modeling_vq import MmfuseVQForConditionalGeneration, MmfuseVQModel, MmfuseVQPreTrainedModel
from .modeling_vqgan import MmfuseVQGANModel
from .processing_common import MmfuseImageProcessor
from .processing_cross_attention import MmfuseCrossAttentionProcessor
from .processing_projection import MmfuseProjectionProcessor
from .processing_vq import MmfuseVQProcessor
from .registration import register_fusion_type, register_model_type

__version__ = "0.1.0"

register_fusion_type(
    config_class=MmfuseProjectionConfig,
    base_model_class=MmfuseProjectionModel,
    generation_model_class=MmfuseProjectionForConditionalGeneration,
    processor_class=MmfuseProjectionProcessor,
)
register_fusion_type(
    config_class=MmfuseCrossAttentionConfig,
    base_model_class=MmfuseCrossAttentionModel,
    generation_model_class=MmfuseCrossAttentionForConditionalGeneration,
    processor_class=MmfuseCrossAttentionProcessor,
)
register_model_type(MmfuseVQGANConfig, MmfuseVQGANModel)
register_fusion_type(
    config_class=MmfuseVQConfig,
    base_model_class=MmfuseVQModel,
    generation_model_class=MmfuseVQForConditionalGeneration,
    processor_class=MmfuseVQProcessor,
)
if hasattr(transformers, "AutoModelForMultimodalLM"):
    # The VQ-token type also generates images, so the any-to-any pipeline may load it.
    transformers.AutoModelForMultimodalLM.register(MmfuseVQConfig, MmfuseVQForConditionalGeneration, exist_ok=True)

__all__ = [
    "MmfuseVQProcessor",
    "MmfuseVQPreTrainedModel",
    "MmfuseVQModel",
    "MmfuseVQForConditionalGeneration",
    "MmfuseVQConfig",
    "MmfuseCrossAttentionConfig",
    "MmfuseCrossAttentionForConditionalGeneration",
    "MmfuseCrossAttentionModel",
    "MmfuseCrossAttentionPreTrainedModel",
    "MmfuseCrossAttentionProcessor",
    "MmfuseImageProcessor",
    "MmfuseProjectionConfig",
    "MmfuseProjectionForConditionalGeneration",
    "MmfuseProjectionModel",
    "MmfuseProjectionPreTrainedModel",
    "MmfuseProjectionProcessor",
    "MmfuseVQGANConfig",
    "MmfuseVQGANModel",
    "register_fusion_type",
    "register_model_type",
]
