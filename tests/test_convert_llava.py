"""`mmfuse convert llava` and `mmfuse convert llava-original` on tiny random models built here."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from subprocess_helpers import compat_python, run_hub_worker
from tiny import build_tokenizer, text_config, vision_config
from transformers import (
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

import mmfuse  # noqa: F401  (registers the mmfuse Auto classes)
from mmfuse.cli import CommandError, main
from mmfuse.conversion import llava as llava_converter
from mmfuse.conversion.llava import image_processor_from_clip
from mmfuse.conversion.parity import PIL_BACKEND_KWARGS

try:  # transformers 5.x: pin the PIL backend, whose resize MmfuseImageProcessor reproduces
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
except ImportError:  # transformers 4.x: the slow processor resizes with PIL
    CLIPImageProcessorPil = CLIPImageProcessor

IMAGE_TOKEN = "<image>"
PROMPT = "<image>\nIs there a cat? <image> What colour is the shape?"
TOLERANCE = 1e-4
MAX_NEW_TOKENS = 8
LLAVA_CASES = {
    "layer-2-default": {"vision_feature_layer": -2, "vision_feature_select_strategy": "default"},
    "layers-list-full": {"vision_feature_layer": [-3, -1], "vision_feature_select_strategy": "full"},
    "layers-list-default-tied": {
        "vision_feature_layer": [0, -2],
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": True,
        "multimodal_projector_bias": False,
        "projector_hidden_act": "silu",
    },
    "layer-1-full": {"vision_feature_layer": -1, "vision_feature_select_strategy": "full"},
}


def config_values(values: dict) -> dict:
    values = dict(values)
    values.pop("model_type")
    return values


def square_images(side: int, count: int = 2) -> list:
    rng = np.random.default_rng(side)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(count)]


def build_llava_folder(folder, case: dict) -> str:
    """Save a tiny random Llava model and its LlavaProcessor (CLIP image processor) into `folder`."""
    tokenizer = build_tokenizer()
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    case = dict(case)
    tie = case.pop("tie_word_embeddings", False)
    text_values = config_values(text_config(vocab_size=len(tokenizer) + 3, tie_word_embeddings=tie))
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**config_values(vision_config())),
        text_config=LlamaConfig(**text_values),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        tie_word_embeddings=tie,
        **case,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    # Random init gives near-zero logits; wider weights make greedy tokens depend on the image.
    with torch.no_grad():
        for parameter in model.model.multi_modal_projector.parameters():
            parameter.mul_(20.0)
    model.save_pretrained(folder)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}),
        tokenizer=tokenizer,
        patch_size=6,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
        chat_template=tokenizer.chat_template,
    )
    processor.save_pretrained(folder)
    return os.fspath(folder)


def convert(*arguments) -> int:
    return main(["convert", *map(os.fspath, arguments)])


def error_line(capsys) -> str:
    """Return the command's one error line; transformers' progress bars also write to stderr."""
    error = capsys.readouterr().err
    lines = [line for line in error.splitlines() if line.startswith("mmfuse convert: error: ")]
    assert len(lines) == 1, error
    return lines[0]


@pytest.fixture(scope="module")
def llava_folders(tmp_path_factory):
    return {name: build_llava_folder(tmp_path_factory.mktemp(name), case) for name, case in LLAVA_CASES.items()}


@pytest.fixture(scope="module")
def converted_folder(llava_folders, tmp_path_factory):
    output = tmp_path_factory.mktemp("converted") / "layer-2-default"
    assert convert("llava", "--input", llava_folders["layer-2-default"], "--output", output) == 0
    return os.fspath(output)


def source_outputs(folder: str, side: int = 45):
    """Inputs from the LlavaProcessor, the Llava model's logits and its greedy tokens."""
    processor = AutoProcessor.from_pretrained(folder, **PIL_BACKEND_KWARGS)
    inputs = processor(text=PROMPT, images=square_images(side), return_tensors="pt")
    inputs = {name: inputs[name] for name in ("input_ids", "attention_mask", "pixel_values")}
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return inputs, logits, tokens


