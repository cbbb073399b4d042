import os

import pytest
import torch
from conftest import config_from_dict
from PIL import Image
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, TrainerCallback

from mmfuse.training.data import IGNORE_INDEX, EasyVQADataset, VisionTextCollator
from mmfuse.training.feature_cache import VisionFeatureCache, supports_feature_cache
from mmfuse.training.trainer import (
    LossProgressCallback,
    build_trainer,
    connector_modules,
    count_parameters,
    finish_training,
    prepare_model_for_stage,
    train,
)


def colour_examples(count: int, repeats: int = 1):
    """Solid red or blue images whose answer is their colour, `repeats` questions per image."""
    examples = []
    for index in range(count):
        colour = "red" if index % 2 == 0 else "blue"
        rgb = (220, 30, 30) if colour == "red" else (30, 30, 220)
        image = Image.new("RGB", (30, 30), tuple(value + index for value in rgb))
        for repeat in range(repeats):
            examples.append(
                {
                    "image": image,
                    "image_id": f"image-{index}",
                    "prompt": f"what color is it? ({repeat})",
                    "answer": colour,
                }
            )
    return examples


class TowerCounter:
    """Count images that pass through a vision tower (forward hook on the tower module)."""

    def __init__(self, tower):
        self.images = 0
        self.handle = tower.register_forward_hook(self.hook)

    def hook(self, module, args, kwargs_or_output, *rest):
        self.images += args[0].shape[0]


class StepCounter(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def trainable_names(model):
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def test_connector_stage_freezes_tower_and_lm(tiny_projection):
    model, _ = tiny_projection
    model = prepare_model_for_stage(model, "connector")
    names = trainable_names(model)
    assert names
    assert all(name.startswith("model.multi_modal_projector.") for name in names)
    assert count_parameters(model)[0] == sum(p.numel() for p in model.multi_modal_projector.parameters())


def test_full_stage_keeps_tower_frozen(tiny_projection):
    model, _ = tiny_projection
    names = trainable_names(prepare_model_for_stage(model, "full"))
    assert "lm_head.weight" in names
    assert any(name.startswith("model.language_model.layers.0.") for name in names)
    assert not any("vision_tower" in name for name in names)
    names = trainable_names(prepare_model_for_stage(model, "full", train_vision_tower=True))
    assert any("vision_tower" in name for name in names)


def test_lora_stage_adapters(tiny_projection):
    model, _ = tiny_projection
    peft_model = prepare_model_for_stage(model, "lora", lora_rank=4)
    names = trainable_names(peft_model)
    lora_names = [name for name in names if "lora_" in name]
    # Llama has 7 linear layers per decoder layer (q, k, v, o, gate, up, down), each with A and B.
    assert len(lora_names) == 2 * 7 * model.config.text_config.num_hidden_layers
    assert all(".language_model." in name for name in lora_names)
    assert any("multi_modal_projector" in name for name in names)
    assert not any("vision_tower" in name for name in names)
    assert not any("lm_head" in name or "embed_tokens" in name for name in names)


def test_stage_errors(tiny_projection):
    model, _ = tiny_projection
    with pytest.raises(ValueError, match=r"stage='all' is invalid; use one of \('connector', 'lora', 'full'\)"):
        prepare_model_for_stage(model, "all")
    with pytest.raises(ValueError, match=r"train_vision_tower=True contradicts stage='connector'"):
        prepare_model_for_stage(model, "connector", train_vision_tower=True)
    with pytest.raises(ValueError, match=r"has no connector module"):
        connector_modules(model.vision_tower)


def test_loss_counts_only_answer_tokens(tiny_projection):
    model, processor = tiny_projection
    batch = VisionTextCollator(processor)(colour_examples(3))
    batch.pop("image_ids")
    outputs = model(**batch)
    # Reference: cross-entropy of the next-token predictions at the answer positions only.
    logits = outputs.logits[:, :-1].reshape(-1, outputs.logits.shape[-1])
    targets = batch["labels"][:, 1:].reshape(-1)
    keep = targets != IGNORE_INDEX
    reference = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(outputs.loss, reference)
    assert int(keep.sum()) < int(batch["attention_mask"].sum()) // 5


def test_supervised_logits_same_loss_and_gradients(tiny_projection):
    model, processor = tiny_projection
    batch = VisionTextCollator(processor)(colour_examples(3))
    batch.pop("image_ids")
    prepare_model_for_stage(model, "connector")
    projector = model.multi_modal_projector.linear_1.weight

    full = model(**batch)
    (full_gradient,) = torch.autograd.grad(full.loss, projector)
    supervised = model(**batch, supervised_logits_only=True)
    (supervised_gradient,) = torch.autograd.grad(supervised.loss, projector)

    torch.testing.assert_close(supervised.loss, full.loss)
    torch.testing.assert_close(supervised_gradient, full_gradient)
    keep = batch["labels"][:, 1:] != IGNORE_INDEX
    assert supervised.logits.shape == (int(keep.sum()), full.logits.shape[-1])
    torch.testing.assert_close(supervised.logits, full.logits[:, :-1][keep])


def test_trainer_requests_supervised_logits(tiny_projection, tmp_path):
    model, processor = tiny_projection
    seen = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("supervised_logits_only")), with_kwargs=True
    )
    trainer = build_trainer(model, processor, colour_examples(4), str(tmp_path), max_steps=2, batch_size=2)
    trainer.train()
    assert seen == [True, True]
    # Outside training the forward gets full logits, as callers of `model(...)` expect.
    trainer.model.eval()
    inputs = trainer._prepare_inputs(VisionTextCollator(processor)(colour_examples(2)))
    assert "supervised_logits_only" not in inputs


