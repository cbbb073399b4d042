"""Layers and helpers shared by the mmfuse fusion types.

This file is Hub code: it imports only `torch`, `transformers` and the standard library.
It also hides the differences between transformers 4.57 and 5.x that the models meet: the
name of the KV cache argument (`past_key_values` in 4.x, `cache` in 5.x) and the format of
`_tied_weights_keys` (a list in 4.x, a target-to-source dict in 5.x).
"""

import copy
import inspect
import os
import shutil
from dataclasses import dataclass

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers import __version__ as transformers_version
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import cached_file, logging

logger = logging.get_logger(__name__)

TRANSFORMERS_MAJOR = int(transformers_version.split(".")[0])

# Name of the KV cache field of transformers' model outputs in the installed version.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


# Vision towers that transformers 4.x nests one level deeper (`vision_tower.vision_model.*`) than
# 5.x saves them (`vision_tower.*`).
NESTED_VISION_MODEL_TOWERS = frozenset({"clip_vision_model", "siglip_vision_model", "siglip2_vision_model"})

# The `image-to-text` pipeline that `save_pretrained` copies into every model folder, and its
# `custom_pipelines` entry in config.json, in the format `Pipeline.save_pretrained` writes:
# `impl` is `<module>.<class>` inside the folder and `pt` names transformers' Auto classes.
IMAGE_TO_TEXT_TASK = "image-to-text"
IMAGE_TO_TEXT_PIPELINE_FILE = "pipeline_image_to_text.py"
IMAGE_TO_TEXT_PIPELINES = {
    IMAGE_TO_TEXT_TASK: {
        "impl": "pipeline_image_to_text.MmfuseImageToTextPipeline",
        "pt": ["AutoModelForImageTextToText"],
        "tf": [],
        "type": "multimodal",
    }
}


@dataclass
class MmfuseModelOutputWithPast(BaseModelOutputWithPast):
    """Output of an mmfuse base model: the LM's hidden states plus the image features it used.

    `image_hidden_states` has shape `[num_images, num_image_tokens, hidden_size]` for the
    projection type, `[batch_size, num_images, num_latents, hidden_size]` for cross-attention.
    """

    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class MmfuseCausalLMOutputWithPast(CausalLMOutputWithPast):
    """Output of an mmfuse head: loss, logits, KV cache and the image features that were used."""

    image_hidden_states: torch.FloatTensor | None = None


