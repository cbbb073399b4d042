"""Convert a transformers Llava folder into an mmfuse_projection folder.

The input is a folder written by `LlavaForConditionalGeneration.save_pretrained` and
`LlavaProcessor.save_pretrained`. The output contains the same weights as an mmfuse_projection
model with its processor, tokenizer and chat template. Nothing is written unless the converted
model reproduces the source's fp32 logits within --tolerance and its greedy tokens exactly.
"""

import torch
from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration
from transformers.utils import logging

from ..cli import CommandError
from ..configuration_common import vision_has_cls_token, vision_image_size
from ..configuration_projection import MmfuseProjectionConfig
from ..modeling_projection import MmfuseProjectionForConditionalGeneration
from ..processing_common import RESAMPLE_FILTERS, MmfuseImageProcessor
from ..processing_projection import MmfuseProjectionProcessor
from .output import atomic_output_dir, check_output_dir
from .parity import (
    FP32_LOAD_KWARGS,
    PIL_BACKEND_KWARGS,
    add_parity_arguments,
    compare_outputs,
    load_strictly,
    map_keys,
    model_outputs,
    read_checkpoint,
    require_folder,
    synthetic_images,
)

logger = logging.get_logger(__name__)

PARITY_INPUT_NAMES = ("input_ids", "attention_mask", "pixel_values")
RESAMPLE_NAMES = {value: name for name, value in RESAMPLE_FILTERS.items()}


def llava_key_table(model: MmfuseProjectionForConditionalGeneration) -> tuple:
    """Return the `(source pattern, target prefix)` rules from Llava checkpoint keys to mmfuse keys.

    Llava checkpoints come in two layouts: transformers 4.52 to 4.57 save `model.language_model.*`
    and `lm_head.*`, while earlier releases and 5.x save `language_model.model.*` and
    `language_model.lm_head.*`. CLIP and SigLIP towers appear with or without the `vision_model.`
    level, and the target gets whichever level the installed transformers builds.
    """
    tower = model.model.vision_tower
    tower_prefix = "model.vision_tower.vision_model." if hasattr(tower, "vision_model") else "model.vision_tower."
    return (
        (r"language_model\.model\.", "model.language_model."),
        (r"model\.language_model\.", "model.language_model."),
        (r"language_model\.lm_head\.", "lm_head."),
        (r"lm_head\.", "lm_head."),
        (r"(model\.)?multi_modal_projector\.", "model.multi_modal_projector."),
        (r"(model\.)?vision_tower\.(vision_model\.)?", tower_prefix),
    )


def square_side(size, name: str, processor_name: str) -> int:
    """Return the side of a square `size` setting (`shortest_edge`, or equal `height` and `width`)."""
    if isinstance(size, int):
        return size
    size = dict(size)
    if "shortest_edge" in size and len(size) == 1:
        return int(size["shortest_edge"])
    if set(size) == {"height", "width"} and size["height"] == size["width"]:
        return int(size["height"])
    raise CommandError(
        f"{processor_name} has {name}={size}, which MmfuseImageProcessor cannot reproduce; it needs "
        "a square size ({'shortest_edge': n} or equal height and width)."
    )


def image_processor_from_clip(source, image_size: int) -> MmfuseImageProcessor:
    """Build an `MmfuseImageProcessor` that gives `source`'s pixel values.

    `source` is a CLIP-style image processor (resize, optional center crop, rescale by 1/255,
    normalize). A shortest-edge resize followed by a center crop of the same side maps to
    `crop_to_square=True`, which gives identical pixel values for images of any aspect ratio;
    a `{height, width}` resize maps to the stretching default. Settings that change the pixel
    values of a square image in a way MmfuseImageProcessor cannot follow raise `CommandError`.
    """
    name = type(source).__name__
    if not getattr(source, "do_resize", True):
        raise CommandError(f"{name} has do_resize=False; MmfuseImageProcessor always resizes to a square.")
    side = square_side(source.size, "size", name)
    crop_size = getattr(source, "crop_size", None)
    center_crop = bool(getattr(source, "do_center_crop", False) and crop_size)
    if center_crop:
        crop_side = square_side(crop_size, "crop_size", name)
        if crop_side != side:
            raise CommandError(
                f"{name} resizes to {side} px and then crops {crop_side} px; MmfuseImageProcessor resizes "
                "straight to the final size, so the pixel values would differ. Set size and crop_size equal."
            )
    if side != image_size:
        raise CommandError(
            f"{name} outputs {side} px images, but the vision tower expects image_size={image_size}; "
            "the source folder is inconsistent."
        )
    rescale_factor = getattr(source, "rescale_factor", 1 / 255)
    if not getattr(source, "do_rescale", True) or abs(rescale_factor - 1 / 255) > 1e-12:
        raise CommandError(
            f"{name} has do_rescale={getattr(source, 'do_rescale', True)}, rescale_factor={rescale_factor}; "
            "MmfuseImageProcessor always rescales by 1/255."
        )
    resample = int(getattr(source, "resample", RESAMPLE_FILTERS["bicubic"]))
    if resample not in RESAMPLE_NAMES:
        raise CommandError(
            f"{name} has resample={resample}; MmfuseImageProcessor supports the PIL filters "
            f"{sorted(RESAMPLE_FILTERS.values())} ({', '.join(RESAMPLE_FILTERS)})."
        )
    return MmfuseImageProcessor(
        size=side,
        resample=RESAMPLE_NAMES[resample],
        image_mean=source.image_mean,
        image_std=source.image_std,
        do_normalize=getattr(source, "do_normalize", True),
        crop_to_square=keeps_aspect_ratio(source) and center_crop,
    )


