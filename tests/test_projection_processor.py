"""Processor of the projection fusion type: image modes, placeholders, padding, truncation, chat, saving."""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import build_tokenizer
from transformers import AutoProcessor

from mmfuse import MmfuseImageProcessor, MmfuseProjectionProcessor

WIDTH, HEIGHT = 64, 48


def build_processor(size=30, num_image_tokens=25, **image_kwargs) -> MmfuseProjectionProcessor:
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.padding_side = "left"
    return MmfuseProjectionProcessor(
        image_processor=MmfuseImageProcessor(size=size, **image_kwargs),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        num_image_tokens=num_image_tokens,
    )


@pytest.fixture
def processor():
    return build_processor()


def random_array(channels, seed=0, dtype=np.uint8, high=256):
    rng = np.random.default_rng(seed)
    shape = (HEIGHT, WIDTH, channels) if channels > 1 else (HEIGHT, WIDTH)
    return rng.integers(0, high, size=shape).astype(dtype)


def half_transparent(mode: str) -> Image.Image:
    """Return a random image in `mode` whose left half is fully transparent."""
    alpha = np.full((HEIGHT, WIDTH), 255, dtype=np.uint8)
    alpha[:, : WIDTH // 2] = 0
    if mode == "RGBA":
        return Image.fromarray(np.dstack([random_array(3), alpha]), mode="RGBA")
    if mode == "LA":
        return Image.fromarray(np.dstack([random_array(1), alpha]), mode="LA")
    # Palette image: index 0 is the transparent colour and fills the left half.
    indices = random_array(1, high=200) + 1
    indices[:, : WIDTH // 2] = 0
    image = Image.fromarray(indices.astype(np.uint8), mode="P")
    image.putpalette(list(np.random.default_rng(1).integers(0, 256, size=768)))
    image.info["transparency"] = 0
    return image


def sixteen_bit(values: np.ndarray) -> Image.Image:
    return Image.frombytes("I;16", (WIDTH, HEIGHT), values.astype("<u2").tobytes())


IMAGE_MODES = {
    "RGBA": lambda: half_transparent("RGBA"),
    "LA": lambda: half_transparent("LA"),
    "P": lambda: half_transparent("P"),
    "L": lambda: Image.fromarray(random_array(1), mode="L"),
    "CMYK": lambda: Image.fromarray(random_array(4), mode="CMYK"),
    "I;16": lambda: sixteen_bit(random_array(1, dtype=np.uint16, high=65536)),
}


@pytest.mark.parametrize("mode", sorted(IMAGE_MODES))
def test_image_modes_give_rgb(processor, mode):
    image = IMAGE_MODES[mode]()
    assert image.mode == mode
    assert image.size == (WIDTH, HEIGHT)
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 30, 30)
    assert pixel_values.dtype == torch.float32
    assert torch.isfinite(pixel_values).all()


def test_transparent_regions_share_background():
    processor = build_processor(do_normalize=False, background_color=(10, 200, 30))
    background = torch.tensor([10, 200, 30], dtype=torch.float32).view(3, 1, 1) / 255
    for mode in ("RGBA", "LA", "P"):
        pixel_values = processor(images=half_transparent(mode), return_tensors="pt")["pixel_values"][0]
        # Columns well inside the transparent half are untouched by resampling across the edge.
        transparent = pixel_values[:, :, :12]
        torch.testing.assert_close(transparent, background.expand_as(transparent), msg=mode)
        assert not torch.allclose(pixel_values[:, :, 18:], background.expand(3, 30, 12)), mode


def test_crop_to_square_keeps_center():
    # Every column of a 60x30 image has its own grey level, so the output shows which columns survive.
    columns = np.tile(np.arange(60, dtype=np.uint8) * 4, (30, 1))
    image = Image.fromarray(np.stack([columns] * 3, axis=-1))
    cropping = build_processor(do_normalize=False, crop_to_square=True)
    pixel_values = cropping(images=image, return_tensors="pt")["pixel_values"][0]
    # The shortest edge is already 30 px, so the crop keeps columns 15 to 44 unresampled.
    torch.testing.assert_close(pixel_values[0, 0], torch.arange(15, 45, dtype=torch.float32) * 4 / 255)
    for side in (image.rotate(90, expand=True), image.resize((120, 60))):
        assert cropping(images=side, return_tensors="pt")["pixel_values"].shape == (1, 3, 30, 30)

    stretched = build_processor(do_normalize=False)(images=image, return_tensors="pt")["pixel_values"][0]
    assert float(stretched[0, 0, 0]) < 4 / 255  # the stretched image still starts at column 0


def test_sixteen_bit_scaled_not_clipped(processor):
    grey = np.full((HEIGHT, WIDTH), 128, dtype=np.uint8)
    eight_bit = processor(images=Image.fromarray(grey, mode="L"), return_tensors="pt")["pixel_values"]
    image = sixteen_bit(grey.astype(np.uint16) * 257)
    torch.testing.assert_close(processor(images=image, return_tensors="pt")["pixel_values"], eight_bit)


def test_cmyk_matches_pil_conversion(processor):
    image = IMAGE_MODES["CMYK"]()
    expected = processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(processor(images=image, return_tensors="pt")["pixel_values"], expected)


def test_placeholders_expand(processor):
    image_token_id = processor.image_token_id
    inputs = processor(text="<image>What is in the picture?", images=Image.new("RGB", (WIDTH, HEIGHT)))
    ids = inputs["input_ids"][0]
    text_ids = processor.tokenizer("What is in the picture?")["input_ids"]
    assert ids == [image_token_id] * 25 + text_ids
    assert inputs["pixel_values"].shape == (1, 3, 30, 30)


@pytest.mark.parametrize(
    ("text", "num_images", "message"),
    [
        ("<image><image>Hi", 1, r"2 `<image>` placeholders but 1 images"),
        ("<image>Hi", 0, r"1 `<image>` placeholders but 0 images"),
        ("Hi", 1, r"0 `<image>` placeholders but 1 images"),
    ],
)
def test_placeholder_image_mismatch(processor, text, num_images, message):
    images = [Image.new("RGB", (WIDTH, HEIGHT))] * num_images or None
    with pytest.raises(ValueError, match=message):
        processor(text=text, images=images)


def test_text_only(processor):
    inputs = processor(text="Is there a cat?", return_tensors="pt")
    assert "pixel_values" not in inputs
    assert inputs["input_ids"].tolist() == [processor.tokenizer("Is there a cat?")["input_ids"]]
    assert inputs["attention_mask"].tolist() == [[1] * inputs["input_ids"].shape[1]]


def test_batch_left_padding(processor):
    texts = ["<image>Hi", "Describe the image. There is a blue square."]
    inputs = processor(text=texts, images=[Image.new("RGB", (WIDTH, HEIGHT))], padding=True, return_tensors="pt")
    lengths = [
        len(processor(text=text, images=[Image.new("RGB", (8, 8))] * text.count("<image>"))["input_ids"][0])
        for text in texts
    ]
    width = max(lengths)
    pad_id = processor.tokenizer.pad_token_id
    for row, length in enumerate(lengths):
        assert inputs["attention_mask"][row].tolist() == [0] * (width - length) + [1] * length
        assert inputs["input_ids"][row, : width - length].tolist() == [pad_id] * (width - length)

    right = processor(text=texts, images=[Image.new("RGB", (WIDTH, HEIGHT))], padding=True, padding_side="right")
    assert right["attention_mask"][0][: lengths[0]] == [1] * lengths[0]


def test_truncation_never_cuts_image(processor):
    image = Image.new("RGB", (WIDTH, HEIGHT))
    full = processor(text="<image>What is in the picture?", images=image)["input_ids"][0]
    with pytest.raises(ValueError, match=rf"sequence of {len(full)} tokens to max_length=20 would cut an image span"):
        processor(text="<image>What is in the picture?", images=image, truncation=True, max_length=20)

    # Cutting text after the image span is fine.
    truncated = processor(text="<image>What is in the picture?", images=image, truncation=True, max_length=27)
    assert truncated["input_ids"][0] == full[:27]
    text_only = processor(text="What is in the picture? A red circle.", truncation=True, max_length=4)
    assert text_only["input_ids"][0] == processor.tokenizer("What is in the picture? A red circle.")["input_ids"][:4]


def test_chat_messages_with_images(processor):
    image = Image.fromarray(random_array(3))
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is in the picture?"}],
        }
    ]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\n<image>\nWhat is in the picture?<|im_end|>\n<|im_start|>assistant\n"

    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    expected = processor(text=rendered, images=image, add_special_tokens=False, return_tensors="pt")
    assert inputs["input_ids"].tolist() == expected["input_ids"].tolist()
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 25
    torch.testing.assert_close(inputs["pixel_values"], expected["pixel_values"])

    ids = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert ids == expected["input_ids"].tolist()


