"""Config and model behaviour of the projection fusion type on tiny random models."""

import json

import pytest
import torch
from tiny import plain_language_model, random_image, text_config, vision_config

from mmfuse import MmfuseProjectionConfig, MmfuseProjectionForConditionalGeneration

PROMPT = "<image>What is in the picture?"


def tiny_config(**kwargs) -> MmfuseProjectionConfig:
    kwargs.setdefault("vision_config", vision_config())
    kwargs.setdefault("text_config", text_config())
    kwargs.setdefault("image_token_id", 300)
    return MmfuseProjectionConfig(**kwargs)


def spy_on(module: torch.nn.Module) -> list:
    """Record the first positional input of every call to `module`."""
    calls = []
    module.register_forward_pre_hook(lambda _, args: calls.append(args[0] if args else None))
    return calls


# Config


@pytest.mark.parametrize(
    ("projector_type", "image_size", "num_image_tokens", "in_features"),
    [
        ("linear", 30, 25, 24),
        ("mlp2x_gelu", 30, 25, 24),
        ("pixel_shuffle", 36, 9, 24 * 4),
        ("avg_pool", 36, 9, 24),
    ],
)
def test_projector_types_token_counts(projector_type, image_size, num_image_tokens, in_features):
    config = tiny_config(vision_config=vision_config(image_size=image_size), projector_type=projector_type)
    assert config.num_image_tokens == num_image_tokens
    model = MmfuseProjectionForConditionalGeneration(config).eval()
    assert model.multi_modal_projector.linear_1.in_features == in_features
    assert hasattr(model.multi_modal_projector, "linear_2") == (projector_type in ("mlp2x_gelu", "avg_pool"))

    pixel_values = torch.randn(3, 3, image_size, image_size)
    features = model.get_image_features(pixel_values)
    assert features.shape == (3, num_image_tokens, 32)


def patch_grid_model(projector_type: str):
    """Return a model with a 6x6 patch grid, random pixel values and the tower's grid of patch features."""
    config = tiny_config(vision_config=vision_config(image_size=36), projector_type=projector_type)
    model = MmfuseProjectionForConditionalGeneration(config).eval()
    pixel_values = torch.randn(2, 3, 36, 36)
    with torch.no_grad():
        hidden = model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
    return model, pixel_values, hidden.reshape(2, 6, 6, 24)  # [num_images, rows, cols, channels]


def test_avg_pool_matches_manual_pooling():
    model, pixel_values, grid = patch_grid_model("avg_pool")
    with torch.no_grad():
        pooled = grid.reshape(2, 3, 2, 3, 2, 24).mean(dim=(2, 4)).reshape(2, 9, 24)
        projector = model.multi_modal_projector
        expected = projector.linear_2(projector.act(projector.linear_1(pooled)))
        torch.testing.assert_close(model.get_image_features(pixel_values), expected)


def test_pixel_shuffle_matches_manual_fold():
    model, pixel_values, grid = patch_grid_model("pixel_shuffle")
    with torch.no_grad():
        # Token (row, col) of the output holds the 2x2 block starting at patch (2 * row, 2 * col).
        folded = torch.stack(
            [
                torch.cat([grid[:, 2 * row + i, 2 * col + j] for i in range(2) for j in range(2)], dim=-1)
                for row in range(3)
                for col in range(3)
            ],
            dim=1,
        )
        expected = model.multi_modal_projector.linear_1(folded)
        torch.testing.assert_close(model.get_image_features(pixel_values), expected)


def test_feature_layer_list_concatenates():
    config = tiny_config(vision_feature_layer=[-1, 1], projector_type="linear")
    assert config.vision_feature_size == 48
    model = MmfuseProjectionForConditionalGeneration(config).eval()
    assert model.multi_modal_projector.linear_1.in_features == 48
    pixel_values = torch.randn(2, 3, 30, 30)
    with torch.no_grad():
        hidden_states = model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        concatenated = torch.cat([hidden_states[-1][:, 1:], hidden_states[1][:, 1:]], dim=-1)
        expected = model.multi_modal_projector.linear_1(concatenated)
        torch.testing.assert_close(model.get_image_features(pixel_values), expected)


