"""Builders of tiny random models and a real, locally trained tokenizer for the tests.

Sizes are small and odd (hidden 32, vocab a few hundred, 30 px images) so that shape mistakes
show up and every test runs in seconds on a CPU.
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "What is in the picture? A red circle on a white background.",
    "Describe the image. There is a blue square and a green triangle.",
    "Is there a cat? Yes, a cat sits on the sofa next to a coffee cup.",
    "The rocket launches into the sky. What colour is the shape? It is yellow.",
    "a photo of a sneaker, a bag, a shirt, a dress, a coat, a sandal, an ankle boot, a trouser, a pullover",
    "user assistant system hello world the quick brown fox jumps over the lazy dog 0123456789",
]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def build_tokenizer(vocab_size: int = 301) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on a small corpus and give it a ChatML template."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def vision_config(model_type: str = "clip_vision_model", image_size: int = 30, patch_size: int = 6) -> dict:
    return {
        "model_type": model_type,
        "hidden_size": 24,
        "intermediate_size": 37,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch_size,
    }


def text_config(model_type: str = "llama", vocab_size: int = 320, tie_word_embeddings: bool = False) -> dict:
    if model_type == "gpt2":
        return {
            "model_type": "gpt2",
            "n_embd": 32,
            "n_layer": 2,
            "n_head": 4,
            "n_positions": 256,
            "vocab_size": vocab_size,
            "tie_word_embeddings": tie_word_embeddings,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }
    config = {
        "model_type": model_type,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": vocab_size,
        "max_position_embeddings": 256,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
    }
    return config


def random_image(seed: int = 0, width: int = 64, height: int = 48):
    """Return a PIL RGB image of uniform random noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def plain_language_model(model):
    """Build transformers' own causal LM class with the LM and head weights of an mmfuse model."""
    from transformers import AutoModelForCausalLM

    language_model = AutoModelForCausalLM.from_config(model.config.text_config)
    language_model.get_decoder().load_state_dict(model.language_model.state_dict())
    language_model.get_output_embeddings().load_state_dict(model.lm_head.state_dict())
    return language_model.eval()


def vqgan_config(**overrides) -> dict:
    """Keyword arguments of a tiny `MmfuseVQGANConfig`: 24 px images, 6x6 codes, a codebook of 37 entries."""
    config = {
        "resolution": 24,
        "base_channels": 12,
        "channel_multipliers": [1, 2, 2],
        "num_res_blocks": 1,
        "attn_resolutions": [12],
        "norm_num_groups": 4,
        "latent_channels": 7,
        "embed_dim": 5,
        "codebook_size": 37,
    }
    config.update(overrides)
    return config


# 64 px easy-VQA images at downsample 16: a 4x4 grid of codes.
EASY_VQA_VQGAN = {
    "resolution": 64,
    "base_channels": 8,
    "channel_multipliers": [1, 1, 1, 1, 1],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "norm_num_groups": 4,
    "latent_channels": 5,
    "embed_dim": 5,
    "codebook_size": 37,
}
