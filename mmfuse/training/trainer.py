"""Training of mmfuse models on transformers' `Trainer`: stages, freezing, LoRA and the feature cache.

Stages follow LLaVA's recipe:

- `connector`: only the connector (projector, resampler, gated cross-attention) learns; the vision
  tower and the LM are frozen. This aligns image features with the LM's embedding space.
- `lora`: the connector plus LoRA adapters (peft) on every linear layer of the LM. The adapters
  are merged into the LM weights before the final save, so the result is a plain mmfuse folder.
- `full`: the connector and every LM weight learn.

The vision tower stays frozen in every stage unless `train_vision_tower=True`. While it is frozen,
its outputs are cached per image (`VisionFeatureCache`) for models that support it.
"""

import inspect
from dataclasses import dataclass, field

import torch
from transformers import ProgressCallback, Trainer, TrainingArguments
from transformers.utils import logging

from .data import VisionTextCollator
from .feature_cache import VisionFeatureCache, supports_feature_cache, vision_tower_is_frozen

logger = logging.get_logger(__name__)

STAGES = ("connector", "lora", "full")
DEFAULT_LEARNING_RATES = {"connector": 1e-3, "lora": 2e-4, "full": 2e-5}
# Names under which the fusion types keep their connector modules; a model can instead define
# `connector_modules()` returning the modules itself.
CONNECTOR_MODULE_NAMES = ("multi_modal_projector", "resampler", "gated_cross_attention", "cross_attention_layers")
LORA_LAYER_TYPES = ("Linear", "Conv1D")  # Conv1D: GPT-2's linear layers


def connector_modules(model: torch.nn.Module) -> dict:
    """Return `{qualified_name: module}` for the modules that connect the vision side to the LM."""
    if hasattr(model, "connector_modules"):
        modules = list(model.connector_modules())
        names = {module: name for name, module in model.named_modules()}
        return {names[module]: module for module in modules}
    found = {}
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last in CONNECTOR_MODULE_NAMES and not any(name.startswith(parent + ".") for parent in found):
            found[name] = module
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no connector module (looked for {CONNECTOR_MODULE_NAMES}); define "
            "`connector_modules()` on the model to name the modules the connector stage trains."
        )
    return found


def lora_target_names(model: torch.nn.Module) -> list:
    """Return the qualified names of the LM's linear layers, the modules that get LoRA adapters."""
    language_model = model.language_model
    prefix = next(name for name, module in model.named_modules() if module is language_model)
    return [
        f"{prefix}.{name}"
        for name, module in language_model.named_modules()
        if type(module).__name__ in LORA_LAYER_TYPES
    ]


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """Return `(trainable, total)` parameter counts."""
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    total = sum(parameter.numel() for parameter in model.parameters())
    return trainable, total


def prepare_model_for_stage(
    model: torch.nn.Module,
    stage: str,
    train_vision_tower: bool = False,
    lora_rank: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
) -> torch.nn.Module:
    """Set `requires_grad` for a training stage; for `lora`, return the model wrapped by peft.

    Args:
        stage: `"connector"`, `"lora"` or `"full"` (see the module docstring).
        train_vision_tower: also train the vision tower (not with `connector`).
        lora_rank, lora_alpha, lora_dropout: LoRA settings of the `lora` stage.
    """
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r} is invalid; use one of {STAGES}.")
    if train_vision_tower and stage == "connector":
        raise ValueError("train_vision_tower=True contradicts stage='connector'; use stage='full' or 'lora'.")
    connectors = connector_modules(model)

    model.requires_grad_(stage == "full")
    for module in connectors.values():
        module.requires_grad_(True)
    if getattr(model, "vision_tower", None) is not None:
        model.vision_tower.requires_grad_(train_vision_tower)

    if stage == "lora":
        from peft import LoraConfig, get_peft_model

        lora_config = LoraConfig(
            **weight_tying_arguments(model, connectors, LoraConfig),
            r=lora_rank,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=[
                # Connector layers inside the LM (gated cross-attention) train fully, without adapters.
                name
                for name in lora_target_names(model)
                if not any(name == connector or name.startswith(connector + ".") for connector in connectors)
            ],
            modules_to_save=list(connectors) + (["vision_tower"] if train_vision_tower else []),
        )
        model = get_peft_model(model, lora_config)
    trainable, total = count_parameters(model)
    logger.info(f"Stage {stage!r}: {trainable:,} of {total:,} parameters are trainable.")
    return model


