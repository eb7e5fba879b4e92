"""``medssl evaluate`` (one backbone, one dataset, one protocol) and ``medssl report`` (compare EVAL_DIRs)."""

from __future__ import annotations

import argparse
import logging

from medssl.errors import MedsslError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` and ``report`` sub-commands."""
    ev = subparsers.add_parser(
        "evaluate", help="linear probe / fine-tuning / kNN evaluation with confidence intervals",
        description="Evaluate a backbone on a labelled dataset; writes results.json, predictions.csv, "
        "report.md and plots to --out.")
    ev.add_argument("--backbone", required=True, help="checkpoint file (any supported format) or 'random'")
    ev.add_argument("--arch", help="architecture for 'random' (default resnet50) or to force one")
    ev.add_argument("--small-stem", action="store_true", help="'random' only: 3x3 stride-1 stem, no max-pool")
    ev.add_argument("--widen-factor", type=float, help="'random' only: width multiplier (default 1.0)")
    ev.add_argument("--trust", action="store_true", help="allow arbitrary pickles in the checkpoint")
    ev.add_argument("--data", required=True, help="manifest (.jsonl) or folder with one subfolder per class")
    ev.add_argument("--protocol", choices=("linear", "finetune", "knn"), help="default linear")
    ev.add_argument("--fractions", help="label fractions of the train split, e.g. 0.01,0.1,1.0 (default 1.0)")
    ev.add_argument("--trials", type=int, help="trials (different stratified subsets) per fraction (default 3)")
    ev.add_argument("--modality",
                    help="eval transform preset (e.g. ultrasound, xray); default: the backbone's pretraining preset "
                    "(medssl files from 'medssl pretrain'); required for other checkpoints and 'random'")
    ev.add_argument("--image-size", type=int,
                    help="input size in px; default: the backbone's pretraining image size (medssl files from "
                    "'medssl pretrain'); required for other checkpoints and 'random'")
    ev.add_argument("--input-normalization",
                    help="imagenet | half | none | 'm1,m2,m3/s1,s2,s3'; default: what the checkpoint records "
                    "(ImageNet mean/std for 'random')")
    ev.add_argument("--norm", choices=("keep", "bn"),
                    help="keep (default) or bn: replace GroupNorm by BatchNorm (Lu et al.'s BiT baseline) and estimate its statistics "
                    "on the train images (implies --recalibrate-bn)")
    ev.add_argument("--recalibrate-bn", action="store_true",
                    help="re-estimate BatchNorm statistics on the train images before evaluating (needed for a "
                    "file converted with 'weights convert --norm bn' without --recalibrate)")
    ev.add_argument("--recalibrate-batches", type=int,
                    help="batches (of --batch-size train images) for BatchNorm recalibration (implies "
                    "--recalibrate-bn); default: one pass over the train split, as torch.optim.swa_utils.update_bn")
    ev.add_argument("--batch-size", type=int,
                    help="images per batch for feature extraction and fine-tuning, and features per linear-probe "
                    "step (default 64)")
    ev.add_argument("--epochs", type=int, help="default 100 (linear) / 20 (finetune)")
    ev.add_argument("--lr", type=float, help="default 1e-3 (linear) / 3e-4 (finetune)")
    ev.add_argument("--weight-decay", type=float, help="default 0 (linear) / 1e-4 (finetune)")
    ev.add_argument("--loss", choices=("focal", "ce", "weighted_ce"), help="default focal (Lu et al.)")
    ev.add_argument("--gamma", type=float, help="focal loss gamma (default 4)")
    ev.add_argument("--k", type=int, help="kNN neighbours (default 20)")
    ev.add_argument("--temperature", type=float, help="kNN temperature (default 0.07)")
    ev.add_argument("--seed", type=int, help="trial t draws its label subset with seed + t and seeds its head "
                    "with seed + 1000 t (default 0)")
    ev.add_argument("--bootstrap", type=int, help="bootstrap resamples (>= 1000; default 1000)")
    ev.add_argument("--cluster-by", choices=("auto", "lesion_id", "patient_id", "none"),
                    help="unit resampled by the bootstrap CIs: auto (default) = lesion_id if any test image has "
                    "one, else patient_id, else the image (none)")
    ev.add_argument("--name", help="label of this initialisation in reports, e.g. P2X")
    ev.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    ev.add_argument("--num-workers", type=int,
                    help="data-loading processes (default: min(8, available cores - 1))")
    ev.add_argument("--baselines", action="store_true",
                    help="also evaluate the sanity rows on the same splits, fractions and trials: the random init "
                    "of the same architecture and a linear probe on 16x16 raw pixels (EVAL_DIR/baselines/), and "
                    "flag the backbone when it does not beat its random init")
    ev.add_argument("--out", required=True, help="EVAL_DIR to write")
    ev.set_defaults(func=evaluate)

    rep = subparsers.add_parser(
        "report", help="compare evaluation folders: table with CIs, paired comparisons, plots",
        description="Comparison table (rows: initialisations, columns: datasets x label fractions) as "
        "Markdown and CSV, paired bootstrap comparisons and plots.")
    rep.add_argument("eval_dirs", nargs="+", metavar="EVAL_DIR", help="folders written by medssl evaluate")
    rep.add_argument("-o", "--out", required=True, metavar="OUT_DIR", help="report folder to write")
    rep.add_argument("--pretrain-runs", nargs="*", default=[], metavar="RUN_DIR",
                     help="pretraining run folders (metrics.jsonl) for loss and kNN curves")
    rep.add_argument("--bootstrap", type=int, default=1000,
                     help="resamples of the paired bootstrap (default 1000, raised to 10,000 where p < ~0.01)")
    rep.add_argument("--cluster-by", choices=("auto", "lesion_id", "patient_id", "none"), default=None,
                     help="unit resampled by CIs and paired tests; default: each evaluation's own --cluster-by")
    rep.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples (default 0)")
    rep.set_defaults(func=report)


def evaluate(args: argparse.Namespace) -> int:
    """Handler of ``medssl evaluate``."""
    import torch

    from medssl.evaluation.components import evaluate_backbone
    from medssl.evaluation.fractions import parse_fractions
    from medssl.evaluation.setup import parse_input_normalization

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    fractions = None
    if args.fractions is not None:
        try:
            fractions = parse_fractions(args.fractions)
        except ValueError as exc:
            raise MedsslError(str(exc)) from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    spec = parse_input_normalization(args.input_normalization) if args.input_normalization else None
    # options not given stay None: evaluate_backbone then uses the EvalConfig default (one set of defaults)
    out = evaluate_backbone(
        args.data, args.out, backbone=args.backbone, arch=args.arch, small_stem=bool(args.small_stem),
        widen_factor=args.widen_factor if args.widen_factor is not None else 1.0, trust=args.trust,
        protocol=args.protocol, input_normalization=spec, norm=args.norm, recalibrate_bn=args.recalibrate_bn,
        recalibrate_batches=args.recalibrate_batches, fractions=fractions, trials=args.trials,
        modality=args.modality, image_size=args.image_size, batch_size=args.batch_size, epochs=args.epochs,
        lr=args.lr, weight_decay=args.weight_decay, loss=args.loss, gamma=args.gamma, k=args.k,
        temperature=args.temperature, seed=args.seed, bootstrap=args.bootstrap, name=args.name, device=device,
        num_workers=args.num_workers, cluster_by=args.cluster_by)
    if args.baselines:
        from medssl.evaluation.sanity import run_baselines

        run_baselines(out, args.data)
    print(out / "report.md")
    return 0


def report(args: argparse.Namespace) -> int:
    """Handler of ``medssl report``."""
    from medssl.evaluation.report import compare_evaluations

    path = compare_evaluations(args.eval_dirs, args.out, pretrain_runs=args.pretrain_runs,
                               n_resamples=args.bootstrap, seed=args.seed, cluster_by=args.cluster_by)
    print(path)
    return 0
