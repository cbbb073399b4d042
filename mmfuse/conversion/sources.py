"""Loading the pretrained parts that `mmfuse compose` joins: a vision tower and a causal LM.

A source is a local folder, a Hub id (when online), for the LM a GGUF file that transformers
dequantises, and for vision also an EfficientNet-Lite state dict in the `efficientnet_pytorch`
key format, which becomes timm's `tf_efficientnet_lite0..4` served by `TimmWrapperModel`.
"""

import os
import re

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging

from ..cli import CommandError
from .model_card import SourceInfo

logger = logging.get_logger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
EFFICIENTNET_LITE_VARIANTS = [f"tf_efficientnet_lite{index}" for index in range(5)]
# Input resolution of each EfficientNet-Lite variant, from the TensorFlow release.
EFFICIENTNET_LITE_IMAGE_SIZES = {0: 224, 1: 240, 2: 260, 3: 280, 4: 300}


def check_source_exists(source: str, role: str, option: str) -> None:
    if os.path.exists(source):
        if not os.access(source, os.R_OK):
            raise CommandError(
                f"{role} source {source} is not readable; fix its permissions or pass another {option}."
            )
        return
    if HUB_ID.match(source) and not source.startswith((".", "/")):
        return  # a Hub id; from_pretrained reports a missing repository itself
    raise CommandError(f"{role} source {source} not found; pass a local folder or a Hub id as {option}.")


def read_license(folder: str) -> str | None:
    """Return the `license:` field of a model folder's README.md front matter, if any."""
    readme = os.path.join(folder, "README.md")
    if not os.path.isfile(readme):
        return None
    with open(readme, encoding="utf-8", errors="replace") as handle:
        text = handle.read()
    front_matter = re.match(r"^---\n(.*?)\n---", text, flags=re.DOTALL)
    if not front_matter:
        return None
    license_line = re.search(r"^license:\s*(\S+)\s*$", front_matter.group(1), flags=re.MULTILINE)
    return license_line.group(1) if license_line else None


def load_pretrained(loader, source: str, role: str, **kwargs):
    try:
        return loader.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CommandError(f"cannot load {role} from {source}: {first_line}") from error


# Vision


def load_vision_source(source: str) -> tuple:
    """Load a vision tower; return `(model, SourceInfo)`."""
    check_source_exists(source, "vision", "--vision")
    if os.path.isfile(source):
        model = convert_efficientnet_lite(source)
        return vision_tower_from_classifier(model), SourceInfo(
            "vision tower", source, f"timm_wrapper ({model.config.architecture})", "apache-2.0"
        )

    config = load_pretrained(AutoConfig, source, "vision tower config")
    if getattr(config, "vision_config", None) is not None and not is_vision_config(config):
        # A dual-encoder checkpoint such as CLIP or SigLIP: keep only its vision half.
        config = config.vision_config
    if not is_vision_config(config):
        raise CommandError(
            f"vision source {source} is a {config.model_type!r} model, which takes no pixel_values; "
            "pass a vision encoder (CLIP, SigLIP, ViT, timm ...) as --vision."
        )
    model_class = type(AutoModel.from_config(config)) if config.model_type != "timm_wrapper" else AutoModel
    model = load_pretrained(model_class, source, "vision tower")
    return model.eval(), SourceInfo("vision tower", source, config.model_type, read_license(source))


def is_vision_config(config) -> bool:
    """Whether `config` builds a model whose main input is `pixel_values`."""
    if config.model_type == "timm_wrapper":
        return True
    try:
        model_class = AutoModel._model_mapping[type(config)]
    except KeyError:
        return False
    return getattr(model_class, "main_input_name", None) == "pixel_values"


def efficientnet_lite_key(key: str, block_types: list) -> str:
    """Map one `efficientnet_pytorch` key to timm's name for the same tensor."""
    stem_and_head = {
        "_conv_stem": "conv_stem",
        "_bn0": "bn1",
        "_conv_head": "conv_head",
        "_bn1": "bn2",
        "_fc": "classifier",
    }
    match = re.match(r"^_blocks\.(\d+)\.(\w+)\.(.+)$", key)
    if match is None:
        module, _, rest = key.partition(".")
        return f"{stem_and_head[module]}.{rest}"
    index, module, rest = int(match.group(1)), match.group(2), match.group(3)
    stage, position, block_type = block_types[index]
    if block_type == "DepthwiseSeparableConv":
        names = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    else:
        names = {
            "_expand_conv": "conv_pw",
            "_bn0": "bn1",
            "_depthwise_conv": "conv_dw",
            "_bn1": "bn2",
            "_project_conv": "conv_pwl",
            "_bn2": "bn3",
        }
    return f"blocks.{stage}.{position}.{names[module]}.{rest}"