@pytest.mark.parametrize("case", list(LLAVA_CASES))
def test_llava_conversion_reproduces_source(case, llava_folders, tmp_path):
    source = llava_folders[case]
    output = tmp_path / "converted"
    assert convert("llava", "--input", source, "--output", output) == 0

    inputs, source_logits, source_tokens = source_outputs(source)
    processor = AutoProcessor.from_pretrained(output)
    converted_inputs = processor(text=PROMPT, images=square_images(45), return_tensors="pt")
    assert torch.equal(converted_inputs["input_ids"], inputs["input_ids"])
    assert float((converted_inputs["pixel_values"] - inputs["pixel_values"]).abs().max()) <= 1e-6

    model = AutoModelForImageTextToText.from_pretrained(output).eval()
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    assert float((logits - source_logits).abs().max()) <= TOLERANCE
    assert tokens.tolist() == source_tokens.tolist()

    source_config = LlavaConfig.from_pretrained(source)
    config = model.config
    assert config.model_type == "mmfuse_projection"
    assert config.vision_feature_layer == source_config.vision_feature_layer
    assert config.vision_feature_select_strategy == source_config.vision_feature_select_strategy
    assert config.projector_hidden_act == source_config.projector_hidden_act
    assert config.projector_bias == source_config.multimodal_projector_bias
    assert config.image_token_id == source_config.image_token_id
    assert config.tie_word_embeddings == source_config.tie_word_embeddings
    assert processor.chat_template == AutoProcessor.from_pretrained(source).chat_template


def test_converted_folder_loads_without_mmfuse(converted_folder, llava_folders, tmp_path):
    inputs, source_logits, source_tokens = source_outputs(llava_folders["layer-2-default"])
    request = {"inputs": inputs, "generate_kwargs": {"max_new_tokens": MAX_NEW_TOKENS}}
    result = run_hub_worker(converted_folder, sys.executable, request, tmp_path)
    assert result["mmfuse_importable"] is False
    assert result["model_class"] == "MmfuseProjectionForConditionalGeneration"
    assert result["missing_keys"] == []
    assert float((result["logits"] - source_logits).abs().max()) <= TOLERANCE
    assert result["tokens"].tolist() == source_tokens.tolist()


def test_converted_folder_loads_on_transformers_457(converted_folder, llava_folders, tmp_path):
    python = compat_python()
    inputs, source_logits, source_tokens = source_outputs(llava_folders["layer-2-default"])
    request = {"inputs": inputs, "generate_kwargs": {"max_new_tokens": MAX_NEW_TOKENS}}
    result = run_hub_worker(converted_folder, python, request, tmp_path)
    assert result["transformers_version"].startswith("4.57")
    assert result["missing_keys"] == []
    assert float((result["logits"] - source_logits).abs().max()) <= TOLERANCE
    assert result["tokens"].tolist() == source_tokens.tolist()


def test_failed_parity_writes_nothing(llava_folders, tmp_path, monkeypatch, capsys):
    read_checkpoint = llava_converter.read_checkpoint

    def tampered(folder):
        state_dict = read_checkpoint(folder)
        state_dict["multi_modal_projector.linear_2.bias"] = state_dict["multi_modal_projector.linear_2.bias"] + 0.05
        return state_dict

    monkeypatch.setattr(llava_converter, "read_checkpoint", tampered)
    output = tmp_path / "converted"
    assert convert("llava", "--input", llava_folders["layer-2-default"], "--output", output) == 1
    error = error_line(capsys)
    assert "logits differ from the source by up to" in error
    assert "tolerance 1.0e-04" in error
    assert not output.exists()
    assert os.listdir(tmp_path) == []


