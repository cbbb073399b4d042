"""VQ-token fusion (Chameleon style): images become codes, codes are LM vocabulary entries.

The VQ-GAN image tokenizer turns an image into a grid of codes; code `c` is the vocabulary id
`config.image_token_ids()[c]` (`image_token_offset + c` for a composed model). The processor expands
every `<image>` into a begin-of-image token, `num_codes` placeholders and an end-of-image token; the
model encodes the pixels and writes the image tokens over the placeholders once, before the LM embeds
the sequence. Because image tokens are ordinary vocabulary entries, the same LM also generates images:
`generate_images` samples exactly one image span per prompt and decodes its codes to pixels.

This file is Hub code: it imports only `torch`, `transformers`, `numpy`, `PIL` and its sibling files.
"""

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import AutoModel, GenerationMixin, LogitsProcessor, LogitsProcessorList
from transformers.utils import ModelOutput, logging

from .configuration_vq import MmfuseVQConfig
from .modeling_common import (
    CACHE_FIELD,
    MmfuseCausalLMOutputWithPast,
    MmfuseLMHeadMixin,
    MmfuseModelOutputWithPast,
    MmfusePreTrainedModel,
    cache_argument_name,
    cache_from_kwargs,
    has_cached_tokens,
    output_cache,
)
from .modeling_vqgan import MmfuseVQGANModel

logger = logging.get_logger(__name__)


@dataclass
class MmfuseVQImageGenerationOutput(ModelOutput):
    """Output of `generate_images`.

    Args:
        images: one PIL image per prompt, or None for an encode-only tokenizer.
        codes: `[batch_size, grid_size, grid_size]` codes of the generated images.
        pixel_values: `[batch_size, 3, resolution, resolution]` decoded images in `[-1, 1]`.
        sequences: `[batch_size, seq_len]` prompts followed by the generated image span.
    """

    images: list | None = None
    codes: torch.LongTensor | None = None
    pixel_values: torch.FloatTensor | None = None
    sequences: torch.LongTensor | None = None


def pixel_values_to_pil(pixel_values: torch.Tensor) -> list:
    """Turn `[batch_size, 3, height, width]` pixel values in `[-1, 1]` into RGB PIL images."""
    pixels = ((pixel_values.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    arrays = pixels.to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(array)) for array in arrays]


def last_image_span_state(input_ids: torch.LongTensor, boi_token_id: int, eoi_token_id: int):
    """Return, per row, whether the sequence ends inside an open image span and how many tokens it holds.

    Returns:
        `(in_span, span_tokens)`, both `[batch_size]`: `in_span` is True when the last begin-of-image token
        comes after the last end-of-image token; `span_tokens` counts the tokens after that begin-of-image.
    """
    seq_len = input_ids.shape[1]
    positions = torch.arange(seq_len, device=input_ids.device).expand_as(input_ids)
    last_boi = torch.where(input_ids == boi_token_id, positions, -1).max(dim=1).values
    last_eoi = torch.where(input_ids == eoi_token_id, positions, -1).max(dim=1).values
    in_span = last_boi > last_eoi
    return in_span, seq_len - 1 - last_boi


class ImageSpanLogitsProcessor(LogitsProcessor):
    """Keep image spans well formed: begin-of-image, exactly `num_codes` image tokens, end-of-image.

    Inside an open span only image tokens are allowed until `num_codes` of them follow the begin-of-image
    token, and then only the end-of-image token. Outside a span image tokens are forbidden unless
    `allow_image_tokens_outside_span` is set; `force_image_start` allows only the begin-of-image token there,
    which makes the next token start an image.
    """

    def __init__(
        self,
        image_token_ids,
        boi_token_id: int,
        eoi_token_id: int,
        num_codes: int,
        force_image_start: bool = False,
        allow_image_tokens_outside_span: bool = False,
    ):
        self.image_token_ids = torch.as_tensor(image_token_ids, dtype=torch.long)
        self.boi_token_id = boi_token_id
        self.eoi_token_id = eoi_token_id
        self.num_codes = num_codes
        self.force_image_start = force_image_start
        self.allow_image_tokens_outside_span = allow_image_tokens_outside_span

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        in_span, span_tokens = last_image_span_state(input_ids, self.boi_token_id, self.eoi_token_id)
        image_ids = self.image_token_ids.to(scores.device)
        is_image_token = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        is_image_token[image_ids] = True
        only_eoi = torch.zeros_like(is_image_token)
        only_eoi[self.eoi_token_id] = True
        only_boi = torch.zeros_like(is_image_token)
        only_boi[self.boi_token_id] = True

        # allowed: [batch_size, vocab_size]
        if self.force_image_start:
            outside = only_boi.expand_as(scores)
        elif self.allow_image_tokens_outside_span:
            outside = torch.ones_like(scores, dtype=torch.bool)
        else:
            outside = (~is_image_token).expand_as(scores)
        wants_codes = (in_span & (span_tokens < self.num_codes)).unsqueeze(1)
        wants_eoi = (in_span & (span_tokens >= self.num_codes)).unsqueeze(1)
        allowed = torch.where(wants_codes, is_image_token, torch.where(wants_eoi, only_eoi, outside))
        return scores.masked_fill(~allowed, float("-inf"))


