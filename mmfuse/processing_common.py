"""Image processor and processor machinery shared by the mmfuse fusion types.

This file is Hub code: it imports only `numpy`, `PIL`, `torch` and `transformers`.
"""

import json
import os

import numpy as np
import torch
from PIL import Image
from transformers import __version__ as transformers_version
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import load_image
from transformers.processing_utils import ProcessorMixin

TRANSFORMERS_MAJOR = int(transformers_version.split(".")[0])
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESAMPLE_FILTERS = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1}


def to_rgb(image: Image.Image, background_color=(255, 255, 255)) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB.

    Transparent pixels are composited onto `background_color`, so RGBA, LA and palette images
    with transparency give the same RGB values wherever they are fully transparent. 16- and
    32-bit grey images are scaled down to 8 bits, not clipped.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            scaled = values / 257.0
        else:
            low, high = float(values.min()), float(values.max())
            scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        grey = Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, tuple(background_color) + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def array_to_pil(image) -> Image.Image:
    """Turn a numpy array or torch tensor (HWC or CHW, uint8 or float in [0, 1]) into a PIL image."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype != np.uint8:
        array = np.clip(np.round(array.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def flatten_images(images) -> list:
    """Return a flat list of images from one image, a list, or a list of lists (one per text)."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        flat = []
        for item in images:
            flat.extend(flatten_images(item))
        return flat
    if isinstance(images, torch.Tensor) and images.dim() == 4 or isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    return [images]


class MmfuseImageProcessor(BaseImageProcessor):
    r"""
    Resize images to a square, convert them to RGB, rescale and normalize them.

    Args:
        size (`int`, *optional*, defaults to 224): side of the square output, in pixels.
        crop_to_square (`bool`, *optional*, defaults to `False`): keep the aspect ratio: resize the
            shortest edge to `size`, then crop the center `size x size` square, as CLIP's and
            Chameleon's image processors do. When False, images are stretched to the square.
        resample (`str`, *optional*, defaults to `"bicubic"`): `"nearest"`, `"bilinear"`, `"bicubic"` or `"lanczos"`.
        image_mean / image_std (`list[float]`, *optional*): per-channel normalization, ImageNet's by default.
        do_normalize (`bool`, *optional*, defaults to `True`): when False, pixel values stay in [0, 1].
        background_color (`list[int]`, *optional*, defaults to white): RGB colour that transparent
            pixels are composited onto.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size=224,
        resample="bicubic",
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_normalize=True,
        background_color=(255, 255, 255),
        crop_to_square=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(size, dict):
            size = size.get("height", size.get("shortest_edge"))
        if resample not in RESAMPLE_FILTERS:
            raise ValueError(f"resample={resample!r} is not supported; use one of {sorted(RESAMPLE_FILTERS)}.")
        self.size = int(size)
        self.resample = resample
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.do_normalize = do_normalize
        self.background_color = list(background_color)
        self.crop_to_square = bool(crop_to_square)

    def to_dict(self):
        output = {
            key: getattr(self, key)
            for key in (
                "size",
                "resample",
                "image_mean",
                "image_std",
                "do_normalize",
                "background_color",
                "crop_to_square",
            )
        }
        output["image_processor_type"] = type(self).__name__
        if getattr(self, "_processor_class", None) is not None:
            output["processor_class"] = self._processor_class
        if getattr(self, "_auto_class", None) is not None:
            output["auto_map"] = {self._auto_class: f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}"}
        return output

    def preprocess_one(self, image) -> np.ndarray:
        """Return `[3, size, size]` float32 pixel values for one image."""
        if isinstance(image, str):
            image = load_image(image)
        if not isinstance(image, Image.Image):
            image = array_to_pil(image)
        image = to_rgb(image, self.background_color)
        if self.crop_to_square:
            image = self.resize_shortest_edge_and_crop(image)
        elif image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), resample=RESAMPLE_FILTERS[self.resample])
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        if self.do_normalize:
            pixels = (pixels - np.asarray(self.image_mean, dtype=np.float32)) / np.asarray(
                self.image_std, dtype=np.float32
            )
        return pixels.transpose(2, 0, 1)

    def resize_shortest_edge_and_crop(self, image: Image.Image) -> Image.Image:
        """Resize the shortest edge to `size` and crop the center square, rounding as transformers' CLIP does."""
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_long = int(self.size * long / short)
        new_size = (self.size, new_long) if width <= height else (new_long, self.size)
        if image.size != new_size:
            image = image.resize(new_size, resample=RESAMPLE_FILTERS[self.resample])
        left = (new_size[0] - self.size) // 2
        top = (new_size[1] - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))

    def preprocess(self, images, return_tensors=None, **kwargs) -> BatchFeature:
        """Turn images into `pixel_values` of shape `[num_images, 3, size, size]`."""
        pixel_values = [self.preprocess_one(image) for image in flatten_images(images)]
        if pixel_values:
            data = {"pixel_values": np.stack(pixel_values)}
        else:
            data = {"pixel_values": np.zeros((0, 3, self.size, self.size), dtype=np.float32)}
        return BatchFeature(data=data, tensor_type=return_tensors)

    def __call__(self, images, return_tensors=None, **kwargs) -> BatchFeature:
        return self.preprocess(images, return_tensors=return_tensors, **kwargs)

    def postprocess(self, pixel_values: torch.Tensor) -> list:
        """Undo normalization: `[num_images, 3, height, width]` pixel values to PIL images."""
        pixels = pixel_values.detach().float().cpu().numpy().transpose(0, 2, 3, 1)
        if self.do_normalize:
            pixels = pixels * np.asarray(self.image_std) + np.asarray(self.image_mean)
        return [array_to_pil(np.clip(image, 0.0, 1.0)) for image in pixels]


