import numpy as np
import pytest
import torch
from PIL import Image


def random_image(width=64, height=48, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def test_forward_logits_shape(tiny_projection):
    model, processor = tiny_projection
    inputs = processor(text="<image>What is in the picture?", images=random_image(), return_tensors="pt")
    logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)


def test_missing_image_reports_counts(tiny_projection):
    model, processor = tiny_projection
    inputs = processor(text="<image>What is in the picture?", images=random_image(), return_tensors="pt")
    with pytest.raises(ValueError, match=r"tokens: 25, features: 0"):
        model(input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match=r"tokens: 25, features: 50"):
        model(input_ids=inputs["input_ids"], pixel_values=torch.cat([inputs["pixel_values"]] * 2))
