"""Processor of the cross-attention fusion type: each image is one `<image>` marker token in the text."""

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
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_token="<image>", **kwargs):
        self.image_token = image_token
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == self.tokenizer.unk_token_id:
            raise ValueError(
                f"The tokenizer does not know the image token {image_token!r}; add it with "
                f"`tokenizer.add_special_tokens({{'additional_special_tokens': [{image_token!r}]}})`."
            )

    def image_replacement(self) -> str:
        return self.image_token

    def image_token_ids(self) -> set:
        return {self.image_token_id}


__all__ = ["MmfuseCrossAttentionProcessor", "MmfuseImageProcessor"]
