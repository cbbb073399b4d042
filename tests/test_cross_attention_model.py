"""Cross-attention fusion: exactness against the bare LM, media-location masking, caching, training."""

import subprocess

import numpy as np
import pytest
import torch
from conftest import config_from_dict
from PIL import Image
from subprocess_helpers import compat_python, run_tests_under
from tiny import text_config, vision_config
from transformers import AutoModel, AutoModelForCausalLM

from mmfuse import MmfuseCrossAttentionConfig
from mmfuse.compose import compose_cross_attention
from mmfuse.modeling_cross_attention import media_location_mask

SMALL_RESAMPLER = {
    "resampler_num_latents": 5,
    "resampler_depth": 2,
    "resampler_num_heads": 2,
    "resampler_head_dim": 12,
    "cross_attention_every_n_layers": 1,
    "cross_attention_intermediate_size": 45,
}


def random_image(seed=0, width=50, height=40):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def compose(tokenizer, model_type="llama", seed=0, **config_kwargs):
    """Return `(model, processor, language_model)` in eval mode, all from the same pretrained LM."""
    torch.manual_seed(seed)
    vision_model = AutoModel.from_config(config_from_dict(vision_config()))
    language_model = AutoModelForCausalLM.from_config(config_from_dict(text_config(model_type)))
    model, processor = compose_cross_attention(
        vision_model, language_model, tokenizer, **{**SMALL_RESAMPLER, **config_kwargs}
    )
    return model.eval(), processor, language_model.eval()


def open_gates(model, value=0.7):
    """Give every gate a nonzero value, as training would."""
    for layer in model.model.gated_decoder_layers():
        layer.gated_cross_attention.attention_gate.data.fill_(value)
        layer.gated_cross_attention.mlp_gate.data.fill_(-value)


def logits_of(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2"])
def test_fresh_model_equals_bare_lm(tokenizer, model_type):
    model, processor, language_model = compose(tokenizer, model_type)
    inputs = processor(
        text="Describe <image> the picture. <image> Is there a cat?",
        images=[random_image(0), random_image(1)],
        return_tensors="pt",
    )

    logits = logits_of(model, inputs)
    with torch.no_grad():
        reference = language_model(input_ids=inputs["input_ids"]).logits

    assert torch.equal(logits, reference)
    open_gates(model)
    assert not torch.allclose(logits_of(model, inputs), reference, atol=1e-3)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_text_before_image_ignores_image(tokenizer, model_type):
    model, processor, language_model = compose(tokenizer, model_type)
    open_gates(model)
    text = "What is in the picture? <image> A cat."
    first = processor(text=text, images=random_image(0), return_tensors="pt")
    second = processor(text=text, images=random_image(5), return_tensors="pt")
    marker = int((first["input_ids"][0] == model.config.image_token_id).nonzero()[0])

    logits_first, logits_second = logits_of(model, first), logits_of(model, second)
    with torch.no_grad():
        reference = language_model(input_ids=first["input_ids"]).logits

    assert torch.equal(logits_first[:, :marker], reference[:, :marker])
    assert torch.equal(logits_second[:, :marker], reference[:, :marker])
    assert not torch.allclose(logits_first[:, marker:], logits_second[:, marker:], atol=1e-4)


def test_second_image_change_keeps_earlier_logits(tokenizer):
    model, processor, _ = compose(tokenizer)
    open_gates(model)
    text = "<image> A red circle. <image> A blue square."
    first = processor(text=text, images=[random_image(0), random_image(1)], return_tensors="pt")
    second = processor(text=text, images=[random_image(0), random_image(2)], return_tensors="pt")
    second_marker = int((first["input_ids"][0] == model.config.image_token_id).nonzero()[1])

    logits_first, logits_second = logits_of(model, first), logits_of(model, second)

    assert torch.equal(logits_first[:, :second_marker], logits_second[:, :second_marker])
    assert not torch.allclose(logits_first[:, second_marker:], logits_second[:, second_marker:], atol=1e-4)


def test_media_location_mask():
    # Row 0: tokens before, at and after two markers; row 1 has one image and a generated extra marker.
    image_counts = torch.tensor([[0, 1, 1, 2, 2], [0, 0, 1, 2, 2]])
    images_per_row = torch.tensor([2, 1])

    immediate = media_location_mask(image_counts, images_per_row, 2, immediate=True)
    all_previous = media_location_mask(image_counts, images_per_row, 2, immediate=False)

    assert immediate[0].tolist() == [[False, False], [True, False], [True, False], [False, True], [False, True]]
    assert all_previous[0].tolist() == [[False, False], [True, False], [True, False], [True, True], [True, True]]
    assert immediate[1].tolist() == [[False, False], [False, False], [True, False], [True, False], [True, False]]


def test_all_previous_images_option(tokenizer):
    """With `only_attend_immediate_media=False`, only tokens after the second image change."""
    text = "<image> A red circle. <image> A blue square."
    immediate, processor, _ = compose(tokenizer)
    all_previous, _, _ = compose(tokenizer, only_attend_immediate_media=False)
    for model in (immediate, all_previous):
        open_gates(model)
    inputs = processor(text=text, images=[random_image(0), random_image(1)], return_tensors="pt")
    second_marker = int((inputs["input_ids"][0] == immediate.config.image_token_id).nonzero()[1])

    logits_immediate, logits_all = logits_of(immediate, inputs), logits_of(all_previous, inputs)

    assert torch.equal(logits_immediate[:, :second_marker], logits_all[:, :second_marker])
    assert not torch.allclose(logits_immediate[:, second_marker:], logits_all[:, second_marker:], atol=1e-4)


def test_explicit_layer_indices(tokenizer):
    model, _, _ = compose(tokenizer, cross_attention_layers=[1])
    layers = model.model.language_model.layers
    assert type(layers[0]).__name__ == "LlamaDecoderLayer"
    assert type(layers[1]).__name__ == "MmfuseGatedDecoderLayer"
    assert "model.language_model.layers.1.decoder_layer.self_attn.q_proj.weight" in model.state_dict()
    assert "model.language_model.layers.1.gated_cross_attention.cross_attention.k_proj.weight" in model.state_dict()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cross_attention_layers": [0, 5]}, r"cross_attention_layers=\[0, 5\].*between 0 and 1"),
        ({"cross_attention_every_n_layers": 0}, r"cross_attention_every_n_layers=0 is invalid"),
        ({"cross_attention_num_heads": 5}, r"cross_attention_num_heads=5 does not divide .* 32"),
        ({"gate_type": "matrix"}, r"gate_type='matrix' is not supported"),
    ],
)
def test_config_rejects_invalid_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MmfuseCrossAttentionConfig(vision_config=vision_config(), text_config=text_config(), **kwargs)


