"""The `mmfuse train` and `mmfuse evaluate` commands.

Heavy imports (torch, transformers) happen inside `run`, so `mmfuse --help` stays fast.
"""

import os

DATASET_HELP = "'easy_vqa', 'fashion_mnist', or a folder with data.jsonl and the images it names."


def load_model_and_processor(path: str):
    """Load an mmfuse model folder (as written by `mmfuse compose` or `mmfuse train`) and its processor."""
    from mmfuse.cli import CommandError

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CommandError(f"--model {path!r} is not a model folder (no config.json); pass an mmfuse model folder.")
    # Importing this module imported the `mmfuse` package, which registered its model types.
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


def load_dataset_or_fail(name: str, **options):
    """Load a dataset for a command; a bad name, folder or line becomes a one-line command error."""
    from mmfuse.cli import CommandError
    from mmfuse.training.data import load_dataset

    try:
        return load_dataset(name, **options)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as error:
        raise CommandError(str(error)) from error


class TrainCommand:
    """`mmfuse train --model DIR --dataset NAME --output DIR`: train a model and save the result."""

    @staticmethod
    def add_arguments(parser):
        parser.add_argument("--model", required=True, help="mmfuse model folder to start from.")
        parser.add_argument("--dataset", required=True, help=f"Training data: {DATASET_HELP}")
        parser.add_argument("--output", required=True, help="Folder for checkpoints and the trained model.")
        parser.add_argument(
            "--stage",
            default="connector",
            help="Which weights learn: 'connector', 'lora' (connector and LoRA adapters on the LM) or 'full'.",
        )

        parser.add_argument("--limit", type=int, help="Train on this many examples, drawn at random (default: all).")
        parser.add_argument("--epochs", type=float, default=1.0, help="Number of passes over the data.")
        parser.add_argument("--max-steps", type=int, default=-1, help="Stop after this many optimizer steps.")
        parser.add_argument("--batch-size", type=int, default=8, help="Examples per step and process.")
        parser.add_argument(
            "--gradient-accumulation-steps", type=int, default=1, help="Batches summed into one optimizer step."
        )
        parser.add_argument(
            "--learning-rate", type=float, help="Peak learning rate (default: 1e-3 connector, 2e-4 lora, 2e-5 full)."
        )

        parser.add_argument("--lora-rank", type=int, default=16, help="LoRA rank of the 'lora' stage.")
        parser.add_argument("--lora-alpha", type=int, default=32, help="LoRA scaling numerator of the 'lora' stage.")
        parser.add_argument("--train-vision-tower", action="store_true", help="Also train the vision tower.")
        parser.add_argument(
            "--gradient-checkpointing", action="store_true", help="Recompute activations in the backward pass."
        )
        parser.add_argument(
            "--no-feature-cache",
            action="store_true",
            help="Run the frozen vision tower at every step instead of once per image.",
        )

        parser.add_argument("--save-steps", type=int, help="Save a resumable checkpoint every this many steps.")
        parser.add_argument(
            "--resume",
            nargs="?",
            const=True,
            default=None,
            metavar="CHECKPOINT",
            help="Resume from a checkpoint folder, or from the latest one in --output when no folder is given.",
        )
        parser.add_argument("--logging-steps", type=int, default=10, help="Log the loss every this many steps.")
        parser.add_argument("--seed", type=int, default=0, help="Seed of data order, sampling and initialisation.")

    @staticmethod
    def run(args) -> int:
        from mmfuse.cli import CommandError
        from mmfuse.training.trainer import STAGES, train

        if args.stage not in STAGES:
            raise CommandError(f"--stage {args.stage!r} is invalid; use one of {', '.join(STAGES)}.")
        dataset = load_dataset_or_fail(args.dataset, split="train", limit=args.limit, seed=args.seed)
        model, processor = load_model_and_processor(args.model)
        result = train(
            model,
            processor,
            dataset,
            args.output,
            resume_from_checkpoint=args.resume,
            stage=args.stage,
            num_train_epochs=args.epochs,
            max_steps=args.max_steps,
            batch_size=args.batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            learning_rate=args.learning_rate,
            lora_rank=args.lora_rank,
            lora_alpha=args.lora_alpha,
            train_vision_tower=args.train_vision_tower,
            gradient_checkpointing=args.gradient_checkpointing,
            use_feature_cache=False if args.no_feature_cache else None,
            save_steps=args.save_steps,
            logging_steps=args.logging_steps,
            seed=args.seed,
        )
        if result.trainer.is_world_process_zero():
            print(
                f"Trained {result.trainable_parameters:,} of {result.total_parameters:,} parameters for "
                f"{result.trainer.state.global_step} steps in {result.metrics['train_runtime']:.1f} s "
                f"(mean loss {result.metrics['train_loss']:.4f}); saved to {args.output}"
            )
        return 0


class EvaluateCommand:
    """`mmfuse evaluate --model DIR`: answer accuracy by greedy generation, as JSON and a markdown table."""

    @staticmethod
    def add_arguments(parser):
        parser.add_argument("--model", required=True, help="mmfuse model folder to evaluate.")
        parser.add_argument(
            "--datasets",
            nargs="+",
            default=["easy_vqa", "fashion_mnist"],
            help=f"Test data, one or more of: {DATASET_HELP} Named datasets use their test split.",
        )
        parser.add_argument("--output", help="Folder for results.json and results.md (default: print only).")
        parser.add_argument("--limit", type=int, help="Evaluate this many examples per dataset (default: all).")
        parser.add_argument("--batch-size", type=int, default=16, help="Prompts generated together.")
        parser.add_argument(
            "--max-new-tokens", type=int, default=16, help="Maximum number of generated tokens per answer."
        )
        parser.add_argument("--seed", type=int, default=0, help="Seed of the --limit sample.")

    @staticmethod
    def run(args) -> int:
        from mmfuse.training.evaluate import EVALUATIONS, evaluate_dataset, format_markdown_table, write_report

        model, processor = load_model_and_processor(args.model)
        options = {"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens}
        results = {}
        for name in args.datasets:
            if name in EVALUATIONS:
                results[name] = EVALUATIONS[name](model, processor, limit=args.limit, seed=args.seed, **options)
            else:
                dataset = load_dataset_or_fail(name, split="test", limit=args.limit, seed=args.seed)
                results[name] = evaluate_dataset(model, processor, dataset, **options)
        print(format_markdown_table(results), end="")
        if args.output:
            json_path, markdown_path = write_report(results, args.output)
            print(f"Wrote {json_path} and {markdown_path}")
        return 0
