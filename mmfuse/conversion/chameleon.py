"""Convert transformers' ChameleonForConditionalGeneration into an mmfuse_vq folder.

Chameleon's LM is not a Llama: it normalises queries and keys per head (qk-norm, with biases per
model-parallel shard) and can move the layer norms after attention (`swin_norm`). The converted folder
therefore keeps a `text_config` of model type `chameleon`, and `AutoModel` builds transformers' own
`ChameleonModel` as the LM; its built-in VQ tokenizer is dropped because the mmfuse VQ-GAN (encode-only,
since Chameleon ships no decoder weights) takes its place.

Chameleon's tokenizer stores its image tokens as ordinary BPE entries (`IMGIMG...` names) at ids that
`vocabulary_map` gives, so the converter reads the id of every code from that map. When the ids form one
ordered, contiguous block the config stores only `image_token_offset`; otherwise it stores the whole
table as `code_token_ids`. The text ids, the `<image>` placeholder and the begin/end-of-image tokens keep
their Chameleon ids, so the source tokenizer is reused unchanged.

Parity is checked before anything is written: the same pixel values must give identical codes, and
the logits (before Chameleon's masking of image tokens) must agree within the tolerance.
"""

import json
import os

import torch
from transformers import AutoConfig, AutoTokenizer, ChameleonForConditionalGeneration
from transformers.utils import logging

from ..cli import CommandError
from ..configuration_vq import MmfuseVQConfig
from ..modeling_vq import MmfuseVQForConditionalGeneration
from ..processing_common import RESAMPLE_FILTERS, MmfuseImageProcessor
from ..processing_vq import MmfuseVQProcessor
from .chameleon_vq import vqgan_config_from_chameleon, vqgan_state_dict_from_chameleon
from .output import atomic_output_dir, check_output_dir
from .parity import (
    FP32_LOAD_KWARGS,
    ModelOutputs,
    add_parity_arguments,
    compare_outputs,
    load_strictly,
    map_keys,
    read_checkpoint,
    require_folder,
    synthetic_images,
)

logger = logging.get_logger(__name__)

# Chameleon's language-model keys and where they live in an mmfuse_vq model; the VQ tokenizer
# (`model.vqmodel.*`) is mapped by `chameleon_vq`.
LANGUAGE_MODEL_KEY_TABLE = (
    (r"model\.embed_tokens\.", "model.language_model.embed_tokens."),
    (r"model\.layers\.", "model.language_model.layers."),
    (r"model\.norm\.", "model.language_model.norm."),
    (r"lm_head\.", "lm_head."),
)
# Chameleon's processor rescales by 0.0078 and normalises with mean 1 and std 1 unless its config sets other values.
# ChameleonImageProcessor's defaults in transformers 4.57 and 5.x: resize the shortest edge to 512 with
# PIL's LANCZOS filter (1), crop the center 512x512 square, then x * 0.0078 - 1.
DEFAULT_PIXEL_TRANSFORM = {
    "rescale_factor": 0.0078,
    "image_mean": [1.0, 1.0, 1.0],
    "image_std": [1.0, 1.0, 1.0],
    "resample": 1,
    "size": {"shortest_edge": 512},
    "do_center_crop": True,
    "crop_size": {"height": 512, "width": 512},
}