def weight_tying_arguments(model: torch.nn.Module, connectors: dict, lora_config_class) -> dict:
    """Return the `LoraConfig` arguments that keep tied input and output embeddings tied while both train.

    peft copies each module of `modules_to_save`, so two connectors that share one weight (the VQ
    type's tied embeddings and LM head) would each get a copy and drift apart.
    `ensure_weight_tying=True` makes peft tie the copies.
    """
    shared = {}
    for name, module in connectors.items():
        for parameter in module.parameters(recurse=True):
            shared.setdefault(id(parameter), []).append(name)
    if not any(len(names) > 1 for names in shared.values()):
        return {}
    if "ensure_weight_tying" not in lora_config_class.__dataclass_fields__:
        tied = next(names for names in shared.values() if len(names) > 1)
        raise ValueError(
            f"The connector modules {tied} share a weight, which this peft version would untie in the lora "
            "stage; upgrade peft to a version whose LoraConfig has `ensure_weight_tying`, or use stage='full'."
        )
    return {"ensure_weight_tying": True}


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Return the mmfuse model inside DDP and peft wrappers."""
    while hasattr(model, "module"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def accepts_argument(model: torch.nn.Module, name: str) -> bool:
    """True when the forward of the mmfuse model inside `model`'s wrappers has a parameter `name`."""
    return name in inspect.signature(unwrap_model(model).forward).parameters


class LossProgressCallback(ProgressCallback):
    """transformers' progress bar, with the latest training loss shown next to it."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=logs, **kwargs)
        if self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)


class MmfuseTrainer(Trainer):
    """`Trainer` for batches of `VisionTextCollator`, with an optional vision feature cache.

    With `feature_cache` set, each batch's `pixel_values` are replaced by cached vision tower
    outputs (`vision_features`), so the frozen tower runs once per image id over all epochs.
    """

    def __init__(self, *args, feature_cache: VisionFeatureCache | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.feature_cache = feature_cache
        # mmfuse models pass extra keywords to the LM instead of normalising the loss over
        # `num_items_in_batch`, so the Trainer must scale the loss for gradient accumulation itself.
        self.model_accepts_loss_kwargs = False
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(LossProgressCallback)

    def _prepare_inputs(self, inputs: dict) -> dict:
        inputs = super()._prepare_inputs(inputs)
        image_ids = inputs.pop("image_ids", None)
        if self.model.training and "labels" in inputs and accepts_argument(self.model, "supervised_logits_only"):
            # Training reads only the loss, so the LM head runs at the answer positions alone.
            inputs["supervised_logits_only"] = True
        if self.feature_cache is not None and inputs.get("pixel_values") is not None:
            model = unwrap_model(self.model)
            pixel_values = inputs.pop("pixel_values")
            inputs["vision_features"] = self.feature_cache.vision_features(model, image_ids, pixel_values)
        return inputs


@dataclass
class TrainingResult:
    """Result of `train`: the trained (LoRA-merged) model and the figures a report needs."""

    model: torch.nn.Module
    trainer: MmfuseTrainer
    metrics: dict
    trainable_parameters: int
    total_parameters: int
    feature_cache: VisionFeatureCache | None = None
    loss_history: list = field(default_factory=list)


def checkpointing_arguments(enabled: bool) -> dict:
    """Return the `TrainingArguments` fields that switch gradient checkpointing on, or none."""
    if not enabled:
        return {}
    # transformers 5.25 renamed `gradient_checkpointing` to `activation_checkpointing`; 4.57 accepts only the old name.
    prefix = "activation" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient"
    return {f"{prefix}_checkpointing": True, f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}


def build_trainer(
    model: torch.nn.Module,
    processor,
    train_dataset,
    output_dir: str,
    stage: str = "connector",
    eval_dataset=None,
    use_feature_cache: bool | None = None,
    train_vision_tower: bool = False,
    lora_rank: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    batch_size: int = 8,
    learning_rate: float | None = None,
    num_train_epochs: float = 1.0,
    max_steps: int = -1,
    gradient_accumulation_steps: int = 1,
    gradient_checkpointing: bool = False,
    save_steps: int | None = None,
    save_total_limit: int | None = 2,
    logging_steps: int = 10,
    seed: int = 0,
    max_length: int | None = None,
    **training_arguments,
) -> MmfuseTrainer:
    """Prepare `model` for `stage` and return an `MmfuseTrainer` for it.

    Args:
        model: an mmfuse `...ForConditionalGeneration` model of any fusion type.
        processor: its processor; batches are built by `VisionTextCollator(processor)`.
        train_dataset: a dataset of `{"image", "image_id", "prompt", "answer"}` examples.
        output_dir: checkpoints go to `output_dir/checkpoint-STEP`.
        use_feature_cache: cache vision tower outputs per image id. None enables it when the
            model supports it and the vision tower is frozen.
        learning_rate: defaults to 1e-3 (`connector`), 2e-4 (`lora`) or 2e-5 (`full`).
        save_steps: save a resumable checkpoint every this many optimizer steps; None saves none
            during training.
        training_arguments: any other `TrainingArguments` field.
    """
    model = prepare_model_for_stage(model, stage, train_vision_tower, lora_rank, lora_alpha, lora_dropout)
    base_model = unwrap_model(model)
    supported = supports_feature_cache(base_model)
    frozen = vision_tower_is_frozen(base_model)
    if use_feature_cache is None:
        use_feature_cache = supported and frozen
    elif use_feature_cache and not (supported and frozen):
        reason = "its vision tower is trained" if supported else "its forward has no `vision_features` argument"
        raise ValueError(
            f"use_feature_cache=True does not work for this {type(base_model).__name__} because {reason}; "
            "pass use_feature_cache=False."
        )
    feature_cache = VisionFeatureCache() if use_feature_cache else None

    arguments = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        learning_rate=DEFAULT_LEARNING_RATES[stage] if learning_rate is None else learning_rate,
        num_train_epochs=num_train_epochs,
        max_steps=max_steps,
        gradient_accumulation_steps=gradient_accumulation_steps,
        **checkpointing_arguments(gradient_checkpointing),
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        save_total_limit=save_total_limit,
        logging_steps=logging_steps,
        seed=seed,
        remove_unused_columns=False,  # the collator needs the raw `image`, `prompt` and `answer` fields
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        **training_arguments,
    )
    return MmfuseTrainer(
        model=model,
        args=arguments,
        data_collator=VisionTextCollator(processor, max_length=max_length),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        feature_cache=feature_cache,
    )


def loss_history(trainer: Trainer) -> list:
    """Return `[(step, loss), ...]` from the trainer's logs."""
    return [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]