def test_existing_output_needs_overwrite(llava_folders, tmp_path, capsys):
    output = tmp_path / "converted"
    output.mkdir()
    (output / "marker.txt").write_text("keep me")
    assert convert("llava", "--input", llava_folders["layer-1-full"], "--output", output) == 1
    error = error_line(capsys)
    assert os.fspath(output) in error
    assert "--overwrite" in error
    assert (output / "marker.txt").exists()

    assert convert("llava", "--input", llava_folders["layer-1-full"], "--output", output, "--overwrite") == 0
    assert not (output / "marker.txt").exists()
    assert (output / "model.safetensors").exists()


def test_bad_input_folder_errors(tmp_path, capsys):
    missing = tmp_path / "missing"
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"not a folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    for source, expected in ((missing, "does not exist"), (a_file, "is not a folder"), (empty, "has no config.json")):
        assert convert("llava", "--input", source, "--output", tmp_path / "out") == 1
        error = error_line(capsys)
        assert os.fspath(source) in error
        assert expected in error
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders regardless of their permissions")
def test_unreadable_input_folder_errors(llava_folders, tmp_path, capsys):
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    unreadable.chmod(0)
    try:
        assert convert("llava", "--input", unreadable, "--output", tmp_path / "out") == 1
    finally:
        unreadable.chmod(0o755)
    error = error_line(capsys)
    assert os.fspath(unreadable) in error
    assert "not readable" in error


def test_mmfuse_command_converts(llava_folders, tmp_path):
    executable = os.path.join(os.path.dirname(sys.executable), "mmfuse")
    output = tmp_path / "converted"
    command = [executable, "convert", "llava", "--input", llava_folders["layer-1-full"], "--output", output]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith(f"Wrote {output}")
    assert "greedy tokens identical" in completed.stdout
    assert (output / "config.json").exists()


def test_image_processor_mapping():
    clip = CLIPImageProcessorPil(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}, resample=0)
    mapped = image_processor_from_clip(clip, image_size=30)
    assert mapped.resample == "nearest"
    assert mapped.crop_to_square
    images = square_images(71, count=1)
    expected = clip(images, return_tensors="pt")["pixel_values"]
    assert float((mapped(images, return_tensors="pt")["pixel_values"] - expected).abs().max()) <= 1e-6

    # Shortest-edge resize and center crop: identical pixel values for portrait and landscape images too.
    rng = np.random.default_rng(5)
    for height, width in [(47, 71), (71, 47), (31, 30), (30, 91)]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        for resample in (0, 3):
            source = CLIPImageProcessorPil(
                size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}, resample=resample
            )
            expected = source(image, return_tensors="pt")["pixel_values"]
            pixel_values = image_processor_from_clip(source, image_size=30)(image, return_tensors="pt")["pixel_values"]
            assert pixel_values.shape == expected.shape == (1, 3, 30, 30)
            assert float((pixel_values - expected).abs().max()) <= 1e-6, (height, width, resample)

    stretching = CLIPImageProcessorPil(size={"height": 30, "width": 30}, do_center_crop=False)
    assert not image_processor_from_clip(stretching, image_size=30).crop_to_square

    cropping = CLIPImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 30, "width": 30})
    with pytest.raises(CommandError, match="resizes to 36 px and then crops 30 px"):
        image_processor_from_clip(cropping, image_size=30)
    with pytest.raises(CommandError, match="image_size=24"):
        image_processor_from_clip(clip, image_size=24)
    rescaling = CLIPImageProcessorPil(size={"shortest_edge": 30}, crop_size=None, rescale_factor=0.5)
    with pytest.raises(CommandError, match="rescale_factor=0.5"):
        image_processor_from_clip(rescaling, image_size=30)


# The original LLaVA release: an LM folder, mm_projector.bin and a CLIP folder.

