"""Convert an original LLaVA release (LM folder, mm_projector.bin, vision tower) into an mmfuse_projection folder.

The original LLaVA code stores the projector apart from the LM, as `mm_projector.bin` with keys
`model.mm_projector.0.weight/bias` (linear) or also `model.mm_projector.2.weight/bias`
(mlp2x_gelu). The LM folder's config.json may name the projector type and the vision features
(`mm_projector_type`, `mm_vision_select_layer`, `mm_vision_select_feature`); command-line options
override it. Nothing is written unless the converted model reproduces LLaVA's forward pass,
rebuilt here from the same weights, within --tolerance and its greedy tokens exactly.
"""

import json
import os
import pickle

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_MAPPING
from transformers.utils import logging

from ..cli import CommandError
from ..compose import compose_projection
from .llava import check_select_strategy, image_processor_from_clip, parity_prompt, warn_if_aspect_ratio_kept
from .output import atomic_output_dir, check_output_dir
from .parity import (
    FP32_LOAD_KWARGS,
    PIL_BACKEND_KWARGS,
    ModelOutputs,
    add_parity_arguments,
    compare_outputs,
    load_strictly,
    map_keys,
    model_outputs,
    require_folder,
    synthetic_images,
)

logger = logging.get_logger(__name__)

# LLaVA marks an image in input_ids with this id and splices the image features in its place.
IMAGE_TOKEN_INDEX = -200
# Config model types of the original LLaVA code -> the transformers LM they subclass.
LLAVA_LANGUAGE_MODEL_TYPES = {"llava_llama": "llama", "llava": "llama", "llava_mistral": "mistral"}
# Projector type -> indices of the linear layers in LLaVA's nn.Sequential.
PROJECTOR_LAYERS = {"linear": (0,), "mlp2x_gelu": (0, 2)}
SELECT_FEATURES = {"patch": "default", "cls_patch": "full"}
# Training-only fields that the original LLaVA code adds to the LM's config.json.
LLAVA_CONFIG_FIELDS = (
    "image_aspect_ratio",
    "image_grid_pinpoints",
    "tokenizer_padding_side",
    "tokenizer_model_max_length",
)
VISION_ONLY_PREFIXES = ("text_model.", "text_projection.", "visual_projection.", "logit_scale", "logit_bias")


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError) as error:
        raise CommandError(f"could not read {path}: {error}") from error


def language_model_config(folder: str):
    """Return the LM config of `folder` and the LLaVA `mm_*` fields stored beside it."""
    values = read_json(os.path.join(folder, "config.json"))
    if "text_config" in values:
        raise CommandError(
            f"{folder} contains a transformers Llava model, not an original LLaVA LM; use `mmfuse convert llava`."
        )
    llava_fields = {key: values.pop(key) for key in list(values) if key.startswith("mm_")}
    for key in LLAVA_CONFIG_FIELDS:
        values.pop(key, None)
    model_type = values.get("model_type")
    if model_type in LLAVA_LANGUAGE_MODEL_TYPES:
        values["model_type"] = LLAVA_LANGUAGE_MODEL_TYPES[model_type]
        values.pop("architectures", None)
    try:
        config = AutoConfig.for_model(**values)
    except (ValueError, KeyError, TypeError) as error:
        raise CommandError(
            f"{folder}/config.json is not a causal LM config that transformers knows: {error}"
        ) from error
    return config, llava_fields


def load_language_model(folder: str, config):
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, config=config, output_loading_info=True, **FP32_LOAD_KWARGS
        )
    except (OSError, ValueError) as error:
        raise CommandError(f"could not load the LM in {folder}: {str(error).splitlines()[0]}") from error
    # A full LLaVA release may keep its projector (and the vision tower) in the LM shards; --projector and
    # --vision supply those parts, so such weights are skipped here.
    unexpected = [
        key for key in info.get("unexpected_keys") or [] if ".mm_projector." not in key and "vision_tower" not in key
    ]
    missing = info.get("missing_keys") or []
    if missing or unexpected:
        raise CommandError(
            f"the LM weights in {folder} do not fit its config: {len(missing)} missing {sorted(missing)[:3]}, "
            f"{len(unexpected)} unexpected {sorted(unexpected)[:3]}."
        )
    return model.eval()


def load_vision_model(folder: str):
    """Load the vision tower of `folder`, which contains a vision model or a full CLIP/SigLIP model."""
    try:
        config = AutoConfig.from_pretrained(folder)
        vision_config = getattr(config, "vision_config", config)
        model_class = MODEL_MAPPING[type(vision_config)]
        model, info = model_class.from_pretrained(
            folder, config=vision_config, output_loading_info=True, **FP32_LOAD_KWARGS
        )
    except (OSError, ValueError, KeyError) as error:
        raise CommandError(f"could not load the vision tower in {folder}: {str(error).splitlines()[0]}") from error
    missing = info.get("missing_keys") or []
    unexpected = [
        key
        for key in info.get("unexpected_keys") or []
        if not key.split("vision_model.")[-1].startswith(VISION_ONLY_PREFIXES)
        and not key.startswith(VISION_ONLY_PREFIXES)
    ]
    if missing or unexpected:
        raise CommandError(
            f"the vision weights in {folder} do not fit its config: {len(missing)} missing "
            f"{sorted(missing)[:3]}, {len(unexpected)} unexpected {sorted(unexpected)[:3]}."
        )
    return model.eval()


