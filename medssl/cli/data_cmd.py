"""``medssl ingest`` and ``medssl manifest validate|split|subsample|export``: thin wrappers over medssl.data."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medssl.data.datalist import write_datalist
from medssl.data.deid import DEFAULT_KEY_ENV, Pseudonymizer
from medssl.data.ingest import IngestOptions, default_errors_path, format_summary, ingest_dicom, parse_frames
from medssl.data.manifest import check_records, read_manifest, write_manifest
from medssl.data.splits import class_counts, nested_subsamples, require_field, split_records
from medssl.data.store import store_dir, validate_store
from medssl.data.verify import decode_failures, write_cleaned
from medssl.errors import MedsslError
from medssl.io import atomic_write_json


def _csv(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(t) for t in _csv(text)]
    except ValueError:
        raise MedsslError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(t) for t in _csv(text)]
    except ValueError:
        raise MedsslError(f"{what} must be comma-separated integers, got {text!r}") from None


def _optional_key(text: str) -> str | None:
    return None if text.lower() in ("none", "") else text


def run_ingest(args: argparse.Namespace) -> int:
    pseudonymizer = Pseudonymizer.from_env(args.deid_key_env, allow_insecure_default=args.allow_insecure_key)
    options = IngestOptions(
        workers=args.workers,
        modalities=[m.upper() for m in _csv(args.modality)],
        body_parts=_csv(args.body_part),
        views=_csv(args.view),
        exclude_derived=args.exclude_derived,
        exclude_localizers=args.exclude_localizers,
        exclude_burned_in=args.exclude_burned_in,
        frames=parse_frames(args.frames),
        progress=not args.no_progress,
        verify_decode=args.verify_decode,
    )
    summary = ingest_dicom(args.folder, args.output, pseudonymizer=pseudonymizer, errors_path=args.errors,
                           options=options)
    print(format_summary(summary))
    if args.summary_json:
        atomic_write_json(args.summary_json, summary)
    return 0


def run_validate(args: argparse.Namespace) -> int:
    store = store_dir(args.manifest)  # a prepared store (folder or its manifest.jsonl): also index/shards/checksums
    manifest = store / "manifest.jsonl" if store is not None else args.manifest
    try:
        store_problems = validate_store(store, progress=not args.no_progress) if store is not None else []
        records = read_manifest(manifest)
    except MedsslError as exc:
        print(f"problem: {exc}")
        return 1
    labels = _csv(args.labels) if args.labels else None
    if args.output and not args.decode:
        raise MedsslError("--output writes the manifest without the records that fail to decode: add --decode")
    problems = store_problems + check_records(records, labels=labels, check_files=not args.no_check_files)
    failures = decode_failures(records, workers=args.workers, progress=not args.no_progress) if args.decode else []
    problems += [f"record {records[i]['id']}: {reason}" for i, reason in failures]
    for problem in problems:
        print(f"problem: {problem}")
    counts = class_counts(records)
    print(f"{len(records)} records; per split and label: {json.dumps(counts)}")
    if args.decode:
        print(f"decode: {len(records) - len(failures)} of {len(records)} records decode")
    if args.output:
        errors_path = args.errors or default_errors_path(args.output)
        kept = write_cleaned(args.output, errors_path, records, failures)
        print(f"wrote {args.output}: {kept} records; {len(failures)} removed, listed in {errors_path}")
    print(f"{len(problems)} problem(s)" if problems else "ok: no problems found")
    return 1 if problems else 0


def run_split(args: argparse.Namespace) -> int:
    records = read_manifest(args.manifest)
    names = _csv(args.names)
    try:
        require_field(records, _optional_key(args.group), "--group")
        require_field(records, _optional_key(args.stratify), "--stratify")
    except MedsslError as exc:
        raise MedsslError(exc.reason, args.manifest) from None
    out = split_records(
        records,
        ratios=_floats(args.ratios, "--ratios"),
        names=names,
        group_key=_optional_key(args.group),
        stratify_key=_optional_key(args.stratify),
        seed=args.seed,
    )
    write_manifest(args.output, out)  # with its private map <output>.private.jsonl
    print(f"wrote {args.output}: {json.dumps(class_counts(out, args.stratify if _optional_key(args.stratify) else 'label'))}")
    return 0


def run_subsample(args: argparse.Namespace) -> int:
    records = read_manifest(args.manifest)
    fractions = _floats(args.fractions, "--fractions")
    seeds = _ints(args.seeds, "--seeds")
    try:
        require_field(records, _optional_key(args.stratify), "--stratify")
    except MedsslError as exc:
        raise MedsslError(exc.reason, args.manifest) from None
    pool = [i for i, r in enumerate(records) if args.split in ("all", r.get("split"))]
    if not pool:
        raise MedsslError(f"no record has split {args.split!r}", args.manifest)
    in_pool = set(pool)
    others = [r for i, r in enumerate(records) if i not in in_pool]
    out_dir = Path(args.output)
    stem = Path(args.manifest).name.removesuffix(".jsonl")
    index = []
    for seed in seeds:
        subsets = nested_subsamples([records[i] for i in pool], fractions, seed=seed,
                                    stratify_key=_optional_key(args.stratify))
        for fraction, chosen in subsets.items():
            path = out_dir / f"{stem}.frac{fraction:g}.seed{seed}.jsonl"
            subset = [records[pool[i]] for i in chosen]
            write_manifest(path, others + subset)
            index.append({"file": path.name, "fraction": fraction, "seed": seed, "split": args.split,
                          "records": len(subset), "per_label": class_counts(subset)})
            print(f"wrote {path}: {len(subset)} of {len(pool)} {args.split} records (+{len(others)} others)")
    atomic_write_json(out_dir / f"{stem}.subsamples.json", index)
    return 0


def run_export(args: argparse.Namespace) -> int:
    records = read_manifest(args.manifest)
    counts = write_datalist(args.output, records, with_paths=args.with_paths)
    print(f"wrote {args.output}: {json.dumps(counts)}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``ingest`` and ``manifest`` to the ``medssl`` command."""
    ingest = subparsers.add_parser(
        "ingest", help="build a de-identified manifest from a PACS export (folder of DICOM, with or without DICOMDIR)"
    )
    ingest.add_argument("folder", help="export folder, scanned recursively (any file names)")
    ingest.add_argument("-o", "--output", required=True, help="manifest to write (JSONL)")
    ingest.add_argument("--errors", help="errors file (JSONL; default <manifest>.errors.jsonl)")
    ingest.add_argument("--workers", type=int, default=None, help="header-reading processes (default: CPU count)")
    ingest.add_argument("--modality", help="keep only these modalities, e.g. CR,DX")
    ingest.add_argument("--body-part", help="keep only these BodyPartExamined values, e.g. CHEST")
    ingest.add_argument("--view", help="keep only these ViewPosition values, e.g. PA,AP")
    ingest.add_argument("--exclude-derived", action="store_true", help="drop ImageType DERIVED images")
    ingest.add_argument("--exclude-localizers", action="store_true", help="drop localizer/scout images")
    ingest.add_argument("--exclude-burned-in", action="store_true", help="drop BurnedInAnnotation=YES images")
    ingest.add_argument("--frames", default="all", help="multi-frame objects: all (default), first or a frame index")
    ingest.add_argument("--deid-key-env", default=DEFAULT_KEY_ENV,
                        help=f"environment variable holding the pseudonymisation key (default {DEFAULT_KEY_ENV})")
    ingest.add_argument("--allow-insecure-key", action="store_true",
                        help="demo/test only: accept a key weaker than 128 bits, or use the public demo key when "
                        "the key variable is unset; records are then marked not de-identified")
    ingest.add_argument("--verify-decode", action="store_true",
                        help="decode every record through the training loader (in --workers processes) and move "
                        "the records that fail to the errors file")
    ingest.add_argument("--summary-json", help="also write the summary as JSON here")
    ingest.add_argument("--no-progress", action="store_true", help="no progress bar")
    ingest.set_defaults(func=run_ingest)

    manifest = subparsers.add_parser("manifest", help="validate, split, subsample or export a manifest")
    sub = manifest.add_subparsers(dest="manifest_command", metavar="ACTION", required=True)

    validate = sub.add_parser("validate", help="report schema problems, missing files, label problems, duplicates, "
                              "leakage; for a prepared store also index vs shards and per-record checksums")
    validate.add_argument("manifest", help="manifest (JSONL), or a prepared store folder (medssl prepare)")
    validate.add_argument("--labels", help="the expected class labels, comma-separated")
    validate.add_argument("--no-check-files", action="store_true", help="do not check that image files exist")
    validate.add_argument("--decode", action="store_true",
                          help="also decode every record through the training loader (slow; in --workers processes)")
    validate.add_argument("--workers", type=int, default=None, help="decoding processes (default: CPU count)")
    validate.add_argument("-o", "--output", help="with --decode: write the manifest without the records that fail "
                          "to decode here (exit status stays 1 when any problem was found)")
    validate.add_argument("--errors", help="with --output: errors file for the removed records "
                          "(JSONL; default <output>.errors.jsonl)")
    validate.add_argument("--no-progress", action="store_true", help="no progress bar")
    validate.set_defaults(func=run_validate)

    split = sub.add_parser("split", help="grouped, stratified split")
    split.add_argument("manifest", help="manifest to split (JSONL)")
    split.add_argument("-o", "--output", required=True, help="manifest to write with 'split' set")
    split.add_argument("--ratios", default="0.6,0.2,0.2",
                       help="fractions of the records per split, comma-separated (default 0.6,0.2,0.2)")
    split.add_argument("--names", default="train,val,test",
                       help="split names in the order of --ratios (default train,val,test)")
    split.add_argument("--group", default="patient_id", help="patient_id (default), lesion_id, study_id or none")
    split.add_argument("--stratify", default="label", help="class key (default label) or none")
    split.add_argument("--seed", type=int, default=0, help="seed of the group order (default 0)")
    split.set_defaults(func=run_split)

    subsample = sub.add_parser("subsample", help="stratified label fractions, nested across fractions per seed")
    subsample.add_argument("manifest", help="manifest with splits (JSONL)")
    subsample.add_argument("-o", "--output", required=True, help="folder for <stem>.frac<F>.seed<S>.jsonl files")
    subsample.add_argument("--fractions", default="0.01,0.1,0.25",
                           help="label fractions in (0, 1], comma-separated (default 0.01,0.1,0.25)")
    subsample.add_argument("--seeds", default="0,1,2", help="one subset per seed, comma-separated (default 0,1,2)")
    subsample.add_argument("--split", default="train",
                           help="split to subsample (default train; others kept whole), or 'all'")
    subsample.add_argument("--stratify", default="label", help="class key (default label) or none")
    subsample.set_defaults(func=run_subsample)

    export = sub.add_parser("export", help="write a MONAI datalist JSON (training/validation/test)")
    export.add_argument("manifest", help="manifest to export (JSONL)")
    export.add_argument("-o", "--output", required=True,
                        help="datalist JSON to write (no paths; they go to <output>.private.jsonl)")
    export.add_argument("--with-paths", action="store_true",
                        help="keep image paths in the datalist (for monai.data.load_decathlon_datalist); the "
                        "datalist is then private (mode 0600) and must not be shared")
    export.set_defaults(func=run_export)

