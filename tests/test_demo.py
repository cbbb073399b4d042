"""The demo pipeline on tiny random models and real easy-VQA images (the real weights are never loaded here)."""

import json
import os
import time

import pytest
import torch
from conftest import config_from_dict
from PIL import Image
from tiny import EASY_VQA_VQGAN, build_tokenizer, text_config, vision_config, vqgan_config
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from mmfuse import cli
from mmfuse.demo import report
from mmfuse.demo.run import (
    DemoSettings,
    PretrainedParts,
    TimeBudgetCallback,
    choose_num_threads,
    choose_precision,
    compose_fusion,
    measure_busy_cores,
    measure_decode_ms_per_token,
    run_demo,
    training_stages,
)
from mmfuse.demo.text_to_image import TextToImageSettings
from mmfuse.training.data import VisionTextCollator
from mmfuse.training.trainer import connector_modules

pytest.importorskip("easy_vqa")
pytest.importorskip("skimage")
pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tiny_vqgan(output_dir, seconds):
    from mmfuse.configuration_vqgan import MmfuseVQGANConfig
    from mmfuse.modeling_vqgan import MmfuseVQGANModel

    return MmfuseVQGANModel(MmfuseVQGANConfig(**vqgan_config()))


def tiny_parts() -> PretrainedParts:
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    return PretrainedParts(
        vision_model=AutoModel.from_config(config_from_dict(vision_config())),
        language_model=AutoModelForCausalLM.from_config(config_from_dict(text_config(vocab_size=len(tokenizer)))),
        tokenizer=tokenizer,
        vision_name="tiny CLIP",
        language_name="tiny Llama",
        vqgan_factory=tiny_vqgan,
        text_to_image_settings=TextToImageSettings(
            vqgan_config=EASY_VQA_VQGAN,
            vqgan_batch_size=4,
            trainable_layers=1,
            seeds_per_prompt=1,
            checker_images=8,
            max_train_images=16,
            show_progress=False,
        ),
    )


def tiny_settings(tmp_path, **overrides) -> DemoSettings:
    values = {
        "output_dir": str(tmp_path / "results"),
        "budget_seconds": 6,
        "batch_size": 4,
        "eval_questions": 6,
        "lora_fraction": 0.5,
        "show_progress": False,
        # The tiny CLIP tower has a 5x5 patch grid, which pixel_shuffle's 2x2 blocks cannot divide.
        "projector_type": "mlp2x_gelu",
    }
    values.update(overrides)
    return DemoSettings(**values)


def test_demo_projection_writes_results(tmp_path):
    settings = tiny_settings(tmp_path)
    metrics = run_demo(settings, tiny_parts())
    results = tmp_path / "results"

    stored = json.loads((results / "metrics.json").read_text())
    assert stored == json.loads(json.dumps(metrics))
    row = stored["fusions"]["projection"]
    assert row["tokens_per_image"] == 25  # 30 px CLIP with 6 px patches: a 5x5 grid, class token dropped
    assert [stage["stage"] for stage in row["stages"]] == ["connector", "lora"]
    assert all(stage["steps"] >= 1 for stage in row["stages"])
    assert row["trainable_parameters"] == row["stages"][1]["trainable_parameters"]
    assert row["stages"][0]["trainable_parameters"] < row["stages"][1]["trainable_parameters"]
    assert row["easy_vqa_questions"] == 6
    assert 0.0 <= row["easy_vqa_accuracy"] <= 1.0
    assert row["decode_ms_per_token"] > 0
    assert row["text_to_image_accuracy"] is None

    table = (results / "metrics.md").read_text()
    assert "| projection | 25 |" in table
    assert table.rstrip().endswith("| not run |")
    assert (results / "loss.png").read_bytes().startswith(PNG_SIGNATURE)

    examples = (results / "examples.md").read_text()
    for name in ("cat", "coffee", "rocket", "easy_vqa_test_"):
        assert f"images/{name}" in examples
    for image in (results / "images").iterdir():
        assert image.read_bytes().startswith(PNG_SIGNATURE)
    assert len(list((results / "images").iterdir())) == 6  # 3 easy-VQA test images and 3 photos

    # The trained model is saved with its processor and reloads through the Auto classes.
    assert row["model_dir"] == str(results / "model-projection")
    model = AutoModelForImageTextToText.from_pretrained(row["model_dir"]).eval()
    processor = AutoProcessor.from_pretrained(row["model_dir"])
    inputs = processor(text="<image>What color is the shape?", images=Image.new("RGB", (32, 32)), return_tensors="pt")
    assert model.generate(**inputs, max_new_tokens=2, do_sample=False).shape == (1, inputs["input_ids"].shape[1] + 2)
    assert not [name for name in os.listdir(results) if name.startswith(".model-")]


