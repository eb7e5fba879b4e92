"""``medssl adapt NAME ROOT -o MANIFEST.jsonl``: build a manifest from a public dataset's published layout.

Examples::

    export MEDSSL_DEID_KEY=...   # secret for the lesion/patient pseudonyms
    medssl adapt ham10000 ~/data/HAM10000 -o ham.jsonl --split-ratios pretrain=0.6,train=0.2,test=0.2
    medssl adapt busi ~/data/BUSI -o busi.jsonl --split-ratios 0.7,0.1,0.2 --seed 1
    medssl adapt csv ~/data/study/labels.csv -o study.jsonl --image-column file --label-column dx \\
        --group-column patient --suffix .png
"""

from __future__ import annotations

import argparse
from collections import Counter

from medssl.data.adapters import ADAPTERS, build_manifest
from medssl.data.deid import DEFAULT_KEY_ENV, Pseudonymizer
from medssl.errors import MedsslError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``adapt`` sub-command."""
    epilog = "datasets:\n" + "\n".join(f"  {a.name:18s} {a.description}" for a in ADAPTERS.values())
    p = subparsers.add_parser(
        "adapt",
        help="build a manifest from a public dataset layout (HAM10000, BUSI, ChestX-ray8, ...)",
        description="Turn a published dataset layout into a de-identified JSONL manifest "
        "(layouts: data_manifests/adapters.md).",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", choices=sorted(ADAPTERS), metavar="NAME", help="dataset layout (see below)")
    p.add_argument("root", metavar="ROOT", help="dataset folder (medmnist: .npz file; csv: the CSV file)")
    p.add_argument("-o", "--output", required=True, metavar="MANIFEST.jsonl", help="manifest to write")
    p.add_argument("--split-ratios", default=None, metavar="RATIOS",
                   help="re-split records without an official val/test split, grouped by lesion/patient and "
                   "stratified by label: 'train=0.7,val=0.1,test=0.2' (names: pretrain, train, val, test) "
                   "or '0.7,0.1,0.2'")
    p.add_argument("--seed", type=int, default=0, help="seed of the ratio split (default 0)")
    p.add_argument("--skip-missing", action="store_true",
                   help="drop images listed in the dataset table but absent (default: error)")
    p.add_argument("--no-probe", action="store_true",
                   help="do not open image headers (rows/columns/photometric stay null; faster)")
    p.add_argument("--deid-key-env", default=DEFAULT_KEY_ENV,
                   help=f"environment variable holding the pseudonymisation key (default {DEFAULT_KEY_ENV})")
    p.add_argument("--allow-insecure-key", action="store_true",
                   help="demo/test only: accept a key weaker than 128 bits, or use the public demo key when "
                   "the key variable is unset; records are then marked not de-identified")
    g = p.add_argument_group("generic layouts (folder, csv)")
    g.add_argument("--modality", default=None, help="DICOM-style modality code to record, e.g. US, DX, MR")
    g.add_argument("--preset", default=None,
                   help="transform preset to record: histology, xray, mri, ultrasound, dermatoscopy, generic")
    g.add_argument("--image-column", help="csv: column with the image file name or relative path")
    g.add_argument("--label-column", help="csv: column with the class label")
    g.add_argument("--group-column", help="csv: column with the patient/lesion id (pseudonymised)")
    g.add_argument("--group-kind", default="patient", choices=("patient", "lesion", "study"),
                   help="csv: what the group column holds (default patient)")
    g.add_argument("--split-column", help="csv: column with train/val/test")
    g.add_argument("--image-root", help="csv: folder the file names are relative to (default: the CSV's folder)")
    g.add_argument("--suffix", default="", help="csv: extension appended to file names without one, e.g. .png")
    p.set_defaults(func=run_adapt)


def _options(args: argparse.Namespace) -> dict:
    opts: dict = {}
    if args.name in ("folder", "csv"):
        if args.modality:
            opts["modality"] = args.modality
        if args.preset:
            opts["preset"] = args.preset
    if args.name == "csv":
        if not args.image_column:
            raise MedsslError("the csv layout needs --image-column")
        opts.update(image_column=args.image_column, label_column=args.label_column,
                    group_column=args.group_column, group_kind=args.group_kind, split_column=args.split_column,
                    image_root=args.image_root, suffix=args.suffix)
    return opts


def run_adapt(args: argparse.Namespace) -> int:
    """Build the records, write the manifest and print counts by split and label."""
    from medssl.data.manifest import write_manifest

    deid = Pseudonymizer.from_env(args.deid_key_env, allow_insecure_default=args.allow_insecure_key)
    records = build_manifest(
        args.name, args.root, deid=deid, split_ratios=args.split_ratios, seed=args.seed,
        probe_images=not args.no_probe, on_missing="skip" if args.skip_missing else "error", **_options(args),
    )
    write_manifest(args.output, records)  # paths go to the private map <output>.private.jsonl
    counts = Counter((r.get("split") or "-", r.get("label") or "-") for r in records)
    print(f"{args.output}: {len(records)} records from {args.name}"
          + ("" if deid.deidentified else " (NOT de-identified: weak or public key)"))
    for split in sorted({s for s, _ in counts}):
        per_label = ", ".join(f"{lab} {n}" for (s, lab), n in sorted(counts.items()) if s == split)
        print(f"  split {split}: {sum(n for (s, _), n in counts.items() if s == split)} ({per_label})")
    return 0
