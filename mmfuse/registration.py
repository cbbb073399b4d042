"""Registration of mmfuse model types with transformers' Auto classes and Hub-code export."""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .processing_common import MmfuseImageProcessor


def register_fusion_type(config_class, base_model_class, generation_model_class, processor_class):
    """Register one fusion type with the Auto classes and mark its classes for Hub-code export.

    After this, `save_pretrained` writes `auto_map` entries and copies the defining files into
    the saved folder, so the folder loads with `trust_remote_code=True` where mmfuse is absent.
    """
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(config_class, base_model_class, exist_ok=True)
    AutoModelForImageTextToText.register(config_class, generation_model_class, exist_ok=True)
    AutoImageProcessor.register(config_class, slow_image_processor_class=MmfuseImageProcessor, exist_ok=True)
    AutoProcessor.register(config_class, processor_class, exist_ok=True)

    config_class.register_for_auto_class()
    base_model_class.register_for_auto_class("AutoModel")
    generation_model_class.register_for_auto_class("AutoModelForImageTextToText")
    processor_class.register_for_auto_class("AutoProcessor")
    MmfuseImageProcessor.register_for_auto_class("AutoImageProcessor")


def register_model_type(config_class, model_class):
    """Register a model type that has no processor (the VQ-GAN image tokenizer) with AutoConfig and AutoModel.

    Like `register_fusion_type`, this marks both classes for Hub-code export, so a saved folder loads with
    `AutoModel.from_pretrained(folder, trust_remote_code=True)` where mmfuse is absent.
    """
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(config_class, model_class, exist_ok=True)
    config_class.register_for_auto_class()
    model_class.register_for_auto_class("AutoModel")