def load_source(folder: str):
    """Load the Chameleon model (fp32) and tokenizer in `folder`, rejecting incomplete checkpoints."""
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise CommandError(f"could not read the config in {folder}: {str(error).splitlines()[0]}") from error
    if config.model_type != "chameleon":
        raise CommandError(
            f"{folder} contains a model of type {config.model_type!r}, expected 'chameleon'; "
            "pass a folder written by ChameleonForConditionalGeneration.save_pretrained."
        )
    if not config.vocabulary_map:
        raise CommandError(f"the Chameleon config in {folder} has no vocabulary_map, so image tokens have no ids.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as error:
        raise CommandError(
            f"could not load the tokenizer from {folder}: {str(error).splitlines()[0]}; save the Chameleon "
            "tokenizer into the same folder."
        ) from error
    model, loading_info = ChameleonForConditionalGeneration.from_pretrained(
        folder, output_loading_info=True, **FP32_LOAD_KWARGS
    )
    missing = loading_info.get("missing_keys") or []
    unexpected = loading_info.get("unexpected_keys") or []
    if missing or unexpected:
        raise CommandError(
            f"the Chameleon checkpoint in {folder} is incomplete: transformers reports {len(missing)} missing "
            f"{sorted(missing)[:3]} and {len(unexpected)} unexpected {sorted(unexpected)[:3]} weights."
        )
    return model.eval(), tokenizer


def token_id(tokenizer, vocabulary_map: dict, token: str, option: str) -> int:
    if token not in vocabulary_map:
        raise CommandError(
            f"the token {token!r} is not in the Chameleon vocabulary_map; pass the right one with {option}."
        )
    if tokenizer.convert_tokens_to_ids(token) != vocabulary_map[token]:
        raise CommandError(
            f"the tokenizer gives {token!r} the id {tokenizer.convert_tokens_to_ids(token)}, the vocabulary_map "
            f"{vocabulary_map[token]}; the tokenizer and the checkpoint do not belong together."
        )
    return vocabulary_map[token]


def code_token_ids(source_model) -> list:
    """Return the vocabulary id of every code, in code order, from Chameleon's `vocabulary_map`."""
    mapping = source_model.model.vocabulary_mapping
    codebook_size = source_model.config.vq_config.num_embeddings
    img2bpe = mapping.img2bpe
    missing = [code for code in range(codebook_size) if code not in img2bpe]
    if missing:
        raise CommandError(
            f"the vocabulary_map has no image token for {len(missing)} of the {codebook_size} codes "
            f"(first: {missing[:3]}); every code needs an IMGIMG token."
        )
    return [img2bpe[code] for code in range(codebook_size)]


def convert_config(source_model, tokenizer, args) -> MmfuseVQConfig:
    source_config = source_model.config
    vocabulary_map = source_config.vocabulary_map
    image_token_id = token_id(tokenizer, vocabulary_map, args.image_token, "--image-token")
    boi_token_id = token_id(tokenizer, vocabulary_map, args.boi_token, "--boi-token")
    eoi_token_id = token_id(tokenizer, vocabulary_map, args.eoi_token, "--eoi-token")

    token_ids = code_token_ids(source_model)
    contiguous = token_ids == list(range(token_ids[0], token_ids[0] + len(token_ids)))
    text_config = source_config.to_dict()
    # ChameleonModel needs a vocabulary_map to build, but mmfuse maps codes itself; the placeholder is enough.
    text_config["vocabulary_map"] = {args.image_token: image_token_id}
    return MmfuseVQConfig(
        vqgan_config=vqgan_config_from_chameleon(source_config.vq_config).to_dict(),
        text_config=text_config,
        image_token=args.image_token,
        boi_token=args.boi_token,
        eoi_token=args.eoi_token,
        image_token_id=image_token_id,
        boi_token_id=boi_token_id,
        eoi_token_id=eoi_token_id,
        image_token_offset=token_ids[0] if contiguous else None,
        code_token_ids=None if contiguous else token_ids,
        tie_word_embeddings=source_config.tie_word_embeddings,
    )


def convert_model(folder: str, config: MmfuseVQConfig) -> tuple:
    """Build the mmfuse_vq model with the source weights; return it (fp32) and the source dtype."""
    source_state = read_checkpoint(folder)
    source_dtype = next(iter(source_state.values())).dtype
    vq_prefix = "model.vqmodel."
    language_state = {key: tensor for key, tensor in source_state.items() if not key.startswith(vq_prefix)}
    state_dict = map_keys(language_state, LANGUAGE_MODEL_KEY_TABLE, f"the Chameleon checkpoint in {folder}")
    vq_state = vqgan_state_dict_from_chameleon(source_state, prefix=vq_prefix)
    state_dict.update({f"model.vqmodel.{key}": tensor for key, tensor in vq_state.items()})

    model = MmfuseVQForConditionalGeneration(config)
    tied_keys = ("lm_head.weight",) if config.tie_word_embeddings else ()
    load_strictly(model, {key: tensor.float() for key, tensor in state_dict.items()}, folder, tied_keys)
    return model.float().eval(), source_dtype


RESAMPLE_NAMES = {value: name for name, value in RESAMPLE_FILTERS.items()}


def read_pixel_transform(folder: str) -> dict:
    """Return Chameleon's image processor settings from preprocessor_config.json, with its defaults for missing ones."""
    transform = dict(DEFAULT_PIXEL_TRANSFORM)
    path = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as file:
            values = json.load(file)
        transform.update({key: values[key] for key in transform if values.get(key) is not None})
    return transform


def convert_processor(folder: str, tokenizer, config: MmfuseVQConfig) -> MmfuseVQProcessor:
    transform = read_pixel_transform(folder)
    # (x * rescale - mean) / std equals (x / 255 - mean') / std' with mean' = mean / (255 * rescale) and
    # std' = std / (255 * rescale), so pixel values match Chameleon's for the same resized image.
    scale = 255.0 * transform["rescale_factor"]
    resample = int(transform["resample"])
    if resample not in RESAMPLE_NAMES:
        raise CommandError(
            f"{folder}/preprocessor_config.json has resample={resample}; MmfuseImageProcessor supports the PIL "
            f"filters {sorted(RESAMPLE_NAMES)}."
        )
    size, crop_size = transform["size"] or {}, transform["crop_size"] or {}
    keeps_aspect_ratio = "shortest_edge" in size
    crop_to_square = (
        keeps_aspect_ratio
        and bool(transform["do_center_crop"])
        and size["shortest_edge"] == crop_size.get("height") == crop_size.get("width") == config.image_size
    )
    if keeps_aspect_ratio and not crop_to_square:
        logger.warning(
            f"The source image processor resizes the shortest edge to {size['shortest_edge']} px with "
            f"do_center_crop={transform['do_center_crop']} and crop_size={crop_size}; the converted processor "
            f"stretches images to {config.image_size} px squares, so non-square images get different pixel values."
        )
    image_processor = MmfuseImageProcessor(
        size=config.image_size,
        resample=RESAMPLE_NAMES[resample],
        image_mean=[mean / scale for mean in transform["image_mean"]],
        image_std=[std / scale for std in transform["image_std"]],
        crop_to_square=crop_to_square,
    )
    return MmfuseVQProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=getattr(tokenizer, "chat_template", None),
        num_codes=config.num_codes,
        image_token=config.image_token,
        boi_token=config.boi_token,
        eoi_token=config.eoi_token,
    )