def convert_efficientnet_lite(path: str):
    """Convert an `efficientnet_pytorch` EfficientNet-Lite state dict into `TimmWrapperForImageClassification`.

    The variant (Lite0 to Lite4) is the one whose tensor names and shapes all match. The
    classifier is kept so that the converted model can be checked on ImageNet.
    """
    try:
        import timm
    except ImportError as error:
        raise CommandError(
            "converting EfficientNet-Lite needs timm (and torchvision); run `pip install timm` and retry."
        ) from error
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CommandError(
            f"vision source {path} is not a PyTorch state dict ({type(error).__name__}); "
            "pass a model folder or an EfficientNet-Lite .pth file as --vision."
        ) from error
    if not isinstance(state_dict, dict) or "_conv_stem.weight" not in state_dict:
        raise CommandError(
            f"vision source {path} is not an EfficientNet-Lite state dict in the efficientnet_pytorch format "
            "(no `_conv_stem.weight`); pass a model folder as --vision."
        )

    for architecture in EFFICIENTNET_LITE_VARIANTS:
        timm_model = timm.create_model(architecture, pretrained=False)
        block_types = [
            (stage, position, type(block).__name__)
            for stage, blocks in enumerate(timm_model.blocks)
            for position, block in enumerate(blocks)
        ]
        if f"_blocks.{len(block_types)}._depthwise_conv.weight" in state_dict:
            continue
        try:
            mapped = {efficientnet_lite_key(key, block_types): value for key, value in state_dict.items()}
        except (KeyError, IndexError):
            continue
        expected = timm_model.state_dict()
        if mapped.keys() != expected.keys() or any(mapped[key].shape != expected[key].shape for key in expected):
            continue
        timm_model.load_state_dict(mapped, strict=True)
        break
    else:
        raise CommandError(
            f"vision source {path} matches none of {EFFICIENTNET_LITE_VARIANTS}; "
            "pass an EfficientNet-Lite state dict in the efficientnet_pytorch format."
        )

    image_size = EFFICIENTNET_LITE_IMAGE_SIZES[int(architecture[-1])]
    pretrained_cfg = {
        key: list(value) if isinstance(value, tuple) else value for key, value in timm_model.pretrained_cfg.items()
    }
    pretrained_cfg["input_size"] = [3, image_size, image_size]
    config = TimmWrapperConfig(
        architecture=architecture,
        num_labels=timm_model.num_classes,
        num_features=timm_model.num_features,
        pretrained_cfg=pretrained_cfg,
    )
    model = TimmWrapperForImageClassification(config)
    model.timm_model.load_state_dict(timm_model.state_dict(), strict=True)
    return model.eval()


def vision_tower_from_classifier(classifier: PreTrainedModel) -> PreTrainedModel:
    """Return the `TimmWrapperModel` (no classifier head) with the weights of a timm classifier."""
    from transformers import TimmWrapperModel

    tower = TimmWrapperModel(classifier.config)
    result = tower.timm_model.load_state_dict(classifier.timm_model.state_dict(), strict=False)
    assert not result.missing_keys, result.missing_keys
    return tower.eval()


# Language model


def load_language_source(source: str | None, gguf_file: str | None = None) -> tuple:
    """Load a causal LM and its tokenizer; return `(model, tokenizer, SourceInfo)`."""
    if gguf_file is not None:
        return load_gguf_language_model(gguf_file)
    if source is None:
        raise CommandError("no language model given; pass --language FOLDER_OR_HUB_ID or --language-gguf FILE.")
    check_source_exists(source, "language", "--language")
    config = load_pretrained(AutoConfig, source, "language model config")
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise CommandError(
            f"language source {source} is a {config.model_type!r} model, not a causal LM; "
            "pass a model that AutoModelForCausalLM loads (Llama, Qwen2, SmolLM2, GPT-2 ...) as --language."
        )
    model = load_pretrained(AutoModelForCausalLM, source, "language model")
    tokenizer = load_pretrained(AutoTokenizer, source, "tokenizer")
    return model.eval(), tokenizer, SourceInfo("language model", source, config.model_type, read_license(source))


def gguf_metadata(path: str) -> dict:
    """Read the architecture and licence fields of a GGUF file without loading its tensors."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as error:
        raise CommandError(
            f"{path} is not a readable GGUF file ({type(error).__name__}: {error}); pass a .gguf file as --language-gguf."
        ) from error
    metadata = {}
    for key in ("general.architecture", "general.license", "general.name"):
        field = reader.fields.get(key)
        if field is not None:
            metadata[key] = bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    return metadata


def load_gguf_language_model(path: str) -> tuple:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if not os.path.isfile(path):
        raise CommandError(f"GGUF file {path} not found; pass the path of a .gguf file as --language-gguf.")
    if not os.access(path, os.R_OK):
        raise CommandError(f"GGUF file {path} is not readable; fix its permissions or pass another --language-gguf.")
    metadata = gguf_metadata(path)
    architecture = metadata.get("general.architecture", "missing")
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise CommandError(
            f"GGUF file {path} has architecture {architecture!r}, which is not a causal LM that transformers loads "
            f"from GGUF; pass the GGUF file of a language model (one of {sorted(GGUF_SUPPORTED_ARCHITECTURES)[:8]} ...)."
        )
    folder, name = os.path.split(os.path.abspath(path))
    logger.info("Dequantising %s (this takes a while for large files)", path)
    tokenizer = load_pretrained(AutoTokenizer, folder, "GGUF tokenizer", gguf_file=name)
    model = load_pretrained(AutoModelForCausalLM, folder, "GGUF language model", gguf_file=name)
    info = SourceInfo(
        "language model",
        name,
        model.config.model_type,
        metadata.get("general.license"),
        gguf_name=metadata.get("general.name"),
    )
    return model.eval(), tokenizer, info