def split_chat_content(conversation, image_token: str):
    """Turn messages with list content into messages with string content and a list of images.

    Image items become `image_token` followed by a newline when text follows; the images are
    returned in the order they appear, loaded from `image`, `url` or `path`.
    """
    images = []
    messages = []
    for message in conversation:
        content = message.get("content")
        if not isinstance(content, (list, tuple)):
            messages.append(dict(message))
            continue
        parts = []
        for index, item in enumerate(content):
            item_type = item.get("type")
            if item_type == "image":
                source = item.get("image", item.get("url", item.get("path")))
                if source is None:
                    raise ValueError(f"Chat image item {item!r} has no `image`, `url` or `path`; add one.")
                images.append(source if isinstance(source, Image.Image) else load_image(source))
                followed_by_text = index + 1 < len(content) and content[index + 1].get("type") == "text"
                parts.append(image_token + ("\n" if followed_by_text else ""))
            elif item_type == "text":
                parts.append(item.get("text", ""))
            else:
                raise ValueError(f"Chat content type {item_type!r} is not supported; use 'text' or 'image'.")
        messages.append({**message, "content": "".join(parts)})
    return messages, images


class MmfuseProcessorMixin(ProcessorMixin):
    """Text-and-image processor: tokenizer plus `MmfuseImageProcessor`, with an image placeholder.

    Subclasses define `expand_image_token(num_images_in_text)`-style behaviour through
    `image_replacement`, the string that stands for one image in the tokenized text.
    """

    attributes = ["image_processor", "tokenizer"]
    if TRANSFORMERS_MAJOR < 5:
        # 4.x resolves sub-processors through these names; 5.x uses the Auto registries instead.
        image_processor_class = "AutoImageProcessor"
        tokenizer_class = "AutoTokenizer"

    def image_replacement(self) -> str:
        raise NotImplementedError

    def image_token_ids(self) -> set:
        """Vocabulary ids that make up image spans; truncation must not cut through them."""
        raise NotImplementedError

    def expand_image_placeholders(self, text: str) -> str:
        """Replace each `image_token` in `text` with `image_replacement()`."""
        return text.replace(self.image_token, self.image_replacement())

    def known_token_id(self, token: str, argument: str) -> int:
        """Return the tokenizer's id for `token`, passed as `argument`; raise ValueError if it has none."""
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(
                f"The tokenizer does not know the {argument.replace('_', ' ')} {token!r} (argument `{argument}`); "
                f"add it with `tokenizer.add_special_tokens({{'additional_special_tokens': [{token!r}]}})`."
            )
        return token_id

    def _split_images_per_text(self, texts, images):
        counts = [text.count(self.image_token) for text in texts]
        flat_images = flatten_images(images)
        if sum(counts) != len(flat_images):
            raise ValueError(
                f"The text has {sum(counts)} `{self.image_token}` placeholders but {len(flat_images)} images were "
                f"given (placeholders per text: {counts}); pass exactly one image per placeholder, in order."
            )
        return flat_images

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs) -> BatchFeature:
        """Tokenize `text` with each image placeholder expanded, and preprocess `images`.

        Args:
            images: one image, a list, or a list of lists with one list per text. Images are
                matched to placeholders in reading order across the batch.
            text: a string or a list of strings that contain `image_token` once per image.
            padding, max_length, truncation, padding_side, return_tensors, add_special_tokens:
                as for the tokenizer. Truncation that would cut an image span raises ValueError.

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask` and, when images are given, `pixel_values`.
        """
        if text is None and images is None:
            raise ValueError("Pass `text`, `images` or both.")
        if isinstance(text, (list, tuple)) and text and isinstance(text[0], dict):
            raise TypeError("`text` is a chat conversation; call `processor.apply_chat_template(messages)` instead.")
        if text is None:
            count = len(flatten_images(images))
            text = self.image_token * count
        texts = [text] if isinstance(text, str) else list(text)
        flat_images = self._split_images_per_text(texts, images)

        return_tensors = kwargs.pop("return_tensors", None)
        padding = kwargs.pop("padding", False)
        truncation = kwargs.pop("truncation", None)
        max_length = kwargs.pop("max_length", None)
        padding_side = kwargs.pop("padding_side", None)
        pad_to_multiple_of = kwargs.pop("pad_to_multiple_of", None)
        add_special_tokens = kwargs.pop("add_special_tokens", True)
        for key in ("images_kwargs", "text_kwargs", "common_kwargs"):
            kwargs.pop(key, None)

        expanded = [self.expand_image_placeholders(text) for text in texts]
        encoded = self.tokenizer(expanded, add_special_tokens=add_special_tokens, padding=False, truncation=False)
        input_ids = [list(ids) for ids in encoded["input_ids"]]
        if truncation and max_length is not None:
            input_ids = [self._truncate_outside_images(ids, max_length) for ids in input_ids]
        features = {"input_ids": input_ids, "attention_mask": [[1] * len(ids) for ids in input_ids]}

        lengths = {len(ids) for ids in input_ids}
        if padding in (False, None, "do_not_pad") and return_tensors is not None and len(lengths) > 1:
            padding = "longest"  # rows of different lengths cannot form one tensor
        if padding not in (False, None, "do_not_pad"):
            pad_kwargs = {"padding": padding, "max_length": max_length, "pad_to_multiple_of": pad_to_multiple_of}
            if padding_side is not None:
                pad_kwargs["padding_side"] = padding_side
            features = dict(self.tokenizer.pad(features, **pad_kwargs))
        data = dict(features)
        if flat_images:
            data.update(self.image_processor(flat_images))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _truncate_outside_images(self, ids: list, max_length: int) -> list:
        if len(ids) <= max_length:
            return ids
        image_ids = self.image_token_ids()
        side = getattr(self.tokenizer, "truncation_side", "right")
        dropped = ids[max_length:] if side == "right" else ids[: len(ids) - max_length]
        if any(token in image_ids for token in dropped):
            last_image_position = max(index for index, token in enumerate(ids) if token in image_ids)
            raise ValueError(
                f"Truncating a sequence of {len(ids)} tokens to max_length={max_length} would cut an image span "
                f"(image tokens reach position {last_image_position}); raise max_length to at least {len(ids)} "
                "or shorten the text."
            )
        return ids[:max_length] if side == "right" else ids[len(ids) - max_length :]

    def apply_chat_template(
        self,
        conversation,
        chat_template=None,
        add_generation_prompt=False,
        continue_final_message=False,
        tokenize=False,
        return_dict=False,
        return_tensors=None,
        **kwargs,
    ):
        """Render chat messages whose content mixes `{"type": "image"}` and `{"type": "text"}` items.

        Image items become the image placeholder; the LM's own chat template then renders the
        messages. With `tokenize=True` the images are loaded and processed as well.
        """
        is_batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if is_batched else [conversation]
        template = chat_template or self.chat_template or getattr(self.tokenizer, "chat_template", None)
        if template is None:
            raise ValueError(
                "The processor has no chat template; pass `chat_template=` or set `processor.chat_template`."
            )

        rendered, all_images = [], []
        for messages in conversations:
            flat_messages, images = split_chat_content(messages, self.image_token)
            rendered.append(
                self.tokenizer.apply_chat_template(
                    flat_messages,
                    chat_template=template,
                    add_generation_prompt=add_generation_prompt,
                    continue_final_message=continue_final_message,
                    tokenize=False,
                )
            )
            all_images.extend(images)

        if not tokenize:
            return rendered if is_batched else rendered[0]
        processor_kwargs = {
            key: kwargs[key] for key in ("padding", "truncation", "max_length", "padding_side") if key in kwargs
        }
        if is_batched and len(rendered) > 1:
            processor_kwargs.setdefault("padding", True)
        # The chat template already wrote the special tokens.
        outputs = self(
            text=rendered if is_batched else rendered[0],
            images=all_images or None,
            return_tensors=return_tensors,
            add_special_tokens=False,
            **processor_kwargs,
        )
        if return_dict:
            return outputs
        return outputs["input_ids"]

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save the processor so that both transformers 4.57 and 5.x can load it."""
        outputs = super().save_pretrained(save_directory, *args, **kwargs)
        # 4.x reads the image processor from its own file; 5.x nests it in processor_config.json.
        self.image_processor.save_pretrained(save_directory)
        # transformers saves the padding and truncation sides only when they were constructor
        # arguments, and a processor for generation must keep left padding after loading.
        make_tokenizer_config_portable(
            os.path.join(save_directory, "tokenizer_config.json"),
            settings={
                "padding_side": self.tokenizer.padding_side,
                "truncation_side": self.tokenizer.truncation_side,
            },
        )
        return outputs

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values"]


def make_tokenizer_config_portable(path: str, settings: dict | None = None) -> None:
    """Rewrite a tokenizer_config.json written by transformers 5.x into a form 4.57 reads too.

    5.x writes `"tokenizer_class": "TokenizersBackend"`, a class 4.57 lacks, and stores
    `extra_special_tokens` as a list where 4.57 expects a dict. `PreTrainedTokenizerFast`
    names the same fast tokenizer in both versions, and the special tokens stay marked in
    tokenizer.json. `settings` are tokenizer constructor arguments written into the file.
    """
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as file:
        config = json.load(file)
    config.update(settings or {})
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if isinstance(config.get("extra_special_tokens"), list):
        del config["extra_special_tokens"]
    with open(path, "w", encoding="utf-8") as file:
        json.dump(config, file, indent=2, ensure_ascii=False)
        file.write("\n")


__all__ = ["MmfuseImageProcessor", "MmfuseProcessorMixin", "split_chat_content", "to_rgb"]
