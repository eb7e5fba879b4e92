"""``medssl demo``: the whole pipeline on a small synthetic dataset (thin wrapper over :func:`medssl.demo.run_demo`)."""

from __future__ import annotations

import argparse
import logging


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` sub-command."""
    p = subparsers.add_parser(
        "demo", help="run the built-in demo (synthetic data, CPU, a few minutes, downloads nothing)",
        description="Write a synthetic ultrasound-like dataset, pretrain a first stage on a synthetic source "
                    "domain, then P1X (random init) and P2X (from the first stage, Frobenius scaling + dead-filter "
                    "copy) on the target, evaluate Random / first stage / P1X / P2X with the linear probe at 10 % "
                    "and 100 % of the labels (3 trials) and write DIR/report.md.")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--quick", action="store_true", help="shrink everything (a smoke test of the pipeline)")
    p.add_argument("--data", metavar="MANIFEST",
                   help="use this labelled manifest (or class-folder tree) as target data instead of the synthetic one")
    p.add_argument("--modality", help="transform preset (default: ultrasound for synthetic data, generic for --data)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and of every run (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    """Handler of ``medssl demo``: runs the demo and prints the report's path."""
    from medssl.demo import run_demo

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = run_demo(args.out, quick=args.quick, data=args.data, modality=args.modality,
                      progress=not args.no_progress, seed=args.seed)
    print(report)
    return 0
