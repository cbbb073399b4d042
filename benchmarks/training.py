"""Connector-only training step time of the projection type, with and without the vision feature cache.

Both runs use `MmfuseTrainer` on the same batches. With the cache, the frozen vision tower encodes each image
once, in the first epoch; the figures compare the steps after that epoch. Batches are built directly (random
token ids with the image placeholders expanded), so no tokenizer is needed.
"""

import tempfile
import time

import torch
from transformers import TrainerCallback, TrainingArguments

from mmfuse.training.feature_cache import VisionFeatureCache
from mmfuse.training.trainer import MmfuseTrainer, prepare_model_for_stage

from .builders import build_projection, prompt_inputs
from .measure import markdown_table, row, timing_from_samples

IGNORE_INDEX = -100


class StepTimes(TrainerCallback):
    """Seconds of every optimizer step: inputs moved and cached, forward, backward and optimizer update."""

    def __init__(self):
        self.seconds = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.started)


class ImageExamples(torch.utils.data.Dataset):
    """`num_images` examples, one image each, as prompt tensors of the projection model."""

    def __init__(self, model, num_images: int, answer_tokens: int = 8):
        self.examples = []
        for index in range(num_images):
            inputs = prompt_inputs(model, num_images=1, text_tokens=16 + answer_tokens)
            labels = inputs["input_ids"].clone()
            labels[:, :-answer_tokens] = IGNORE_INDEX  # only the answer counts in the loss
            self.examples.append(
                {
                    "input_ids": inputs["input_ids"][0],
                    "labels": labels[0],
                    "pixel_values": inputs["pixel_values"][0] + index,  # a different image per example
                    "image_id": f"image-{index}",
                }
            )

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]


def collate(examples: list) -> dict:
    """Stack equal-length examples into a `VisionTextCollator`-style batch."""
    input_ids = torch.stack([example["input_ids"] for example in examples])
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": torch.stack([example["labels"] for example in examples]),
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "image_ids": [example["image_id"] for example in examples],
    }


def train_steps(tiny: bool, use_feature_cache: bool, num_images: int, batch_size: int, epochs: int) -> list:
    """Train the connector for `epochs` passes over `num_images` images; return every step's seconds."""
    model = prepare_model_for_stage(build_projection(tiny).train(), "connector")
    timer = StepTimes()
    with tempfile.TemporaryDirectory() as output_dir:
        arguments = TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=batch_size,
            num_train_epochs=epochs,
            learning_rate=1e-3,
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            remove_unused_columns=False,
            dataloader_num_workers=0,
            disable_tqdm=True,
            seed=0,
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = MmfuseTrainer(
            model=model,
            args=arguments,
            data_collator=collate,
            train_dataset=ImageExamples(model, num_images),
            feature_cache=VisionFeatureCache() if use_feature_cache else None,
            callbacks=[timer],
        )
        trainer.train()
    return timer.seconds


def run(settings, output_dir: str) -> dict:
    batch_size = 2 if settings.tiny else 4
    num_images = 2 * batch_size
    steps_per_epoch = num_images // batch_size
    epochs = 1 + max(1, (settings.repeats + steps_per_epoch - 1) // steps_per_epoch)
    cached = train_steps(settings.tiny, True, num_images, batch_size, epochs)
    uncached = train_steps(settings.tiny, False, num_images, batch_size, epochs)
    # Steps of the first epoch fill the cache; only later steps are compared.
    cached_later = timing_from_samples(cached[steps_per_epoch:])
    uncached_later = timing_from_samples(uncached[steps_per_epoch:])
    cached_first = timing_from_samples(cached[:steps_per_epoch])
    uncached_first = timing_from_samples(uncached[:steps_per_epoch])
    return {
        "batch_size": batch_size,
        "num_images": num_images,
        "epochs": epochs,
        "rows": [
            row("training step after the first epoch", cached_later, uncached_later),
            row("training step in the first epoch (cache filling)", cached_first, uncached_first),
        ],
    }


def markdown(results: dict) -> str:
    lines = [
        "## Training: connector-only step time with and without the vision feature cache",
        "",
        f"Projection fusion, batch {results['batch_size']}, {results['num_images']} distinct images, "
        f"{results['epochs']} epochs on `MmfuseTrainer`; the vision tower and the LM are frozen. Each row is the "
        "median (min to max) over that row's steps, timed from the step's start to its end (collation excluded).",
        "",
        markdown_table(results["rows"], reference_name="no cache", subject_name="with cache"),
        "",
    ]
    return "\n".join(lines)
