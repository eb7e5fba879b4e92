"""``medssl study CONFIG.yaml``: run a study file (thin wrapper over :func:`medssl.study.run_study`)."""

from __future__ import annotations

import argparse
import logging


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``study`` sub-command."""
    p = subparsers.add_parser(
        "study", help="run a comparison study from one YAML file (resumable; docs/study.md)",
        description="Pretrain, evaluate and compare every initialisation named in CONFIG (random, published "
                    "checkpoints, a first stage, P1X and P2X per method) in dependency order. Stages already "
                    "complete with the same settings are skipped, so rerunning after a kill continues where it "
                    "stopped; a changed setting reruns that stage and everything downstream. Writes OUT/report.md.")
    p.add_argument("config", metavar="CONFIG.yaml", help="study file (see docs/study.md)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: the file's 'out')")
    p.add_argument("--data", metavar="PATH", help="target data instead of the file's 'data' (the stages' hashes "
                   "cover the data's content, not its location)")
    p.add_argument("--first-stage-data", metavar="PATH", help="first-stage data instead of the file's "
                   "'first_stage.data'")
    p.add_argument("--plan", action="store_true", help="print the stages and whether each is complete; run nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars during pretraining")
    p.set_defaults(func=run_study_command)


def run_study_command(args: argparse.Namespace) -> int:
    """Handler of ``medssl study``: runs the study (or prints its plan) and prints the report's path."""
    from medssl.study import build_plan, load_study_config, run_study
    from medssl.study.runner import stage_complete

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_study_config(args.config, out=args.out, data=args.data,
                               first_stage_data=args.first_stage_data)
    if args.plan:
        stages = build_plan(config)
        for k, s in enumerate(stages, 1):
            state = "complete" if stage_complete(s) else "to run"
            print(f"{k}/{len(stages)}\t{s.kind}\t{s.label}\t{s.folder.relative_to(config.out).as_posix() or '.'}"
                  f"\t{state}")
        return 0
    print(run_study(config, progress=not args.no_progress))
    return 0
