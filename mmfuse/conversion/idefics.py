"""Convert a transformers Idefics folder into an mmfuse_cross_attention folder.

The input is a folder written by `IdeficsForVisionText2Text.save_pretrained`, normally with the
`IdeficsProcessor` saved beside it. The output contains the same weights as an mmfuse_cross_attention
model: the Idefics vision transformer becomes a CLIP vision tower, its Perceiver resampler and
gated cross-attention layers map one to one, and its decoder becomes a Llama LM. The processor
becomes an `MmfuseCrossAttentionProcessor` with the same tokenizer, chat template, image tokens
and image preprocessing. Idefics options without a counterpart are rejected by name. Nothing is
written unless the converted processor encodes a test prompt into the same token ids and pixel
values, and the converted model reproduces the source's fp32 logits within --tolerance and its
greedy tokens exactly.
"""

import copy
import os

import torch
from transformers import AutoTokenizer, IdeficsForVisionText2Text
from transformers.utils import logging

from ..cli import CommandError
from ..configuration_cross_attention import MmfuseCrossAttentionConfig
from ..modeling_common import TRANSFORMERS_MAJOR
from ..modeling_cross_attention import MmfuseCrossAttentionForConditionalGeneration, media_location_mask
from ..processing_common import MmfuseImageProcessor
from ..processing_cross_attention import MmfuseCrossAttentionProcessor
from .llava import image_processor_from_clip, load_processor
from .output import atomic_output_dir, check_output_dir
from .parity import (
    FP32_LOAD_KWARGS,
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

PARITY_SEQUENCE = (5, 7, None, 11, 13, 17, None, 19, 23)  # None marks an image
# The tokens IdeficsProcessor writes around images, as transformers 4.57 and 5.25 define them.
IMAGE_TOKEN = "<image>"
IMAGE_BOUNDARY_TOKEN = "<fake_token_around_image>"
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def reject_unsupported(config) -> None:
    """Raise `CommandError` for Idefics options that mmfuse_cross_attention cannot express."""
    checks = (
        ("additional_vocab_size", config.additional_vocab_size, 0),
        ("use_resampler", config.use_resampler, True),
        ("qk_layer_norms", config.qk_layer_norms, False),
        ("perceiver_config.qk_layer_norms_perceiver", config.perceiver_config.qk_layer_norms_perceiver, False),
    )
    for name, value, supported in checks:
        if value != supported:
            raise CommandError(
                f"the Idefics config has {name}={value!r}, which mmfuse_cross_attention cannot express "
                f"(it supports {name}={supported!r} only); this checkpoint cannot be converted."
            )
    if config.num_hidden_layers % config.cross_layer_interval != 0:
        raise CommandError(
            f"the Idefics config has cross_layer_interval={config.cross_layer_interval}, which does not divide "
            f"num_hidden_layers={config.num_hidden_layers}; this layout cannot be converted."
        )


def convert_config(config, image_token_id: int) -> MmfuseCrossAttentionConfig:
    vision = config.vision_config
    perceiver = config.perceiver_config
    vision_config = {
        "model_type": "clip_vision_model",
        "hidden_size": vision.embed_dim,
        "intermediate_size": vision.intermediate_size,
        "num_hidden_layers": vision.num_hidden_layers,
        "num_attention_heads": vision.num_attention_heads,
        "num_channels": vision.num_channels,
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "hidden_act": vision.hidden_act,
        "layer_norm_eps": vision.layer_norm_eps,
    }
    rope_theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta") or getattr(
        config, "rope_theta", 10000.0
    )
    text_config = {
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_attention_heads,
        "hidden_act": config.hidden_act,
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": rope_theta,
        "tie_word_embeddings": config.tie_word_embeddings,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
    }
    return MmfuseCrossAttentionConfig(
        vision_config=vision_config,
        text_config=text_config,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",  # Idefics resamples every token, class token included
        resampler_num_latents=perceiver.resampler_n_latents,
        resampler_depth=perceiver.resampler_depth,
        resampler_num_heads=perceiver.resampler_n_heads,
        resampler_head_dim=perceiver.resampler_head_dim,
        resampler_intermediate_size=4 * vision.embed_dim,
        resampler_hidden_act="relu",
        cross_attention_every_n_layers=config.cross_layer_interval,
        cross_attention_intermediate_size=config.intermediate_size,
        cross_attention_hidden_act=config.hidden_act,
        cross_attention_mlp="gated",
        cross_attention_norm="rms_norm",
        cross_attention_norm_eps=config.rms_norm_eps,
        gate_type=config.alpha_type,
        only_attend_immediate_media=True,
        skip_block_without_image=False,  # Idefics runs the gated feed-forward layer on every token
        image_token_id=image_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
    )