def test_marker_image_mismatch_reports_counts(tokenizer):
    model, processor, _ = compose(tokenizer)
    inputs = processor(
        text="<image> A cat. <image> A dog.", images=[random_image(0), random_image(1)], return_tensors="pt"
    )
    with pytest.raises(ValueError, match=r"markers: 2, images: 1"):
        model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"][:1])
    with pytest.raises(ValueError, match=r"markers: 2, images: 0"):
        model(input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match=r"2 `<image>` placeholders but 1 images"):
        processor(text="<image> A cat. <image> A dog.", images=[random_image(0)])


def test_processor_inserts_one_marker_per_image(tokenizer):
    _, processor, _ = compose(tokenizer)
    inputs = processor(text="<image> A cat. <image> A dog.", images=[random_image(0), random_image(1)])
    assert inputs["input_ids"][0].count(processor.image_token_id) == 2
    assert inputs["pixel_values"].shape == (2, 3, 30, 30)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2"])
def test_cached_generation_matches_uncached(tokenizer, model_type):
    model, processor, _ = compose(tokenizer, model_type)
    open_gates(model)
    inputs = processor(
        text="<image> What is in <image> the picture?", images=[random_image(0), random_image(1)], return_tensors="pt"
    )

    cached = model.generate(**inputs, do_sample=False, max_new_tokens=6)
    uncached = model.generate(**inputs, do_sample=False, max_new_tokens=6, use_cache=False)

    assert torch.equal(cached, uncached)


def test_decode_steps_reuse_image_keys_values(tokenizer):
    model, processor, _ = compose(tokenizer)
    open_gates(model)
    inputs = processor(text="<image> What is in the picture?", images=random_image(0), return_tensors="pt")
    calls = []
    model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))

    with torch.no_grad():
        prefill = model(**inputs, use_cache=True)
        next_token = prefill.logits[:, -1:].argmax(-1)
        step = model(
            input_ids=next_token,
            attention_mask=torch.ones(1, inputs["input_ids"].shape[1] + 1, dtype=torch.long),
            image_cache=prefill.image_cache,
            cache=getattr(prefill, "cache", None) or prefill.past_key_values,
            use_cache=True,
        )
        full = model(
            input_ids=torch.cat([inputs["input_ids"], next_token], dim=1), pixel_values=inputs["pixel_values"]
        )

    assert len(calls) == 2  # prefill and the full pass; the decode step did not run the tower
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=1e-5, rtol=1e-5)