@pytest.mark.parametrize(
    ("tower", "strategy", "num_image_tokens"),
    [
        ("clip_vision_model", "default", 25),
        ("clip_vision_model", "full", 26),
        ("siglip_vision_model", "default", 25),
        ("siglip_vision_model", "full", 25),
    ],
)
def test_select_strategy_token_counts(tower, strategy, num_image_tokens):
    config = tiny_config(vision_config=vision_config(model_type=tower), vision_feature_select_strategy=strategy)
    assert config.num_image_tokens == num_image_tokens
    model = MmfuseProjectionForConditionalGeneration(config).eval()
    features = model.get_image_features(torch.randn(2, 3, 30, 30))
    assert features.shape == (2, num_image_tokens, 32)


def test_num_image_tokens_not_stored(tmp_path):
    config = tiny_config()
    assert "num_image_tokens" not in config.to_dict()
    config.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())
    assert "num_image_tokens" not in stored

    # The count follows the vision config after loading, with no stale copy to disagree.
    stored["vision_config"]["image_size"] = 36
    (tmp_path / "config.json").write_text(json.dumps(stored))
    assert MmfuseProjectionConfig.from_pretrained(tmp_path).num_image_tokens == 36


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"projector_type": "conv"}, r"projector_type='conv' is not supported; use one of"),
        ({"vision_feature_select_strategy": "cls"}, r"vision_feature_select_strategy='cls' is not supported"),
        ({"vision_feature_layer": []}, r"vision_feature_layer is an empty list"),
        ({"projector_type": "avg_pool", "projector_downsample": 2}, r"does not divide the vision grid of 5x5"),
        (
            {"projector_type": "pixel_shuffle", "vision_feature_select_strategy": "full"},
            r"keeps the class token; use 'default'",
        ),
    ],
)
def test_invalid_config_values(kwargs, message):
    if kwargs.get("vision_feature_select_strategy") == "full":
        kwargs["vision_config"] = vision_config(image_size=36)
    with pytest.raises(ValueError, match=message):
        tiny_config(**kwargs)


def test_feature_layer_out_of_range():
    model = MmfuseProjectionForConditionalGeneration(tiny_config(vision_feature_layer=7))
    with pytest.raises(ValueError, match=r"vision_feature_layer=7 is out of range.*between -4 and 3"):
        model.get_image_features(torch.randn(1, 3, 30, 30))


# Placeholder and feature counts


def test_forward_logits_shape(tiny_projection):
    model, processor = tiny_projection
    inputs = processor(text=PROMPT, images=random_image(), return_tensors="pt")
    logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert model.get_image_features(inputs["pixel_values"]).shape == (1, 25, 32)


def test_count_mismatch_before_vision_tower(tiny_projection):
    model, processor = tiny_projection
    tower_calls = spy_on(model.vision_tower)
    two_placeholders = processor(text="<image><image>Hi", images=[random_image(), random_image(seed=1)])
    one_placeholder = processor(text=PROMPT, images=random_image(), return_tensors="pt")
    text_only = processor(text="What is in the picture?", return_tensors="pt")
    one_image = one_placeholder["pixel_values"]

    with pytest.raises(ValueError, match=r"tokens: 50, features: 25"):
        model(input_ids=torch.tensor(two_placeholders["input_ids"]), pixel_values=one_image)
    with pytest.raises(ValueError, match=r"tokens: 25, features: 0"):
        model(input_ids=one_placeholder["input_ids"])
    with pytest.raises(ValueError, match=r"tokens: 0, features: 25"):
        model(input_ids=text_only["input_ids"], pixel_values=one_image)
    assert tower_calls == []


def test_multi_image_batch_order(tiny_projection):
    model, processor = tiny_projection
    images = [random_image(seed=seed) for seed in range(3)]
    inputs = processor(
        text=["<image>A<image>Describe the image.", "Is there a cat?<image>"],
        images=[images[:2], images[2:]],
        padding=True,
        return_tensors="pt",
    )
    assert inputs["pixel_values"].shape[0] == 3
    with torch.no_grad():
        logits = model(**inputs).logits

        # Reference: each image encoded alone and written by hand over its own placeholder span.
        inputs_embeds = model.get_input_embeddings()(inputs["input_ids"]).clone()
        image_token_id = model.config.image_token_id
        spans = [(row, int(column)) for row in range(2) for column in range(inputs["input_ids"].shape[1])]
        starts = [
            (row, column)
            for row, column in spans
            if inputs["input_ids"][row, column] == image_token_id
            and (column == 0 or inputs["input_ids"][row, column - 1] != image_token_id)
        ]
        assert [row for row, _ in starts] == [0, 0, 1]
        for index, (row, column) in enumerate(starts):
            features = model.get_image_features(inputs["pixel_values"][index : index + 1])[0]
            inputs_embeds[row, column : column + 25] = features
        hidden = model.language_model(inputs_embeds=inputs_embeds, attention_mask=inputs["attention_mask"])
        expected = model.lm_head(hidden.last_hidden_state)
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[mask], expected[mask])


