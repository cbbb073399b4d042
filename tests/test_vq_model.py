"""VQ-token fusion: vocabulary extension, image-token mapping, labels, image generation and Hub loading."""

import numpy as np
import pytest
import torch
from conftest import config_from_dict
from PIL import Image
from tiny import build_tokenizer, text_config
from transformers import AutoModelForCausalLM

from mmfuse import MmfuseVQGANConfig, MmfuseVQGANModel
from mmfuse.compose import compose_vq
from mmfuse.modeling_vq import ImageSpanLogitsProcessor

# 12 px images, downsampling 4: a 3x3 grid of 9 codes from a 23-entry codebook.
TINY_VQGAN = {
    "resolution": 12,
    "channel_multipliers": [1, 2, 2],
    "base_channels": 8,
    "norm_num_groups": 4,
    "latent_channels": 8,
    "embed_dim": 5,
    "codebook_size": 23,
    "num_res_blocks": 1,
}


def random_image(width=20, height=17, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def build_vq(tie_word_embeddings=False, model_type="llama", seed=0):
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    vqgan = MmfuseVQGANModel(MmfuseVQGANConfig(**TINY_VQGAN))
    language_model = AutoModelForCausalLM.from_config(
        config_from_dict(text_config(model_type, vocab_size=len(tokenizer), tie_word_embeddings=tie_word_embeddings))
    )
    model, processor = compose_vq(vqgan, language_model, tokenizer)
    return model.eval(), processor, language_model


@pytest.fixture(scope="module")
def tiny_vq():
    model, processor, _ = build_vq()
    return model, processor


def image_ids(model) -> torch.Tensor:
    return torch.tensor(model.config.image_token_ids())


def test_image_tokens_round_trip(tiny_vq):
    model, processor = tiny_vq
    pixel_values = processor.image_processor([random_image(seed=1), random_image(seed=2)], return_tensors="pt")[
        "pixel_values"
    ]
    codes = model.vqmodel.encode(pixel_values)
    token_ids = model.model.codes_to_token_ids(codes)
    assert torch.equal(model.model.token_ids_to_codes(token_ids), codes)
    assert token_ids.min() >= model.config.image_token_offset
    assert token_ids.max() < model.config.image_token_offset + model.config.codebook_size

    all_codes = torch.arange(model.config.codebook_size)
    assert torch.equal(model.model.token_ids_to_codes(model.model.codes_to_token_ids(all_codes)), all_codes)
    with pytest.raises(ValueError, match="not image tokens"):
        model.model.token_ids_to_codes(torch.tensor([model.config.boi_token_id]))


def test_image_span_holds_only_image_tokens(tiny_vq):
    model, processor = tiny_vq
    inputs = processor(text="Look: <image> what?", images=random_image(), return_tensors="pt")
    merged = model.model.merge_image_tokens(inputs["input_ids"], inputs["pixel_values"])[0]
    start = int((merged == model.config.boi_token_id).nonzero()[0]) + 1
    end = int((merged == model.config.eoi_token_id).nonzero()[0])
    assert end - start == model.config.num_codes
    assert torch.isin(merged[start:end], image_ids(model)).all()
    outside = torch.cat([merged[:start], merged[end:]])
    assert not torch.isin(outside, image_ids(model)).any()
    assert not (merged == model.config.image_token_id).any()


def test_wrong_image_size_rejected_before_encoding(tiny_vq, monkeypatch):
    model, processor = tiny_vq
    inputs = processor(text="<image>", images=random_image(), return_tensors="pt")

    def fail_encode(*args, **kwargs):
        raise AssertionError("the image tokenizer ran before the input check")

    monkeypatch.setattr(model.model.vqmodel, "encode", fail_encode)
    with pytest.raises(ValueError, match=r"\[num_images, 3, 12, 12\].*\[1, 3, 16, 16\]"):
        model(input_ids=inputs["input_ids"], pixel_values=torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"tokens: 9, codes: 18"):
        model(input_ids=inputs["input_ids"], pixel_values=torch.cat([inputs["pixel_values"]] * 2))
    with pytest.raises(ValueError, match=r"tokens: 9, codes: 0"):
        model(input_ids=inputs["input_ids"])


def test_max_new_tokens_below_span_rejected(tiny_vq):
    model, processor = tiny_vq
    inputs = processor(text="a red circle", return_tensors="pt")
    with pytest.raises(ValueError, match=r"max_new_tokens=10 is smaller than one image span of 11 tokens"):
        model.generate_images(**inputs, max_new_tokens=10)


def test_labels_modes(tiny_vq):
    model, processor = tiny_vq
    texts = ["<image>a red circle", "a blue square <image> here"]
    images = [random_image(seed=3), random_image(seed=4)]
    understanding = processor(text=texts, images=images, return_tensors="pt", labels_mode="understanding")
    generation = processor(text=texts, images=images, return_tensors="pt", labels_mode="generation")
    input_ids = understanding["input_ids"]
    span = torch.isin(input_ids, torch.tensor(sorted(processor.image_token_ids())))
    padding = understanding["attention_mask"] == 0

    assert (understanding["labels"][span | padding] == -100).all()
    assert torch.equal(understanding["labels"][~span & ~padding], input_ids[~span & ~padding])
    assert torch.equal(generation["labels"][~padding], input_ids[~padding])
    assert (generation["labels"][padding] == -100).all()

    with torch.no_grad():
        output = model(**generation)
        merged = model.model.merge_image_tokens(input_ids, generation["pixel_values"])
    # Reference loss: next-token cross-entropy over every real token, image tokens included.
    targets = merged.masked_fill(padding, -100)[:, 1:]
    expected = torch.nn.functional.cross_entropy(
        output.logits[:, :-1].reshape(-1, output.logits.shape[-1]), targets.reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(output.loss, expected)

    with torch.no_grad():
        understanding_loss = model(**understanding).loss
    targets = merged.masked_fill(padding | span, -100)[:, 1:]
    expected = torch.nn.functional.cross_entropy(
        output.logits[:, :-1].reshape(-1, output.logits.shape[-1]), targets.reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(understanding_loss, expected)


@pytest.mark.parametrize("tie_word_embeddings", [False, True])
def test_vocabulary_extension_and_reload(tie_word_embeddings, tmp_path):
    model, processor, language_model = build_vq(tie_word_embeddings=tie_word_embeddings)
    old_vocab_size = language_model.config.vocab_size
    new_vocab_size = model.config.image_token_offset + model.config.codebook_size
    embeddings = model.get_input_embeddings().weight
    assert embeddings.shape[0] == new_vocab_size
    assert model.lm_head.weight.shape[0] == new_vocab_size
    assert model.config.text_config.vocab_size == new_vocab_size
    assert (model.lm_head.weight.data_ptr() == embeddings.data_ptr()) == tie_word_embeddings

    old_embeddings = language_model.get_input_embeddings().weight
    torch.testing.assert_close(embeddings[:old_vocab_size], old_embeddings, rtol=0, atol=0)
    if not tie_word_embeddings:
        old_head = language_model.get_output_embeddings().weight
        torch.testing.assert_close(model.lm_head.weight[:old_vocab_size], old_head, rtol=0, atol=0)
    new_rows = embeddings[model.config.image_token_offset :]
    # Rows sampled around the old mean lie far closer to it than the spread of the old rows allows.
    distance_to_mean = (new_rows.mean(0) - old_embeddings.mean(0)).norm()
    assert distance_to_mean < old_embeddings.std(0).norm()

    inputs = processor(
        text="<image>a red circle", images=random_image(), return_tensors="pt", labels_mode="generation"
    )
    with torch.no_grad():
        loss = model(**inputs).loss
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    reloaded_processor = type(processor).from_pretrained(tmp_path)
    assert reloaded.get_input_embeddings().weight.shape[0] == new_vocab_size
    assert reloaded.lm_head.weight.shape[0] == new_vocab_size
    assert reloaded_processor.num_codes == model.config.num_codes
    reloaded_inputs = reloaded_processor(
        text="<image>a red circle", images=random_image(), return_tensors="pt", labels_mode="generation"
    )
    assert torch.equal(reloaded_inputs["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**reloaded_inputs).loss, loss)


def test_span_processor_constrains_every_state(tiny_vq):
    model, _ = tiny_vq
    config = model.config
    vocab_size = config.text_config.vocab_size
    processor = ImageSpanLogitsProcessor(
        config.image_token_ids(), config.boi_token_id, config.eoi_token_id, config.num_codes
    )
    image_token = config.image_token_ids()[0]
    rows = [
        [5, 6, 7],  # outside a span: text only
        [5, config.boi_token_id] + [image_token] * 4,  # inside, codes missing: image tokens only
        [5, config.boi_token_id] + [image_token] * config.num_codes,  # span full: end-of-image only
        [config.boi_token_id] + [image_token] * config.num_codes + [config.eoi_token_id],  # closed again
    ]
    length = max(len(row) for row in rows)
    input_ids = torch.tensor([[3] * (length - len(row)) + row for row in rows])
    allowed = processor(input_ids, torch.zeros(len(rows), vocab_size)).isfinite()
    is_image = torch.zeros(vocab_size, dtype=torch.bool)
    is_image[image_ids(model)] = True
    assert torch.equal(allowed[0], ~is_image)
    assert torch.equal(allowed[1], is_image)
    assert allowed[2].nonzero().flatten().tolist() == [config.eoi_token_id]
    assert torch.equal(allowed[3], ~is_image)


def test_generate_images_exact_span(tiny_vq):
    model, processor = tiny_vq
    inputs = processor(text=["a red circle", "the quick brown fox"], return_tensors="pt", padding=True)
    output = model.generate_images(**inputs, seed=0, max_new_tokens=50)
    generated = output.sequences[:, inputs["input_ids"].shape[1] :]
    assert generated.shape == (2, model.config.image_span_length)
    assert (generated[:, 0] == model.config.boi_token_id).all()
    assert (generated[:, -1] == model.config.eoi_token_id).all()
    assert torch.isin(generated[:, 1:-1], image_ids(model)).all()
    assert output.codes.shape == (2, 3, 3)
    assert torch.equal(model.model.codes_to_token_ids(output.codes.flatten(1)), generated[:, 1:-1])
    assert [image.size for image in output.images] == [(12, 12), (12, 12)]


def test_text_generation_keeps_image_tokens_in_spans(tiny_vq):
    model, processor = tiny_vq
    inputs = processor(text="<image>What is it?", images=random_image(), return_tensors="pt")
    # Bias the head towards image tokens so that an unconstrained model would emit them.
    bias = torch.zeros(model.config.text_config.vocab_size)
    bias[image_ids(model)] = 50.0
    model.lm_head.register_forward_hook(lambda module, args, output: output + bias)
    try:
        generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    finally:
        model.lm_head._forward_hooks.clear()
    new_tokens = generated[0, inputs["input_ids"].shape[1] :]
    assert not torch.isin(new_tokens, image_ids(model)).any()


def test_guidance_changes_output(tiny_vq):
    model, processor = tiny_vq
    inputs = processor(text=["a red circle"], return_tensors="pt")
    plain = model.generate_images(**inputs, do_sample=False)
    unit_scale = model.generate_images(**inputs, do_sample=False, guidance_scale=1.0)
    guided = model.generate_images(**inputs, do_sample=False, guidance_scale=20.0)
    assert torch.equal(plain.codes, unit_scale.codes)
    assert not torch.equal(plain.codes, guided.codes)

    unconditional = processor(text=["the quick brown fox"], return_tensors="pt")
    other_prompt = model.generate_images(
        **inputs,
        do_sample=False,
        guidance_scale=20.0,
        unconditional_ids=unconditional["input_ids"],
        unconditional_attention_mask=unconditional["attention_mask"],
    )
    assert not torch.equal(guided.codes, other_prompt.codes)


def test_seeds_and_batching(tiny_vq):
    model, processor = tiny_vq
    texts = ["a red circle", "the quick brown fox jumps"]
    batch = processor(text=texts, return_tensors="pt", padding=True)
    first = model.generate_images(**batch, seed=7, temperature=1.5, guidance_scale=3.0)
    second = model.generate_images(**batch, seed=7, temperature=1.5, guidance_scale=3.0)
    other_seed = model.generate_images(**batch, seed=8, temperature=1.5, guidance_scale=3.0)
    assert torch.equal(first.codes, second.codes)
    assert not torch.equal(first.codes, other_seed.codes)
    for row, text in enumerate(texts):
        single = model.generate_images(
            **processor(text=[text], return_tensors="pt"), seed=7, temperature=1.5, guidance_scale=3.0
        )
        assert torch.equal(single.codes[0], first.codes[row])