class ClassifierFreeGuidanceLogitsProcessor(LogitsProcessor):
    """Classifier-free guidance: `uncond + scale * (cond - uncond)` on log-probabilities.

    The unconditional branch runs `model` on `unconditional_ids` followed by the tokens generated so far,
    with its own KV cache, one row per prompt, so a batch gives the same scores as its rows one at a time.
    """

    def __init__(self, model, guidance_scale: float, unconditional_ids, unconditional_attention_mask, prompt_length):
        self.model = model
        self.guidance_scale = guidance_scale
        self.unconditional_ids = unconditional_ids
        self.attention_mask = unconditional_attention_mask
        self.prompt_length = prompt_length
        self.cache = None

    def _unconditional_logits(self, input_ids: torch.LongTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length :]
        if self.cache is None:
            step_ids = torch.cat([self.unconditional_ids, generated], dim=1)
            self.attention_mask = torch.cat([self.attention_mask, torch.ones_like(generated)], dim=1)
        else:
            step_ids = generated[:, -1:]
            self.attention_mask = torch.cat([self.attention_mask, torch.ones_like(step_ids)], dim=1)
        # Left padding: positions count only real tokens, as `generate` counts them for the conditional branch.
        position_ids = (self.attention_mask.cumsum(dim=1) - 1).clamp(min=0)[:, -step_ids.shape[1] :]
        outputs = self.model(
            input_ids=step_ids,
            attention_mask=self.attention_mask,
            position_ids=position_ids,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.cache = output_cache(outputs)
        return outputs.logits[:, -1].float()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        conditional = torch.log_softmax(scores, dim=-1)
        unconditional = torch.log_softmax(self._unconditional_logits(input_ids), dim=-1)
        return unconditional + self.guidance_scale * (conditional - unconditional)


class SeededSamplingLogitsProcessor(LogitsProcessor):
    """Sample the next token of every row with its own seeded generator, then leave only that token.

    Run with greedy decoding (`do_sample=False`): the argmax of the returned scores is the sampled token.
    One generator per row makes a row's tokens independent of the other rows in the batch.
    """

    def __init__(self, seeds: list, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None):
        self.generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float().cpu() / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            threshold = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < threshold, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            remove_sorted = cumulative - sorted_logits.softmax(dim=-1) >= self.top_p  # keeps the top token
            remove = torch.zeros_like(remove_sorted).scatter(1, order, remove_sorted)
            logits = logits.masked_fill(remove, float("-inf"))
        probabilities = logits.softmax(dim=-1)
        chosen = torch.stack(
            [torch.multinomial(row, 1, generator=generator) for row, generator in zip(probabilities, self.generators)]
        )  # [batch_size, 1]
        output = torch.full_like(scores, float("-inf"))
        return output.scatter(1, chosen.to(scores.device), 0.0)


class MmfuseVQPreTrainedModel(MmfusePreTrainedModel):
    config_class = MmfuseVQConfig
    config: MmfuseVQConfig
    output_modalities = ("text", "image")

    def _init_weights(self, module):
        # The VQ-GAN and the LM initialise themselves; the VQ-token type adds no layers of its own.
        return


class MmfuseVQModel(MmfuseVQPreTrainedModel):
    """VQ-GAN image tokenizer and LM backbone without a language-modeling head."""

    def __init__(self, config: MmfuseVQConfig):
        super().__init__(config)
        self.vqmodel = MmfuseVQGANModel(config.vqgan_config)
        self.language_model = AutoModel.from_config(config.text_config)
        if getattr(self.language_model, "vqmodel", None) is not None:
            # Chameleon's LM builds its own VQ image tokenizer; `self.vqmodel` replaces it, so it is dropped
            # here rather than stored twice.
            self.language_model.vqmodel = None
        self._lm_cache_argument = cache_argument_name(self.language_model)

        self.post_init()

    @property
    def has_image_tokens(self) -> bool:
        return self.config.code_token_ids is not None or self.config.image_token_offset is not None

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def _code_token_ids(self) -> torch.LongTensor:
        # Built from the config on every call rather than kept as a buffer: transformers 5.x creates models on
        # the meta device when loading and would leave a non-persistent buffer uninitialised.
        return torch.tensor(self.config.image_token_ids(), dtype=torch.long)

    def codes_to_token_ids(self, codes: torch.LongTensor) -> torch.LongTensor:
        """Map codes (any shape, values in `[0, codebook_size)`) to the vocabulary ids of their image tokens."""
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.config.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.config.codebook_size}), got values from {int(codes.min())} to "
                f"{int(codes.max())}."
            )
        return self._code_token_ids().to(codes.device)[codes]

    def token_ids_to_codes(self, token_ids: torch.LongTensor) -> torch.LongTensor:
        """Map vocabulary ids of image tokens (any shape) back to codes; any other id raises ValueError."""
        table = self._code_token_ids().to(token_ids.device)
        order = torch.argsort(table)
        sorted_ids = table[order]
        index = torch.searchsorted(sorted_ids, token_ids.contiguous()).clamp(max=len(table) - 1)
        is_image_token = sorted_ids[index] == token_ids
        if not bool(is_image_token.all()):
            outside = token_ids[~is_image_token].unique()[:5].tolist()
            raise ValueError(
                f"token ids {outside} are not image tokens; image tokens are the {len(table)} ids of "
                "`config.image_token_ids()`."
            )
        return order[index]

    def get_image_tokens(self, pixel_values: torch.FloatTensor) -> torch.LongTensor:
        """Encode images into the vocabulary ids of their codes.

        Args:
            pixel_values: `[num_images, 3, image_size, image_size]` in `[-1, 1]`.

        Returns:
            `[num_images, num_codes]` image-token ids, codes in row-major grid order.
        """
        codes = self.vqmodel.encode(pixel_values)  # [num_images, grid_size, grid_size]
        return self.codes_to_token_ids(codes.flatten(1))

    def check_pixel_values(self, pixel_values: torch.FloatTensor) -> None:
        """Reject images whose size differs from the tokenizer's trained resolution, before any compute."""
        size = self.config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(
                f"pixel_values must have shape [num_images, 3, {size}, {size}] (the image tokenizer was trained on "
                f"{size}x{size} images, a {self.config.grid_size}x{self.config.grid_size} grid of codes), got "
                f"{list(pixel_values.shape)}; let the processor resize the images."
            )

    def merge_image_tokens(self, input_ids: torch.LongTensor, pixel_values: torch.FloatTensor) -> torch.LongTensor:
        """Return `input_ids` with the placeholders of every image replaced by the image tokens of its codes.

        Args:
            input_ids: `[batch_size, seq_len]` with `num_codes` placeholders per image.
            pixel_values: `[num_images, 3, image_size, image_size]`, images in the order of their placeholders.
        """
        if input_ids is None:
            raise ValueError("`pixel_values` need `input_ids` to locate the image placeholders; pass `input_ids`.")
        placeholder_mask = input_ids == self.config.image_token_id
        num_placeholders = int(placeholder_mask.sum())
        num_images = pixel_values.shape[0]
        # Check shapes and counts before the tokenizer runs, so a bad batch fails fast.
        self.check_pixel_values(pixel_values)
        if num_placeholders != num_images * self.config.num_codes:
            raise ValueError(
                f"Image codes and image tokens do not match: tokens: {num_placeholders}, codes: "
                f"{num_images * self.config.num_codes} ({num_images} images of {self.config.num_codes} codes each). "
                f"Give one image per `{self.config.image_token}` and let the processor expand the placeholders."
            )
        image_token_ids = self.get_image_tokens(pixel_values)
        return input_ids.masked_scatter(placeholder_mask, image_token_ids.to(input_ids.device))

    def _reject_unfilled_placeholders(self, input_ids, cache) -> None:
        if input_ids is None or self.config.image_token_id is None or has_cached_tokens(cache):
            return
        num_placeholders = int((input_ids == self.config.image_token_id).sum())
        if num_placeholders:
            raise ValueError(
                f"Image codes and image tokens do not match: tokens: {num_placeholders}, codes: 0. Pass "
                "`pixel_values` for the images, or remove the image placeholders from the text."
            )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        cache=None,
        **kwargs,
    ) -> MmfuseModelOutputWithPast:
        """
        Args:
            input_ids: `[batch_size, seq_len]`, with `num_codes` placeholders per image or image tokens already.
            pixel_values: `[num_images, 3, image_size, image_size]`, images in the order of their placeholders.
            attention_mask: `[batch_size, seq_len]`, 0 at padding.

        Returns:
            `MmfuseModelOutputWithPast` with `last_hidden_state` `[batch_size, seq_len, hidden_size]`.
        """
        cache = cache_from_kwargs(past_key_values, cache, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        if pixel_values is not None:
            input_ids = self.merge_image_tokens(input_ids, pixel_values)
        self._reject_unfilled_placeholders(input_ids, cache)

        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **{self._lm_cache_argument: cache},
            **kwargs,
        )
        return MmfuseModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_FIELD: output_cache(outputs)},
        )