def test_bf16_training_autocasts_and_leaves_float32_model(tiny_projection, tmp_path):
    model, processor = tiny_projection
    autocast_seen = []
    model.language_model.register_forward_pre_hook(
        lambda module, args: autocast_seen.append(torch.is_autocast_enabled("cpu"))
    )
    trainer = build_trainer(model, processor, colour_examples(4), str(tmp_path), max_steps=2, batch_size=2, bf16=True)
    trainer.train()
    assert autocast_seen == [True, True]

    trained = finish_training(trainer, processor, None)
    trained.eval()
    batch = VisionTextCollator(processor)(colour_examples(2))
    batch.pop("image_ids")
    outputs = trained(**batch)
    # The autocast wrapper is gone: inference after training runs in float32.
    assert autocast_seen[-1] is False
    assert outputs.logits.dtype == torch.float32
    assert all(parameter.dtype == torch.float32 for parameter in trained.parameters())


def test_lora_stage_keeps_tied_embeddings_tied(tokenizer, tmp_path):
    from tiny import text_config, vqgan_config

    from mmfuse.compose import compose_vq
    from mmfuse.configuration_vqgan import MmfuseVQGANConfig
    from mmfuse.modeling_vqgan import MmfuseVQGANModel

    torch.manual_seed(0)
    language_model = AutoModelForCausalLM.from_config(
        config_from_dict(text_config(vocab_size=len(tokenizer), tie_word_embeddings=True))
    )
    model, processor = compose_vq(MmfuseVQGANModel(MmfuseVQGANConfig(**vqgan_config())), language_model, tokenizer)
    # The VQ type has no connector module: its image rows live in the (tied) embeddings and LM head.
    model.connector_modules = lambda: [model.get_input_embeddings(), model.get_output_embeddings()]
    before = model.get_input_embeddings().weight.detach().clone()

    trainer = build_trainer(
        model, processor, colour_examples(4), str(tmp_path), stage="lora", max_steps=2, batch_size=2
    )
    trainer.train()
    trained = finish_training(trainer, processor, None)

    embeddings = trained.get_input_embeddings().weight
    assert embeddings.data_ptr() == trained.get_output_embeddings().weight.data_ptr()
    assert not torch.equal(embeddings, before)
    assert not any("lora_" in name for name, _ in trained.named_parameters())


