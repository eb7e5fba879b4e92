"""``medssl weights inspect|convert|stats``: read published checkpoints, convert them to medssl files,
report filter statistics. Thin: parsing here, work in :mod:`medssl.weights`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from medssl.errors import MedsslError


def register(subparsers: Any) -> None:
    """Add the ``weights`` command group."""
    parser = subparsers.add_parser("weights", help="inspect, convert and analyse pretrained weights")
    sub = parser.add_subparsers(dest="weights_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("file", help="checkpoint file (any supported format) or a registry name, e.g. bit_m_r50x1")
        p.add_argument("--arch", default=None, help="architecture (default: inferred from tensor shapes)")
        p.add_argument("--format", default=None, dest="fmt", help="force the checkpoint format (default: detect)")
        p.add_argument("--trust", action="store_true",
                       help="allow pickles that need arbitrary Python classes (runs code from the file)")

    inspect = sub.add_parser("inspect", help="say what a checkpoint contains and how medssl reads it")
    common(inspect)
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(func=cmd_inspect)

    convert = sub.add_parser("convert", help="convert a checkpoint to a medssl .safetensors file")
    common(convert)
    convert.add_argument("-o", "--output", required=True, help="output .safetensors file")
    convert.add_argument("--norm", choices=("keep", "bn"), default="keep", help="GroupNorm -> BatchNorm (bn)")
    convert.add_argument("--fold-ws", action="store_true", help="fold weight standardisation into plain convs")
    convert.add_argument("--scale-frobenius", action="store_true",
                         help="Frobenius scaling of conv+BN pairs with norm > 1 (Ciga et al.)")
    convert.add_argument("--dead-filters", choices=("none", "copy", "random"), default="none",
                         help="repair filters with norm < 0.1 (Ciga et al.; copy is the paper's best)")
    convert.add_argument("--seed", type=int, default=0, help="seed of dead-filter repair (default 0)")
    convert.set_defaults(func=cmd_convert)

    stats = sub.add_parser("stats", help="filter-norm statistics (Ciga et al. Fig. 1)")
    common(stats)
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    stats.add_argument("--layers", action="store_true", help="also list every layer in the table")
    stats.add_argument("--plot", default=None, help="write a PNG histogram of filter norms")
    stats.set_defaults(func=cmd_stats)


def _load(args: argparse.Namespace) -> Any:
    from medssl.weights import load_checkpoint
    from medssl.weights.registry import resolve

    return load_checkpoint(resolve(args.file), arch=args.arch, trust=args.trust, format=args.fmt)


def _short(keys: list[str], limit: int = 8) -> str:
    if not keys:
        return "none"
    more = f", ... ({len(keys)} in all)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def format_summary(record: dict[str, Any]) -> str:
    """Human-readable summary of ``LoadedCheckpoint.to_record()``."""
    norm = record["input_normalization"]
    kwargs = ", ".join(f"{k}={v}" for k, v in record["arch_kwargs"].items())
    lines = [
        f"file:        {record['path']}",
        f"format:      {record['format']} ({record['file_kind']} file)",
        f"arch:        {record['arch']} ({kwargs})",
        f"parameters:  {record['num_parameters']:,} in {record['num_backbone_tensors']} backbone tensors",
        f"input:       {norm.get('description', '')} (mean {norm['mean']}, std {norm['std']})",
        f"loaded:      {len(record['loaded'])} tensors",
        f"missing:     {len(record['missing'])}: {_short(record['missing'])}",
        f"unexpected:  {len(record['unexpected'])}: {_short(record['unexpected'])}",
        f"skipped:     {len(record['skipped'])}: {_short(record['skipped'])}",
    ]
    if record["heads"]:
        for name, shapes in record["heads"].items():
            desc = ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items() if k.endswith("weight"))
            lines.append(f"head:        {name}: {desc}")
    else:
        lines.append("heads:       none")
    ops = record.get("provenance", {}).get("operations")
    if ops:
        lines.append("operations:  " + ", ".join(str(op.get("operation", op)) for op in ops))
    lines += [f"note:        {n}" for n in record["notes"]]
    return "\n".join(lines) + "\n"


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print what the checkpoint holds (summary, or one JSON object with --json)."""
    record = _load(args).to_record()
    if args.json:
        sys.stdout.write(json.dumps(record) + "\n")
    else:
        sys.stdout.write(format_summary(record))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Read, optionally prepare (norm, WS folding, surgery), and write a medssl safetensors file."""
    from medssl.weights import build_from_checkpoint, save_medssl_file, sha256_of
    from medssl.weights.prepare import prepare_backbone

    if not str(args.output).endswith(".safetensors"):
        raise MedsslError("output must be a .safetensors file", args.output)
    loaded = _load(args)
    model, loaded = build_from_checkpoint(loaded)
    operations = list(loaded.provenance.get("operations") or [])
    operations += prepare_backbone(model, norm=args.norm, fold_ws=args.fold_ws,
                                   scale_frobenius=args.scale_frobenius, dead_filters=args.dead_filters,
                                   seed=args.seed)
    provenance = {
        "source_format": loaded.format,
        "source_file": loaded.path.replace("\\", "/").rsplit("/", 1)[-1],
        "source_sha256": sha256_of(loaded.path),
        "skipped": loaded.skipped,
        "notes": loaded.notes,
        "operations": operations,
    }
    if loaded.format == "medssl" and loaded.provenance:
        provenance["parent"] = {k: v for k, v in loaded.provenance.items() if k != "operations"}
    save_medssl_file(args.output, model.state_dict(), arch=model.arch, arch_kwargs=model.arch_kwargs,
                     heads=loaded.heads, input_normalization=loaded.input_normalization, provenance=provenance)
    done = ", ".join(op.get("operation", "?") for op in operations) or "none"
    print(f"wrote {args.output}: {loaded.format} -> medssl ({model.arch}); operations: {done}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """Filter-norm statistics as a table (or JSON), and optionally a PNG histogram."""
    from medssl.weights import build_from_checkpoint
    from medssl.weights.stats import filter_statistics, format_stats_table, plot_filter_histogram

    model, loaded = build_from_checkpoint(_load(args))
    stats = filter_statistics(model)
    if args.plot:
        plot_filter_histogram(model, args.plot)
    if args.json:
        sys.stdout.write(json.dumps({"path": loaded.path, "format": loaded.format, "arch": loaded.arch,
                                     **stats}) + "\n")
    else:
        sys.stdout.write(format_stats_table(stats, layers=args.layers))
        if args.plot:
            print(f"wrote {args.plot}")
    return 0