IMAGE_TOKEN_INDEX = -200  # the marker of an image in LLaVA's input_ids
ORIGINAL_CASES = {
    # LLaVA's own config.json names the settings, and the vision folder contains a CLIP vision model.
    "config-mlp2x-patch": {"projector_layers": (0, 2), "select_layer": -2, "keep_cls": False, "options": []},
    # A plain Llama folder with the settings as options, and a full CLIP model in the vision folder.
    "options-linear-cls-patch": {
        "projector_layers": (0,),
        "select_layer": -1,
        "keep_cls": True,
        "options": ["--vision-select-layer", "-1", "--vision-select-feature", "cls_patch"],
    },
}


def build_original_release(root, case: dict) -> dict:
    tokenizer = build_tokenizer()
    torch.manual_seed(1)
    language_model = LlamaForCausalLM(LlamaConfig(**config_values(text_config(vocab_size=len(tokenizer)))))
    language_model.save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    if not case["options"]:
        config_path = root / "lm" / "config.json"
        config = json.loads(config_path.read_text())
        config.update(
            model_type="llava_llama",
            architectures=["LlavaLlamaForCausalLM"],
            mm_projector_type="mlp2x_gelu",
            mm_vision_select_layer=case["select_layer"],
            mm_vision_select_feature="patch",
            mm_hidden_size=24,
            mm_use_im_start_end=False,
            image_aspect_ratio="pad",
        )
        config_path.write_text(json.dumps(config))

    vision_values = config_values(vision_config())
    if case["options"]:
        text_values = {"hidden_size": 16, "intermediate_size": 19, "num_hidden_layers": 1, "num_attention_heads": 2}
        CLIPModel(CLIPConfig(vision_config=vision_values, text_config=text_values)).save_pretrained(root / "vision")
    else:
        CLIPVisionModel(CLIPVisionConfig(**vision_values)).save_pretrained(root / "vision")
    CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}).save_pretrained(
        root / "vision"
    )

    projector = {}
    in_features = 24
    for index in case["projector_layers"]:
        projector[f"model.mm_projector.{index}.weight"] = torch.randn(32, in_features) * 0.3
        projector[f"model.mm_projector.{index}.bias"] = torch.randn(32) * 0.3
        in_features = 32
    torch.save(projector, root / "mm_projector.bin")
    return {"lm": root / "lm", "vision": root / "vision", "projector": root / "mm_projector.bin"}


def llava_reference_embeddings(paths: dict, case: dict, input_ids: list, pixel_values: torch.Tensor):
    """LLaVA's forward up to the LM, written from its description: select, project, splice."""
    vision = CLIPVisionModel.from_pretrained(paths["vision"]).eval()
    language_model = LlamaForCausalLM.from_pretrained(paths["lm"], config=LlamaConfig.from_pretrained(paths["lm"]))
    projector = torch.load(paths["projector"], weights_only=True)

    hidden = vision(pixel_values, output_hidden_states=True).hidden_states[case["select_layer"]]
    features = hidden if case["keep_cls"] else hidden[:, 1:]
    features = F.linear(features, projector["model.mm_projector.0.weight"], projector["model.mm_projector.0.bias"])
    if 2 in case["projector_layers"]:
        weight, bias = projector["model.mm_projector.2.weight"], projector["model.mm_projector.2.bias"]
        features = F.linear(F.gelu(features), weight, bias)

    ids = torch.tensor(input_ids)
    markers = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
    embed = language_model.get_input_embeddings()
    pieces, start = [], 0
    for image_index, position in enumerate(markers):
        pieces += [embed(ids[start:position]), features[image_index]]
        start = position + 1
    pieces.append(embed(ids[start:]))
    return language_model.eval(), torch.cat(pieces).unsqueeze(0)