@pytest.mark.parametrize("fusion", ["projection", "cross_attention"])
def test_vision_features_match_pixel_values(fusion, request):
    if fusion == "projection":
        model, processor = request.getfixturevalue("tiny_projection")
    else:
        model, processor = tiny_cross_attention()
        with torch.no_grad():  # open the zero-initialised gates, so the images change the logits
            for block in model.model.gated_decoder_layers():
                block.gated_cross_attention.attention_gate.fill_(0.7)
    batch = VisionTextCollator(processor)(colour_examples(2))
    batch.pop("image_ids")
    assert supports_feature_cache(model)
    reference = model(**batch).logits
    vision_features = model.get_vision_features(batch.pop("pixel_values"))
    torch.testing.assert_close(model(**batch, vision_features=vision_features).logits, reference)
    with pytest.raises(ValueError, match=r"either `pixel_values` or precomputed `vision_features`"):
        model(**batch, pixel_values=torch.zeros(2, 3, 30, 30), vision_features=vision_features)


@pytest.mark.parametrize("fusion", ["projection", "cross_attention"])
def test_feature_cache_runs_tower_once_per_image(fusion, make_projection, tmp_path):
    build = make_projection if fusion == "projection" else tiny_cross_attention
    dataset = colour_examples(4, repeats=3)  # 12 examples, 4 images
    histories, counts = {}, {}
    for cached in (True, False):
        model, processor = build()
        counter = TowerCounter(model.vision_tower)
        result = train(
            model,
            processor,
            dataset,
            str(tmp_path / str(cached)),
            stage="connector",
            use_feature_cache=cached,
            batch_size=4,
            num_train_epochs=2,
            logging_steps=1,
            save_final_model=False,
        )
        histories[cached] = [loss for _, loss in result.loss_history]
        counts[cached] = counter.images
        if cached:
            assert result.feature_cache.num_computed == 4
            assert len(result.feature_cache) == 4
    assert counts[True] == 4
    assert counts[False] == 12 * 2
    assert len(histories[True]) == 6
    torch.testing.assert_close(torch.tensor(histories[True]), torch.tensor(histories[False]), rtol=1e-5, atol=1e-6)


def tiny_cross_attention(seed: int = 0):
    from tiny import build_tokenizer, text_config, vision_config
    from transformers import AutoModel

    from mmfuse.compose import compose_cross_attention

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    vision_model = AutoModel.from_config(config_from_dict(vision_config()))
    language_model = AutoModelForCausalLM.from_config(config_from_dict(text_config(vocab_size=len(tokenizer))))
    model, processor = compose_cross_attention(
        vision_model, language_model, tokenizer, resampler_num_latents=3, cross_attention_every_n_layers=1
    )
    return model.eval(), processor


def test_feature_cache_rejects_trained_tower(tiny_projection, tmp_path):
    model, processor = tiny_projection
    with pytest.raises(ValueError, match=r"use_feature_cache=True does not work .* vision tower is trained"):
        build_trainer(
            model,
            processor,
            colour_examples(2),
            str(tmp_path),
            stage="full",
            train_vision_tower=True,
            use_feature_cache=True,
        )


def test_feature_cache_checks_ids(tiny_projection):
    model, _ = tiny_projection
    cache = VisionFeatureCache()
    with pytest.raises(ValueError, match=r"Got 1 image ids for 2 images"):
        cache.vision_features(model, ["a"], torch.zeros(2, 3, 30, 30))
    with pytest.raises(ValueError, match=r"has no `image_id`"):
        cache.vision_features(model, ["a", None], torch.zeros(2, 3, 30, 30))
    features = cache.vision_features(model, ["a", "a"], torch.randn(2, 3, 30, 30))
    assert cache.num_computed == 1
    torch.testing.assert_close(features[0], features[1])


def test_connector_training_changes_only_projector(tiny_projection, tmp_path):
    model, processor = tiny_projection
    before = {name: value.clone() for name, value in model.state_dict().items()}
    result = train(model, processor, colour_examples(4), str(tmp_path), stage="connector", batch_size=2, max_steps=2)
    changed = {name for name, value in result.model.state_dict().items() if not torch.equal(value, before[name])}
    assert changed
    assert all(name.startswith("model.multi_modal_projector.") for name in changed)
    assert os.path.isfile(tmp_path / "model.safetensors")
    assert os.path.isfile(tmp_path / "processor_config.json")


