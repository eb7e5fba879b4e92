"""``medssl pretrain``: second-stage SSL pretraining (thin wrapper over :func:`medssl.engines.run.run_pretraining`)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from medssl.errors import MedsslError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``pretrain`` sub-command."""
    p = subparsers.add_parser(
        "pretrain", help="self-supervised (second-stage) pretraining of a backbone",
        description="Pretrain a backbone with SimCLR, SwAV, BYOL or SimSiam on a manifest or image folder. "
                    "RUN_DIR receives config.json, checkpoints/, tb/, metrics.jsonl and backbone.safetensors.")
    p.add_argument("--data", help="manifest (.jsonl) or folder of images (subfolders = labels)")
    p.add_argument("--method", choices=["simclr", "swav", "byol", "simsiam"])
    p.add_argument("--init", default="random", help="'random' or a checkpoint file (any supported format)")
    p.add_argument("--arch", help="architecture (default: the checkpoint's; resnet50 for random init)")
    p.add_argument("--norm", choices=["keep", "bn"], default="keep", help="bn: replace GroupNorm by BatchNorm")
    p.add_argument("--scale-frobenius", action="store_true", help="Frobenius scaling of conv+BN pairs (Ciga et al.)")
    p.add_argument("--dead-filters", choices=["copy", "random", "none"], default="none")
    p.add_argument("--use-checkpoint-heads", action="store_true", help="start from the checkpoint's SSL heads")
    p.add_argument("--trust", action="store_true", help="allow pickled checkpoints that need arbitrary classes")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start a new run in a non-empty RUN_DIR")
    p.add_argument("--modality", default="generic",
                   help="augmentation preset: generic, xray, ultrasound, histology, mri, dermatoscopy")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int)
    length.add_argument("--iterations", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--stop-after", type=int, help="end this invocation after N steps (checkpointed); --resume later")
    p.add_argument("--batch-size", type=int, help="images per optimizer step and process (default 128)")
    p.add_argument("--image-size", type=int, help="view size in pixels (default 224)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: paper rate x batch / 256)")
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw", "lars"])
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the training network")
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--workers", type=int, default=4, help="data-loading processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--augment-on", choices=["loader", "device"], default="loader",
                   help="loader: per-sample augmentation in the workers; device: batched (kornia) on the "
                        "training device, for GPUs whose loader cannot keep up")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (torchrun)")
    p.add_argument("--knn-data", help="labelled folder/manifest for the kNN monitor (default: labelled --data)")
    p.add_argument("--knn-every", type=int, default=1, help="epochs between kNN checks (0 = off)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="iterations between checkpoints (0 = off)")
    p.add_argument("--checkpoint-every-epochs", type=int, default=1, help="epochs between checkpoints (0 = off)")
    p.add_argument("--keep-checkpoints", type=int, default=3)
    p.add_argument("--small-stem", action="store_true", help="3x3 stride-1 stem without max-pool (small images)")
    p.add_argument("--widen-factor", type=float, default=1.0)
    p.add_argument("--method-options", default="{}", metavar="JSON",
                   help='method keyword options as JSON, e.g. \'{"temperature": 0.5}\'')
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_pretrain)


def run_pretrain(args: argparse.Namespace) -> int:
    """Handler of ``medssl pretrain``."""
    from medssl.engines.config import PretrainConfig
    from medssl.engines.run import run_pretraining

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.resume:
        cfg = PretrainConfig(out=args.out, iterations=args.iterations, stop_after=args.stop_after)
        run_dir = run_pretraining(cfg, resume=True, progress=not args.no_progress)
        print(run_dir)
        return 0
    if not args.data or not args.method:
        raise MedsslError("--data and --method are required for a new run (or use --resume)")
    if not Path(args.data).exists():
        raise MedsslError("data not found", args.data)
    try:
        options = json.loads(args.method_options)
    except json.JSONDecodeError as exc:
        raise MedsslError(f"--method-options is not valid JSON ({exc})") from exc
    if not isinstance(options, dict):
        raise MedsslError("--method-options must be a JSON object")
    values = {
        "data": args.data, "out": args.out, "method": args.method, "init": args.init, "arch": args.arch,
        "norm": args.norm, "scale_frobenius": args.scale_frobenius, "dead_filters": args.dead_filters,
        "use_checkpoint_heads": args.use_checkpoint_heads, "trust": args.trust, "modality": args.modality,
        "iterations": args.iterations, "stop_after": args.stop_after, "lr": args.lr, "optimizer": args.optimizer,
        "weight_decay": args.weight_decay, "warmup_epochs": args.warmup_epochs, "precision": args.precision,
        "channels_last": args.channels_last, "compile": args.compile, "accumulate": args.accumulate,
        "workers": args.workers, "seed": args.seed, "device": args.device, "sync_bn": args.sync_bn,
        "augment_on": args.augment_on,
        "knn_data": args.knn_data, "knn_every": args.knn_every, "checkpoint_every": args.checkpoint_every,
        "checkpoint_every_epochs": args.checkpoint_every_epochs, "keep_checkpoints": args.keep_checkpoints,
        "small_stem": args.small_stem, "widen_factor": args.widen_factor, "method_options": options,
    }
    for name in ("epochs", "batch_size", "image_size"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    run_dir = run_pretraining(PretrainConfig(**values), overwrite=args.overwrite, progress=not args.no_progress)
    print(run_dir)
    return 0
