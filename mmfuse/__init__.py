"""mmfuse: turn a pretrained causal LM into a vision-language model.

Importing the package registers every mmfuse model type with transformers' Auto classes, so
`AutoConfig`, `AutoModel`, `AutoModelForImageTextToText` and `AutoProcessor` resolve mmfuse
folders without `trust_remote_code`. Saved folders also carry the Hub code and load without
mmfuse installed, with `trust_remote_code=True`.
"""

from .configuration_projection import MmfuseProjectionConfig
from .configuration_vqgan import MmfuseVQGANConfig
from .modeling_projection import (
    MmfuseProjectionForConditionalGeneration,
    MmfuseProjectionModel,
    MmfuseProjectionPreTrainedModel,
)
from .modeling_vqgan import MmfuseVQGANModel
from .processing_common import MmfuseImageProcessor
from .processing_projection import MmfuseProjectionProcessor
from .registration import register_fusion_type, register_model_type

__version__ = "0.1.0"

register_fusion_type(
    config_class=MmfuseProjectionConfig,
    base_model_class=MmfuseProjectionModel,
    generation_model_class=MmfuseProjectionForConditionalGeneration,
    processor_class=MmfuseProjectionProcessor,
)
register_model_type(MmfuseVQGANConfig, MmfuseVQGANModel)

__all__ = [
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