def test_full_training_lowers_loss(tiny_projection, tmp_path):
    model, processor = tiny_projection
    result = train(
        model,
        processor,
        EasyVQADataset("train", limit=16),
        str(tmp_path),
        stage="full",
        batch_size=8,
        max_steps=8,
        learning_rate=1e-2,
        logging_steps=2,
        save_final_model=False,
    )
    losses = [loss for _, loss in result.loss_history]
    assert len(losses) == 4
    assert losses[-1] < losses[0] - 1.0


def test_lora_training_merges_and_saves(tiny_projection, tmp_path):
    model, processor = tiny_projection
    q_before = model.language_model.layers[0].self_attn.q_proj.weight.clone()
    result = train(
        model, processor, colour_examples(4), str(tmp_path), stage="lora", lora_rank=4, batch_size=4, max_steps=3
    )
    trained = result.model
    assert not any("lora_" in name for name, _ in trained.named_parameters())
    assert not torch.equal(trained.language_model.layers[0].self_attn.q_proj.weight, q_before)
    assert result.trainable_parameters < result.total_parameters // 4

    reloaded = AutoModelForImageTextToText.from_pretrained(str(tmp_path)).eval()
    batch = VisionTextCollator(processor)(colour_examples(2))
    batch.pop("image_ids")
    torch.testing.assert_close(reloaded(**batch).logits, trained.eval()(**batch).logits)


def test_gradient_checkpointing_same_losses(make_projection, tmp_path):
    histories = {}
    for checkpointing in (False, True):
        model, processor = make_projection()
        trainer = build_trainer(
            model,
            processor,
            colour_examples(8),
            str(tmp_path / str(checkpointing)),
            stage="full",
            gradient_checkpointing=checkpointing,
            batch_size=4,
            max_steps=4,
            logging_steps=1,
            learning_rate=1e-3,
        )
        trainer.train()
        assert model.language_model.gradient_checkpointing is checkpointing
        histories[checkpointing] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    torch.testing.assert_close(torch.tensor(histories[True]), torch.tensor(histories[False]), rtol=1e-5, atol=1e-6)


def test_resume_matches_uninterrupted_run(make_projection, tmp_path):
    options = {"stage": "connector", "batch_size": 2, "max_steps": 6, "save_steps": 3, "logging_steps": 1}
    model, processor = make_projection()
    full_run = train(model, processor, colour_examples(12), str(tmp_path / "full"), **options)
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert checkpoint.is_dir()

    model, processor = make_projection(seed=1)  # different start: the checkpoint must restore everything
    steps = StepCounter()
    trainer = build_trainer(model, processor, colour_examples(12), str(tmp_path / "resumed"), **options)
    trainer.add_callback(steps)
    trainer.train(resume_from_checkpoint=str(checkpoint))

    assert steps.steps == [4, 5, 6]
    resumed_losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry and entry["step"] > 3]
    full_losses = [loss for step, loss in full_run.loss_history if step > 3]
    torch.testing.assert_close(torch.tensor(resumed_losses), torch.tensor(full_losses), rtol=1e-5, atol=1e-6)
    for name, value in full_run.model.multi_modal_projector.state_dict().items():
        torch.testing.assert_close(trainer.model.multi_modal_projector.state_dict()[name], value, rtol=1e-5, atol=1e-6)


def test_progress_bar_shows_loss(tiny_projection, tmp_path, capsys):
    model, processor = tiny_projection
    trainer = build_trainer(
        model,
        processor,
        colour_examples(4),
        str(tmp_path),
        batch_size=2,
        max_steps=2,
        logging_steps=1,
        disable_tqdm=False,
    )
    assert any(isinstance(callback, LossProgressCallback) for callback in trainer.callback_handler.callbacks)
    trainer.train()
    assert "loss=" in capsys.readouterr().err