def idefics_key_table(model, config) -> list:
    """Return the `(source pattern, target prefix)` rules from Idefics keys to mmfuse keys."""
    tower = model.model.vision_tower
    tower_prefix = "model.vision_tower.vision_model." if hasattr(tower, "vision_model") else "model.vision_tower."
    interval = config.cross_layer_interval
    table = [
        (r"model\.embed_tokens\.", "model.language_model.embed_tokens."),
        (r"model\.norm\.", "model.language_model.norm."),
        (r"lm_head\.", "lm_head."),
        (r"model\.vision_model\.", tower_prefix),
        (r"model\.perceiver_resampler\.latents$", "model.resampler.latents"),
        (r"model\.perceiver_resampler\.layer_norm\.", "model.resampler.norm."),
    ]
    resampler_names = {
        "0.context_layer_norm.": "attention.context_norm.",
        "0.latents_layer_norm.": "attention.latents_norm.",
        "0.q_proj.": "attention.q_proj.",
        "0.k_proj.": "attention.k_proj.",
        "0.v_proj.": "attention.v_proj.",
        "0.output_proj.": "attention.o_proj.",
        "1.ln.": "mlp.norm.",
        "1.fc.": "mlp.fc1.",
        "1.c_proj.": "mlp.fc2.",
    }
    for depth in range(config.perceiver_config.resampler_depth):
        for source, target in resampler_names.items():
            table.append(
                (rf"model\.perceiver_resampler\.blocks\.{depth}\.{source}", f"model.resampler.layers.{depth}.{target}")
            )
    block_names = {
        "input_layernorm.": "attention_norm.",
        "cross_attn.": "cross_attention.",
        "post_attention_layernorm.": "mlp_norm.",
        "mlp.": "mlp.",
        "alpha_cross_attn": "attention_gate",
        "alpha_dense": "mlp_gate",
    }
    for layer in range(config.num_hidden_layers):
        wrapped = layer % interval == 0
        inner = "decoder_layer." if wrapped else ""
        table.append((rf"model\.layers\.{layer}\.", f"model.language_model.layers.{layer}.{inner}"))
        if wrapped:
            for source, target in block_names.items():
                table.append(
                    (
                        rf"model\.gated_cross_attn_layers\.{layer // interval}\.{source}",
                        f"model.language_model.layers.{layer}.gated_cross_attention.{target}",
                    )
                )
    return table


def convert_model(folder: str, config: MmfuseCrossAttentionConfig, source_config) -> tuple:
    """Build the mmfuse model from the checkpoint tensors in `folder`; return it (fp32) and the source dtype."""
    state_dict = read_checkpoint(folder)
    source_dtype = next((tensor.dtype for tensor in state_dict.values() if tensor.is_floating_point()), None)
    state_dict = {key: tensor.float() if tensor.is_floating_point() else tensor for key, tensor in state_dict.items()}

    model = MmfuseCrossAttentionForConditionalGeneration(config)
    mapped = map_keys(state_dict, idefics_key_table(model, source_config), folder)
    # Idefics stores vector gates as [1, 1, hidden_size] and float gates as [1].
    for key in [key for key in mapped if key.endswith(("attention_gate", "mlp_gate"))]:
        mapped[key] = mapped[key].reshape(-1)
    tied_keys = ("lm_head.weight",) if config.tie_word_embeddings else ()
    load_strictly(model, mapped, folder, tied_keys=tied_keys)
    return model.eval(), source_dtype or torch.float32


