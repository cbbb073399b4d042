"""VQ-token fusion: image tokenization against transformers' ChameleonVQVAE, and image generation speed."""

import functools

import torch
from transformers import ChameleonVQVAE, ChameleonVQVAEConfig

from mmfuse.conversion.chameleon_vq import convert_chameleon_vqvae

from .builders import build_language_model, build_vq, prompt_inputs, text_inputs, vqgan_sizes
from .measure import alternate, call_seconds, markdown_table, row, value_row


def build_tokenizers(tiny: bool) -> tuple:
    """Return `(MmfuseVQGANModel, ChameleonVQVAE)` with the same encoder and codebook weights."""
    sizes = vqgan_sizes(tiny)
    config = ChameleonVQVAEConfig(
        embed_dim=sizes["embed_dim"],
        num_embeddings=sizes["codebook_size"],
        latent_channels=sizes["latent_channels"],
        resolution=sizes["resolution"],
        base_channels=sizes["base_channels"],
        channel_multiplier=sizes["channel_multipliers"],
        num_res_blocks=sizes["num_res_blocks"],
        attn_resolutions=sizes["attn_resolutions"],
    )
    torch.manual_seed(0)
    chameleon = ChameleonVQVAE(config).eval()
    return convert_chameleon_vqvae(chameleon), chameleon


def run(settings, output_dir: str) -> dict:
    mmfuse_tokenizer, chameleon = build_tokenizers(settings.tiny)
    batch_size = 8
    size = mmfuse_tokenizer.config.resolution
    pixel_values = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))

    with torch.no_grad():
        mmfuse_codes = mmfuse_tokenizer.encode(pixel_values)
        chameleon_codes = chameleon.encode(pixel_values).image_tokens.view(mmfuse_codes.shape)
        mmfuse_encode, chameleon_encode = alternate(
            [
                call_seconds(functools.partial(mmfuse_tokenizer.encode, pixel_values)),
                call_seconds(functools.partial(chameleon.encode, pixel_values)),
            ],
            settings.repeats,
        )
    results = {
        "batch_size": batch_size,
        "resolution": size,
        "num_codes": mmfuse_tokenizer.config.num_codes,
        "codes_identical": bool(torch.equal(mmfuse_codes, chameleon_codes)),
        "rows": [
            row(f"encode {batch_size} images", mmfuse_encode, chameleon_encode),
            value_row(
                "images per second",
                "images/s",
                batch_size / mmfuse_encode.median,
                batch_size / chameleon_encode.median,
            ),
        ],
    }
    del mmfuse_tokenizer, chameleon

    # Image generation: one greedy image span (begin-of-image, the codes, end-of-image) after a text prompt,
    # against greedy text generation of the bare LM from a prompt of the same length.
    model = build_vq(settings.tiny)
    inputs = prompt_inputs(model, num_images=0)
    span_length = model.config.image_span_length
    language_model = build_language_model(settings.tiny)
    lm_inputs = text_inputs(inputs["input_ids"].shape[1], language_model.config.vocab_size)

    def generate_image():
        model.generate_images(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], do_sample=False)

    def generate_text():
        with torch.no_grad():
            language_model.generate(
                **lm_inputs, max_new_tokens=span_length, min_new_tokens=span_length, do_sample=False
            )

    generation, text_generation = alternate(
        [call_seconds(generate_image), call_seconds(generate_text)], settings.repeats
    )
    results["span_length"] = span_length
    results["generation"] = {
        "image": generation.as_dict(),
        "bare_lm_text": text_generation.as_dict(),
        "image_tokens_per_second": span_length / generation.median,
        "bare_lm_tokens_per_second": span_length / text_generation.median,
    }
    results["rows"].append(
        value_row(
            f"image generation, tokens/s (mmfuse generate_images vs bare LM text, {span_length} tokens)",
            "tokens/s",
            span_length / generation.median,
            span_length / text_generation.median,
        )
    )
    return results


def markdown(results: dict) -> str:
    lines = [
        "## VQ-token fusion: image tokenization vs transformers' ChameleonVQVAE (identical weights)",
        "",
        f"{results['batch_size']} random images of {results['resolution']} px, {results['num_codes']} codes each; "
        f"codes identical: {'yes' if results['codes_identical'] else 'NO'}. The last row is not Chameleon: it "
        f"compares greedy `generate_images` (one span of {results['span_length']} tokens, pixels decoded by the "
        "VQ-GAN decoder) with greedy text generation of the same number of tokens by the bare LM.",
        "",
        markdown_table(results["rows"], reference_name="reference"),
        "",
    ]
    return "\n".join(lines)
