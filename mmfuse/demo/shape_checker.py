"""A pixel-level checker that reads the colour and the shape of an easy-VQA style image.

easy-VQA images are 64x64 pictures of one filled shape (circle, rectangle or triangle) in one of eight flat
colours on a light, nearly uniform background. The checker needs no training:

1. Background: the median colour of the border pixels (a shape covers at most part of the border).
2. Foreground: pixels whose L1 distance from the background exceeds `FOREGROUND_THRESHOLD`; the largest
   4-connected region of them is the shape, so specks of noise in generated images do not count.
3. Colour: the median colour of the shape's interior (the region minus its anti-aliased edge), mapped to the
   nearest of the eight easy-VQA colours.
4. Shape: from corner analysis of the bounding box, the fill ratio (shape area over bounding-box area) and
   the width of the top rows against the bottom rows. Only a rectangle fills all four corners of its box; a
   circle fills pi/4 of its box; an upright triangle fills half of it and is narrow at the top. On 2,000
   labelled easy-VQA train images the fill ratios span 0.98-1.00 (rectangles), 0.76-0.88 (circles) and
   0.51-0.69 (triangles); shapes cut by the image border cause the spread. Corner analysis keeps blurred
   rectangles, whose rounded corners lower the fill ratio, apart from circles cut by the border.

`evaluate_checker` measures the checker against the colours and shapes that easy-VQA's own questions and
answers state for each image.
"""

import re
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

SHAPES = ("circle", "rectangle", "triangle")
# The eight easy-VQA colours, as measured: the median shape colour over the easy-VQA train images of each colour.
COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
    "yellow": (255, 255, 0),
}
# L1 distance (summed over RGB, 0-765) from the background above which a pixel belongs to the shape. The closest
# pair in easy-VQA is a gray shape (128) on the lightest background (230 per channel): distance 306.
FOREGROUND_THRESHOLD = 100
# A region smaller than this many pixels is noise, not a shape: the smallest easy-VQA shapes are about 8x8.
MIN_SHAPE_PIXELS = 12
# A shape is a rectangle when each corner patch of its bounding box (a fifth of its width by a fifth of its
# height) is at least this full. A circle leaves about 90% of each patch empty, a triangle its top patches.
RECTANGLE_MIN_CORNER_FILL = 0.5
# Fill ratio below which a shape is a triangle: the midpoint of the gap between triangles and circles above.
TRIANGLE_MAX_FILL = 0.725
# A shape that is not a rectangle and whose top fifth is less than this fraction as wide as its bottom
# fifth is a triangle. Measured top / bottom widths: triangles 0.1-0.25 / 0.9-1.0, circles 0.4-0.8 on both.
TRIANGLE_MAX_TOP_TO_BOTTOM = 0.5


@dataclass
class ShapeReading:
    """The colour and shape the checker reads from one image, with its measurements; None where no shape is found."""

    colour: str | None
    shape: str | None
    area: int = 0
    fill_ratio: float = 0.0
    top_to_bottom: float = 0.0
    corner_fill: float = 0.0
    colour_distance: float = 0.0

    def matches(self, colour: str, shape: str) -> bool:
        return self.colour == colour and self.shape == shape


