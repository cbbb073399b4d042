"""Configuration of the VQ-token fusion type (Chameleon style).

This file is Hub code: it imports only `transformers`, the standard library and its sibling files.
"""

from transformers import AutoConfig, PretrainedConfig

from .configuration_common import build_sub_config
from .configuration_vqgan import MmfuseVQGANConfig


class MmfuseVQConfig(PretrainedConfig):
    r"""
    Configuration of a VQ-GAN image tokenizer and a causal LM whose vocabulary holds one image token per
    codebook entry, so that the same LM reads and writes images.

    The LM vocabulary is laid out as the text vocabulary (including the placeholder, begin-of-image and
    end-of-image tokens) followed by `codebook_size` image tokens: code `c` is vocabulary id
    `image_token_offset + c`. A checkpoint whose image tokens are not one contiguous, ordered block
    (Chameleon's tokenizer is free to place them anywhere) stores the id of every code in
    `code_token_ids` instead.

    Args:
        vqgan_config (`dict` or `MmfuseVQGANConfig`, *optional*):
            Config of the image tokenizer. Defaults to a 512 px, 8192-entry VQ-GAN with 32x32 codes.
        text_config (`dict` or `PretrainedConfig`, *optional*):
            Config of any causal LM that transformers builds with `AutoModel.from_config`. Defaults to Llama.
            Its `vocab_size` includes the image tokens.
        image_token (`str`, *optional*, defaults to `"<image>"`):
            Placeholder in prompts; the processor expands it to `boi_token`, `num_codes` placeholders and
            `eoi_token`, and the model replaces the placeholders by the image tokens of the codes.
        boi_token / eoi_token (`str`, *optional*, defaults to `"<boi>"` / `"<eoi>"`):
            Begin-of-image and end-of-image tokens around every image span.
        image_token_id, boi_token_id, eoi_token_id (`int`, *optional*):
            Vocabulary ids of the three tokens above.
        image_token_offset (`int`, *optional*):
            Vocabulary id of the image token of code 0; the image tokens fill
            `[image_token_offset, image_token_offset + codebook_size)`.
        code_token_ids (`list[int]`, *optional*):
            Vocabulary id of every code, for checkpoints whose image tokens are not contiguous. When given,
            `image_token_offset` is ignored.
    """

    model_type = "mmfuse_vq"
    sub_configs = {"text_config": AutoConfig, "vqgan_config": MmfuseVQGANConfig}

    def __init__(
        self,
        vqgan_config=None,
        text_config=None,
        image_token="<image>",
        boi_token="<boi>",
        eoi_token="<eoi>",
        image_token_id=None,
        boi_token_id=None,
        eoi_token_id=None,
        image_token_offset=None,
        code_token_ids=None,
        **kwargs,
    ):
        # The tokenizer config is not in transformers' CONFIG_MAPPING, so it is built here directly.
        if vqgan_config is None:
            vqgan_config = MmfuseVQGANConfig()
        elif isinstance(vqgan_config, dict):
            vqgan_config = MmfuseVQGANConfig(**{k: v for k, v in vqgan_config.items() if k != "model_type"})
        elif not isinstance(vqgan_config, PretrainedConfig):
            raise TypeError(
                f"`vqgan_config` must be a dict or an MmfuseVQGANConfig, got {type(vqgan_config).__name__}."
            )
        self.vqgan_config = vqgan_config
        self.text_config = build_sub_config(text_config, "text_config", "llama")

        self.image_token = image_token
        self.boi_token = boi_token
        self.eoi_token = eoi_token
        self.image_token_id = image_token_id
        self.boi_token_id = boi_token_id
        self.eoi_token_id = eoi_token_id
        self.image_token_offset = image_token_offset
        if code_token_ids is not None:
            code_token_ids = [int(token_id) for token_id in code_token_ids]
            if len(code_token_ids) != self.codebook_size:
                raise ValueError(
                    f"code_token_ids has {len(code_token_ids)} entries but the codebook has {self.codebook_size} "
                    "codes; give one vocabulary id per code."
                )
        self.code_token_ids = code_token_ids

        kwargs.setdefault("tie_word_embeddings", getattr(self.text_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)

    @property
    def codebook_size(self) -> int:
        return self.vqgan_config.codebook_size

    @property
    def num_codes(self) -> int:
        """Image tokens per image: the side of the code grid, squared."""
        return self.vqgan_config.num_codes

    @property
    def grid_size(self) -> int:
        return self.vqgan_config.grid_size

    @property
    def image_size(self) -> int:
        """Side of the square image the tokenizer was trained on, in pixels."""
        return self.vqgan_config.resolution

    @property
    def image_span_length(self) -> int:
        """Tokens of one image span: begin-of-image, `num_codes` image tokens, end-of-image."""
        return self.num_codes + 2

    def image_token_ids(self) -> list:
        """Return the vocabulary id of every code, in code order."""
        if self.code_token_ids is not None:
            return list(self.code_token_ids)
        if self.image_token_offset is None:
            raise ValueError(
                "The config has image_token_offset=None, so codes have no vocabulary ids; compose the model with "
                "`mmfuse.compose.compose_vq`, which extends the vocabulary and sets the offset."
            )
        return list(range(self.image_token_offset, self.image_token_offset + self.codebook_size))


__all__ = ["MmfuseVQConfig"]
