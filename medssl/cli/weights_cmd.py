"""``medssl weights inspect|convert|stats``: read published checkpoints, convert them to medssl files,
report filter statistics. Thin: parsing here, work in :mod:`medssl.weights`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
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
                         help="Frobenius scaling of conv+BN pairs with norm > 1 (Ciga et al.); a GroupNorm BiT "
                              "needs --norm bn --fold-ws")
    convert.add_argument("--frobenius-rule", choices=("paper", "unit_norm"), default="paper",
                         help="paper (default, Ciga et al.): W, gamma, running mean / sqrt(s), running var / s^2; "
                              "unit_norm: W, running mean / s, running var / s^2 (norm becomes 1)")
    convert.add_argument("--dead-filters", choices=("none", "copy", "random"), default="none",
                         help="repair filters with norm < 0.1 (Ciga et al.; copy is the paper's best)")
    convert.add_argument("--seed", type=int, default=0,
                         help="seed of dead-filter repair and of the choice of calibration images (default 0)")
    convert.add_argument("--recalibrate", metavar="DATA", default=None,
                         help="estimate BatchNorm statistics on these images (manifest or image folder; test-split "
                              "records are left out), e.g. after --norm bn (Lu et al.'s BiT without SSL)")
    convert.add_argument("--recalibrate-batches", type=int, default=None, metavar="N",
                         help="at most N batches of calibration images (default 50)")
    convert.add_argument("--recalibrate-batch-size", type=int, default=None, metavar="IMAGES",
                         help="images per calibration batch (default 32)")
    convert.add_argument("--image-size", type=int, default=None,
                         help="calibration image size in px (default 224, the ImageNet/BiT resolution)")
    convert.add_argument("--modality", default=None,
                         help="preset of the deterministic evaluation transform for calibration images "
                              "(generic, xray, ultrasound, histology, mri, dermatoscopy)")
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


def calibration_batches(path: str, *, modality: str, image_size: int, input_normalization: Any,
                        batch_size: int, max_batches: int, seed: int) -> tuple[Iterator[Any], int]:
    """Batches of calibration images from a manifest or folder, and how many images they hold.

    Records of the ``test`` split are left out (when others remain); the rest are shuffled with ``seed`` (so
    that a label-sorted folder gives every class) and the first ``batch_size * max_batches`` are read with
    ``medssl.transforms.presets.build_eval_transform(modality, image_size)`` (resize shorter side, centre crop;
    [0, 1]) and normalised as the checkpoint expects (``InputNormalization``). A last batch of one image is
    dropped (BatchNorm needs two). The batches are a generator: images are read as they are used.
    """
    import torch

    from medssl.data.sources import records_from_path
    from medssl.models import InputNormalization
    from medssl.transforms.presets import MODALITIES, build_eval_transform

    if modality not in MODALITIES:
        raise MedsslError(f"unknown --modality {modality!r}; choose one of {', '.join(MODALITIES)}")
    if batch_size < 2 or max_batches < 1 or image_size < 8:
        raise MedsslError("--recalibrate-batch-size must be >= 2, --recalibrate-batches >= 1, --image-size >= 8")
    records = records_from_path(path)
    kept = [r for r in records if r.get("split") != "test"] or records
    if len(kept) < 2:
        raise MedsslError(f"{len(kept)} image(s) found; BatchNorm calibration needs at least 2", path)
    order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = [kept[i] for i in order[:batch_size * max_batches]]
    if len(chosen) % batch_size == 1:
        chosen = chosen[:-1]
    transform = build_eval_transform(modality, image_size)
    normalize = InputNormalization.from_spec(input_normalization)

    def batches() -> Iterator[torch.Tensor]:
        for start in range(0, len(chosen), batch_size):
            images = torch.stack([transform(r)["image"] for r in chosen[start:start + batch_size]])
            yield normalize(images.float())

    return batches(), len(chosen)


def cmd_convert(args: argparse.Namespace) -> int:
    """Read, optionally prepare (norm, WS folding, surgery, BN recalibration), and write a medssl file."""
    from torch.nn import GroupNorm

    from medssl.weights import build_from_checkpoint, save_medssl_file, sha256_of
    from medssl.weights.norm import recalibrate_bn
    from medssl.weights.prepare import (
        bn_statistics_state,
        has_batchnorm_statistics,
        preparation_summary,
        prepare_backbone,
    )

    if not str(args.output).endswith(".safetensors"):
        raise MedsslError("output must be a .safetensors file", args.output)
    calibration_options = {"recalibrate_batches": 50, "recalibrate_batch_size": 32, "image_size": 224,
                           "modality": "generic"}  # defaults; they only apply with --recalibrate
    given = [k for k in calibration_options if getattr(args, k) is not None]
    if given and not args.recalibrate:
        raise MedsslError(", ".join("--" + k.replace("_", "-") for k in given) + " only apply with --recalibrate")
    for key, value in calibration_options.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    loaded = _load(args)
    model, loaded = build_from_checkpoint(loaded)
    calibrate = None
    if args.recalibrate:
        has_gn = any(isinstance(m, GroupNorm) for m in model.modules())
        if not has_batchnorm_statistics(model) and not (args.norm == "bn" and has_gn):
            raise MedsslError("--recalibrate needs BatchNorm layers and this network has none"
                              + (" (add --norm bn to convert its GroupNorms)" if has_gn else ""), args.file)
        batches, _ = calibration_batches(
            args.recalibrate, modality=args.modality, image_size=args.image_size,
            input_normalization=loaded.input_normalization, batch_size=args.recalibrate_batch_size,
            max_batches=args.recalibrate_batches, seed=args.seed)

        def calibrate(m: Any) -> dict[str, Any]:
            report = recalibrate_bn(m, batches, num_batches=args.recalibrate_batches)
            report.update(data=str(args.recalibrate).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1],
                          image_size=args.image_size, modality=args.modality, seed=args.seed)
            return report

    operations = list(loaded.provenance.get("operations") or [])
    try:
        steps = prepare_backbone(model, norm=args.norm, fold_ws=args.fold_ws, scale_frobenius=args.scale_frobenius,
                                 frobenius_rule=args.frobenius_rule, dead_filters=args.dead_filters,
                                 seed=args.seed, calibrate=calibrate)
    except MedsslError as exc:
        if exc.path is None:  # name the checkpoint the preparation refused
            raise MedsslError(exc.reason, args.file) from exc
        raise
    operations += steps
    summary = preparation_summary(steps)
    provenance: dict[str, Any] = {
        "source_format": loaded.format,
        "source_file": loaded.path.replace("\\", "/").rsplit("/", 1)[-1],
        "source_sha256": sha256_of(loaded.path),
        "skipped": loaded.skipped,
        "notes": loaded.notes,
        "operations": operations,
        "preparation": summary,
    }
    parent = loaded.provenance.get("bn_statistics") if loaded.format == "medssl" else None
    state = bn_statistics_state(model, steps, parent=parent)
    if state is not None:
        provenance["bn_statistics"] = state
    recal = next((op for op in steps if op.get("operation") == "bn_recalibration"), None)
    if recal is not None:
        provenance["bn_recalibration"] = {k: recal[k] for k in ("num_samples", "num_batches", "data",
                                                               "image_size", "modality", "seed")}
    if loaded.format == "medssl" and loaded.provenance:
        provenance["parent"] = {k: v for k, v in loaded.provenance.items() if k != "operations"}
    save_medssl_file(args.output, model.state_dict(), arch=model.arch, arch_kwargs=model.arch_kwargs,
                     heads=loaded.heads, input_normalization=loaded.input_normalization, provenance=provenance)
    done = ", ".join(op.get("operation", "?") for op in operations) or "none"
    counts = ""
    if args.scale_frobenius or args.dead_filters != "none":
        rule = f" ({args.frobenius_rule} rule)" if args.scale_frobenius else ""
        counts = (f"; {summary['layers_scaled']} conv+BN layers scaled{rule}, "
                  f"{summary['filters_repaired']} dead filters repaired")
    bn = ""
    if state is not None:
        bn = f"; BatchNorm statistics: {state}" + (f" on {recal['num_samples']} images" if recal else "")
    print(f"wrote {args.output}: {loaded.format} -> medssl ({model.arch}); operations: {done}{counts}{bn}")
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
