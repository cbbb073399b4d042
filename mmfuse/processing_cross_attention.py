"""Processor of the cross-attention fusion type: each image is one `<image>` marker token in the text."""

import re

from .processing_common import MmfuseImageProcessor, MmfuseProcessorMixin


class MmfuseCrossAttentionProcessor(MmfuseProcessorMixin):
    r"""
    Tokenizer, image processor and chat template of a cross-attention fusion model.

    The image stays out of the LM context: the text keeps one `image_token` per image, and the
    tokens after it read that image's latents through the gated cross-attention blocks.

    Args:
        image_processor (`MmfuseImageProcessor`): turns images into `pixel_values`.
        tokenizer (`PreTrainedTokenizerBase`): the LM's tokenizer, with `image_token` added as a special token.
        chat_template (`str`, *optional*): Jinja template for messages with string content; image
            items of a chat become `image_token` before the template runs.
        image_token (`str`, *optional*, defaults to `"<image>"`): the marker in prompts.
        image_boundary_token (`str`, *optional*): a special token written before and after every run
            of consecutive image markers, so `<image><image>` becomes `B<image>B<image>B` for a
            boundary token `B`. Idefics checkpoints use `"<fake_token_around_image>"`; None writes none.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        image_token="<image>",
        image_boundary_token=None,
        **kwargs,
    ):
        self.image_token = image_token
        self.image_boundary_token = image_boundary_token
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.image_token_id = self.known_token_id(image_token, "image_token")
        self.image_boundary_token_id = None
        if image_boundary_token is not None:
            self.image_boundary_token_id = self.known_token_id(image_boundary_token, "image_boundary_token")

    def image_replacement(self) -> str:
        return self.image_token

    def expand_image_placeholders(self, text: str) -> str:
        if self.image_boundary_token is None:
            return text
        boundary = self.image_boundary_token

        def wrap(run):
            count = len(run.group(0)) // len(self.image_token)
            return boundary + (self.image_token + boundary) * count

        return re.sub(f"(?:{re.escape(self.image_token)})+", wrap, text)

    def image_token_ids(self) -> set:
        return {self.image_token_id, self.image_boundary_token_id} - {None}


__all__ = ["MmfuseCrossAttentionProcessor", "MmfuseImageProcessor"]