def as_rgb_array(image) -> np.ndarray:
    """Return `image` (PIL image, or `[height, width, 3]` uint8 array) as an int array `[height, width, 3]`."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"Expected an RGB image of shape [height, width, 3], got an array of shape {array.shape}.")
    return array.astype(np.int64)


def largest_region(mask: np.ndarray) -> np.ndarray:
    """Return the largest 4-connected region of the boolean `mask` `[height, width]`, as a boolean mask."""
    height, width = mask.shape
    labels = np.zeros(mask.shape, dtype=np.int32)
    best_label, best_size, next_label = 0, 0, 1
    for start_y, start_x in zip(*np.nonzero(mask)):
        if labels[start_y, start_x]:
            continue
        labels[start_y, start_x] = next_label
        stack, size = [(start_y, start_x)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = next_label
                    stack.append((ny, nx))
        if size > best_size:
            best_label, best_size = next_label, size
        next_label += 1
    return labels == best_label if best_size else np.zeros_like(mask)


def erode(mask: np.ndarray) -> np.ndarray:
    """Keep the pixels of `mask` whose four neighbours are in `mask` too (one step of binary erosion)."""
    padded = np.pad(mask, 1)
    return mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


def nearest_colour(rgb: np.ndarray) -> tuple[str, float]:
    """Return the easy-VQA colour nearest to `rgb` (Euclidean distance in RGB) and that distance."""
    names = list(COLOURS)
    distances = np.linalg.norm(np.array([COLOURS[name] for name in names]) - rgb, axis=1)
    index = int(np.argmin(distances))
    return names[index], float(distances[index])


def classify_shape(region: np.ndarray) -> tuple[str, float, float, float]:
    """Return `(shape, fill_ratio, top_to_bottom, corner_fill)` for the boolean mask of one shape."""
    rows, columns = np.nonzero(region)
    top, bottom, left, right = rows.min(), rows.max(), columns.min(), columns.max()
    box = region[top : bottom + 1, left : right + 1]
    height, width = box.shape
    fill_ratio = len(rows) / (height * width)
    widths = box.sum(axis=1)
    band = max(1, height // 5)
    top_to_bottom = float(widths[:band].mean() / max(widths[-band:].mean(), 1.0))
    patch_height, patch_width = max(1, height // 5), max(1, width // 5)
    corners = (
        box[:patch_height, :patch_width],
        box[:patch_height, -patch_width:],
        box[-patch_height:, :patch_width],
        box[-patch_height:, -patch_width:],
    )
    corner_fill = float(min(corner.mean() for corner in corners))

    if corner_fill >= RECTANGLE_MIN_CORNER_FILL:
        shape = "rectangle"
    elif fill_ratio <= TRIANGLE_MAX_FILL or top_to_bottom < TRIANGLE_MAX_TOP_TO_BOTTOM:
        shape = "triangle"
    else:
        shape = "circle"
    return shape, float(fill_ratio), top_to_bottom, corner_fill


def read_shape(image) -> ShapeReading:
    """Read the colour and shape of the one shape in `image` (PIL image or `[height, width, 3]` uint8 array)."""
    pixels = as_rgb_array(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    foreground = np.abs(pixels - background).sum(axis=-1) > FOREGROUND_THRESHOLD
    region = largest_region(foreground)
    area = int(region.sum())
    if area < MIN_SHAPE_PIXELS:
        return ShapeReading(colour=None, shape=None, area=area)

    interior = erode(region)
    colour_pixels = pixels[interior] if interior.sum() >= MIN_SHAPE_PIXELS // 2 else pixels[region]
    colour, colour_distance = nearest_colour(np.median(colour_pixels, axis=0))
    shape, fill_ratio, top_to_bottom, corner_fill = classify_shape(region)
    return ShapeReading(colour, shape, area, fill_ratio, top_to_bottom, corner_fill, colour_distance)


def easy_vqa_labels(split: str = "test") -> dict:
    """Return `{image_id: (colour, shape)}` as easy-VQA's questions and answers state them; None where unstated.

    Open questions name the colour or shape in the question ("what is the red shape?") and the other in the
    answer. A yes/no question names one colour or shape, and its answer (flipped by "not" or "no" in the
    question) states whether the image has it. When the answers rule out all shapes but one, that one is taken.
    """
    try:
        import easy_vqa
    except ImportError as error:
        raise ImportError("easy_vqa_labels needs the easy-vqa package: `pip install easy-vqa`.") from error
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} is invalid; use 'train' or 'test'.")
    questions, answers, image_ids = (
        easy_vqa.get_train_questions() if split == "train" else easy_vqa.get_test_questions()
    )
    paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()

    present = {image_id: set() for image_id in paths}
    absent = {image_id: set() for image_id in paths}
    for question, answer, image_id in zip(questions, answers, image_ids):
        words = re.findall(r"[a-z]+", question.lower())
        named = [word for word in words if word in COLOURS or word in SHAPES]
        if answer in ("yes", "no"):
            negated = "not" in words or "no" in words
            target = present if (answer == "yes") != negated else absent
            target[image_id].update(named)
        else:
            present[image_id].update(named + [answer])

    labels = {}
    for image_id in paths:
        labels[image_id] = (
            stated_value(present[image_id], absent[image_id], tuple(COLOURS)),
            stated_value(present[image_id], absent[image_id], SHAPES),
        )
    return labels


def stated_value(present: set, absent: set, choices: tuple) -> str | None:
    found = [choice for choice in choices if choice in present]
    if len(found) == 1:
        return found[0]
    remaining = [choice for choice in choices if choice not in absent]
    return remaining[0] if not found and len(remaining) == 1 else None


def evaluate_checker(split: str = "test", limit: int | None = None) -> dict:
    """Score `read_shape` against easy-VQA's stated colours and shapes; return accuracies and the misreadings.

    Colour accuracy counts images whose colour is stated, shape accuracy those whose shape is stated, and
    `accuracy` (both right) those with both stated.
    """
    import easy_vqa

    paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
    labels = easy_vqa_labels(split)
    image_ids = sorted(labels)[:limit]
    colour_hits = colour_total = shape_hits = shape_total = both_hits = both_total = 0
    errors = []
    for image_id in image_ids:
        colour, shape = labels[image_id]
        if colour is None and shape is None:
            continue
        with Image.open(paths[image_id]) as image:
            reading = read_shape(image)
        colour_total += colour is not None
        colour_hits += colour is not None and reading.colour == colour
        shape_total += shape is not None
        shape_hits += shape is not None and reading.shape == shape
        if colour is not None and shape is not None:
            both_total += 1
            both_hits += reading.matches(colour, shape)
        if (colour is not None and reading.colour != colour) or (shape is not None and reading.shape != shape):
            errors.append({"image_id": image_id, "expected": [colour, shape], **asdict(reading)})
    return {
        "split": split,
        "images": len(image_ids),
        "accuracy": both_hits / max(both_total, 1),
        "images_with_both_labels": both_total,
        "colour_accuracy": colour_hits / max(colour_total, 1),
        "images_with_colour_label": colour_total,
        "shape_accuracy": shape_hits / max(shape_total, 1),
        "images_with_shape_label": shape_total,
        "errors": errors,
    }


__all__ = ["COLOURS", "SHAPES", "ShapeReading", "easy_vqa_labels", "evaluate_checker", "read_shape"]
