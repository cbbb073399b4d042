"""The `mmfuse` command line."""

import argparse
import importlib
import logging
import sys

# Each command lives in its own module, imported only when it runs, so `mmfuse --help` stays fast.
# A module defines `add_arguments(parser)` and `run(args) -> int`; "module:Name" names an object in
# the module that defines them, for modules that hold several commands.
COMMANDS = {
    "convert": ("mmfuse.conversion.convert", "Convert a checkpoint of another implementation into an mmfuse folder."),
    "train": ("mmfuse.training.commands:TrainCommand", "Train a model on easy-VQA, Fashion-MNIST or your own data."),
    "evaluate": ("mmfuse.training.commands:EvaluateCommand", "Measure answer accuracy by greedy generation."),
    "train-vqgan": ("mmfuse.training.vqgan_command", "Train a VQ-GAN image tokenizer from scratch."),
    "compose": ("mmfuse.conversion.compose_command", "Compose a new model from a pretrained vision tower and LM."),
    "push": ("mmfuse.conversion.push", "Upload an mmfuse folder to the Hugging Face Hub."),
    "demo": ("mmfuse.demo.run", "Compose SmolLM2 with EfficientNet-Lite, train on easy-VQA and report."),
}


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmfuse", description="Compose, convert, train and publish mmfuse models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Log at INFO level.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        module_name, _, attribute = module_name.partition(":")
        module = importlib.import_module(module_name)
        if attribute:
            module = getattr(module, attribute)
        module.add_arguments(subparser)
        subparser.set_defaults(run=module.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.run(args) or 0
    except CommandError as error:
        print(f"mmfuse {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