class MmfusePreTrainedModel(PreTrainedModel):
    """Base of every mmfuse model: the flags all fusion types share and cross-version loading."""

    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = []
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _supports_cache_class = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        if TRANSFORMERS_MAJOR < 5 and "key_mapping" not in kwargs:
            # A folder written by 5.x stores CLIP/SigLIP towers without the `vision_model.` level
            # that 4.x expects. Without this renaming, 4.x would warn and use a random tower.
            config = kwargs.get("config")
            if not isinstance(config, cls.config_class):
                config = cls.config_class.from_pretrained(
                    pretrained_model_name_or_path,
                    **{key: kwargs[key] for key in ("revision", "token", "cache_dir", "subfolder") if key in kwargs},
                )
            vision_config = getattr(config, "vision_config", None)
            if vision_config is not None and vision_config.model_type in NESTED_VISION_MODEL_TOWERS:
                kwargs["key_mapping"] = {
                    r"^(model\.)?vision_tower\.(?!vision_model\.)": r"\1vision_tower.vision_model.",
                }
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save the model; a model registered for Hub-code export also ships its Auto classes and pipeline.

        Beyond what transformers writes, config.json gets `auto_map` entries for `AutoModel` (the
        base model) and `AutoModelForImageTextToText` (a generating head), and `custom_pipelines`
        names the `image-to-text` pipeline, whose file is copied next to the model code.
        """
        pipeline_file = None
        if self._auto_class is not None:
            self._add_auto_map_entries()
            pipeline_file = self._find_pipeline_file()
            custom_pipelines = dict(getattr(self.config, "custom_pipelines", None) or {})
            if pipeline_file is not None:
                # A copy, because `pipeline()` rewrites the entry it reads in place.
                custom_pipelines.update(copy.deepcopy(IMAGE_TO_TEXT_PIPELINES))
            elif custom_pipelines.pop(IMAGE_TO_TEXT_TASK, None) is not None:
                logger.warning(
                    f"{IMAGE_TO_TEXT_PIPELINE_FILE} was found neither beside the model code nor in "
                    f"{self.name_or_path!r}, so the folder is saved without the image-to-text pipeline; copy the "
                    "file into the folder and add `custom_pipelines` to config.json to restore it."
                )
            self.config.custom_pipelines = custom_pipelines

        outputs = super().save_pretrained(save_directory, *args, **kwargs)
        if pipeline_file is not None and kwargs.get("is_main_process", True):
            target = os.path.join(save_directory, IMAGE_TO_TEXT_PIPELINE_FILE)
            if not os.path.exists(target) or not os.path.samefile(pipeline_file, target):
                shutil.copyfile(pipeline_file, target)
        return outputs

    def _add_auto_map_entries(self) -> None:
        def class_reference(model_class) -> str:
            return f"{model_class.__module__.split('.')[-1]}.{model_class.__name__}"

        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map["AutoModel"] = class_reference(type(self.base_model))
        if isinstance(self, GenerationMixin):
            auto_map["AutoModelForImageTextToText"] = class_reference(type(self))
        self.config.auto_map = auto_map

    def _find_pipeline_file(self) -> str | None:
        """Return the path of the pipeline file: beside this module, or in the folder the model came from."""
        # NOTE: the pipeline file is deliberately not imported from here. transformers 4.57 copies only the
        # direct relative imports of a local model file into its module cache, and then fails to open any
        # file that a copied file imports in turn.
        beside_code = os.path.join(os.path.dirname(os.path.abspath(__file__)), IMAGE_TO_TEXT_PIPELINE_FILE)
        if os.path.isfile(beside_code):
            return beside_code
        if self.name_or_path:
            try:
                return cached_file(
                    self.name_or_path, IMAGE_TO_TEXT_PIPELINE_FILE, _raise_exceptions_for_missing_entries=False
                )
            except OSError:
                return None
        return None


def cache_from_kwargs(past_key_values, cache, kwargs: dict):
    """Return the KV cache whichever name the caller used for it."""
    if cache is None:
        cache = past_key_values
    if cache is None:
        cache = kwargs.pop("cache", None)
    kwargs.pop("cache_position", None)  # 4.57 passes it; the LM rebuilds it from the cache length
    kwargs.pop("return_dict", None)  # mmfuse models always return a ModelOutput
    return cache


def cache_argument_name(module: torch.nn.Module) -> str:
    """Return the keyword under which `module.forward` accepts a KV cache."""
    parameters = inspect.signature(module.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def output_cache(outputs):
    """Read the KV cache out of a transformers model output of either major version."""
    return getattr(outputs, CACHE_FIELD, None)


def has_cached_tokens(cache) -> bool:
    """Return True once a KV cache contains at least one position, that is after the prefill step."""
    if cache is None:
        return False
    if hasattr(cache, "get_seq_length"):
        return cache.get_seq_length() > 0
    return len(cache) > 0  # legacy tuple cache


def tied_weights_keys(model: torch.nn.Module, input_embeddings: torch.nn.Module, output_name: str = "lm_head.weight"):
    """Return `_tied_weights_keys` in the format of the installed transformers version."""
    if TRANSFORMERS_MAJOR < 5:
        return [output_name]
    embedding_name = next(name for name, module in model.named_modules() if module is input_embeddings)
    return {output_name: f"{embedding_name}.weight"}


def select_vision_features(
    vision_tower: torch.nn.Module,
    pixel_values: torch.FloatTensor,
    feature_layer,
    drop_cls_token: bool,
) -> torch.FloatTensor:
    """Run the vision tower and return the requested hidden states as one sequence of features.

    Args:
        pixel_values: `[num_images, num_channels, height, width]`.
        feature_layer: index into the tower's hidden states, or a list of indices whose
            features are concatenated along the last dimension.
        drop_cls_token: remove the first token of every selected hidden state.

    Returns:
        `[num_images, num_patches, hidden_size * num_feature_layers]`.
    """
    tower_dtype = next(vision_tower.parameters()).dtype
    # timm towers (`TimmWrapperModel`) report their stage outputs as hidden states, whose widths differ
    # from the final feature map (EfficientNet: 320 channels before the 1280-channel head convolution),
    # so for them only the final feature map is offered.
    is_timm_tower = getattr(vision_tower.config, "model_type", None) == "timm_wrapper"
    outputs = vision_tower(pixel_values.to(tower_dtype), output_hidden_states=not is_timm_tower, return_dict=True)
    hidden_states = None if is_timm_tower else outputs.hidden_states
    if hidden_states is None:
        hidden_states = (outputs.last_hidden_state,)
    layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)

    selected = []
    for layer in layers:
        if not -len(hidden_states) <= layer < len(hidden_states):
            raise ValueError(
                f"vision_feature_layer={layer} is out of range: the vision tower returns {len(hidden_states)} "
                "hidden states; use an index between "
                f"{-len(hidden_states)} and {len(hidden_states) - 1}."
            )
        features = hidden_states[layer]
        if features.dim() == 4:
            # A convolutional feature map [num_images, channels, height, width] becomes a sequence.
            features = features.flatten(2).transpose(1, 2)
        elif drop_cls_token:
            features = features[:, 1:]
        selected.append(features)
    return torch.cat(selected, dim=-1)


def image_token_mask(input_ids: torch.LongTensor, image_token_id: int) -> torch.BoolTensor:
    if image_token_id is None:
        raise ValueError(
            "The config has image_token_id=None, so no position can receive image features; set "
            "`config.image_token_id` to the tokenizer's id for the image token."
        )
    return input_ids == image_token_id


def scatter_image_features(
    inputs_embeds: torch.FloatTensor,
    placeholder_mask: torch.BoolTensor,
    image_features: torch.FloatTensor,
) -> torch.FloatTensor:
    """Write image features, in order, into the placeholder positions of `inputs_embeds`.

    Args:
        inputs_embeds: `[batch_size, seq_len, hidden_size]`.
        placeholder_mask: `[batch_size, seq_len]`, True at image placeholder positions.
        image_features: `[num_images, num_image_tokens, hidden_size]`.

    Raises:
        ValueError: when the number of placeholders and of image features differ.
    """
    num_placeholders = int(placeholder_mask.sum())
    num_features = image_features.shape[0] * image_features.shape[1]
    if num_placeholders != num_features:
        num_image_tokens = image_features.shape[1]
        raise ValueError(
            f"Image features and image tokens do not match: tokens: {num_placeholders}, features: {num_features} "
            f"({image_features.shape[0]} images of {num_image_tokens} tokens each). Let the processor expand "
            "each image placeholder, and pass exactly one image per placeholder."
        )
    flat_features = image_features.reshape(-1, inputs_embeds.shape[-1]).to(inputs_embeds.device, inputs_embeds.dtype)
    mask = placeholder_mask.unsqueeze(-1).expand_as(inputs_embeds).to(inputs_embeds.device)
    return inputs_embeds.masked_scatter(mask, flat_features)


def apply_final_logit_transforms(logits: torch.Tensor, text_config) -> torch.Tensor:
    """Apply the LM's own output scaling (Cohere's `logit_scale`, Gemma 2's soft-capping)."""
    logit_scale = getattr(text_config, "logit_scale", None)
    if logit_scale is not None:
        logits = logits * logit_scale
    softcap = getattr(text_config, "final_logit_softcapping", None)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def mask_ignored_labels(labels, input_ids, attention_mask, image_token_id):
    """Return labels with image-token and padding positions set to -100."""
    labels = labels.clone()
    if input_ids is not None and image_token_id is not None:
        labels[input_ids == image_token_id] = -100
    if attention_mask is not None and attention_mask.dim() == 2:
        labels[attention_mask == 0] = -100
    return labels