@torch.no_grad()
def check_parity(source_model, model, processor, tolerance: float, max_new_tokens: int):
    """Compare codes, logits and greedy tokens of both models on two images; raise ParityError on a difference."""
    prompt = f"{processor.image_token}What is in the picture?"
    inputs = processor(
        text=[prompt, prompt], images=synthetic_images(processor.image_processor.size), return_tensors="pt"
    )
    pixel_values = inputs["pixel_values"]

    source_codes = source_model.model.vqmodel.encode(pixel_values).image_tokens.view(pixel_values.shape[0], -1)
    codes = model.vqmodel.encode(pixel_values).flatten(1)
    if not torch.equal(source_codes, codes):
        mismatched = int((source_codes != codes).sum())
        raise CommandError(
            f"parity check failed: {mismatched} of {codes.numel()} codes differ from Chameleon's; nothing was written."
        )

    # Chameleon forbids image tokens by setting their logits to the dtype minimum; compare the head's output.
    source_hidden = source_model.model(**inputs).last_hidden_state
    reference_logits = source_model.lm_head(source_hidden).float()
    converted_logits = model(**inputs).logits.float()
    prompt_length = inputs["input_ids"].shape[1]
    generate_kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1}
    reference_tokens = source_model.generate(**inputs, **generate_kwargs)[:, prompt_length:].tolist()
    converted_tokens = model.generate(**inputs, **generate_kwargs)[:, prompt_length:].tolist()
    report = compare_outputs(
        ModelOutputs(reference_logits, reference_tokens), ModelOutputs(converted_logits, converted_tokens), tolerance
    )
    return report, codes.numel()


def add_arguments(parser) -> None:
    add_parity_arguments(parser)
    parser.add_argument("--image-token", default="<image>", help="Chameleon's image placeholder token.")
    parser.add_argument("--boi-token", default="<racm3:break>", help="Chameleon's begin-of-image token.")
    parser.add_argument("--eoi-token", default="<eoss>", help="Chameleon's end-of-image token.")


def run(args) -> int:
    check_output_dir(args.output, args.overwrite)
    require_folder(args.input, "input folder")
    source_model, tokenizer = load_source(args.input)

    config = convert_config(source_model, tokenizer, args)
    model, source_dtype = convert_model(args.input, config)
    processor = convert_processor(args.input, tokenizer, config)
    report, num_codes = check_parity(source_model, model, processor, args.tolerance, args.max_new_tokens)

    with atomic_output_dir(args.output, args.overwrite) as staging:
        model.to(source_dtype).save_pretrained(staging)
        processor.save_pretrained(staging)
    print(
        f"Wrote {args.output} (mmfuse_vq, {config.num_codes} codes per image, {source_dtype}). Parity: "
        f"{num_codes} codes identical, max logit difference {report.max_logit_difference:.2e} over "
        f"{report.num_compared_logits} logits, greedy tokens identical ({len(report.new_tokens[0])} generated)."
    )
    return 0
