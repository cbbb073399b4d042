"""`mmfuse compose`: build a new, untrained vision-language model from a pretrained vision tower and LM.

The vision tower and the LM keep their pretrained weights; the connector (projector, resampler
or gated cross-attention) is freshly initialised. The tokenizer learns the image tokens, the LM's
embeddings grow to match, and the processor takes the LM's chat template and the image
preprocessing the vision tower was trained with. The folder is written to a temporary folder and
renamed at the end, so a failure leaves nothing behind.
"""

import os

import torch
from transformers.utils import logging

from .. import compose as compose_module
from ..cli import CommandError
from .model_card import build_model_card, tokens_per_image
from .output import atomic_output_dir, check_output_dir
from .sources import load_language_source, load_vision_source

logger = logging.get_logger(__name__)

FUSION_TYPES = ("projection", "cross_attention", "vq")
# LoRA set-up that the summary's "lora" stage counts: rank 16 on every linear layer of the LM's
# decoder (peft's "all-linear", which leaves the output head out).
LORA_RANK = 16


def add_arguments(parser):
    parser.add_argument("--fusion", required=True, choices=FUSION_TYPES, help="How the image reaches the LM.")
    parser.add_argument(
        "--vision", required=True, help="Vision tower: a model folder, a Hub id or an EfficientNet-Lite .pth file."
    )
    language = parser.add_mutually_exclusive_group(required=True)
    language.add_argument("--language", help="Causal LM: a model folder or a Hub id.")
    language.add_argument(
        "--language-gguf", metavar="FILE", help="Causal LM as a GGUF file; transformers dequantises it."
    )
    parser.add_argument("--output", required=True, help="Folder to write; must not exist unless --overwrite is given.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output folder.")
    parser.add_argument("--image-token", default="<image>", help="Placeholder token for an image in the prompt.")
    parser.add_argument(
        "--projector-type",
        default=None,
        help="Projector of the projection type: linear, mlp2x_gelu, pixel_shuffle or avg_pool (default mlp2x_gelu).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed for the freshly initialised connector weights.")
    parser.add_argument(
        "--push-to-hub", metavar="NAME", default=None, help="Also upload the folder to this Hub repository."
    )


def run(args) -> int:
    check_output_dir(args.output, args.overwrite)
    compose_function = getattr(compose_module, f"compose_{args.fusion}", None)
    if compose_function is None:
        available = [name for name in FUSION_TYPES if hasattr(compose_module, f"compose_{name}")]
        raise CommandError(
            f"fusion type {args.fusion!r} is not available in this mmfuse version; use one of {available}."
        )

    if args.language_gguf is not None and not os.path.isfile(args.language_gguf):
        # Checked before the vision tower loads, which can take a while for a large tower.
        raise CommandError(
            f"GGUF file {args.language_gguf} not found; pass the path of a .gguf file as --language-gguf."
        )
    vision_model, vision_source = load_vision_source(args.vision)
    language_model, tokenizer, language_source = load_language_source(args.language, args.language_gguf)

    config_kwargs = {}
    if args.projector_type is not None:
        config_kwargs["projector_type"] = args.projector_type
    if vision_model.config.model_type == "timm_wrapper":
        # timm towers report one feature map, so the last (and only) hidden state is the one to use.
        config_kwargs["vision_feature_layer"] = -1
    torch.manual_seed(args.seed)
    try:
        model, processor = compose_function(
            vision_model, language_model, tokenizer, image_token=args.image_token, **config_kwargs
        )
    except (TypeError, ValueError) as error:
        raise CommandError(f"cannot compose a {args.fusion} model from {args.vision} and the LM: {error}") from error

    sources = [vision_source, language_source]
    with atomic_output_dir(args.output, args.overwrite) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        with open(f"{staging}/README.md", "w", encoding="utf-8") as handle:
            handle.write(build_model_card(model.config, repo_id=args.push_to_hub, sources=sources, folder=args.output))

    print(format_summary(model, args.output, sources))
    if args.push_to_hub:
        from .push import push_to_hub

        commit = push_to_hub(args.output, args.push_to_hub, sources=sources)
        print(f"Pushed to {args.push_to_hub}: {commit.commit_url}")
    return 0


def count(parameters) -> int:
    return sum(parameter.numel() for parameter in parameters)


def part_parameter_counts(model: torch.nn.Module) -> dict:
    """Split the parameters into vision tower, language model and connector by module name."""
    parts = {"vision tower": 0, "language model": 0, "connector": 0}
    for name, parameter in model.named_parameters():
        if "vision_tower" in name:
            parts["vision tower"] += parameter.numel()
        elif "language_model" in name or name.startswith("lm_head"):
            parts["language model"] += parameter.numel()
        else:
            parts["connector"] += parameter.numel()
    return parts


def lora_parameter_count(model: torch.nn.Module, rank: int = LORA_RANK) -> int:
    """Return the parameters LoRA of `rank` adds to every linear layer of the LM's decoder."""
    total = 0
    for name, module in model.named_modules():
        if "language_model" in name and isinstance(module, torch.nn.Linear):
            total += rank * (module.in_features + module.out_features)
    return total


def format_summary(model: torch.nn.Module, output: str, sources: list) -> str:
    parts = part_parameter_counts(model)
    lora = lora_parameter_count(model)
    image_tokens = tokens_per_image(model.config)
    lines = [f"Wrote {model.config.model_type} model to {output}"]
    for source in sources:
        lines.append(f"  {source.role:<15} {source.model_type} from {source.name}")
    lines.append("Parameters per part:")
    for part, number in parts.items():
        lines.append(f"  {part:<15} {number:>15,}")
    lines.append(f"  {'total':<15} {sum(parts.values()):>15,}")
    lines.append("Trainable parameters per training stage:")
    lines.append(f"  {'connector':<15} {parts['connector']:>15,}  (vision tower and LM frozen)")
    lines.append(f"  {'lora':<15} {parts['connector'] + lora:>15,}  (connector + LoRA rank {LORA_RANK} on the LM)")
    lines.append(f"  {'full':<15} {sum(parts.values()):>15,}  (every weight)")
    lines.append(f"Tokens per image: {image_tokens if image_tokens is not None else 'not stated by the config'}")
    return "\n".join(lines)