class MmfuseLMHeadMixin:
    """Language-modeling head shared by the `...ForConditionalGeneration` class of every fusion type.

    List it before the fusion type's `PreTrainedModel` in the class bases, so that its embedding
    accessors take precedence over `PreTrainedModel`'s defaults. The class sets `self.model` to its
    base model, which has a `language_model`, and calls `init_lm_head` before `post_init`.
    """

    def init_lm_head(self) -> None:
        """Create `lm_head` and declare it tied to the LM's input embeddings."""
        text_config = self.config.text_config
        self.lm_head = torch.nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False)
        self._tied_weights_keys = tied_weights_keys(self, self.model.get_input_embeddings())

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_decoder(self):
        return self.model.language_model

    @property
    def language_model(self):
        return self.model.language_model

    def compute_lm_logits(self, hidden_states: torch.FloatTensor, logits_to_keep: int | torch.Tensor = 0):
        """Turn `[batch_size, seq_len, hidden_size]` hidden states into logits with the LM's output scaling.

        `logits_to_keep` > 0 keeps the last that many positions and a tensor keeps the positions it
        indexes, as in transformers' causal LMs; 0 keeps all of them.
        """
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        return apply_final_logit_transforms(logits, self.config.text_config)

    def compute_lm_loss(self, logits, labels, input_ids, attention_mask) -> torch.Tensor:
        """Return the next-token loss of `logits`, leaving out image tokens, padding and -100 labels."""
        labels = mask_ignored_labels(labels, input_ids, attention_mask, self.config.image_token_id)
        return self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size)

    def compute_supervised_lm_loss(self, hidden_states, labels, input_ids, attention_mask) -> tuple:
        """Return `(logits, loss)` with the LM head run only at the positions whose next token counts in the loss.

        The loss equals `compute_lm_loss(compute_lm_logits(hidden_states), ...)`, but prompt, image
        and padding positions skip the `hidden_size x vocab_size` head, which dominates the cost of
        short supervised answers. `logits` is `[num_supervised, vocab_size]`, the positions where
        `labels[:, 1:]` counts, in row-major order.
        """
        labels = mask_ignored_labels(labels, input_ids, attention_mask, self.config.image_token_id)
        shift_labels = labels[:, 1:]
        supervised = shift_labels != -100
        logits = self.compute_lm_logits(hidden_states[:, :-1][supervised])
        loss = self.loss_function(
            logits=logits,
            labels=None,
            vocab_size=self.config.text_config.vocab_size,
            shift_labels=shift_labels[supervised],
        )
        return logits, loss

    def compute_logits_and_loss(
        self, hidden_states, labels, input_ids, attention_mask, logits_to_keep=0, supervised_logits_only=False
    ) -> tuple:
        """Return `(logits, loss)` of a forward call; `loss` is None without `labels`.

        With `labels` and `supervised_logits_only`, the head runs only where a label counts
        (`compute_supervised_lm_loss`); otherwise at the last `logits_to_keep` positions.
        """
        if labels is not None and supervised_logits_only:
            return self.compute_supervised_lm_loss(hidden_states, labels, input_ids, attention_mask)
        logits = self.compute_lm_logits(hidden_states, logits_to_keep)
        loss = None if labels is None else self.compute_lm_loss(logits, labels, input_ids, attention_mask)
        return logits, loss


__all__ = [
    "CACHE_FIELD",
    "MmfusePreTrainedModel",
    "MmfuseCausalLMOutputWithPast",
    "MmfuseLMHeadMixin",
    "MmfuseModelOutputWithPast",
    "apply_final_logit_transforms",
    "cache_argument_name",
    "cache_from_kwargs",
    "has_cached_tokens",
    "image_token_mask",
    "mask_ignored_labels",
    "output_cache",
    "scatter_image_features",
    "select_vision_features",
    "tied_weights_keys",
]
