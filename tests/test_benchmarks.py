"""Smoke run of the benchmark runner with tiny models: it checks the files and the parity figures, not timings."""

import json

import pytest

from benchmarks import run


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("benchmarks")
    assert (
        run.main(["--tiny", "--repeats", "1", "--new-tokens", "3", "--decode-steps", "3", "--output", str(folder)])
        == 0
    )
    return folder


def test_runner_writes_every_section(output_dir):
    report = json.loads((output_dir / "results.json").read_text())
    assert set(report["sections"]) == set(run.SECTIONS)
    for section in report["sections"].values():
        assert section["seconds"] > 0
    markdown = (output_dir / "results.md").read_text()
    assert "| measure |" in markdown
    for heading in ("Llava", "bare LM", "Idefics", "number of images", "ChameleonVQVAE", "feature cache"):
        assert heading in markdown


def test_context_plot_is_png(output_dir):
    assert (output_dir / "context_cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_context_rows_grow_with_images(output_dir):
    rows = json.loads((output_dir / "results.json").read_text())["sections"]["context"]["rows"]
    for fusion_type in ("projection", "cross_attention", "vq"):
        entries = [entry for entry in rows if entry["fusion_type"] == fusion_type]
        lengths = [entry["context_length"] for entry in entries]
        assert lengths == sorted(lengths)
        assert len(set(lengths)) == len(lengths)
        assert all(entry["kv_cache_bytes"] > 0 for entry in entries)
    assert all(entry["image_cache_bytes"] > 0 for entry in rows if entry["fusion_type"] == "cross_attention")


def test_references_have_identical_weights(output_dir):
    sections = json.loads((output_dir / "results.json").read_text())["sections"]
    assert sections["cross_attention"]["max_logit_difference"] < 1e-4
    assert sections["vq"]["codes_identical"]
