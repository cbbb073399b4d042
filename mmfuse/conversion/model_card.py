"""The model card (README.md) written into composed folders and pushed to the Hub."""

from dataclasses import dataclass

from transformers import PretrainedConfig


@dataclass
class SourceInfo:
    """Origin of one pretrained part of a composed model: its role, source, model type and licence."""

    role: str  # "vision tower" or "language model"
    name: str  # Hub id, folder or file it was loaded from
    model_type: str
    license: str | None = None


def combined_license(sources: list) -> str:
    """Return the card's `license` field: the sources' common licence, `other` if they differ.

    It is `unknown` when any source has no recorded licence, because the composed weights are
    bound by every part's terms.
    """
    if not sources or any(not source.license for source in sources):
        return "unknown"
    licenses = {source.license.lower() for source in sources}
    return licenses.pop() if len(licenses) == 1 else "other"


def tokens_per_image(config: PretrainedConfig) -> int | None:
    """Return the number of LM context positions one image takes, where the config states it."""
    value = getattr(config, "num_image_tokens", None)
    return int(value) if value is not None else None


def build_model_card(config: PretrainedConfig, repo_id: str | None = None, sources: list | None = None) -> str:
    """Write the Markdown model card of an mmfuse folder with Hub metadata in its YAML header."""
    sources = list(sources or [])
    name = repo_id or "path/to/model"
    fusion_type = config.model_type.removeprefix("mmfuse_")
    vision_type = config.vision_config.model_type
    if vision_type == "timm_wrapper":
        vision_type = f"timm_wrapper ({config.vision_config.architecture})"
    text_type = config.text_config.model_type
    image_tokens = tokens_per_image(config)

    header = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        f"license: {combined_license(sources)}",
    ]
    base_models = [source.name for source in sources if "/" in source.name and not source.name.startswith(("/", "."))]
    if base_models:
        header.append("base_model:")
        header.extend(f"- {base_model}" for base_model in base_models)
    header.extend(["tags:", "- mmfuse", f"- {config.model_type}", "- image-text-to-text", "---", ""])

    lines = [
        f"# {name.split('/')[-1]}",
        "",
        f"A vision-language model built with mmfuse, fusion type `{fusion_type}`.",
        "",
        "| part | model type | source | licence |",
        "|---|---|---|---|",
    ]
    source_by_role = {source.role: source for source in sources}
    for role, model_type in (("vision tower", vision_type), ("language model", text_type)):
        source = source_by_role.get(role)
        lines.append(
            f"| {role} | `{model_type}` | {source.name if source else 'not recorded'} | "
            f"{(source.license if source else None) or 'not recorded'} |"
        )
    lines.append("")
    if image_tokens is not None:
        lines += [f"Each image takes {image_tokens} tokens of the language model's context.", ""]
    lines += [
        "The model code ships in this repository, so loading needs `trust_remote_code=True` and no mmfuse install:",
        "",
        "```python",
        "from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline",
        "",
        f'model = AutoModelForImageTextToText.from_pretrained("{name}", trust_remote_code=True)',
        f'processor = AutoProcessor.from_pretrained("{name}", trust_remote_code=True)',
        "",
        "# Captions: an image in, text out.",
        f'captioner = pipeline("image-to-text", model="{name}", trust_remote_code=True)',
        'captioner("photo.jpg", max_new_tokens=20)',
        "",
        "# Chat with images: messages with image and text parts.",
        f'chat = pipeline("image-text-to-text", model="{name}", trust_remote_code=True)',
        'messages = [{"role": "user", "content": [{"type": "image", "url": "photo.jpg"}, '
        '{"type": "text", "text": "What is in the picture?"}]}]',
        "chat(text=messages, max_new_tokens=20)",
        "```",
        "",
    ]
    return "\n".join(header + lines)