def finish_training(trainer: MmfuseTrainer, processor, output_dir: str | None) -> torch.nn.Module:
    """Merge LoRA adapters into the model and, if `output_dir` is set, save model and processor there.

    In a multi-process run every process merges, the main process writes, and all wait for it.
    """
    # Without `keep_fp32_wrapper=False`, a mixed-precision run leaves the forward wrapped in autocast.
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if output_dir is not None:
        if trainer.is_world_process_zero():
            model.save_pretrained(output_dir)
            processor.save_pretrained(output_dir)
        trainer.accelerator.wait_for_everyone()
    return model


def train(
    model: torch.nn.Module,
    processor,
    train_dataset,
    output_dir: str,
    resume_from_checkpoint: str | bool | None = None,
    save_final_model: bool = True,
    **trainer_options,
) -> TrainingResult:
    """Train `model` on `train_dataset` and save the result, with its processor, in `output_dir`.

    Args:
        resume_from_checkpoint: a `checkpoint-STEP` folder, or True for the latest one in
            `output_dir`; training continues at that step with the saved optimizer, scheduler
            and data order.
        save_final_model: write the trained (LoRA-merged) model and the processor to `output_dir`.
        trainer_options: arguments of `build_trainer` (`stage`, `batch_size`, `max_steps`, ...).

    Returns:
        `TrainingResult`; `model` is the trained model with any LoRA adapters merged.
    """
    trainer = build_trainer(model, processor, train_dataset, output_dir, **trainer_options)
    trainable, total = count_parameters(trainer.model)
    output = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    trained_model = finish_training(trainer, processor, output_dir if save_final_model else None)
    return TrainingResult(
        model=trained_model,
        trainer=trainer,
        metrics=dict(output.metrics),
        trainable_parameters=trainable,
        total_parameters=total,
        feature_cache=trainer.feature_cache,
        loss_history=loss_history(trainer),
    )


__all__ = [
    "DEFAULT_LEARNING_RATES",
    "LossProgressCallback",
    "MmfuseTrainer",
    "STAGES",
    "TrainingResult",
    "build_trainer",
    "connector_modules",
    "count_parameters",
    "finish_training",
    "loss_history",
    "lora_target_names",
    "prepare_model_for_stage",
    "train",
]
