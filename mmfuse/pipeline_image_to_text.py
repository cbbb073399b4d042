"""The `image-to-text` pipeline that mmfuse ships inside every saved model folder.

transformers 5 dropped the `image-to-text` task: 5.25 redirects it to `image-text-to-text`, which
rejects an image without text. `save_pretrained` of an mmfuse model therefore copies this
file into the folder and names it under `custom_pipelines` in config.json, so that
`pipeline("image-to-text", model=DIR, trust_remote_code=True)` builds this class on transformers
4.57 and 5.x alike.

This file is Hub code: it imports only `torch`, `PIL` and `transformers`.
"""

import torch
from transformers import GenerationConfig, Pipeline
from transformers.image_utils import load_image
from transformers.utils import logging

logger = logging.get_logger(__name__)


class MmfuseImageToTextPipeline(Pipeline):
    """Caption images, optionally conditioned on a text prompt, with any mmfuse model.

    The processor builds the model inputs, so the pipeline works for every fusion type whose
    processor expands its image placeholder (`processor.image_token`). Each image is one
    prompt: the placeholder, followed by `prompt` when one is given.

    Example:

    ```python
    captioner = pipeline("image-to-text", model="org/my-vlm", trust_remote_code=True)
    captioner(image)  # [{"generated_text": "a cat on a sofa"}]
    captioner([image_1, image_2], prompt="Describe the image.", max_new_tokens=20)
    ```

    `generated_text` holds only the generated continuation, never the prompt.
    """

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    _pipeline_calls_generate = True
    _default_generation_config = GenerationConfig(max_new_tokens=256)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.processor is None:
            raise ValueError(
                f"The image-to-text pipeline needs the model's processor, but none was loaded for "
                f"{type(self.model).__name__}; save the processor into the model folder with "
                "`processor.save_pretrained(DIR)` or pass `processor=` to `pipeline()`."
            )
        if getattr(self.processor, "image_token", None) is None:
            raise ValueError(
                f"The processor {type(self.processor).__name__} has no `image_token`; the image-to-text pipeline "
                "needs an mmfuse processor that expands an image placeholder."
            )
        if self.tokenizer is None:
            self.tokenizer = self.processor.tokenizer
        # Batched generation with a decoder-only LM needs the padding on the left.
        self.tokenizer.padding_side = "left"

    def _sanitize_parameters(self, prompt=None, max_new_tokens=None, generate_kwargs=None, timeout=None, **kwargs):
        preprocess_params = {}
        if prompt is not None:
            if not isinstance(prompt, str):
                raise TypeError(f"`prompt` must be one string for all images, got {type(prompt).__name__}.")
            preprocess_params["prompt"] = prompt
        if timeout is not None:
            preprocess_params["timeout"] = timeout

        forward_params = dict(generate_kwargs or {})
        if max_new_tokens is not None:
            if "max_new_tokens" in forward_params:
                raise ValueError(
                    "`max_new_tokens` is given both as an argument and inside `generate_kwargs`; pass it once."
                )
            forward_params["max_new_tokens"] = max_new_tokens
        # Other keywords (do_sample, num_beams, ...) go to `generate` unchanged.
        forward_params.update(kwargs)
        return preprocess_params, forward_params, {}

    def __call__(self, inputs=None, **kwargs):
        """Generate text for one image or a list of images.

        Args:
            inputs: a PIL image, a local path or URL, or a list of these (`images=` works too).
            prompt (`str`, *optional*): text that follows the image placeholder in every prompt.
            max_new_tokens (`int`, *optional*): the maximum number of generated tokens, 256 by default.
            generate_kwargs (`dict`, *optional*): further arguments for `model.generate`.
            batch_size (`int`, *optional*): images per `generate` call.

        Returns:
            `[{"generated_text": str}]` for one image, a list of such lists for a list of images.
        """
        if "images" in kwargs:
            if inputs is not None:
                raise ValueError("Pass the images either as the first argument or as `images=`, not both.")
            inputs = kwargs.pop("images")
        if inputs is None:
            raise ValueError("The image-to-text pipeline needs an image; pass a PIL image, a path or a URL.")
        return super().__call__(inputs, **kwargs)

    def preprocess(self, image, prompt=None, timeout=None):
        image = load_image(image, timeout=timeout)
        text = self.processor.image_token + (prompt or "")
        return self.processor(text=text, images=[image], return_tensors="pt")

    def _forward(self, model_inputs, **generate_kwargs):
        if hasattr(self, "_prepare_generate_kwargs"):
            # transformers 5.x merges the pipeline's own defaults and the call's parameters here.
            generate_kwargs = self._prepare_generate_kwargs(generate_kwargs, return_dict_in_generate=False)
        elif "generation_config" not in generate_kwargs:
            # transformers 4.x prepares `self.generation_config` in `Pipeline.__init__`.
            generate_kwargs["generation_config"] = self.generation_config

        prompt_length = model_inputs["input_ids"].shape[1]
        generated = self.model.generate(**model_inputs, **generate_kwargs)
        # Left padding lines all prompts up, so the new tokens start at the same column.
        return {"generated_token_ids": generated[:, prompt_length:]}

    def postprocess(self, model_outputs):
        token_ids = model_outputs["generated_token_ids"]
        if isinstance(token_ids, torch.Tensor) and token_ids.dim() == 1:
            token_ids = token_ids.unsqueeze(0)
        texts = self.processor.batch_decode(token_ids, skip_special_tokens=True)
        return [{"generated_text": text} for text in texts]


__all__ = ["MmfuseImageToTextPipeline"]