@pytest.mark.parametrize("case_name", list(ORIGINAL_CASES))
def test_llava_original_matches_reference(case_name, tmp_path):
    case = ORIGINAL_CASES[case_name]
    paths = build_original_release(tmp_path, case)
    output = tmp_path / "converted"
    arguments = ["--input", paths["lm"], "--projector", paths["projector"], "--vision", paths["vision"]]
    assert convert("llava-original", *arguments, "--output", output, *case["options"]) == 0

    processor = AutoProcessor.from_pretrained(output)
    model = AutoModelForImageTextToText.from_pretrained(output).eval()
    tokenizer = build_tokenizer()
    # LLaVA tokenizes the text between images separately and marks each image with one index.
    reference_ids = []
    for index, chunk in enumerate(PROMPT.split(IMAGE_TOKEN)):
        if index:
            reference_ids.append(IMAGE_TOKEN_INDEX)
        reference_ids += tokenizer(chunk, add_special_tokens=False)["input_ids"]

    images = square_images(45)
    inputs = processor(text=PROMPT, images=images, return_tensors="pt")
    expanded = []
    for token in reference_ids:
        expanded += (
            [processor.image_token_id] * model.config.num_image_tokens if token == IMAGE_TOKEN_INDEX else [token]
        )
    assert inputs["input_ids"][0].tolist() == expanded
    expected_pixels = AutoImageProcessor.from_pretrained(paths["vision"], **PIL_BACKEND_KWARGS)(
        images, return_tensors="pt"
    )["pixel_values"]
    assert float((inputs["pixel_values"] - expected_pixels).abs().max()) <= 1e-6

    with torch.no_grad():
        language_model, inputs_embeds = llava_reference_embeddings(paths, case, reference_ids, inputs["pixel_values"])
        reference_logits = language_model(inputs_embeds=inputs_embeds).logits
        reference_tokens = language_model.generate(
            inputs_embeds=inputs_embeds, max_new_tokens=MAX_NEW_TOKENS, do_sample=False
        )
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    vocab_size = reference_logits.shape[-1]
    assert float((logits[..., :vocab_size] - reference_logits).abs().max()) <= TOLERANCE
    assert tokens[:, inputs["input_ids"].shape[1] :].tolist() == reference_tokens.tolist()
    assert model.config.projector_type == ("mlp2x_gelu" if 2 in case["projector_layers"] else "linear")


def test_llava_original_bad_inputs(tmp_path, capsys):
    case = ORIGINAL_CASES["config-mlp2x-patch"]
    paths = build_original_release(tmp_path, case)
    output = tmp_path / "converted"
    base = {"--input": paths["lm"], "--projector": paths["projector"], "--vision": paths["vision"]}

    def run(extra=(), **replaced):
        arguments = {**base, **{f"--{name}": value for name, value in replaced.items()}}
        return convert(
            "llava-original", *[item for pair in arguments.items() for item in pair], "--output", output, *extra
        )

    assert run(["--projector-type", "linear"]) == 1
    error = error_line(capsys)
    assert os.fspath(paths["projector"]) in error
    assert "--projector-type" in error

    assert run(projector=tmp_path / "missing.bin") == 1
    assert os.fspath(tmp_path / "missing.bin") in error_line(capsys)

    (tmp_path / "broken.bin").write_bytes(b"not a pickle")
    assert run(projector=tmp_path / "broken.bin") == 1
    assert "could not read the projector file" in error_line(capsys)

    assert run(vision=tmp_path / "no-vision") == 1
    assert os.fspath(tmp_path / "no-vision") in error_line(capsys)
    assert not output.exists()


def test_output_folder_gets_default_permissions(tmp_path):
    from safetensors.torch import save_file

    from mmfuse.conversion.output import atomic_output_dir

    previous = os.umask(0o022)
    try:
        with atomic_output_dir(str(tmp_path / "out")) as staging:
            os.makedirs(os.path.join(staging, "sub"))
            save_file({"weight": torch.zeros(2)}, os.path.join(staging, "sub", "model.safetensors"))
            with open(os.path.join(staging, "config.json"), "w") as file:
                file.write("{}")
    finally:
        os.umask(previous)
    # mkdtemp creates 0700 folders and safetensors writes 0600 files; the published folder follows the umask.
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "sub").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "sub" / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "out" / "config.json").stat().st_mode & 0o777 == 0o644