def test_demo_connector_only_skips_lora(tmp_path):
    settings = tiny_settings(tmp_path, lora_fraction=0.0, budget_seconds=4, eval_questions=2, save_models=False)
    row = run_demo(settings, tiny_parts())["fusions"]["projection"]
    assert [stage["stage"] for stage in row["stages"]] == ["connector"]
    assert row["model_dir"] is None
    assert not (tmp_path / "results" / "model-projection").exists()
    model, _ = compose_fusion("projection", tiny_parts(), settings, str(tmp_path / "work"))
    connector_parameters = sum(
        parameter.numel() for module in connector_modules(model).values() for parameter in module.parameters()
    )
    assert row["trainable_parameters"] == connector_parameters


@pytest.mark.slow
def test_demo_all_fusions_compare(tmp_path):
    settings = tiny_settings(tmp_path, fusion="all", budget_seconds=3, eval_questions=2)
    rows = run_demo(settings, tiny_parts())["fusions"]
    assert list(rows) == ["projection", "cross_attention", "vq"]
    assert rows["cross_attention"]["tokens_per_image"] == 1
    # The tiny VQ-GAN turns 24 px images into 6x6 codes, framed by begin- and end-of-image tokens.
    assert rows["vq"]["tokens_per_image"] == 36 + 2
    assert [stage["stage"] for stage in rows["vq"]["stages"]] == ["connector", "lora"]
    table = (tmp_path / "results" / "metrics.md").read_text()
    for fusion in rows:
        assert f"| {fusion} |" in table


@pytest.mark.parametrize("fusion", ["projection", "cross_attention", "vq"])
def test_supervised_logits_same_loss_and_gradients(fusion, tmp_path):
    settings = tiny_settings(tmp_path)
    model, processor = compose_fusion(fusion, tiny_parts(), settings, str(tmp_path / "work"))
    items = [
        {"image": Image.new("RGB", (40, 30), colour), "image_id": None, "prompt": prompt, "answer": answer}
        for colour, prompt, answer in [("red", "What color is it?", "red"), ("blue", "Is it blue?", "yes")]
    ]
    batch = VisionTextCollator(processor)(items)
    batch.pop("image_ids")
    parameters = [parameter for module in connector_modules(model).values() for parameter in module.parameters()]

    full = model(**batch)
    full_gradients = torch.autograd.grad(full.loss, parameters, allow_unused=True)
    supervised = model(**batch, supervised_logits_only=True)
    supervised_gradients = torch.autograd.grad(supervised.loss, parameters, allow_unused=True)

    torch.testing.assert_close(supervised.loss, full.loss)
    for supervised_gradient, full_gradient in zip(supervised_gradients, full_gradients):
        torch.testing.assert_close(supervised_gradient, full_gradient)
    keep = batch["labels"][:, 1:] != -100
    assert supervised.logits.shape == (int(keep.sum()), full.logits.shape[-1])
    torch.testing.assert_close(supervised.logits, full.logits[:, :-1][keep])


@pytest.mark.slow
def test_demo_keeps_finished_fusions_on_failure(tmp_path):
    def failing_vqgan(output_dir, seconds):
        raise RuntimeError("VQ-GAN training failed")

    parts = tiny_parts()
    parts.vqgan_factory = failing_vqgan
    settings = tiny_settings(tmp_path, fusion="all", budget_seconds=3, eval_questions=2, save_models=False)
    with pytest.raises(RuntimeError, match="VQ-GAN training failed"):
        run_demo(settings, parts)
    stored = json.loads((tmp_path / "results" / "metrics.json").read_text())
    assert list(stored["fusions"]) == ["projection", "cross_attention"]
    assert "| cross_attention |" in (tmp_path / "results" / "metrics.md").read_text()


def test_time_budget_callback_stops_training():
    arguments = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True)
    spent, fresh = TimeBudgetCallback(0.0), TimeBudgetCallback(3600.0)
    for callback in (spent, fresh):
        callback.on_train_begin(arguments, TrainerState(), TrainerControl())
    control = TrainerControl()
    spent.on_step_end(arguments, TrainerState(), control)
    assert control.should_training_stop
    control = TrainerControl()
    fresh.on_step_end(arguments, TrainerState(), control)
    assert not control.should_training_stop


def test_time_budget_callback_decays_learning_rate(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("time.monotonic", lambda: now[0])
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 2))
    callback = TimeBudgetCallback(10.0, decay_learning_rate=True)
    arguments = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True)
    callback.on_train_begin(arguments, TrainerState(), TrainerControl(), lr_scheduler=scheduler)

    # Warm-up still applies: after one step the schedule gives 1.0, and 4 of 10 seconds are spent.
    now[0] = 104.0
    optimizer.step()
    scheduler.step()
    assert scheduler.get_last_lr() == [pytest.approx(0.5 * 1.0 * 0.6)]
    now[0] = 115.0
    optimizer.step()
    scheduler.step()
    assert scheduler.get_last_lr() == [0.0]


