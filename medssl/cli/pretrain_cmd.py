"""``medssl pretrain``: second-stage SSL pretraining (thin wrapper over :func:`medssl.engines.run.run_pretraining`)."""

from __future__ import annotations

import argparse
import dataclasses
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
    p.add_argument("--method", choices=["simclr", "swav", "byol", "simsiam"], help="SSL method (required for a new run)")
    p.add_argument("--init", help="'random' (default) or a checkpoint file (any supported format)")
    p.add_argument("--arch", help="architecture (default: the checkpoint's; resnet50 for random init)")
    p.add_argument("--norm", choices=["keep", "bn"], help="keep (default) or bn: replace GroupNorm by BatchNorm")
    p.add_argument("--scale-frobenius", action="store_true", default=None,
                   help="Frobenius scaling of conv+BN pairs (Ciga et al.); a GroupNorm BiT needs --norm bn --fold-ws")
    p.add_argument("--frobenius-rule", choices=["paper", "unit_norm"],
                   help="paper (default, Ciga et al.): W, gamma, running mean / sqrt(s), running var / s^2; "
                        "unit_norm: W, running mean / s, running var / s^2")
    p.add_argument("--fold-ws", action="store_true", default=None,
                   help="fold weight standardisation into plain convs (required to scale a BiT)")
    p.add_argument("--dead-filters", choices=["copy", "random", "none"],
                   help="repair filters with norm < 0.1 (Ciga et al.; copy is the paper's best; default none)")
    p.add_argument("--use-checkpoint-heads", action="store_true", default=None,
                   help="start from the checkpoint's SSL heads")
    p.add_argument("--trust", action="store_true", default=None,
                   help="allow pickled checkpoints that need arbitrary classes (new runs only: a resume never "
                        "reads the init checkpoint again)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in RUN_DIR from its last checkpoint; only --iterations, --stop-after, "
                        "--workers, --device, --lr, --knn-every, --checkpoint-every(-epochs), --keep-checkpoints, "
                        "--skip-bad-records and --no-progress may be given with it (recorded in resumes.jsonl)")
    p.add_argument("--overwrite", action="store_true", default=None, help="start a new run in a non-empty RUN_DIR")
    p.add_argument("--modality",
                   help="augmentation preset: generic (default), xray, ultrasound, histology, mri, dermatoscopy")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help="passes over the pretraining images (default 100)")
    length.add_argument("--iterations", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--stop-after", type=int, help="end this invocation after N steps (checkpointed); --resume later")
    p.add_argument("--batch-size", type=int, help="images per optimizer step and process (default 128)")
    p.add_argument("--image-size", type=int, help="view size in pixels (default 224)")
    p.add_argument("--lr", type=float,
                   help="peak learning rate (default: the method's paper rate per 256 images x global batch / 256)")
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw", "lars"],
                   help="default: the method's paper optimizer (LARS; SGD for SimSiam)")
    p.add_argument("--weight-decay", type=float,
                   help="default: the method's paper value (SimCLR, SwAV 1e-6; BYOL 1.5e-6; SimSiam 1e-4)")
    p.add_argument("--warmup-epochs", type=float,
                   help="linear warmup in epochs (default: the paper's, 10, or 0 for SimSiam; at most 10 %% of the run)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default fp32")
    p.add_argument("--channels-last", action="store_true", default=None,
                   help="channels-last memory format (faster convolutions on recent GPUs)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the training network")
    p.add_argument("--accumulate", type=int, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--workers", type=int, help="data-loading processes (default: min(8, available cores - 1))")
    p.add_argument("--seed", type=int, help="seed of initialisation, data order and augmentation (default 0)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--augment-on", choices=["loader", "device"],
                   help="loader (default): per-sample augmentation in the workers; device: batched (kornia) on the "
                        "training device, for GPUs whose loader cannot keep up")
    p.add_argument("--sync-bn", action="store_true", default=None, help="SyncBatchNorm across processes (torchrun)")
    p.add_argument("--knn-data", help="labelled folder/manifest for the kNN monitor (default: labelled --data)")
    p.add_argument("--knn-every", type=int, help="epochs between kNN checks (0 = off; default 1)")
    p.add_argument("--checkpoint-every", type=int, help="iterations between checkpoints (0 = off, default)")
    p.add_argument("--checkpoint-every-epochs", type=int, help="epochs between checkpoints (0 = off; default 1)")
    p.add_argument("--keep-checkpoints", type=int, help="newest checkpoints kept in RUN_DIR/checkpoints (default 3)")
    p.add_argument("--skip-bad-records", type=int, metavar="N",
                   help="replace up to N unreadable records (logged to RUN_DIR/errors.jsonl) instead of stopping "
                        "at the first (default 0)")
    p.add_argument("--small-stem", action="store_true", default=None,
                   help="3x3 stride-1 stem without max-pool (small images)")
    p.add_argument("--widen-factor", type=float, help="channel-width multiplier (default 1.0)")
    p.add_argument("--method-options", metavar="JSON",
                   help='method keyword options as JSON, e.g. \'{"temperature": 0.5}\'')
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # options default to None so that a resume can tell given options from defaults
    p.set_defaults(func=run_pretrain, pretrain_parser=p)


#: namespace entries that are not run settings
_NOT_SETTINGS = frozenset({"func", "command", "debug", "out", "resume", "no_progress", "pretrain_parser"})


def given_options(args: argparse.Namespace) -> dict[str, object]:
    """Options given on the command line (value differs from the parser default, which is None)."""
    parser = getattr(args, "pretrain_parser", None)
    return {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS and v is not None
            and (parser is None or v != parser.get_default(k))}


def run_pretrain(args: argparse.Namespace) -> int:
    """Handler of ``medssl pretrain``."""
    from medssl.engines.config import PretrainConfig
    from medssl.engines.run import run_pretraining

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.resume:  # only the given options reach the resume, which applies or refuses them
        run_dir = run_pretraining(PretrainConfig(out=args.out), resume=True, progress=not args.no_progress,
                                  resume_options=given_options(args))
        print(run_dir)
        return 0
    if not args.data or not args.method:
        raise MedsslError("--data and --method are required for a new run (or use --resume)")
    if not Path(args.data).exists():
        raise MedsslError("data not found", args.data)
    try:
        options = json.loads(args.method_options or "{}")
    except json.JSONDecodeError as exc:
        raise MedsslError(f"--method-options is not valid JSON ({exc})") from exc
    if not isinstance(options, dict):
        raise MedsslError("--method-options must be a JSON object")
    # every option is named like its PretrainConfig field; one not given (None) keeps the library default
    fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    values["method_options"] = options
    run_dir = run_pretraining(PretrainConfig(**values), overwrite=bool(args.overwrite),
                              progress=not args.no_progress)
    print(run_dir)
    return 0