def test_labels_ignore_images_and_padding(tiny_projection):
    model, processor = tiny_projection
    inputs = processor(
        text=[PROMPT, "Describe the image. There is a blue square."],
        images=[random_image()],
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )
    assert (inputs["attention_mask"] == 0).any()
    labels = inputs["input_ids"].clone()
    with torch.no_grad():
        outputs = model(**inputs, labels=labels)

    ignored = (labels == model.config.image_token_id) | (inputs["attention_mask"] == 0)
    targets = labels.masked_fill(ignored, -100)[:, 1:]
    expected = torch.nn.functional.cross_entropy(
        outputs.logits[:, :-1].reshape(-1, outputs.logits.shape[-1]), targets.reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(outputs.loss, expected)
    # The unmasked loss differs, so the masking is what makes the two agree.
    unmasked = torch.nn.functional.cross_entropy(
        outputs.logits[:, :-1].reshape(-1, outputs.logits.shape[-1]), labels[:, 1:].reshape(-1)
    )
    assert not torch.isclose(unmasked, expected)


# Embeddings


@pytest.mark.parametrize(
    ("model_type", "tie"),
    [("gpt2", True), ("llama", True), ("llama", False)],
)
def test_embeddings_survive_save_load(make_projection, tokenizer, tmp_path, model_type, tie):
    model, processor = make_projection(
        text=text_config(model_type, vocab_size=len(tokenizer), tie_word_embeddings=tie)
    )
    embeddings = model.get_input_embeddings().weight
    assert (model.lm_head.weight is embeddings) == tie
    inputs = processor(text=PROMPT, images=random_image(), return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits

    model.save_pretrained(tmp_path)
    loaded = MmfuseProjectionForConditionalGeneration.from_pretrained(tmp_path).eval()
    loaded_embeddings = loaded.get_input_embeddings().weight
    assert (loaded.lm_head.weight.data_ptr() == loaded_embeddings.data_ptr()) == tie
    torch.testing.assert_close(loaded_embeddings, embeddings, rtol=0, atol=0)
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
    if not tie:
        assert not torch.equal(loaded.lm_head.weight, loaded_embeddings)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, logits, rtol=0, atol=0)


def test_resize_token_embeddings(tiny_projection):
    model, _ = tiny_projection
    old_size = model.config.text_config.vocab_size
    old_input = model.get_input_embeddings().weight.detach().clone()
    old_output = model.lm_head.weight.detach().clone()

    model.resize_token_embeddings(old_size + 7)
    assert model.config.text_config.vocab_size == old_size + 7
    assert model.get_input_embeddings().weight.shape == (old_size + 7, 32)
    assert model.lm_head.weight.shape == (old_size + 7, 32)
    torch.testing.assert_close(model.get_input_embeddings().weight[:old_size], old_input, rtol=0, atol=0)
    torch.testing.assert_close(model.lm_head.weight[:old_size], old_output, rtol=0, atol=0)
    logits = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert logits.shape[-1] == old_size + 7


# Training


def projector_gradients(model, inputs, checkpointing: bool):
    model.zero_grad()
    if checkpointing:
        model.gradient_checkpointing_enable()
    else:
        model.gradient_checkpointing_disable()
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    return loss.detach(), {name: param.grad for name, param in model.named_parameters() if param.grad is not None}


def test_gradient_checkpointing_same_gradients(tiny_projection):
    model, processor = tiny_projection
    model.train()
    inputs = processor(text=PROMPT, images=random_image(), return_tensors="pt")
    loss_off, grads_off = projector_gradients(model, inputs, checkpointing=False)
    loss_on, grads_on = projector_gradients(model, inputs, checkpointing=True)
    for part in (model.vision_tower, model.language_model):
        assert any(getattr(module, "gradient_checkpointing", False) for module in part.modules())
    torch.testing.assert_close(loss_on, loss_off)
    assert grads_on.keys() == grads_off.keys()
    # Every part learns; the tower's last layer is unused because features come from layer -2.
    for prefix in ("model.vision_tower.", "model.multi_modal_projector.", "model.language_model.", "lm_head."):
        assert any(name.startswith(prefix) for name in grads_off), prefix
    for name, grad in grads_off.items():
        torch.testing.assert_close(grads_on[name], grad, msg=name)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_frozen_backbones_train_projector_only(tiny_projection, checkpointing):
    model, processor = tiny_projection
    model.train()
    model.vision_tower.requires_grad_(False)
    model.language_model.requires_grad_(False)
    model.lm_head.requires_grad_(False)
    inputs = processor(text=PROMPT, images=random_image(), return_tensors="pt")
    _, grads = projector_gradients(model, inputs, checkpointing=checkpointing)

    assert sorted(grads) == sorted(
        name for name, _ in model.multi_modal_projector.named_parameters(prefix="model.multi_modal_projector")
    )
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    optimizer.step()
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) != name.startswith("model.multi_modal_projector"), name