class MmfuseVQForConditionalGeneration(MmfuseLMHeadMixin, MmfuseVQPreTrainedModel, GenerationMixin):
    """VQ-token fusion model with a language-modeling head: reads images, writes text and images."""

    def __init__(self, config: MmfuseVQConfig):
        super().__init__(config)
        self.model = MmfuseVQModel(config)
        self.init_lm_head()
        self.post_init()

    @property
    def vqmodel(self):
        return self.model.vqmodel

    def get_image_tokens(self, pixel_values: torch.FloatTensor) -> torch.LongTensor:
        """Return image-token ids `[num_images, num_codes]` for `pixel_values` `[num_images, 3, height, width]`."""
        return self.model.get_image_tokens(pixel_values)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save the model; a model registered for Hub-code export also maps `AutoModelForMultimodalLM` to it."""
        if self._auto_class is not None:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map["AutoModelForMultimodalLM"] = f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}"
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache=None,
        supervised_logits_only: bool = False,
        **kwargs,
    ) -> MmfuseCausalLMOutputWithPast:
        """
        Args:
            input_ids: `[batch_size, seq_len]`.
            pixel_values: `[num_images, 3, image_size, image_size]`.
            labels: `[batch_size, seq_len]`. Positions with -100 and padding (attention mask 0) do not count.
                Placeholder ids in `labels` stand for the image tokens of the image at that position, so labels
                that keep the image span train image generation, and labels with -100 there (the processor's
                `labels_mode="understanding"`) train image understanding.
            supervised_logits_only: with `labels`, run the LM head only where a label counts in the
                loss (the same loss, computed faster; training uses it).

        Returns:
            `MmfuseCausalLMOutputWithPast` with `logits` `[batch_size, seq_len, vocab_size]`, where
            `vocab_size` counts the text tokens and the `codebook_size` image tokens; with
            `supervised_logits_only` and `labels`, `[num_supervised, vocab_size]`.
        """
        if pixel_values is not None:
            input_ids = self.model.merge_image_tokens(input_ids, pixel_values)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            cache=cache,
            **kwargs,
        )

        if labels is not None and input_ids is not None and self.config.image_token_id is not None:
            is_placeholder = labels == self.config.image_token_id
            labels = torch.where(is_placeholder, input_ids.to(labels.device), labels)
        logits, loss = self.compute_logits_and_loss(
            outputs.last_hidden_state, labels, input_ids, attention_mask, logits_to_keep, supervised_logits_only
        )

        return MmfuseCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_FIELD: output_cache(outputs)},
        )

    def prepare_inputs_for_generation(self, *args, pixel_values=None, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        # Images enter the prefill step only; later steps read them from the KV cache.
        cache = model_inputs.get("cache", model_inputs.get("past_key_values"))
        if not has_cached_tokens(cache):
            model_inputs["pixel_values"] = pixel_values
        return model_inputs

    def image_span_processor(self, **kwargs) -> ImageSpanLogitsProcessor:
        """Build the logits processor that keeps image spans well formed (see `ImageSpanLogitsProcessor`)."""
        return ImageSpanLogitsProcessor(
            self.model._code_token_ids(),
            self.config.boi_token_id,
            self.config.eoi_token_id,
            self.config.num_codes,
            **kwargs,
        )

    def generate(self, *args, generation_mode: str = "text", logits_processor=None, **kwargs):
        """Generate text (default) or, with `generation_mode="image"`, one image span per prompt.

        Text generation is transformers' own `generate` plus `ImageSpanLogitsProcessor`: image tokens appear
        only inside complete spans. `generation_mode="image"` calls `generate_images` and returns its
        `sequences`, which `decode_image_tokens` turns into pixels (the any-to-any pipeline does both).
        """
        if generation_mode == "image":
            return self.generate_images(*args, **kwargs).sequences
        if generation_mode != "text":
            raise ValueError(f"generation_mode={generation_mode!r} is not supported; use 'text' or 'image'.")
        processors = LogitsProcessorList(logits_processor or [])
        if self.model.has_image_tokens and self.config.boi_token_id is not None:
            processors.append(self.image_span_processor())
        return super().generate(*args, logits_processor=processors, **kwargs)

    @torch.no_grad()
    def generate_images(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        guidance_scale: float | None = None,
        unconditional_ids: torch.LongTensor | None = None,
        unconditional_attention_mask: torch.LongTensor | None = None,
        seed: int | list | None = None,
        do_sample: bool = True,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        max_new_tokens: int | None = None,
        pixel_values: torch.FloatTensor | None = None,
        inputs: torch.LongTensor | None = None,
        **kwargs,
    ) -> MmfuseVQImageGenerationOutput:
        """Generate exactly one image per prompt: begin-of-image, `num_codes` image tokens, end-of-image.

        Args:
            input_ids: `[batch_size, seq_len]` prompts, left-padded. A prompt that already ends with the
                begin-of-image token continues that span.
            attention_mask: `[batch_size, seq_len]`, 0 at padding.
            guidance_scale: classifier-free guidance scale; None or 1.0 disables guidance.
            unconditional_ids / unconditional_attention_mask: `[batch_size, uncond_len]` prompts of the
                unconditional branch (left-padded). Defaults to the begin-of-sequence token alone, or the
                last prompt token where the tokenizer has none.
            seed: an int for every row, or one int per row. Each row samples with its own generator, so a
                row's image depends only on its prompt and seed, not on the rest of the batch.
            do_sample: False takes the most likely image token at every step.
            temperature, top_k, top_p: sampling controls, as in `generate`.
            max_new_tokens: limit on generated tokens; it must leave room for the whole image span.
            pixel_values: `[num_images, 3, image_size, image_size]` for image placeholders in the prompts.

        Returns:
            `MmfuseVQImageGenerationOutput` with PIL `images`, `codes` `[batch_size, grid_size, grid_size]`,
            decoded `pixel_values` and the full `sequences`.
        """
        input_ids = input_ids if input_ids is not None else inputs
        if input_ids is None:
            raise ValueError("Pass the prompts as `input_ids` `[batch_size, seq_len]`.")
        if self.config.boi_token_id is None or self.config.eoi_token_id is None:
            raise ValueError(
                "The config has no begin-of-image or end-of-image token id (boi_token_id="
                f"{self.config.boi_token_id}, eoi_token_id={self.config.eoi_token_id}); compose the model with "
                "`mmfuse.compose.compose_vq`."
            )
        batch_size = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        for key in ("generation_config", "max_length", "min_new_tokens", "num_return_sequences"):
            if kwargs.get(key) is not None and key != "generation_config":
                raise ValueError(f"`{key}` is not supported by generate_images; it always generates one image span.")
        kwargs.pop("generation_config", None)

        prompt_opens_span = input_ids[:, -1] == self.config.boi_token_id
        if bool(prompt_opens_span.any()) and not bool(prompt_opens_span.all()):
            raise ValueError(
                "Either every prompt or none must end with the begin-of-image token "
                f"{self.config.boi_token} (id {self.config.boi_token_id}), so that all rows generate the same span."
            )
        span_length = self.config.image_span_length - int(prompt_opens_span.all())
        if max_new_tokens is not None and max_new_tokens < span_length:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} is smaller than one image span of {span_length} tokens "
                f"(begin-of-image, {self.config.num_codes} image tokens, end-of-image); raise max_new_tokens to at "
                f"least {span_length}."
            )

        processors = LogitsProcessorList()
        if guidance_scale is not None and guidance_scale != 1.0:
            if unconditional_ids is None:
                start_id = self.config.text_config.bos_token_id
                if start_id is None:
                    unconditional_ids = input_ids[:, -1:]
                else:
                    unconditional_ids = torch.full_like(input_ids[:, :1], start_id)
            if unconditional_attention_mask is None:
                unconditional_attention_mask = torch.ones_like(unconditional_ids)
            if unconditional_ids.shape[0] != batch_size:
                raise ValueError(
                    f"unconditional_ids has {unconditional_ids.shape[0]} rows but there are {batch_size} prompts; "
                    "give one unconditional prompt per prompt."
                )
            processors.append(
                ClassifierFreeGuidanceLogitsProcessor(
                    self, guidance_scale, unconditional_ids, unconditional_attention_mask, input_ids.shape[1]
                )
            )
        processors.append(self.image_span_processor(force_image_start=True))
        if do_sample:
            seeds = seed if isinstance(seed, (list, tuple)) else [seed] * batch_size
            if len(seeds) != batch_size:
                raise ValueError(f"seed has {len(seeds)} entries but there are {batch_size} prompts; give one each.")
            seeds = [int(torch.randint(0, 2**31 - 1, ())) if value is None else value for value in seeds]
            processors.append(SeededSamplingLogitsProcessor(seeds, temperature=temperature, top_k=top_k, top_p=top_p))

        sequences = super().generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            logits_processor=processors,
            do_sample=False,
            max_new_tokens=span_length,
            min_new_tokens=span_length,
            num_beams=1,
            temperature=None,
            top_k=None,
            top_p=None,
            **kwargs,
        )
        codes = self.image_codes(sequences)
        pixels = self.model.vqmodel.decode(codes) if self.model.vqmodel.decoder is not None else None
        images = pixel_values_to_pil(pixels) if pixels is not None else None
        return MmfuseVQImageGenerationOutput(images=images, codes=codes, pixel_values=pixels, sequences=sequences)

    def image_codes(self, sequences: torch.LongTensor) -> torch.LongTensor:
        """Return the codes `[batch_size, grid_size, grid_size]` of the last image span of every row.

        Raises ValueError when a row has no complete span (begin-of-image, `num_codes` image tokens).
        """
        rows = []
        for row in sequences:
            begins = (row == self.config.boi_token_id).nonzero().flatten()
            if len(begins) == 0 or len(row) - int(begins[-1]) - 1 < self.config.num_codes:
                raise ValueError(
                    f"A sequence has no complete image span (begin-of-image id {self.config.boi_token_id} followed "
                    f"by {self.config.num_codes} image tokens); generate it with `generate_images`."
                )
            start = int(begins[-1]) + 1
            rows.append(self.model.token_ids_to_codes(row[start : start + self.config.num_codes]))
        grid = self.config.grid_size
        return torch.stack(rows).view(len(rows), grid, grid)

    def decode_image_tokens(self, sequences: torch.LongTensor) -> torch.FloatTensor:
        """Decode the last image span of every row into pixel values `[batch_size, 3, image_size, image_size]`."""
        return self.model.vqmodel.decode(self.image_codes(sequences))


__all__ = [
    "ClassifierFreeGuidanceLogitsProcessor",
    "ImageSpanLogitsProcessor",
    "MmfuseVQForConditionalGeneration",
    "MmfuseVQImageGenerationOutput",
    "MmfuseVQModel",
    "MmfuseVQPreTrainedModel",
    "SeededSamplingLogitsProcessor",
]