def test_time_budget_decay_needs_lambda_scheduler():
    parameter = torch.nn.Parameter(torch.zeros(1))
    scheduler = torch.optim.lr_scheduler.StepLR(torch.optim.SGD([parameter], lr=0.5), step_size=1)
    arguments = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="decay_learning_rate=True needs a LambdaLR scheduler, not StepLR"):
        TimeBudgetCallback(10.0, decay_learning_rate=True).on_train_begin(
            arguments, TrainerState(), TrainerControl(), lr_scheduler=scheduler
        )


def test_training_stages_split_budget():
    settings = DemoSettings(lora_fraction=0.25)
    stages = training_stages("projection", 100.0, settings)
    assert [(stage, seconds) for stage, seconds, _ in stages] == [("connector", 75.0), ("lora", 25.0)]
    assert stages[0][2] == settings.connector_learning_rate
    vq_stages = training_stages("vq", 100.0, settings)
    assert [stage for stage, _, _ in vq_stages] == ["connector", "lora"]
    assert {rate for _, _, rate in vq_stages} == {settings.vq_learning_rate}
    no_lora = training_stages("cross_attention", 100.0, DemoSettings(lora_fraction=0.0))
    assert [(stage, seconds) for stage, seconds, _ in no_lora] == [("connector", 100.0)]


@pytest.mark.parametrize(
    "field, value",
    [("fusion", "late"), ("lora_fraction", 1.0), ("reserve_fraction", -0.1), ("budget_seconds", 0)],
)
def test_settings_reject_invalid_value(field, value):
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        DemoSettings(**{field: value})


def test_demo_command_reports_invalid_option(capsys):
    status = cli.main(["demo", "--lora-fraction", "1.5", "--output", "unused"])
    error = capsys.readouterr().err.strip()
    assert status == 1
    assert error.startswith("mmfuse demo: error: lora_fraction=1.5 is invalid")


def test_threads_follow_free_cores(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr("mmfuse.demo.run.measure_busy_cores", lambda: 1.2)
    assert choose_num_threads(0) == 3
    monkeypatch.setattr("mmfuse.demo.run.measure_busy_cores", lambda: 3.9)
    assert choose_num_threads(0) == 1
    assert choose_num_threads(2) == 2
    # Without /proc/stat the load average is used instead.
    monkeypatch.setattr("mmfuse.demo.run.measure_busy_cores", lambda: None)
    monkeypatch.setattr("os.getloadavg", lambda: (0.4, 0.0, 0.0))
    assert choose_num_threads(0) == 4
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    monkeypatch.setattr("os.getloadavg", lambda: (9.0, 0.0, 0.0))
    assert choose_num_threads(0) == 4


def test_busy_cores_sees_a_spinning_process():
    import subprocess
    import sys

    if not os.path.isfile("/proc/stat"):
        pytest.skip("needs /proc/stat")
    idle = measure_busy_cores(0.3)
    assert 0.0 <= idle <= os.cpu_count()
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        busy = measure_busy_cores(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    # One spinning process keeps about one core busy, whatever else the machine runs.
    assert busy >= 0.7


def test_precision_choice(monkeypatch, tmp_path):
    assert choose_precision("fp32") == "fp32"
    assert choose_precision("bf16") == "bf16"
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("mmfuse.demo.run.cpu_flags", lambda: ["fpu", "avx2", "amx_bf16"])
    assert choose_precision("auto") == "bf16"
    monkeypatch.setattr("mmfuse.demo.run.cpu_flags", lambda: ["fpu", "avx2"])
    assert choose_precision("auto") == "fp32"
    with pytest.raises(ValueError, match=r"precision='fp8' is invalid; use one of \('auto', 'bf16', 'fp32'\)"):
        tiny_settings(tmp_path, precision="fp8")


def test_demo_records_precision(tmp_path):
    settings = tiny_settings(tmp_path, precision="bf16", budget_seconds=3, eval_questions=2, lora_fraction=0.0)
    metrics = run_demo(settings, tiny_parts())
    assert metrics["settings"]["precision"] == "bf16"
    assert "- training precision: bf16" in (tmp_path / "results" / "metrics.md").read_text()


def test_decode_speed_is_positive(tiny_projection):
    from tiny import random_image

    model, processor = tiny_projection
    processor.chat_template = processor.tokenizer.chat_template
    assert measure_decode_ms_per_token(model, processor, random_image(), num_tokens=4) > 0


def test_metrics_table_marks_missing_results():
    metrics = {
        "settings": {
            "command": "mmfuse demo --fusion all",
            "machine": "test",
            "vision": "v",
            "language": "l",
            "budget_seconds": 60.0,
            "eval_questions": 10,
        },
        "fusions": {
            "projection": {"tokens_per_image": 16, "easy_vqa_accuracy": 0.925},
            "vq": {"tokens_per_image": 66, "text_to_image_accuracy": 0.5},
        },
    }
    lines = report.format_metrics_table(metrics).splitlines()
    projection = next(line for line in lines if line.startswith("| projection |"))
    vq = next(line for line in lines if line.startswith("| vq |"))
    assert "| 92.5% |" in projection
    assert projection.endswith("| not run |")
    assert vq.endswith("| 50.0% |")
