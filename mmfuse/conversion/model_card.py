"""The model card (README.md) written into composed folders and pushed to the Hub."""

import os
import re
from dataclasses import dataclass

from transformers import PretrainedConfig

# The two pretrained parts of every composed model, in the order the card lists them.
PART_ROLES = ("vision tower", "language model")


@dataclass
class SourceInfo:
    """Origin of one pretrained part of a composed model: its role, source, model type and licence."""

    role: str  # "vision tower" or "language model"
    name: str  # Hub id, folder or file it was loaded from
    model_type: str
    license: str | None = None
    gguf_name: str | None = None  # the `general.name` metadata of a GGUF file


def parts_without_license(sources: list) -> list:
    """Return the roles of the parts whose licence is not recorded, including parts with no source."""
    license_by_role = {source.role: source.license for source in sources}
    roles = list(PART_ROLES) + [source.role for source in sources if source.role not in PART_ROLES]
    return [role for role in roles if not license_by_role.get(role)]


def combined_license(sources: list) -> str:
    """Return the card's `license` field: the parts' common licence, `other` if they differ.

    It is `unknown` when any part has no recorded licence, because the composed weights are
    bound by every part's terms.
    """
    if parts_without_license(sources):
        return "unknown"
    licenses = {source.license.lower() for source in sources}
    return licenses.pop() if len(licenses) == 1 else "other"


def license_note(sources: list) -> str | None:
    """Explain a `license` field of `unknown` or `other` by naming the parts behind it."""
    missing = parts_without_license(sources)
    if missing:
        return (
            f"Licence: unknown, because no licence is recorded for the {' and the '.join(missing)}. "
            "Check the terms of each source before you use or share these weights."
        )
    if combined_license(sources) == "other":
        terms = ", ".join(f"{source.role} {source.license}" for source in sources)
        return f"Licence: other, because the parts have different licences ({terms}); the weights are bound by each."
    return None


def name_words(text: str) -> set:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def source_label(source: SourceInfo) -> str:
    """Return how the card names a source: its Hub id, folder or file, plus a GGUF name that adds to it.

    A GGUF file's `general.name` is often a training-run label ("Smollm2 135M 8k Lc100K Mix1 Ep2")
    rather than the model's name, so the file name comes first. The `general.name` follows in
    brackets unless all of its words already appear in the file name.
    """
    label = source.name
    if source.gguf_name and not name_words(source.gguf_name) <= name_words(source.name):
        label = f"{label} (GGUF name: {source.gguf_name})"
    return label.replace("|", "\\|")  # a bare `|` would split the Markdown table cell


def is_hub_id(name: str) -> bool:
    """Return True when a source name is a Hub repository id rather than a local folder or file."""
    return "/" in name and not name.startswith(("/", ".")) and not os.path.exists(name)


def tokens_per_image(config: PretrainedConfig) -> int | None:
    """Return the number of LM context positions one image takes, where the config states it."""
    value = getattr(config, "num_image_tokens", None)
    return int(value) if value is not None else None


def build_model_card(
    config: PretrainedConfig,
    repo_id: str | None = None,
    sources: list | None = None,
    folder: str | None = None,
) -> str:
    """Write the Markdown model card of an mmfuse folder with Hub metadata in its YAML header.

    The title is the repository name of `repo_id`, else the name of `folder`, else the model type.
    """
    sources = list(sources or [])
    name = repo_id or "path/to/model"
    if repo_id:
        title = repo_id.split("/")[-1]
    elif folder:
        title = os.path.basename(os.path.normpath(folder))
    else:
        title = config.model_type
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
    base_models = [source.name for source in sources if is_hub_id(source.name)]
    if base_models:
        header.append("base_model:")
        header.extend(f"- {base_model}" for base_model in base_models)
    header.extend(["tags:", "- mmfuse", f"- {config.model_type}", "- image-text-to-text", "---", ""])

    lines = [
        f"# {title}",
        "",
        f"A vision-language model built with mmfuse, fusion type `{fusion_type}`.",
        "",
        "| part | model type | source | licence |",
        "|---|---|---|---|",
    ]
    source_by_role = {source.role: source for source in sources}
    for role, model_type in zip(PART_ROLES, (vision_type, text_type)):
        source = source_by_role.get(role)
        lines.append(
            f"| {role} | `{model_type}` | {source_label(source) if source else 'not recorded'} | "
            f"{(source.license if source else None) or 'not recorded'} |"
        )
    lines.append("")
    note = license_note(sources)
    if note is not None:
        lines += [note, ""]
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