def test_batched_left_padding_matches_single_prompts(tokenizer):
    """Rows with different image counts, left-padded into one batch, generate what each prompt alone does."""
    model, processor, _ = compose(tokenizer)
    open_gates(model)
    texts = ["<image> Is there a cat? <image> Yes.", "Describe the image. <image>", "hello world"]
    images = [[random_image(0), random_image(1)], [random_image(2)], []]

    batch = processor(text=texts, images=[image for row in images for image in row], padding=True, return_tensors="pt")
    batched = model.generate(**batch, do_sample=False, max_new_tokens=5)
    for row, (text, row_images) in enumerate(zip(texts, images)):
        single = processor(text=text, images=row_images or None, return_tensors="pt")
        alone = model.generate(**single, do_sample=False, max_new_tokens=5)
        assert batched[row, -5:].tolist() == alone[0, -5:].tolist(), f"row {row}"


def test_beam_search_with_several_images_per_row(tokenizer):
    model, processor, _ = compose(tokenizer)
    open_gates(model)
    texts = ["<image> Is there a cat? <image> Yes.", "Describe the image. <image>"]
    images = [random_image(0), random_image(1), random_image(2)]
    batch = processor(text=texts, images=images, padding=True, return_tensors="pt")

    beams = model.generate(**batch, do_sample=False, num_beams=3, max_new_tokens=4)
    for row, row_images in enumerate([images[:2], images[2:]]):
        single = processor(text=texts[row], images=row_images, return_tensors="pt")
        alone = model.generate(**single, do_sample=False, num_beams=3, max_new_tokens=4)
        assert beams[row, -4:].tolist() == alone[0, -4:].tolist(), f"row {row}"


def frozen_training_step(model, inputs, checkpointing: bool, use_reentrant: bool = False):
    """Run one backward pass with only the resampler and gated blocks trainable; return the loss.

    Also return how often the first wrapped LM decoder layer called its checkpoint function:
    once with checkpointing, never without.
    """
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.zero_grad()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    for parameter in list(model.model.vision_tower.parameters()) + list(model.model.language_model.parameters()):
        parameter.requires_grad_(False)
    for layer in model.model.gated_decoder_layers():
        layer.gated_cross_attention.requires_grad_(True)
    model.lm_head.requires_grad_(False)
    checkpoint_calls = []
    first_layer = model.model.gated_decoder_layers()[0].decoder_layer
    if checkpointing:
        checkpoint_function = first_layer._gradient_checkpointing_func

        def counting_checkpoint(*args, **kwargs):
            checkpoint_calls.append(1)
            return checkpoint_function(*args, **kwargs)

        first_layer._gradient_checkpointing_func = counting_checkpoint
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    return loss.detach(), len(checkpoint_calls)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_training_with_and_without_checkpointing(tokenizer, model_type, use_reentrant):
    """Checkpointing leaves loss and gradients unchanged; reentrant checkpointing is 4.57's default."""
    inputs = None
    losses, gradients = [], []
    for checkpointing in (False, True):
        model, processor, _ = compose(tokenizer, model_type)
        open_gates(model)
        inputs = processor(
            text="<image> A red circle. <image> A blue square.",
            images=[random_image(0), random_image(1)],
            return_tensors="pt",
        )
        loss, checkpoint_calls = frozen_training_step(model, inputs, checkpointing, use_reentrant)
        losses.append(loss)
        assert checkpoint_calls == (1 if checkpointing else 0)
        gradients.append({name: parameter.grad for name, parameter in model.named_parameters()})

        for name, parameter in model.named_parameters():
            trainable = name.startswith("model.resampler.") or ".gated_cross_attention." in name
            if trainable:
                assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
            else:
                assert parameter.grad is None, name

    torch.testing.assert_close(losses[0], losses[1])
    for name, gradient in gradients[0].items():
        if gradient is not None:
            torch.testing.assert_close(gradient, gradients[1][name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_training_under_transformers_457():
    """Rerun the checkpointing test under the transformers 4.57 environment, with mmfuse from this checkout."""
    python = compat_python()
    version = subprocess.run(
        [python, "-c", "import transformers; print(transformers.__version__)"], capture_output=True, text=True
    )
    assert version.stdout.startswith("4.57"), version.stdout

    result = run_tests_under(python, __file__, "training_with_and_without")

    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "4 passed" in result.stdout, result.stdout[-2000:]