def keeps_aspect_ratio(source) -> bool:
    """True when `source` resizes the shortest edge (`size={"shortest_edge": n}`) instead of to a fixed shape."""
    size = getattr(source, "size", None)
    if size is None or isinstance(size, int):
        return isinstance(size, int)
    # transformers 5 stores sizes as `SizeDict`, which converts to a dict of the fields that are set.
    return "shortest_edge" in dict(size)


def warn_if_aspect_ratio_kept(source) -> None:
    # NOTE: without a center crop, a shortest-edge resize gives non-square pixel values, which
    # MmfuseImageProcessor cannot output; it stretches instead. Square images still match.
    crops = getattr(source, "do_center_crop", False) and getattr(source, "crop_size", None)
    if keeps_aspect_ratio(source) and not crops:
        logger.warning(
            "The source image processor resizes the shortest edge without a center crop; the converted processor "
            "stretches images to a square, so non-square images get different pixel values."
        )


def load_processor(folder: str, model_name: str):
    """Load the processor saved in `folder` with its PIL image backend; `model_name` names it in errors."""
    try:
        return AutoProcessor.from_pretrained(folder, **PIL_BACKEND_KWARGS)
    except (OSError, ValueError, TypeError) as error:
        raise CommandError(
            f"could not load the {model_name} processor from {folder}: {str(error).splitlines()[0]}; "
            f"save the {model_name}Processor into the same folder."
        ) from error


def load_source(folder: str):
    """Load the Llava model (fp32) and processor in `folder`, rejecting incomplete checkpoints."""
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise CommandError(f"could not read the config in {folder}: {str(error).splitlines()[0]}") from error
    if config.model_type != "llava":
        raise CommandError(
            f"{folder} contains a model of type {config.model_type!r}, expected 'llava'; "
            "pass a folder written by LlavaForConditionalGeneration.save_pretrained."
        )
    processor = load_processor(folder, "Llava")
    if not hasattr(processor, "image_processor") or not hasattr(processor, "image_token"):
        raise CommandError(
            f"{folder} contains a {type(processor).__name__}, expected a LlavaProcessor; "
            "save the LlavaProcessor into the same folder."
        )

    model, loading_info = LlavaForConditionalGeneration.from_pretrained(
        folder, output_loading_info=True, **FP32_LOAD_KWARGS
    )
    missing = loading_info.get("missing_keys") or []
    unexpected = loading_info.get("unexpected_keys") or []
    if missing or unexpected:
        raise CommandError(
            f"the Llava checkpoint in {folder} is incomplete: transformers reports {len(missing)} missing "
            f"{sorted(missing)[:3]} and {len(unexpected)} unexpected {sorted(unexpected)[:3]} weights."
        )
    return model.eval(), processor


def check_select_strategy(vision_config, strategy: str) -> None:
    # LLaVA drops the first token even where it is a patch; mmfuse drops only a class token.
    if strategy == "default" and not vision_has_cls_token(vision_config):
        raise CommandError(
            f"vision_feature_select_strategy='default' on a {vision_config.model_type} tower drops its first "
            "patch in LLaVA, which mmfuse does not reproduce; only towers with a class token convert."
        )


def convert_config(source_config, image_token: str) -> MmfuseProjectionConfig:
    vision_config = source_config.vision_config
    strategy = source_config.vision_feature_select_strategy
    check_select_strategy(vision_config, strategy)
    tie_word_embeddings = bool(
        getattr(source_config, "tie_word_embeddings", False)
        or getattr(source_config.text_config, "tie_word_embeddings", False)
    )
    return MmfuseProjectionConfig(
        vision_config=vision_config.to_dict(),
        text_config=source_config.text_config.to_dict(),
        projector_type="mlp2x_gelu",
        projector_bias=getattr(source_config, "multimodal_projector_bias", True),
        projector_hidden_act=source_config.projector_hidden_act,
        vision_feature_layer=source_config.vision_feature_layer,
        vision_feature_select_strategy=strategy,
        image_token=image_token,
        image_token_id=source_config.image_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )


def convert_model(folder: str, config: MmfuseProjectionConfig) -> tuple:
    """Build the mmfuse model from the checkpoint tensors in `folder`; return it (fp32) and the source dtype."""
    state_dict = read_checkpoint(folder)
    source_dtype = next((tensor.dtype for tensor in state_dict.values() if tensor.is_floating_point()), None)
    state_dict = {key: tensor.float() if tensor.is_floating_point() else tensor for key, tensor in state_dict.items()}

    model = MmfuseProjectionForConditionalGeneration(config)
    mapped = map_keys(state_dict, llava_key_table(model), folder)
    tied_keys = ("lm_head.weight",) if config.tie_word_embeddings else ()
    load_strictly(model, mapped, folder, tied_keys=tied_keys)
    return model.eval(), source_dtype or torch.float32


def convert_processor(source_processor, config: MmfuseProjectionConfig) -> MmfuseProjectionProcessor:
    tokenizer = source_processor.tokenizer
    image_token = source_processor.image_token
    image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    if image_token_id != config.image_token_id:
        raise CommandError(
            f"the tokenizer maps {image_token!r} to id {image_token_id}, but the Llava config has "
            f"image_token_id={config.image_token_id}; the source folder is inconsistent."
        )
    warn_if_aspect_ratio_kept(source_processor.image_processor)
    image_processor = image_processor_from_clip(
        source_processor.image_processor, vision_image_size(config.vision_config)
    )
    tokenizer.padding_side = "left"  # batched generation appends to the right end of every row
    return MmfuseProjectionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=source_processor.chat_template,
        num_image_tokens=config.num_image_tokens,
        image_token=image_token,
    )


def parity_prompt(image_token: str) -> str:
    return f"{image_token}\nWhat is in the picture? {image_token} Describe it."


def check_processor_parity(source_processor, processor, tolerance: float) -> dict:
    """Compare both processors on the parity prompt; return the source's model inputs."""
    image_size = processor.image_processor.size
    images = synthetic_images(2 * image_size + 1)
    prompt = parity_prompt(processor.image_token)
    source_inputs = source_processor(text=prompt, images=images, return_tensors="pt")
    converted_inputs = processor(text=prompt, images=images, return_tensors="pt")

    source_ids = source_inputs["input_ids"]
    converted_ids = converted_inputs["input_ids"]
    if source_ids.shape != converted_ids.shape or not torch.equal(source_ids, converted_ids):
        raise CommandError(
            f"parity check failed: the converted processor encodes the test prompt into "
            f"{converted_ids.shape[1]} tokens, the LlavaProcessor into {source_ids.shape[1]} "
            f"(image tokens per image: {processor.num_image_tokens} here); nothing was written."
        )
    pixel_difference = float((source_inputs["pixel_values"] - converted_inputs["pixel_values"]).abs().max())
    if not pixel_difference <= tolerance:
        raise CommandError(
            f"parity check failed: pixel values differ from the LlavaProcessor's by up to "
            f"{pixel_difference:.3e} (tolerance {tolerance:.1e}); nothing was written."
        )
    return {name: source_inputs[name] for name in PARITY_INPUT_NAMES}


def add_arguments(parser) -> None:
    add_parity_arguments(parser)


def run(args) -> int:
    check_output_dir(args.output, args.overwrite)
    require_folder(args.input, "input folder")
    source_model, source_processor = load_source(args.input)

    config = convert_config(source_model.config, source_processor.image_token)
    model, source_dtype = convert_model(args.input, config)
    processor = convert_processor(source_processor, config)

    inputs = check_processor_parity(source_processor, processor, args.tolerance)
    pad_token_id = processor.tokenizer.pad_token_id
    reference = model_outputs(source_model, inputs, args.max_new_tokens, pad_token_id)
    converted = model_outputs(model, inputs, args.max_new_tokens, pad_token_id)
    report = compare_outputs(reference, converted, args.tolerance)

    with atomic_output_dir(args.output, args.overwrite) as staging:
        model.to(source_dtype).save_pretrained(staging)
        processor.save_pretrained(staging)
    print(
        f"Wrote {args.output} (mmfuse_projection, {config.num_image_tokens} image tokens per image, "
        f"{source_dtype}). Parity: max logit difference {report.max_logit_difference:.2e} over "
        f"{report.num_compared_logits} logits, greedy tokens identical ({len(report.new_tokens[0])} generated)."
    )
    return 0