def test_save_load_round_trip(tmp_path):
    processor = build_processor(
        size=36,
        num_image_tokens=9,
        image_mean=(0.5, 0.4, 0.3),
        image_std=(0.2, 0.25, 0.3),
        resample="bilinear",
        background_color=(0, 0, 0),
        crop_to_square=True,
    )
    processor.tokenizer.add_tokens(["<box>", "</box>"], special_tokens=True)
    processor.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    processor.save_pretrained(tmp_path)

    for loader in (MmfuseProjectionProcessor, AutoProcessor):
        loaded = loader.from_pretrained(tmp_path)
        assert type(loaded) is MmfuseProjectionProcessor
        assert loaded.num_image_tokens == 9
        assert loaded.image_token == "<image>"
        assert loaded.image_token_id == processor.image_token_id
        assert loaded.chat_template == processor.chat_template
        assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()
        assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
        assert loaded.tokenizer.all_special_tokens == processor.tokenizer.all_special_tokens
        assert loaded.tokenizer.padding_side == "left"

        text = ["<image><box>a red circle</box>", "[user] Is there a cat?"]
        images = [Image.fromarray(random_array(4), mode="RGBA")]
        expected = processor(text=text, images=images, padding=True, return_tensors="pt")
        encoded = loaded(text=text, images=images, padding=True, return_tensors="pt")
        assert encoded.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(encoded[key], expected[key], rtol=0, atol=0, msg=key)
        messages = [{"role": "user", "content": [{"type": "image", "image": images[0]}]}]
        assert loaded.apply_chat_template(messages) == processor.apply_chat_template(messages)


def test_invalid_processor_arguments():
    tokenizer = build_tokenizer()
    with pytest.raises(ValueError, match=r"num_image_tokens=None is invalid"):
        MmfuseProjectionProcessor(image_processor=MmfuseImageProcessor(), tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"does not know the image token '<image>'"):
        MmfuseProjectionProcessor(image_processor=MmfuseImageProcessor(), tokenizer=tokenizer, num_image_tokens=4)
    with pytest.raises(ValueError, match=r"resample='cubic' is not supported"):
        MmfuseImageProcessor(resample="cubic")
