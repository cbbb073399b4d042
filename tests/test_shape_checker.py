"""The pixel-level colour and shape checker: real easy-VQA test images and shapes drawn here."""

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from mmfuse.demo.shape_checker import COLOURS, SHAPES, evaluate_checker, read_shape

easy_vqa = pytest.importorskip("easy_vqa")


def draw_shape(shape: str, colour: str, box: tuple, background=(240, 244, 236), size: int = 64) -> Image.Image:
    """Draw one filled shape inside `box` (left, top, right, bottom) the way easy-VQA images look."""
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = box
    if shape == "rectangle":
        draw.rectangle(box, fill=COLOURS[colour])
    elif shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    else:
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=COLOURS[colour])
    return image


def test_real_test_images_accuracy():
    result = evaluate_checker("test", limit=300)
    assert result["images_with_both_labels"] >= 250
    assert result["accuracy"] >= 0.95, result["errors"][:5]
    assert result["colour_accuracy"] >= 0.95
    assert result["shape_accuracy"] >= 0.95


def test_labels_from_questions():
    from mmfuse.demo.shape_checker import easy_vqa_labels

    labels = easy_vqa_labels("test")
    assert len(labels) == 1000
    # Test image 0: "what is the red shape?" -> "triangle"; image 1: "what is the color of the rectangle?" -> yellow.
    assert labels[0] == ("red", "triangle")
    assert labels[1] == ("yellow", "rectangle")


def test_real_images_read_as_labelled():
    from mmfuse.demo.shape_checker import easy_vqa_labels

    labels = easy_vqa_labels("test")
    paths = easy_vqa.get_test_image_paths()
    for image_id in (0, 1, 3):
        with Image.open(paths[image_id]) as image:
            reading = read_shape(image)
        assert (reading.colour, reading.shape) == labels[image_id]


@pytest.mark.parametrize("shape", SHAPES)
def test_drawn_shapes_every_colour(shape):
    rng = np.random.default_rng(0)
    for colour in COLOURS:
        for _ in range(4):
            width = int(rng.integers(10, 30))
            left, top = int(rng.integers(2, 60 - width)), int(rng.integers(2, 60 - width))
            background = tuple(int(value) for value in rng.integers(230, 256, size=3))
            image = draw_shape(shape, colour, (left, top, left + width, top + width), background)
            reading = read_shape(image)
            assert (reading.colour, reading.shape) == (colour, shape), (left, top, width, reading)


@pytest.mark.parametrize("shape", SHAPES)
def test_blurred_noisy_shapes(shape):
    # Generated images are soft and noisy; blur and Gaussian noise imitate a VQ-GAN decoder's output.
    rng = np.random.default_rng(1)
    for colour in ("red", "teal", "gray", "brown"):
        image = draw_shape(shape, colour, (14, 18, 42, 46)).filter(ImageFilter.GaussianBlur(1))
        noisy = np.asarray(image).astype(np.float64) + rng.normal(0, 12, size=(64, 64, 3))
        reading = read_shape(np.clip(noisy, 0, 255).astype(np.uint8))
        assert (reading.colour, reading.shape) == (colour, shape), reading


def test_shape_cut_by_border():
    image = draw_shape("circle", "blue", (40, 40, 80, 80))  # a quarter of it lies outside the image
    assert read_shape(image).colour == "blue"
    assert read_shape(draw_shape("rectangle", "black", (-10, 20, 20, 40))).shape == "rectangle"


def test_blank_image_has_no_shape():
    reading = read_shape(Image.new("RGB", (64, 64), (245, 250, 240)))
    assert reading.shape is None
    assert reading.colour is None
    assert not reading.matches("red", "circle")


def test_specks_ignored():
    image = draw_shape("triangle", "green", (10, 10, 40, 40))
    pixels = np.asarray(image).copy()
    pixels[55, 55] = pixels[5, 58] = (0, 0, 255)  # single-pixel specks of another colour
    reading = read_shape(pixels)
    assert (reading.colour, reading.shape) == ("green", "triangle")


def test_non_rgb_array_rejected():
    with pytest.raises(ValueError, match="height, width, 3"):
        read_shape(np.zeros((64, 64), dtype=np.uint8))
