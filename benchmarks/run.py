"""Run the benchmarks and write JSON, markdown and PNG results.

python -m benchmarks.run                 # default sizes, about 10 minutes on 2 CPU cores
python -m benchmarks.run --tiny          # tiny models, a smoke test of the runner
"""

import argparse
import importlib
import json
import os
import platform
import sys
import time

import torch

from .measure import machine_description

# Section name -> module with `run(settings) -> dict` and `markdown(results) -> str`.
SECTIONS = {
    "projection": "benchmarks.projection",
    "overhead": "benchmarks.overhead",
    "cross_attention": "benchmarks.cross_attention",
    "context": "benchmarks.context",
    "vq": "benchmarks.vq",
    "training": "benchmarks.training",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="Use tiny models: checks the runner, not the speed.")
    parser.add_argument(
        "--repeats", type=int, default=None, help="Measured repetitions per figure (default 3, tiny 2)."
    )
    parser.add_argument(
        "--decode-steps",
        type=int,
        default=None,
        help="Tokens per generate call whose decode steps are timed (default 32, tiny 4).",
    )
    parser.add_argument("--new-tokens", type=int, default=None, help="Tokens per generate call (default 64, tiny 8).")
    parser.add_argument(
        "--output", default="benchmarks/results", help="Folder for results.json, results.md and plots."
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's own choice)."
    )
    parser.add_argument("--only", nargs="*", choices=sorted(SECTIONS), help="Run only these sections.")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.tiny else 3
    if args.decode_steps is None:
        args.decode_steps = 4 if args.tiny else 32
    if args.new_tokens is None:
        args.new_tokens = 8 if args.tiny else 64
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    report = {
        "machine": machine_description(),
        "python": platform.python_version(),
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {
            "tiny": args.tiny,
            "repeats": args.repeats,
            "new_tokens": args.new_tokens,
            "decode_steps": args.decode_steps,
            "threads": torch.get_num_threads(),
        },
        "load_average_at_start": os.getloadavg()[0],
        "sections": {},
    }
    markdown = [f"Machine: {report['machine']}. Command: `{report['command'].strip()}`.", ""]
    loads = []
    for name in args.only or SECTIONS:
        module = importlib.import_module(SECTIONS[name])
        started = time.perf_counter()
        results = module.run(args, output_dir=args.output)
        results["seconds"] = time.perf_counter() - started
        # The 1-minute load average shows whether other work shared the CPUs during the section.
        results["load_average"] = os.getloadavg()[0]
        report["sections"][name] = results
        markdown.append(module.markdown(results))
        loads.append(f"{name} {results['load_average']:.1f} ({results['seconds']:.0f} s)")
        print(f"{name}: done in {results['seconds']:.0f} s", flush=True)

    markdown.append(
        f"1-minute load average at the end of each section (wall time): {', '.join(loads)}; the machine has "
        f"{os.cpu_count()} CPUs."
    )
    with open(os.path.join(args.output, "results.json"), "w") as file:
        json.dump(report, file, indent=2)
    with open(os.path.join(args.output, "results.md"), "w") as file:
        file.write("\n".join(markdown) + "\n")
    print(f"wrote {args.output}/results.json and results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