def load_projector(path: str) -> dict:
    if not os.path.isfile(path):
        raise CommandError(f"projector file {path} does not exist; pass the mm_projector.bin of the LLaVA release.")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as error:
        raise CommandError(f"could not read the projector file {path}: {str(error).splitlines()[0]}") from error
    if not isinstance(state_dict, dict) or not state_dict:
        raise CommandError(f"projector file {path} contains no state dict of tensors; pass LLaVA's mm_projector.bin.")
    return {key: tensor.float() for key, tensor in state_dict.items()}


def projector_layer_indices(state_dict: dict) -> tuple:
    prefix = "model.mm_projector."
    return tuple(sorted({int(key[len(prefix) :].split(".")[0]) for key in state_dict if key.startswith(prefix)}))


def resolve_settings(args, llava_fields: dict, projector_state: dict) -> dict:
    """Pick projector type and vision feature settings: options, then config.json, then defaults."""
    found_layers = projector_layer_indices(projector_state)
    inferred_type = "mlp2x_gelu" if 2 in found_layers else "linear"
    projector_type = args.projector_type or llava_fields.get("mm_projector_type") or inferred_type
    if projector_type not in PROJECTOR_LAYERS:
        raise CommandError(
            f"mm_projector_type={projector_type!r} is not supported; convertible types are {sorted(PROJECTOR_LAYERS)}."
        )
    if found_layers != PROJECTOR_LAYERS[projector_type]:
        raise CommandError(
            f"{args.projector} has projector layers {list(found_layers)}, but mm_projector_type={projector_type!r} "
            f"has layers {list(PROJECTOR_LAYERS[projector_type])}; pass --projector-type to match the file."
        )
    select_feature = args.vision_select_feature or llava_fields.get("mm_vision_select_feature", "patch")
    if select_feature not in SELECT_FEATURES:
        raise CommandError(
            f"mm_vision_select_feature={select_feature!r} is not supported; use one of {sorted(SELECT_FEATURES)}."
        )
    select_layer = args.vision_select_layer
    if select_layer is None:
        select_layer = int(llava_fields.get("mm_vision_select_layer", -2))
    if llava_fields.get("mm_use_im_start_end"):
        raise CommandError(
            "mm_use_im_start_end=true (image start/end tokens around every image) is not supported by mmfuse_projection."
        )
    return {"projector_type": projector_type, "select_feature": select_feature, "select_layer": select_layer}


def config_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


class LlavaReference:
    """LLaVA's forward pass from the original code, rebuilt from the same weights as the converted model.

    The image is one `IMAGE_TOKEN_INDEX` entry in `input_ids`; its projected features are
    spliced into the sequence of text embeddings there.
    """

    def __init__(self, vision_model, language_model, projector_state: dict, settings: dict):
        self.vision_model = vision_model
        self.language_model = language_model
        self.projector_state = projector_state
        self.settings = settings

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Map `[num_images, 3, height, width]` to `[num_images, num_patches, hidden_size]`."""
        outputs = self.vision_model(pixel_values, output_hidden_states=True)
        features = outputs.hidden_states[self.settings["select_layer"]]
        if self.settings["select_feature"] == "patch":
            features = features[:, 1:]
        weights = self.projector_state
        features = features @ weights["model.mm_projector.0.weight"].T + weights["model.mm_projector.0.bias"]
        if self.settings["projector_type"] == "mlp2x_gelu":
            features = torch.nn.functional.gelu(features)
            features = features @ weights["model.mm_projector.2.weight"].T + weights["model.mm_projector.2.bias"]
        return features

    def splice(self, input_ids: list, pixel_values: torch.Tensor) -> torch.Tensor:
        """Return `[1, seq_len, hidden_size]` embeddings with each image's features at its marker."""
        features = self.image_features(pixel_values)
        embed_tokens = self.language_model.get_input_embeddings()
        pieces, text, image_index = [], [], 0
        for token in input_ids + [None]:
            if token is not None and token != IMAGE_TOKEN_INDEX:
                text.append(token)
                continue
            if text:
                pieces.append(embed_tokens(torch.tensor(text)))
                text = []
            if token == IMAGE_TOKEN_INDEX:
                pieces.append(features[image_index])
                image_index += 1
        return torch.cat(pieces).unsqueeze(0)

    @torch.no_grad()
    def outputs(self, input_ids: list, pixel_values: torch.Tensor, max_new_tokens: int, pad_token_id) -> ModelOutputs:
        inputs_embeds = self.splice(input_ids, pixel_values)
        attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long)
        return model_outputs(
            self.language_model,
            {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask},
            max_new_tokens,
            pad_token_id,
        )


