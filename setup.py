from setuptools import find_packages, setup

setup(
    name="mmfuse",
    version="0.1.0",
    description="Turn any pretrained causal LM into a vision-language model, as Hugging Face transformers models.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["mmfuse", "mmfuse.*"]),
    install_requires=[
        "torch>=2.4",
        "transformers>=4.57",
        "huggingface_hub>=0.34",
        "safetensors>=0.4.3",
        "tokenizers>=0.21",
        "accelerate>=1.0",
        "numpy>=1.24",
        "pillow>=10.0",
        "tqdm>=4.66",
    ],
    extras_require={
        "test": ["pytest>=8.0", "ruff>=0.6", "peft>=0.13", "easy-vqa>=1.0", "gguf>=0.10", "matplotlib>=3.8"],
        "timm": ["timm>=1.0"],
        "demo": ["gguf>=0.10", "peft>=0.13", "easy-vqa>=1.0", "scikit-image>=0.22", "matplotlib>=3.8"],
    },
    entry_points={"console_scripts": ["mmfuse=mmfuse.cli:main"]},
)