def parity_inputs(config: MmfuseCrossAttentionConfig, image_size: int) -> tuple:
    """Return `(source_inputs, converted_inputs)`: one prompt with two images, in each model's layout."""
    image_token_id = config.image_token_id
    input_ids = torch.tensor([[image_token_id if token is None else token for token in PARITY_SEQUENCE]])
    num_images = PARITY_SEQUENCE.count(None)
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(num_images, 3, image_size, image_size, generator=generator)
    image_counts = torch.cumsum(input_ids == image_token_id, dim=1)
    image_attention_mask = media_location_mask(image_counts, torch.tensor([num_images]), num_images, immediate=True)
    attention_mask = torch.ones_like(input_ids)
    source_inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values.unsqueeze(0),
        "image_attention_mask": image_attention_mask.long(),
    }
    converted_inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
    return source_inputs, converted_inputs


def find_image_token_id(folder: str, image_token_id: int | None) -> int:
    if image_token_id is not None:
        return image_token_id
    if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        token_id = tokenizer.convert_tokens_to_ids("<image>")
        if token_id is not None and token_id != tokenizer.unk_token_id:
            return token_id
    raise CommandError(
        f"{folder} has no tokenizer that knows '<image>'; pass --image-token-id with the id of the image token."
    )


def load_source_processor(folder: str):
    """Load the `IdeficsProcessor` saved in `folder` with its PIL image backend, or return None if there is none."""
    if not any(os.path.isfile(os.path.join(folder, name)) for name in PROCESSOR_FILES):
        logger.warning(
            f"{folder} contains no IdeficsProcessor ({' or '.join(PROCESSOR_FILES)}), so the converted folder "
            "gets no processor and AutoProcessor and pipelines cannot load it; save the IdeficsProcessor "
            "into the input folder to convert it as well."
        )
        return None
    processor = load_processor(folder, "Idefics")
    if type(processor).__name__ != "IdeficsProcessor":
        raise CommandError(
            f"{folder} contains a {type(processor).__name__}, expected an IdeficsProcessor; "
            "save the IdeficsProcessor into the same folder."
        )
    return processor


def image_processor_from_idefics(source, image_size: int) -> MmfuseImageProcessor:
    """Build an `MmfuseImageProcessor` that gives the pixel values of Idefics' PIL image backend.

    Idefics stretches every image to a square (no crop), converts it to RGB on a white
    background, rescales by 1/255 and normalizes, as MmfuseImageProcessor does.
    """
    if getattr(source, "size", None) is None:
        # transformers 4.x's IdeficsImageProcessor has only `image_size` and always resizes bicubic.
        source = copy.copy(source)
        source.size = {"height": source.image_size, "width": source.image_size}
    # NOTE: transformers 5 gives IdeficsImageProcessor a torchvision backend, its default wherever
    # torchvision is installed, and its bicubic resize differs slightly from PIL's. The converted
    # processor reproduces the PIL backend (and transformers 4.x) exactly, the torchvision one not.
    if TRANSFORMERS_MAJOR >= 5:
        logger.warning(
            "The converted image processor resizes with PIL, like IdeficsImageProcessorPil and transformers 4.x; "
            "where the source used transformers 5's torchvision backend, pixel values differ slightly."
        )
    return image_processor_from_clip(source, image_size)


def convert_processor(source_processor, config: MmfuseCrossAttentionConfig) -> MmfuseCrossAttentionProcessor:
    tokenizer = source_processor.tokenizer
    for token in (IMAGE_TOKEN, IMAGE_BOUNDARY_TOKEN):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise CommandError(
                f"the Idefics tokenizer has no token {token!r}, which IdeficsProcessor writes around every "
                "image; the source folder is incomplete."
            )
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id != config.image_token_id:
        raise CommandError(
            f"the tokenizer maps {IMAGE_TOKEN!r} to id {image_token_id}, but the image token id is "
            f"{config.image_token_id} (--image-token-id); drop the option or pass {image_token_id}."
        )
    image_processor = image_processor_from_idefics(source_processor.image_processor, config.vision_config.image_size)
    tokenizer.padding_side = "left"  # batched generation appends to the right end of every row
    return MmfuseCrossAttentionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=source_processor.chat_template or tokenizer.chat_template,
        image_token=IMAGE_TOKEN,
        image_boundary_token=IMAGE_BOUNDARY_TOKEN,
    )


