"""The model card: title, source names (GGUF included), base models and the licence note."""

import pytest
from tiny import text_config, vision_config

from mmfuse.configuration_projection import MmfuseProjectionConfig
from mmfuse.conversion.model_card import SourceInfo, build_model_card, combined_license

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture
def config():
    return MmfuseProjectionConfig(vision_config=vision_config(), text_config=text_config())


def front_matter(card: str) -> list:
    lines = card.splitlines()
    assert lines[0] == "---"
    return lines[1 : lines.index("---", 1)]


def title(card: str) -> str:
    return next(line for line in card.splitlines() if line.startswith("# "))


def licensed_sources(vision_license="apache-2.0", language_license="apache-2.0") -> list:
    return [
        SourceInfo("vision tower", "openai/clip-vit-base-patch32", "clip_vision_model", vision_license),
        SourceInfo("language model", "HuggingFaceTB/SmolLM2-135M", "llama", language_license),
    ]


def test_title_from_repo_id(config, tmp_path):
    card = build_model_card(config, repo_id="org/my-vlm", folder=str(tmp_path / "local-name"))
    assert title(card) == "# my-vlm"
    assert 'from_pretrained("org/my-vlm", trust_remote_code=True)' in card


def test_title_from_folder(config, tmp_path):
    card = build_model_card(config, folder=str(tmp_path / "smol-clip-vlm") + "/")
    assert title(card) == "# smol-clip-vlm"
    assert 'from_pretrained("path/to/model", trust_remote_code=True)' in card


def test_title_without_name(config):
    assert title(build_model_card(config)) == "# mmfuse_projection"


def test_gguf_file_name_before_general_name(config):
    language = SourceInfo(
        "language model", SMOLLM2_FILE, "llama", "apache-2.0", gguf_name="Smollm2 135M 8k Lc100K Mix1 Ep2"
    )
    card = build_model_card(config, sources=[licensed_sources()[0], language])
    row = f"| language model | `llama` | {SMOLLM2_FILE} (GGUF name: Smollm2 135M 8k Lc100K Mix1 Ep2) | apache-2.0 |"
    assert row in card.splitlines()


def test_gguf_general_name_already_in_file_name(config):
    language = SourceInfo("language model", SMOLLM2_FILE, "llama", "apache-2.0", gguf_name="SmolLM2 135M Instruct")
    card = build_model_card(config, sources=[licensed_sources()[0], language])
    assert f"| language model | `llama` | {SMOLLM2_FILE} | apache-2.0 |" in card.splitlines()
    assert "GGUF name" not in card


def test_pipe_in_name_escaped(config):
    language = SourceInfo("language model", "lm.gguf", "llama", "mit", gguf_name="a | b")
    card = build_model_card(config, sources=[licensed_sources()[0], language])
    assert "| lm.gguf (GGUF name: a \\| b) |" in card


def test_base_models_are_hub_ids_only(config, tmp_path, monkeypatch):
    (tmp_path / "models" / "clip").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    sources = [
        SourceInfo("vision tower", "models/clip", "clip_vision_model", "mit"),
        SourceInfo("language model", "HuggingFaceTB/SmolLM2-135M", "llama", "apache-2.0"),
    ]
    header = front_matter(build_model_card(config, sources=sources))
    start = header.index("base_model:")
    assert header[start + 1 : start + 3] == ["- HuggingFaceTB/SmolLM2-135M", "tags:"]


def test_license_common_to_both_parts(config):
    card = build_model_card(config, sources=licensed_sources())
    assert "license: apache-2.0" in front_matter(card)
    assert "Licence:" not in card


def test_unknown_license_names_the_part(config):
    card = build_model_card(config, sources=licensed_sources(vision_license=None))
    assert "license: unknown" in front_matter(card)
    assert "Licence: unknown, because no licence is recorded for the vision tower." in card
    assert "language model." not in card


def test_unknown_license_of_unrecorded_part(config):
    language_only = licensed_sources()[1:]
    assert combined_license(language_only) == "unknown"
    card = build_model_card(config, sources=language_only)
    assert "| vision tower | `clip_vision_model` | not recorded | not recorded |" in card
    assert "no licence is recorded for the vision tower." in card


def test_unknown_license_without_sources(config):
    card = build_model_card(config)
    assert "license: unknown" in front_matter(card)
    assert "no licence is recorded for the vision tower and the language model." in card


def test_different_licenses(config):
    card = build_model_card(config, sources=licensed_sources(vision_license="mit"))
    assert "license: other" in front_matter(card)
    assert "different licences (vision tower mit, language model apache-2.0)" in card