# Attention, dtypes and devices


def test_sdpa_matches_eager(tiny_projection, tmp_path):
    model, processor = tiny_projection
    model.save_pretrained(tmp_path)
    inputs = processor(text=PROMPT, images=random_image(), return_tensors="pt")
    logits = {}
    for implementation in ("eager", "sdpa"):
        loaded = MmfuseProjectionForConditionalGeneration.from_pretrained(
            tmp_path, attn_implementation=implementation
        ).eval()
        assert loaded.language_model.config._attn_implementation == implementation
        assert loaded.vision_tower.config._attn_implementation == implementation
        with torch.no_grad():
            logits[implementation] = loaded(**inputs).logits
    torch.testing.assert_close(logits["sdpa"], logits["eager"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("tower_dtype", "lm_dtype"), [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]
)
def test_mixed_dtypes_run(tiny_projection, tower_dtype, lm_dtype):
    model, processor = tiny_projection
    model.vision_tower.to(tower_dtype)
    model.language_model.to(lm_dtype)
    model.lm_head.to(lm_dtype)
    model.multi_modal_projector.to(lm_dtype)
    inputs = processor(text=PROMPT, images=random_image(), return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    assert outputs.logits.dtype == lm_dtype
    assert torch.isfinite(outputs.logits).all()
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 3)


def test_device_map_auto(tiny_projection, tmp_path):
    from accelerate import infer_auto_device_map

    model, processor = tiny_projection
    # transformers 5 gathers the children's lists in post_init; 4.57 walks the modules on request.
    if hasattr(model, "_get_no_split_modules"):
        no_split = model._get_no_split_modules("auto")
    else:
        no_split = model._no_split_modules
    assert {"LlamaDecoderLayer", "CLIPEncoderLayer"} <= set(no_split)

    # About 200 KB of weights in all: a 200 KB first device forces a split inside the LM, and no
    # decoder layer may be cut in two (accelerate only warns that device 0 is absent on CPU).
    device_map = infer_auto_device_map(model, max_memory={0: "200KB", "cpu": "1GB"}, no_split_module_classes=no_split)
    assert set(device_map.values()) == {0, "cpu"}
    assert "model.language_model.layers.0" in device_map
    for name in device_map:
        assert not any(part in name for part in ("self_attn", "mlp.", "layer_norm", "input_layernorm")), name

    model.save_pretrained(tmp_path)
    loaded = MmfuseProjectionForConditionalGeneration.from_pretrained(tmp_path, device_map="auto").eval()
    inputs = processor(text=PROMPT, images=random_image(), return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)


# Text only


def test_text_only_matches_plain_lm(tiny_projection):
    model, processor = tiny_projection
    language_model = plain_language_model(model)
    inputs = processor(
        text=["What is in the picture?", "Is there a cat? Yes"], padding=True, padding_side="left", return_tensors="pt"
    )
    assert "pixel_values" not in inputs
    with torch.no_grad():
        logits = model(**inputs).logits
        expected = language_model(**inputs).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)

    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    expected_tokens = language_model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.tolist() == expected_tokens.tolist()
