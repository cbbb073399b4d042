"""Processor of the VQ-token fusion type: each `<image>` becomes begin-of-image, placeholders, end-of-image."""

import torch
from transformers.feature_extraction_utils import BatchFeature

from .processing_common import MmfuseImageProcessor, MmfuseProcessorMixin

LABELS_MODES = ("understanding", "generation")


class MmfuseVQProcessor(MmfuseProcessorMixin):
    r"""
    Tokenizer, image processor and chat template of a VQ-token fusion model.

    Args:
        image_processor (`MmfuseImageProcessor`): turns images into `pixel_values` in `[-1, 1]` at the image
            tokenizer's resolution (mean 0.5, std 0.5).
        tokenizer (`PreTrainedTokenizerBase`): the LM's tokenizer, with the three tokens below added as special tokens.
        chat_template (`str`, *optional*): Jinja template for messages with string content.
        num_codes (`int`): codes per image (`config.num_codes` of the model).
        image_token (`str`, *optional*, defaults to `"<image>"`): the placeholder in prompts.
        boi_token / eoi_token (`str`, *optional*, defaults to `"<boi>"` / `"<eoi>"`): begin-of-image and
            end-of-image tokens.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        num_codes=None,
        image_token="<image>",
        boi_token="<boi>",
        eoi_token="<eoi>",
        **kwargs,
    ):
        if num_codes is None or int(num_codes) < 1:
            raise ValueError(f"num_codes={num_codes!r} is invalid; pass the model's `config.num_codes`.")
        self.num_codes = int(num_codes)
        self.image_token = image_token
        self.boi_token = boi_token
        self.eoi_token = eoi_token
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.image_token_id = self.known_token_id(image_token, "image_token")
        self.boi_token_id = self.known_token_id(boi_token, "boi_token")
        self.eoi_token_id = self.known_token_id(eoi_token, "eoi_token")

    def image_replacement(self) -> str:
        return self.boi_token + self.image_token * self.num_codes + self.eoi_token

    def image_token_ids(self) -> set:
        return {self.image_token_id, self.boi_token_id, self.eoi_token_id}

    def __call__(self, images=None, text=None, videos=None, audio=None, labels_mode=None, **kwargs) -> BatchFeature:
        """Tokenize `text` with each image expanded to its span, preprocess `images`, and optionally add labels.

        Args:
            labels_mode: None adds no labels. `"understanding"` sets -100 on image spans and padding, for
                training image-to-text. `"generation"` keeps the image spans, for training text-to-image, and
                the model then replaces the placeholders in the labels by the image tokens.
            Other arguments as in `MmfuseProcessorMixin.__call__`.
        """
        if labels_mode not in (None,) + LABELS_MODES:
            raise ValueError(f"labels_mode={labels_mode!r} is not supported; use None or one of {LABELS_MODES}.")
        outputs = super().__call__(images=images, text=text, videos=videos, audio=audio, **kwargs)
        if labels_mode is None:
            return outputs

        input_ids = torch.as_tensor(outputs["input_ids"])
        labels = input_ids.clone()
        if labels_mode == "understanding":
            for token_id in self.image_token_ids():
                labels[input_ids == token_id] = -100
        labels[torch.as_tensor(outputs["attention_mask"]) == 0] = -100
        if isinstance(outputs["input_ids"], torch.Tensor):
            outputs["labels"] = labels
        else:
            outputs["labels"] = labels.tolist()
        return outputs

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        """Decode generated ids to text; ids past the tokenizer's vocabulary (image tokens) are dropped."""
        vocab_size = len(self.tokenizer)
        rows = [[int(token) for token in row if int(token) < vocab_size] for row in generated_outputs]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens, **kwargs)

    def post_process_multimodal_output(
        self, generated_outputs, skip_special_tokens=True, generation_mode=None, **kwargs
    ):
        """Return text for `generation_mode` None/"text" and PIL images for `"image"` (decoded pixel values)."""
        if generation_mode in (None, "text"):
            return self.post_process_image_text_to_text(generated_outputs, skip_special_tokens=skip_special_tokens)
        if generation_mode == "image":
            return self.image_processor.postprocess(generated_outputs)
        raise ValueError(f"generation_mode={generation_mode!r} is not supported; use 'text' or 'image'.")


__all__ = ["MmfuseImageProcessor", "MmfuseVQProcessor"]
