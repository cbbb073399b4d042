"""`mmfuse train-vqgan`: train a VQ-GAN image tokenizer from scratch and save it as an mmfuse folder.

The defaults give a small tokenizer for 64x64 images (easy-VQA): downsampling 8, so 8x8 = 64 codes per
image, a codebook of 512 entries of dimension 8 looked up by Euclidean distance, a squared-error
reconstruction loss, EMA codebook updates and dead-code restarts. On easy-VQA, the cosine lookup together with
the L1 loss (`--codebook-normalization l2 --reconstruction-loss l1`) gave grey shapes after the same run.
"""

import os
import time

import torch

from ..cli import CommandError
from ..configuration_vqgan import MmfuseVQGANConfig
from ..conversion.output import check_output_dir
from ..modeling_vqgan import MmfuseVQGANModel
from .vqgan import DATASETS, VQGANTrainingArguments, load_images, train_vqgan


def add_arguments(parser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default="easy-vqa", help="Training images.")
    data.add_argument("--data-dir", help="Image folder for --dataset folder (searched recursively).")
    data.add_argument("--limit", type=int, help="Train on this many images, drawn at random (default: all).")
    data.add_argument("--eval-images", type=int, default=500, help="Held-out images for the before/after figures.")
    parser.add_argument("--output", required=True, help="Folder to write the tokenizer and samples/ to.")
    parser.add_argument("--overwrite", action="store_true", help="Write into an existing output folder.")

    model = parser.add_argument_group("model")
    model.add_argument("--resolution", type=int, default=64, help="Image side in pixels.")
    model.add_argument("--base-channels", type=int, default=16, help="Channels of the first level.")
    model.add_argument(
        "--channel-multipliers",
        default="1,2,2,4",
        help="Comma-separated multipliers, one per level; downsampling is 2 ** (levels - 1).",
    )
    model.add_argument("--num-res-blocks", type=int, default=1, help="Residual blocks per encoder level.")
    model.add_argument("--norm-num-groups", type=int, default=8, help="GroupNorm groups.")
    model.add_argument("--latent-channels", type=int, default=32, help="Channels of the encoder output.")
    model.add_argument("--embed-dim", type=int, default=8, help="Dimension of a codebook entry.")
    model.add_argument("--codebook-size", type=int, default=512, help="Number of codebook entries.")
    model.add_argument(
        "--codebook-normalization",
        choices=("none", "l2", "l2_decode"),
        default="none",
        help="'none' looks codes up by Euclidean distance, 'l2' by cosine distance.",
    )

    training = parser.add_argument_group("training")
    training.add_argument("--steps", type=int, default=800, help="Optimizer steps.")
    training.add_argument("--batch-size", type=int, default=16, help="Images per step.")
    training.add_argument("--learning-rate", type=float, default=1e-3, help="Adam learning rate.")
    training.add_argument(
        "--reconstruction-loss", choices=("l1", "mse"), default="mse", help="Pixel loss: squared or absolute error."
    )
    training.add_argument(
        "--codebook-update", choices=("ema", "gradient"), default="ema", help="How codebook entries are learned."
    )
    training.add_argument("--ema-decay", type=float, default=0.95, help="Decay of the EMA codebook updates.")
    training.add_argument(
        "--no-restart-dead-codes",
        action="store_true",
        help="Keep entries that no image uses instead of moving them onto recent encoder outputs.",
    )
    training.add_argument("--restart-every", type=int, default=10, help="Steps between dead-code restarts.")
    training.add_argument("--discriminator", action="store_true", help="Add a PatchGAN discriminator (hinge loss).")
    training.add_argument("--discriminator-start", type=int, default=200, help="First step of the GAN loss.")
    training.add_argument("--discriminator-weight", type=float, default=0.1, help="Weight of the GAN loss.")
    training.add_argument("--sample-every", type=int, default=100, help="Steps between reconstruction PNGs.")
    training.add_argument("--seed", type=int, default=0, help="Seed of initialisation, batches and restarts.")
    training.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice).")


def parse_multipliers(text: str) -> list:
    try:
        multipliers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise CommandError(f"--channel-multipliers {text!r} is invalid; give integers such as 1,2,2,4.") from error
    if not multipliers:
        raise CommandError("--channel-multipliers is empty; give one integer per level, such as 1,2,2,4.")
    return multipliers


def run(args) -> int:
    if not args.overwrite:
        check_output_dir(args.output, overwrite=False)
    if args.dataset == "folder" and not args.data_dir:
        raise CommandError("--dataset folder needs --data-dir with the training images.")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        config = MmfuseVQGANConfig(
            resolution=args.resolution,
            base_channels=args.base_channels,
            channel_multipliers=parse_multipliers(args.channel_multipliers),
            num_res_blocks=args.num_res_blocks,
            attn_resolutions=[],
            norm_num_groups=args.norm_num_groups,
            latent_channels=args.latent_channels,
            embed_dim=args.embed_dim,
            codebook_size=args.codebook_size,
            codebook_normalization=args.codebook_normalization,
        )
        training_args = VQGANTrainingArguments(
            num_steps=args.steps,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            reconstruction_loss=args.reconstruction_loss,
            codebook_update=args.codebook_update,
            ema_decay=args.ema_decay,
            restart_dead_codes=not args.no_restart_dead_codes,
            restart_every=args.restart_every,
            discriminator=args.discriminator,
            discriminator_start_step=args.discriminator_start,
            discriminator_weight=args.discriminator_weight,
            sample_every=args.sample_every,
            seed=args.seed,
        )
        train_images = load_images(args.dataset, args.resolution, "train", args.limit, args.data_dir, args.seed)
        if args.dataset == "folder":
            # A folder has no test split, so the figures come from training images.
            eval_images = train_images[: args.eval_images]
        else:
            eval_images = load_images(args.dataset, args.resolution, "test", args.eval_images, seed=args.seed)
    except (ValueError, FileNotFoundError, ImportError) as error:
        raise CommandError(str(error)) from error

    torch.manual_seed(args.seed)
    model = MmfuseVQGANModel(config)
    os.makedirs(args.output, exist_ok=True)
    start, start_cpu = time.perf_counter(), time.process_time()
    result = train_vqgan(model, train_images, args.output, training_args, eval_images=eval_images)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu

    before, after = result.before, result.after
    print(
        f"Trained {args.steps} steps on {len(train_images)} {args.dataset} images in {seconds:.0f} s ({cpu_seconds:.0f} s of CPU time)."
    )
    print(f"{'':24}{'before':>10}{'after':>10}")
    for name in ("codebook_usage", "perplexity", "l1", "mse", "psnr"):
        print(f"{name:24}{before[name]:>10.4f}{after[name]:>10.4f}")
    print(f"Wrote {args.output} and {len(result.sample_paths)} reconstruction grids in {args.output}/samples.")
    return 0