def check_processor_parity(source_processor, processor, tolerance: float) -> tuple:
    """Encode one prompt with three images with both processors and compare token ids and pixel values.

    Returns `(source_inputs, converted_inputs)`, each in its model's layout.
    """
    images = synthetic_images(2 * processor.image_processor.size + 1, count=3)
    # IdeficsProcessor takes a list of text and image items; it strips spaces around text items.
    items = ["User:", images[0], images[1], "What is in the pictures?", images[2], "Assistant:"]
    text = "".join(item if isinstance(item, str) else processor.image_token for item in items)
    source_inputs = dict(source_processor(text=[items], return_tensors="pt"))
    converted_inputs = dict(processor(text=text, images=images, return_tensors="pt"))

    source_ids = source_inputs["input_ids"]
    converted_ids = converted_inputs["input_ids"]
    if source_ids.shape != converted_ids.shape or not torch.equal(source_ids, converted_ids):
        tokenizer = processor.tokenizer
        raise CommandError(
            f"parity check failed: the converted processor encodes the test prompt into "
            f"{tokenizer.convert_ids_to_tokens(converted_ids[0])}, the IdeficsProcessor into "
            f"{tokenizer.convert_ids_to_tokens(source_ids[0])}. IdeficsProcessor writes the BOS token as text, "
            "so the converted processor matches it only with a tokenizer that adds BOS itself. Nothing was written."
        )
    source_pixels = source_inputs["pixel_values"][0, : len(images)]
    pixel_difference = float((source_pixels - converted_inputs["pixel_values"]).abs().max())
    if not pixel_difference <= tolerance:
        raise CommandError(
            f"parity check failed: pixel values differ from the IdeficsProcessor's by up to "
            f"{pixel_difference:.3e} (tolerance {tolerance:.1e}); nothing was written."
        )
    return source_inputs, converted_inputs


def add_arguments(parser) -> None:
    add_parity_arguments(parser)
    parser.add_argument(
        "--image-token-id",
        type=int,
        default=None,
        help="Vocabulary id of the image token; read from the folder's tokenizer when omitted.",
    )


def run(args) -> int:
    check_output_dir(args.output, args.overwrite)
    require_folder(args.input, "input folder")
    source_model = IdeficsForVisionText2Text.from_pretrained(args.input, **FP32_LOAD_KWARGS).eval()
    source_config = source_model.config
    reject_unsupported(source_config)
    source_processor = load_source_processor(args.input)
    if source_processor is not None and args.image_token_id is None:
        image_token_id = source_processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    else:
        image_token_id = find_image_token_id(args.input, args.image_token_id)

    config = convert_config(source_config, image_token_id)
    model, source_dtype = convert_model(args.input, config, source_config)

    processor = None
    if source_processor is None:
        source_inputs, converted_inputs = parity_inputs(config, source_config.vision_config.image_size)
    else:
        processor = convert_processor(source_processor, config)
        source_inputs, converted_inputs = check_processor_parity(source_processor, processor, args.tolerance)
    pad_token_id = source_config.pad_token_id
    reference = model_outputs(source_model, source_inputs, args.max_new_tokens, pad_token_id)
    converted = model_outputs(model, converted_inputs, args.max_new_tokens, pad_token_id)
    report = compare_outputs(reference, converted, args.tolerance)

    with atomic_output_dir(args.output, args.overwrite) as staging:
        model.to(source_dtype).save_pretrained(staging)
        if processor is not None:
            processor.save_pretrained(staging)
        elif os.path.isfile(os.path.join(args.input, "tokenizer_config.json")):
            AutoTokenizer.from_pretrained(args.input).save_pretrained(staging)
    print(
        f"Wrote {args.output} (mmfuse_cross_attention, {source_dtype}). Parity: max logit difference "
        f"{report.max_logit_difference:.2e} over {report.num_compared_logits} logits, greedy tokens identical "
        f"({len(report.new_tokens[0])} generated)."
    )
    return 0
