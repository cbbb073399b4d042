"""`mmfuse push` against a Hub-compatible server on 127.0.0.1, and loading the pushed model back."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import config_from_dict
from hub_server import HubServer
from PIL import Image
from tiny import text_config, vision_config
from transformers import AutoModel, AutoModelForCausalLM

import mmfuse.cli as cli
from mmfuse.compose import compose_projection

TOKEN = "hf_loopbackSecretToken0123456789"


@pytest.fixture(scope="module")
def hub():
    server = HubServer()
    yield server
    server.stop()


@pytest.fixture
def hub_env(hub, monkeypatch, tmp_path):
    """Point huggingface_hub at the loopback server with a token in HF_TOKEN."""
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(cli, "COMMANDS", {"push": cli.COMMANDS["push"]})
    return hub


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from tiny import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    vision_model = AutoModel.from_config(config_from_dict(vision_config()))
    language_model = AutoModelForCausalLM.from_config(config_from_dict(text_config(vocab_size=len(tokenizer))))
    model, processor = compose_projection(vision_model, language_model, tokenizer)
    folder = tmp_path_factory.mktemp("pushed") / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def push(argv) -> int:
    return cli.main(["push", *argv])


def test_push_uploads_every_file(hub_env, model_folder, capsys):
    assert push([model_folder, "--repo-id", "tester/every-file"]) == 0

    remote = hub_env.files("tester/every-file")
    for name in os.listdir(model_folder):
        with open(os.path.join(model_folder, name), "rb") as handle:
            assert remote[name] == handle.read(), name
    assert "README.md" in remote
    card = remote["README.md"].decode()
    assert "fusion type `projection`" in card
    assert "trust_remote_code=True" in card
    assert 'pipeline("image-to-text"' in card
    assert 'pipeline("image-text-to-text"' in card
    assert "Each image takes 25 tokens" in card
    assert "Pushed" in capsys.readouterr().out


def test_push_keeps_token_secret(hub_env, model_folder, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    assert cli.main(["-v", "push", model_folder, "--repo-id", "tester/secret"]) == 0

    captured = capsys.readouterr()
    assert TOKEN in hub_env.state.tokens_seen
    assert TOKEN not in captured.out
    assert TOKEN not in captured.err
    assert TOKEN not in caplog.text


def test_push_without_token(hub_env, model_folder, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(model_folder) + "-no-home")
    assert push([model_folder, "--repo-id", "tester/no-token"]) == 1
    assert "no Hugging Face token found" in capsys.readouterr().err
    assert "tester/no-token" not in hub_env.state.repos


def test_push_shards_large_weights(hub_env, model_folder):
    assert push([model_folder, "--repo-id", "tester/sharded", "--max-shard-size", "60KB"]) == 0

    remote = hub_env.files("tester/sharded")
    index = json.loads(remote["model.safetensors.index.json"])
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert "model.safetensors" not in remote
    for shard in shards:
        assert len(remote[shard]) <= 60_000 + 20_000  # one tensor may exceed the limit by itself


def test_push_branch_and_pull_request(hub_env, model_folder):
    assert push([model_folder, "--repo-id", "tester/branches", "--revision", "dev", "--commit-message", "first"]) == 0
    assert push([model_folder, "--repo-id", "tester/branches", "--create-pr", "--private"]) == 0

    repo = hub_env.state.repos["tester/branches"]
    assert repo.branches["dev"][-1].message == "first"
    assert len(repo.branches["main"]) == 1  # only the initial commit
    assert repo.pull_requests == ["refs/pr/1"]
    assert "config.json" in hub_env.files("tester/branches", "refs/pr/1")


@pytest.mark.parametrize("step", ["commit", "lfs_upload"])
def test_push_server_error_leaves_no_commit(hub_env, model_folder, capsys, step):
    repo_id = f"tester/failing-{step.replace('_', '-')}"
    hub_env.state.fail_next[step] = 1
    assert push([model_folder, "--repo-id", repo_id]) == 1

    # Upload progress bars share stderr without a final newline, so the error may start mid-line.
    marker = "mmfuse push: error"
    errors = [line[line.index(marker) :] for line in capsys.readouterr().err.split("\n") if marker in line]
    assert len(errors) == 1
    error = errors[0]
    assert repo_id in error
    assert "no commit was made" in error
    assert list(hub_env.files(repo_id)) == [".gitattributes"]

    assert push([model_folder, "--repo-id", repo_id]) == 0
    assert "model.safetensors" in hub_env.files(repo_id)


def test_push_rejects_folder_without_config(hub_env, tmp_path, capsys):
    assert push([str(tmp_path), "--repo-id", "tester/empty"]) == 1
    error = capsys.readouterr().err
    assert str(tmp_path) in error
    assert "config.json" in error


ROUND_TRIP_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["mmfuse"] = None
    try:
        import mmfuse  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("mmfuse must not be importable here")
    import json, torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    name, image_path, output = sys.argv[1:4]
    model = AutoModelForImageTextToText.from_pretrained(name, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(name, trust_remote_code=True)
    image = Image.open(image_path)
    inputs = processor(text="<image>What is in the picture?", images=image, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    captioner = pipeline("image-to-text", model=name, trust_remote_code=True)
    caption = captioner(image, max_new_tokens=3)
    chat = pipeline("image-text-to-text", model=name, trust_remote_code=True)
    content = [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]
    answer = chat(text=[{"role": "user", "content": content}], max_new_tokens=3)
    torch.save(logits, output)
    print(json.dumps({"caption": str(caption), "answer": str(answer)}))
    """
)


def test_push_round_trip_without_mmfuse(hub_env, model_folder, tmp_path):
    assert push([model_folder, "--repo-id", "tester/round-trip", "--max-shard-size", "60KB"]) == 0
    image_path = tmp_path / "image.png"
    Image.fromarray(torch.randint(0, 255, (40, 36, 3), dtype=torch.uint8).numpy()).save(image_path)

    environment = dict(os.environ, HF_ENDPOINT=hub_env.endpoint, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "home"))
    environment.pop("TRANSFORMERS_OFFLINE", None)
    script = tmp_path / "load.py"
    script.write_text(ROUND_TRIP_SCRIPT)
    output = tmp_path / "logits.pt"
    result = subprocess.run(
        [sys.executable, str(script), "tester/round-trip", str(image_path), str(output)],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert any(request.startswith("GET /tester/round-trip/resolve/") for request in hub_env.state.requests)

    from transformers import AutoModelForImageTextToText, AutoProcessor

    local_model = AutoModelForImageTextToText.from_pretrained(model_folder).eval()
    processor = AutoProcessor.from_pretrained(model_folder)
    inputs = processor(text="<image>What is in the picture?", images=Image.open(image_path), return_tensors="pt")
    with torch.no_grad():
        expected = local_model(**inputs).logits
    torch.testing.assert_close(torch.load(output), expected, rtol=0, atol=0)
    outputs = json.loads(result.stdout.strip().splitlines()[-1])
    assert outputs["caption"]
    assert outputs["answer"]
