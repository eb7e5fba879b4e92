"""``medssl bundle``: the MONAI bundles shipped inside the package.

``medssl bundle init MODALITY DIR`` writes the installed bundle (``configs/``, ``docs/``, ``LICENSE``) to DIR,
which must be absent or empty; ``medssl bundle list`` names the bundles. Run a written bundle with
``python -m monai.bundle run --config_file DIR/configs/train.yaml --bundle_root DIR --dataset_dir DATA``.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``bundle`` sub-command with ``init`` and ``list``."""
    from medssl.bundles import MODALITIES

    p = subparsers.add_parser("bundle", help="write one of the MONAI bundles shipped with medssl to a folder",
                              description="The five MONAI bundles (model-zoo layout) shipped inside medssl.")
    sub = p.add_subparsers(dest="bundle_command", metavar="ACTION")
    init = sub.add_parser("init", help="write a bundle to DIR (absent or empty)",
                          description="Copy the installed bundle MODALITY (configs/, docs/, LICENSE) to DIR.")
    init.add_argument("modality", choices=MODALITIES, metavar="MODALITY", help=", ".join(MODALITIES))
    init.add_argument("dir", metavar="DIR", help="destination folder (created; must be absent or empty)")
    init.set_defaults(func=run_init)
    listing = sub.add_parser("list", help="name the bundles and where the installed copies are")
    listing.set_defaults(func=run_list)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def run_init(args: argparse.Namespace) -> int:
    """Handler of ``medssl bundle init``: prints the written folder and the command that trains from it."""
    from medssl.bundles import init_bundle

    out = init_bundle(args.modality, args.dir)
    print(out)
    print(f"python -m monai.bundle run --config_file {out / 'configs' / 'train.yaml'} --bundle_root {out} "
          f"--logging_file {out / 'configs' / 'logging.conf'} --dataset_dir DATA_DIR")
    return 0


def run_list(args: argparse.Namespace) -> int:
    """Handler of ``medssl bundle list``."""
    from medssl.bundles import MODALITIES, bundle_path

    for name in MODALITIES:
        print(f"{name}\t{bundle_path(name)}")
    return 0
