import json

from benchmarks import run


def test_runner_writes_results(tmp_path):
    assert run.main(["--tiny", "--output", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert set(report["sections"]) == set(run.SECTIONS)
    markdown = (tmp_path / "results.md").read_text()
    assert "| measure |" in markdown
    for section in report["sections"].values():
        assert section["seconds"] > 0
