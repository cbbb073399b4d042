"""generate() on the projection fusion type, checked against transformers' plain causal LM.

The reference for every decoding strategy is the same LM weights in transformers' own
`...ForCausalLM`, given the merged input embeddings (text embeddings with the projected image
features written over the placeholders) through `inputs_embeds`.
"""

import os
import subprocess

import pytest
import torch
from subprocess_helpers import compat_python
from tiny import plain_language_model, random_image
from transformers import TextStreamer

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["<image>A<image>Describe the image.", "Is there a cat?<image>"]


def batch_inputs(processor, texts=TEXTS):
    images = [random_image(seed) for seed in range(sum(text.count("<image>") for text in texts))]
    return processor(text=texts, images=images or None, padding=True, padding_side="left", return_tensors="pt")


def merged_embeddings(model, inputs) -> torch.Tensor:
    """Return `[batch_size, seq_len, hidden_size]` text embeddings with image features in the placeholders."""
    with torch.no_grad():
        inputs_embeds = model.get_input_embeddings()(inputs["input_ids"])
        mask = (inputs["input_ids"] == model.config.image_token_id).unsqueeze(-1).expand_as(inputs_embeds)
        features = model.get_image_features(inputs["pixel_values"])
        return inputs_embeds.masked_scatter(mask, features.reshape(-1, features.shape[-1]))


def new_tokens(generated, inputs) -> list:
    return generated[:, inputs["input_ids"].shape[1] :].tolist()


def reference_tokens(model, inputs, seed=None, **generate_kwargs) -> list:
    """Generate with the plain LM from the merged embeddings and return the new tokens."""
    language_model = plain_language_model(model)
    if seed is not None:
        torch.manual_seed(seed)
    generated = language_model.generate(
        input_ids=inputs["input_ids"],
        inputs_embeds=merged_embeddings(model, inputs),
        attention_mask=inputs["attention_mask"],
        **generate_kwargs,
    )
    return new_tokens(generated, inputs)


def test_pixels_reach_prefill_only(tiny_projection):
    model, processor = tiny_projection
    inputs = batch_inputs(processor)
    tower_calls, step_lengths = [], []
    model.vision_tower.register_forward_pre_hook(lambda module, args: tower_calls.append(args[0].shape[0]))
    model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: step_lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    model.generate(**inputs, max_new_tokens=5, do_sample=False)

    assert tower_calls == [3]  # one call for all three images
    # The prefill step receives the whole prompt, and each decode step reads the KV cache and adds one token.
    assert step_lengths == [inputs["input_ids"].shape[1]] + [1] * 4


def test_greedy_matches_loop_without_cache(tiny_projection):
    model, processor = tiny_projection
    inputs = processor(text="<image>What is in the picture?", images=random_image(0), return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)

    input_ids = inputs["input_ids"]
    with torch.no_grad():
        for _ in range(6):
            logits = model(input_ids=input_ids, pixel_values=inputs["pixel_values"], use_cache=False).logits
            input_ids = torch.cat([input_ids, logits[:, -1:].argmax(-1)], dim=1)
    assert generated.tolist() == input_ids.tolist()


@pytest.mark.parametrize(
    ("strategy", "generate_kwargs"),
    [
        ("greedy", {"do_sample": False}),
        ("sampling", {"do_sample": True, "top_k": 0, "temperature": 1.5}),
        ("beam_search", {"do_sample": False, "num_beams": 3}),
        ("beam_search_all_beams", {"do_sample": False, "num_beams": 3, "num_return_sequences": 3}),
    ],
)
def test_strategies_match_plain_lm(tiny_projection, strategy, generate_kwargs):
    model, processor = tiny_projection
    inputs = batch_inputs(processor)
    torch.manual_seed(0)
    generated = model.generate(**inputs, max_new_tokens=6, **generate_kwargs)
    assert new_tokens(generated, inputs) == reference_tokens(
        model, inputs, seed=0, max_new_tokens=6, **generate_kwargs
    )


def test_sampling_is_seeded(tiny_projection):
    model, processor = tiny_projection
    inputs = batch_inputs(processor)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(model.generate(**inputs, max_new_tokens=8, do_sample=True, top_k=0, temperature=2.0).tolist())
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_text_streamer(tiny_projection, capsys):
    model, processor = tiny_projection
    inputs = processor(text="<image>What is in the picture?", images=random_image(0), return_tensors="pt")
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    generated = model.generate(**inputs, max_new_tokens=6, do_sample=False, streamer=streamer)

    text = processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert capsys.readouterr().out == text + "\n"


def test_batch_matches_single_prompts(tiny_projection):
    model, processor = tiny_projection
    texts = TEXTS + ["What colour is the shape? It is"]
    inputs = batch_inputs(processor, texts)
    assert (inputs["attention_mask"] == 0).any(dim=1).sum() == 2  # two rows are left-padded
    batched = new_tokens(model.generate(**inputs, max_new_tokens=6, do_sample=False), inputs)

    first_image = 0
    for row, text in enumerate(texts):
        num_images = text.count("<image>")
        images = [random_image(seed) for seed in range(first_image, first_image + num_images)]
        first_image += num_images
        single = processor(text=text, images=images or None, return_tensors="pt")
        assert new_tokens(model.generate(**single, max_new_tokens=6, do_sample=False), single) == [batched[row]]


@pytest.mark.slow
def test_generate_under_transformers_457():
    """Rerun this file's generate tests under the transformers 4.57 environment, with mmfuse from this checkout."""
    python = compat_python()
    version = subprocess.run(
        [python, "-c", "import transformers; print(transformers.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert version.stdout.startswith("4.57"), version.stdout

    environment = dict(os.environ, PYTHONPATH=REPOSITORY)
    result = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not transformers_457", __file__],
        cwd=REPOSITORY,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout, result.stdout[-2000:]
    assert " skipped" not in result.stdout, result.stdout[-2000:]
