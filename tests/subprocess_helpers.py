"""Run a saved model folder in a fresh Python process where mmfuse cannot be imported.

A test writes a request (prompts, images as uint8 tensors, generate arguments, pipeline calls)
with `torch.save`, and `run_hub_worker(folder, python, request, workdir)` runs this file as a
script under `python`: any virtual environment with torch and transformers, mmfuse or not.
The worker blocks `import mmfuse` before it imports transformers, loads the folder only through
transformers' Auto classes with `trust_remote_code=True`, and writes its results to a file
that the test reads back.

The module imports only the standard library at the top, so the worker starts in an
environment without pytest.
"""

import os
import subprocess
import sys

COMPAT_PYTHON_VARIABLE = "MMFUSE_COMPAT_PYTHON"
WORKER_TIMEOUT_S = 300


def compat_python() -> str:
    """Return the python of the transformers 4.57 environment named by `MMFUSE_COMPAT_PYTHON`.

    Without the variable the calling test is skipped, except under `CI=true`, where it fails:
    CI must run the compatibility tests.
    """
    import pytest

    path = os.environ.get(COMPAT_PYTHON_VARIABLE)
    if not path:
        message = (
            f"{COMPAT_PYTHON_VARIABLE} is not set, so the transformers 4.57 checks cannot run; create the "
            f"environment with `make compat` and set {COMPAT_PYTHON_VARIABLE}=.venv457/bin/python."
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    if not os.path.isfile(path):
        pytest.fail(f"{COMPAT_PYTHON_VARIABLE}={path} does not exist; point it at a python executable.")
    # The worker runs in another directory; abspath keeps the venv's symlink, which realpath would resolve.
    return os.path.abspath(path)


def run_hub_worker(folder, python: str, request: dict, workdir) -> dict:
    """Load `folder` under `python` without mmfuse, run `request` there and return the results.

    Args:
        folder: a model folder written by `save_pretrained` of an mmfuse model and its processor.
        python: the interpreter to use, e.g. `sys.executable` or `compat_python()`.
        request: keys the worker reads, all optional:
            `text` (str or list) and `images` (list of `[height, width, 3]` uint8 tensors): encoded
                with `AutoProcessor` (padding on) into the model inputs; `inputs` (dict of tensors)
                replaces them.
            `generate_kwargs` (dict): arguments of `model.generate`; greedy without it.
            `base_model` (bool): also load `AutoModel` and return its `last_hidden_state`.
            `pipelines` (list of dicts with `task`, `args`, `kwargs`): calls of
                `pipeline(task, model=folder, trust_remote_code=True)`; uint8 tensors of shape
                `[height, width, 3]` anywhere in `args` and `kwargs` become PIL images.
            `save_to` (str): save the loaded model and processor there, with this transformers.
        workdir: a folder, created when missing, for the request, the results and the Hub-code module cache.

    Returns:
        A dict with `transformers_version`, `mmfuse_importable`, the resolved class names
        (`config_class`, `model_class`, `processor_class`, `base_model_class`), the loading report
        (`missing_keys`, `unexpected_keys`, `mismatched_keys`), `inputs`, `logits`, `tokens`,
        `base_last_hidden_state` and `pipelines` (the outputs, `generated_text` only).
    """
    import torch

    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    request_path = os.path.join(workdir, "hub_request.pt")
    output_path = os.path.join(workdir, "hub_output.pt")
    torch.save(request, request_path)

    environment = dict(os.environ)
    environment.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        # 4.57 caches Hub code under the folder's base name only; a private cache keeps parallel runs apart.
        HF_MODULES_CACHE=os.path.join(workdir, "hf_modules"),
        PYTHONPATH="",
        TOKENIZERS_PARALLELISM="false",
    )
    command = [python, os.path.abspath(__file__), os.fspath(folder), request_path, output_path]
    completed = subprocess.run(
        command, cwd=workdir, env=environment, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"The Hub-code worker failed under {python} with exit status {completed.returncode}:\n"
            f"{completed.stderr[-6000:]}"
        )
    return torch.load(output_path, weights_only=True)


def run_tests_under(python: str, test_file: str, keyword: str) -> subprocess.CompletedProcess:
    """Run the tests of `test_file` selected by `-k keyword` under `python`, with mmfuse from this checkout."""
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", keyword, test_file],
        cwd=repository,
        env=dict(os.environ, PYTHONPATH=repository),
        capture_output=True,
        text=True,
        timeout=WORKER_TIMEOUT_S,
    )


def _block_mmfuse() -> bool:
    """Make `import mmfuse` fail in this process and return whether it still succeeds."""
    sys.modules["mmfuse"] = None  # an editable install stays on sys.path, so hide the module itself
    try:
        import mmfuse  # noqa: F401
    except ImportError:
        return False
    return True


def _to_images(value):
    import torch
    from PIL import Image

    if isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 3 and value.shape[-1] == 3:
        return Image.fromarray(value.numpy())
    if isinstance(value, dict):
        return {key: _to_images(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_images(item) for item in value]
    return value


def _generated_texts(value):
    """Keep only `generated_text` of pipeline outputs, which may also hold images and chats."""
    if isinstance(value, dict):
        return {"generated_text": value["generated_text"]}
    if isinstance(value, (list, tuple)):
        return [_generated_texts(item) for item in value]
    return value


def _serve(folder: str, request_path: str, output_path: str) -> None:
    mmfuse_importable = _block_mmfuse()

    import torch
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline

    torch.set_num_threads(2)
    request = torch.load(request_path, weights_only=True)
    output = {"transformers_version": transformers.__version__, "mmfuse_importable": mmfuse_importable}

    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model, loading_info = AutoModelForImageTextToText.from_pretrained(
        folder, trust_remote_code=True, output_loading_info=True
    )
    model.eval()
    output.update(
        config_class=type(config).__name__,
        processor_class=type(processor).__name__,
        model_class=type(model).__name__,
        missing_keys=sorted(loading_info.get("missing_keys", [])),
        unexpected_keys=sorted(loading_info.get("unexpected_keys", [])),
        mismatched_keys=[str(key) for key in loading_info.get("mismatched_keys", [])],
    )

    inputs = request.get("inputs")
    if inputs is None and request.get("text") is not None:
        images = _to_images(request.get("images")) or None
        inputs = dict(processor(text=request["text"], images=images, padding=True, return_tensors="pt"))
    if inputs is not None:
        output["inputs"] = inputs
        with torch.no_grad():
            output["logits"] = model(**inputs).logits
        generate_kwargs = {"do_sample": False, "max_new_tokens": 6, **request.get("generate_kwargs", {})}
        output["tokens"] = model.generate(**inputs, **generate_kwargs)
        if request.get("base_model"):
            base_model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
            output["base_model_class"] = type(base_model).__name__
            with torch.no_grad():
                output["base_last_hidden_state"] = base_model(**inputs).last_hidden_state

    results = []
    for call in request.get("pipelines", []):
        runner = pipeline(call["task"], model=folder, trust_remote_code=True)
        result = runner(*_to_images(call.get("args", [])), **_to_images(call.get("kwargs", {})))
        results.append({"pipeline_class": type(runner).__name__, "output": _generated_texts(result)})
    output["pipelines"] = results

    if request.get("save_to"):
        model.save_pretrained(request["save_to"])
        processor.save_pretrained(request["save_to"])

    torch.save(output, output_path)


if __name__ == "__main__":
    _serve(*sys.argv[1:4])
