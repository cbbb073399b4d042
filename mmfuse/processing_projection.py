"""Processor of the projection fusion type: each `<image>` becomes `num_image_tokens` image tokens."""

from .processing_common import MmfuseImageProcessor, MmfuseProcessorMixin


class MmfuseProjectionProcessor(MmfuseProcessorMixin):
    r"""
    Tokenizer, image processor and chat template of a projection-fusion model.

    Args:
        image_processor (`MmfuseImageProcessor`): turns images into `pixel_values`.
        tokenizer (`PreTrainedTokenizerBase`): the LM's tokenizer, with `image_token` added as a special token.
        chat_template (`str`, *optional*): Jinja template for messages with string content; image
            items of a chat become `image_token` before the template runs.
        num_image_tokens (`int`): LM positions one image fills (`config.num_image_tokens` of the model).
        image_token (`str`, *optional*, defaults to `"<image>"`): the placeholder in prompts.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        num_image_tokens=None,
        image_token="<image>",
        **kwargs,
    ):
        if num_image_tokens is None or int(num_image_tokens) < 1:
            raise ValueError(
                f"num_image_tokens={num_image_tokens!r} is invalid; pass the model's `config.num_image_tokens`."
            )
        self.num_image_tokens = int(num_image_tokens)
        self.image_token = image_token
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.image_token_id = self.known_token_id(image_token, "image_token")

    def image_replacement(self) -> str:
        return self.image_token * self.num_image_tokens

    def image_token_ids(self) -> set:
        return {self.image_token_id}


__all__ = ["MmfuseImageProcessor", "MmfuseProjectionProcessor"]
