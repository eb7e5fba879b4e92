"""``medssl prepare MANIFEST -o STORE``: decode every record once into a prepared store (medssl.data.store)."""

from __future__ import annotations

import argparse

from medssl.data.store import (
    DEFAULT_MAX_SIZE_PX,
    DEFAULT_SHARD_SIZE_MB,
    format_prepare_summary,
    prepare_store,
)
from medssl.io import atomic_write_json


def run_prepare(args: argparse.Namespace) -> int:
    summary = prepare_store(args.manifest, args.output, max_size_px=args.max_size, workers=args.workers,
                            shard_size_mb=args.shard_size, progress=not args.no_progress)
    print(format_prepare_summary(summary))
    print(f"train from it with: medssl pretrain --data {args.output}/manifest.jsonl ...")
    if args.summary_json:
        atomic_write_json(args.summary_json, summary)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``prepare`` to the ``medssl`` command."""
    prepare = subparsers.add_parser(
        "prepare", help="decode a manifest's images once into a memory-mapped store (incremental, resumable)")
    prepare.add_argument("manifest", help="source manifest (JSONL; its private map is read, never copied)")
    prepare.add_argument("-o", "--output", required=True,
                         help="store folder: shards/, index.json, manifest.jsonl (train from this), errors.jsonl")
    prepare.add_argument("--max-size", type=int, default=DEFAULT_MAX_SIZE_PX,
                         help=f"longer side of the stored images in px, never enlarged (default {DEFAULT_MAX_SIZE_PX}"
                         ": room for 224-px random crops)")
    prepare.add_argument("--workers", type=int, default=None, help="decoding processes (default: CPU count)")
    prepare.add_argument("--shard-size", type=float, default=DEFAULT_SHARD_SIZE_MB,
                         help=f"shard file size in MB (10^6 bytes; default {DEFAULT_SHARD_SIZE_MB})")
    prepare.add_argument("--summary-json", help="also write the run's summary (counts, disk use) as JSON here")
    prepare.add_argument("--no-progress", action="store_true", help="no progress bar")
    prepare.set_defaults(func=run_prepare)