def collapse_image_tokens(input_ids: list, image_token_id: int) -> list:
    """Turn each run of expanded image tokens into one LLaVA image marker."""
    collapsed = []
    for token in input_ids:
        if token == image_token_id:
            if not collapsed or collapsed[-1] != IMAGE_TOKEN_INDEX:
                collapsed.append(IMAGE_TOKEN_INDEX)
            continue
        collapsed.append(token)
    return collapsed


def build_image_processor(vision_folder: str, image_size: int):
    """Return an MmfuseImageProcessor that reproduces `vision_folder`'s image processor, or None if it has none."""
    if not os.path.isfile(os.path.join(vision_folder, "preprocessor_config.json")):
        return None
    source = AutoImageProcessor.from_pretrained(vision_folder, **PIL_BACKEND_KWARGS)
    warn_if_aspect_ratio_kept(source)
    return image_processor_from_clip(source, image_size)


def add_arguments(parser) -> None:
    parser.add_argument("--projector", required=True, help="LLaVA's mm_projector.bin.")
    parser.add_argument(
        "--vision", required=True, help="Folder of the vision tower (a CLIP vision model or a full CLIP model)."
    )
    parser.add_argument(
        "--projector-type",
        choices=sorted(PROJECTOR_LAYERS),
        help="Overrides mm_projector_type; by default read from config.json or inferred from the projector file.",
    )
    parser.add_argument(
        "--vision-select-layer",
        type=int,
        help="Overrides mm_vision_select_layer, the vision hidden state that is projected (default -2).",
    )
    parser.add_argument(
        "--vision-select-feature",
        choices=sorted(SELECT_FEATURES),
        help="Overrides mm_vision_select_feature: 'patch' drops the class token, 'cls_patch' keeps it (default patch).",
    )
    add_parity_arguments(parser)


def run(args) -> int:
    check_output_dir(args.output, args.overwrite)
    require_folder(args.input, "language model folder")
    require_folder(args.vision, "vision folder")
    projector_state = load_projector(args.projector)

    text_config, llava_fields = language_model_config(args.input)
    settings = resolve_settings(args, llava_fields, projector_state)
    language_model = load_language_model(args.input, text_config)
    vision_model = load_vision_model(args.vision)
    check_select_strategy(vision_model.config, SELECT_FEATURES[settings["select_feature"]])
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.input)
    except (OSError, ValueError) as error:
        raise CommandError(f"could not load the tokenizer in {args.input}: {str(error).splitlines()[0]}") from error

    model, processor = compose_projection(
        vision_model,
        language_model,
        tokenizer,
        projector_type=settings["projector_type"],
        projector_hidden_act="gelu",
        vision_feature_layer=settings["select_layer"],
        vision_feature_select_strategy=SELECT_FEATURES[settings["select_feature"]],
    )
    projector_table = [
        (rf"model\.mm_projector\.{index}\.", f"linear_{number}.")
        for number, index in enumerate(PROJECTOR_LAYERS[settings["projector_type"]], start=1)
    ]
    projector_weights = map_keys(projector_state, projector_table, args.projector)
    load_strictly(model.model.multi_modal_projector, projector_weights, args.projector)
    image_processor = build_image_processor(args.vision, processor.image_processor.size)
    if image_processor is not None:
        processor.image_processor = image_processor
    model.eval()

    # Both models see the same pixel values and the same text; LLaVA's input has one marker per image.
    images = synthetic_images(2 * processor.image_processor.size + 1)
    inputs = processor(text=parity_prompt(processor.image_token), images=images, return_tensors="pt")
    pad_token_id = tokenizer.pad_token_id
    reference = LlavaReference(vision_model, language_model, projector_state, settings).outputs(
        collapse_image_tokens(inputs["input_ids"][0].tolist(), processor.image_token_id),
        inputs["pixel_values"],
        args.max_new_tokens,
        pad_token_id,
    )
    converted = model_outputs(model, dict(inputs), args.max_new_tokens, pad_token_id)
    # The image token may add one vocabulary entry that LLaVA's LM lacks; compare the shared ones.
    source_vocab_size = reference.logits.shape[-1]
    converted.logits = converted.logits[..., :source_vocab_size]
    report = compare_outputs(reference, converted, args.tolerance)

    dtype = config_dtype(text_config)
    with atomic_output_dir(args.output, args.overwrite) as staging:
        model.to(dtype).save_pretrained(staging)
        processor.save_pretrained(staging)
    print(
        f"Wrote {args.output} (mmfuse_projection, {settings['projector_type']} projector, "
        f"{model.config.num_image_tokens} image tokens per image, {dtype}). Parity with LLaVA's forward: max logit "
        f"difference {report.max_logit_difference:.2e} over {report.num_compared_logits} logits, greedy tokens "
        f"identical ({len(report.new_tokens[0])} generated)."
    )
    return 0
