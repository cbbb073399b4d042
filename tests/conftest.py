import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from tiny import build_tokenizer, text_config, vision_config  # noqa: E402
from transformers import AutoModel, AutoModelForCausalLM  # noqa: E402
from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402

torch.set_num_threads(2)


def config_from_dict(values: dict):
    values = dict(values)
    return CONFIG_MAPPING[values.pop("model_type")](**values)


@pytest.fixture
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def tiny_projection(tokenizer):
    """A composed tiny projection model (CLIP tower, Llama LM) and its processor, in eval mode."""
    from mmfuse.compose import compose_projection

    torch.manual_seed(0)
    vision_model = AutoModel.from_config(config_from_dict(vision_config()))
    language_model = AutoModelForCausalLM.from_config(config_from_dict(text_config(vocab_size=len(tokenizer))))
    model, processor = compose_projection(vision_model, language_model, tokenizer)
    return model.eval(), processor


@pytest.fixture
def make_projection(tokenizer):
    """Return a builder of composed tiny projection models: `make(vision=..., text=..., **config_kwargs)`.

    `vision` and `text` are config dicts from tests/tiny.py; the model comes back in eval mode
    with its processor, built from fixed seeds so two calls give the same weights.
    """
    from mmfuse.compose import compose_projection

    def make(vision: dict | None = None, text: dict | None = None, seed: int = 0, **config_kwargs):
        torch.manual_seed(seed)
        vision_model = AutoModel.from_config(config_from_dict(vision or vision_config()))
        language_model = AutoModelForCausalLM.from_config(
            config_from_dict(text or text_config(vocab_size=len(tokenizer)))
        )
        model, processor = compose_projection(vision_model, language_model, build_tokenizer(), **config_kwargs)
        return model.eval(), processor

    return make


@pytest.fixture(params=["installed", "compat"])
def hub_python(request):
    """Python of each transformers version the Hub code supports: this environment's and 4.57's.

    The 4.57 environment comes from `MMFUSE_COMPAT_PYTHON`; without it the test is skipped, or
    fails under `CI=true`.
    """
    from subprocess_helpers import compat_python

    return sys.executable if request.param == "installed" else compat_python()


def pytest_configure(config):
    config.addinivalue_line("markers", "timm: needs timm and torchvision; `make test` runs these in .venv-timm")
