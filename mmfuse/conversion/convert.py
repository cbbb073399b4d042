"""`mmfuse convert FORMAT --input SRC --output DST`: one sub-command per source format."""

import importlib

# Source format -> module that defines `add_arguments(parser)` and `run(args)`.
CONVERTERS = {
    "llava": "mmfuse.conversion.llava",
    "llava-original": "mmfuse.conversion.llava_original",
    "janus-vq": "mmfuse.conversion.janus_vq",
    "chameleon": "mmfuse.conversion.chameleon",
    "idefics": "mmfuse.conversion.idefics",
}


def add_arguments(parser):
    formats = parser.add_subparsers(dest="source_format", required=True, metavar="FORMAT")
    for name, module_name in CONVERTERS.items():
        module = importlib.import_module(module_name)
        subparser = formats.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__)
        subparser.add_argument("--input", required=True, help="Source checkpoint folder.")
        subparser.add_argument("--output", required=True, help="mmfuse folder to write; must not exist.")
        subparser.add_argument("--overwrite", action="store_true", help="Replace an existing output folder.")
        subparser.add_argument(
            "--tolerance",
            type=float,
            default=1e-4,
            help="Largest allowed logit difference (fp32) in the parity check.",
        )
        subparser.add_argument(
            "--push-to-hub",
            metavar="NAME",
            default=None,
            help="Also upload the written folder to this Hub repository.",
        )
        module.add_arguments(subparser)
        subparser.set_defaults(convert=module.run)


def run(args) -> int:
    status = args.convert(args)
    if not status and args.push_to_hub:
        from .push import push_to_hub

        commit = push_to_hub(args.output, args.push_to_hub)
        print(f"Pushed {args.output} to {args.push_to_hub}: {commit.commit_url}")
    return status
