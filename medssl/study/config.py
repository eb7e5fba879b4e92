"""The study file (``study.yaml``): reading and validating it into a :class:`StudyConfig`.

Every error is one line naming the file and the key (``study.yaml: pretrain.batch_size: must be an integer``).
Paths in the file are relative to the file's folder. Schema (``docs/study.md`` has the full reference)::

    data: manifest.jsonl            # target data: labelled manifest, prepared store or class-folder tree
    out: study_out                  # output folder
    modality: ultrasound            # transform preset of the target data (default generic)
    seed: 0
    network: {arch: resnet18, widen_factor: 0.25, small_stem: true}   # every randomly initialised network
    methods: [simclr, byol]         # or {simclr: {lr: 1.0}, byol: {}}: per-method pretraining overrides
    pretrain: {iterations: 400, batch_size: 32, image_size: 64}       # PretrainConfig fields
    first_stage: {data: other.jsonl, modality: xray, iterations: 400}  # optional: a first stage per method
    initialisations: [random, first_stage, p1x, {kind: p2x, from: first_stage},
                      {kind: checkpoint, path: BiT-M-R50x1.npz, norm: bn, name: "BiT -> BN"}]
    evaluation: {protocols: [linear, knn], fractions: [0.1, 1.0], trials: 3}  # EvalConfig fields
    # evaluation.baselines (default true): the sanity rows (raw-pixel linear probe; random init of the same
    # architecture when no random row is compared) next to one evaluation per protocol
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medssl.errors import MedsslError

TOP_KEYS = ("data", "out", "modality", "seed", "device", "network", "methods", "pretrain", "first_stage",
            "initialisations", "evaluation")
INIT_KINDS = ("random", "first_stage", "p1x", "p2x", "checkpoint")
#: default row names (Ciga et al.'s: P1X = SSL from random init on the target, P2X = second stage)
DEFAULT_NAMES = {"random": "Random", "first_stage": "First stage", "p1x": "P1X", "p2x": "P2X"}
#: PretrainConfig fields a study sets itself (per stage), never from the file
PRETRAIN_RESERVED = ("data", "out", "method", "init", "method_schedule", "stop_after", "arch", "small_stem",
                     "widen_factor", "modality", "seed", "device", "scale_frobenius", "frobenius_rule",
                     "dead_filters", "fold_ws", "norm", "trust", "use_checkpoint_heads")
#: EvalConfig fields a study sets itself
EVAL_RESERVED = ("protocol", "name", "arch", "arch_kwargs", "device")
#: per-initialisation keys: kind -> allowed keys besides ``kind`` and ``name``
INIT_KEYS = {"random": (), "first_stage": (), "p1x": (),
             "p2x": ("from", "scale_frobenius", "dead_filters", "frobenius_rule", "norm", "fold_ws"),
             "checkpoint": ("path", "norm", "recalibrate_bn")}


@dataclass(frozen=True)
class Initialisation:
    """One row of the comparison: ``kind`` (see :data:`INIT_KINDS`), display ``name`` and its options
    (``p2x``: ``from`` = ``first_stage``, a checkpoint file or a weights-registry name, or a mapping method ->
    one of those (Ciga et al. start each method from its own ImageNet SSL weights); Frobenius scaling and
    dead-filter copy on by default as Ciga et al.; ``checkpoint``: ``path`` (file or registry name), ``norm``,
    ``recalibrate_bn``)."""

    kind: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class StudyConfig:
    """A validated study file; paths absolute."""

    path: Path
    data: Path
    out: Path
    modality: str = "generic"
    seed: int = 0
    device: str | None = None
    network: dict[str, Any] = field(default_factory=lambda: {"arch": "resnet50", "widen_factor": 1.0,
                                                             "small_stem": False})
    methods: dict[str, dict[str, Any]] = field(default_factory=lambda: {"simclr": {}})
    pretrain: dict[str, Any] = field(default_factory=dict)
    first_stage: dict[str, Any] | None = None
    initialisations: list[Initialisation] = field(default_factory=list)
    evaluation: dict[str, Any] = field(default_factory=dict)
    protocols: list[str] = field(default_factory=lambda: ["linear"])
    baselines: bool = True


def _fail(path: Path, key: str, reason: str) -> MedsslError:
    return MedsslError(f"{key}: {reason}", path)


def _mapping(path: Path, key: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(path, key, f"must be a mapping, not {type(value).__name__}")
    return dict(value)


def _check_fields(path: Path, key: str, values: dict[str, Any], cls: type, reserved: tuple[str, ...],
                  extra: tuple[str, ...] = ()) -> None:
    """Unknown or reserved keys of a section, and values whose type does not match the dataclass default."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in values.items():
        if name in extra:
            continue
        if name not in fields or name in reserved:
            allowed = sorted(set(fields) - set(reserved)) + list(extra)
            raise _fail(path, f"{key}.{name}", f"unknown setting (allowed: {', '.join(sorted(allowed))})")
        default = fields[name].default
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int) and default is not None:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(default, str):
            ok = isinstance(value, str)
        else:
            ok = True
        if not ok:
            raise _fail(path, f"{key}.{name}", f"must be {type(default).__name__}, not {value!r}")


def _path(base: Path, path: Path, key: str, value: Any, *, must_exist: bool = True) -> Path:
    if not isinstance(value, str) or not value:
        raise _fail(path, key, "must be a path (text)")
    p = Path(value).expanduser()
    p = p if p.is_absolute() else (base / p)
    if must_exist and not p.exists():
        raise _fail(path, key, f"{value} not found")
    return p.resolve()


def _weights(base: Path, path: Path, key: str, value: Any) -> str:
    """A checkpoint file (relative to the study file) or a weights-registry name (fetched when the study runs)."""
    from medssl.weights.registry import registry

    if isinstance(value, str) and value in registry() and not (base / value).exists():
        return value
    return str(_path(base, path, key, value))


def p2x_source(init: Initialisation, method: str) -> str:
    """Where the P2X row ``init`` starts for ``method``: ``first_stage``, a checkpoint file or a registry name."""
    source = init.options["from"]
    return source.get(method, source.get("*")) if isinstance(source, dict) else source


def slug(text: str) -> str:
    """Folder name of a row name: lower case, runs of other characters -> ``_`` (``BiT -> BN`` -> ``bit_bn``)."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "init"


def _initialisations(path: Path, base: Path, raw: Any) -> list[Initialisation]:
    if not isinstance(raw, list) or not raw:
        raise _fail(path, "initialisations", "must be a non-empty list (e.g. [random, p1x, p2x])")
    out: list[Initialisation] = []
    for i, item in enumerate(raw):
        key = f"initialisations[{i}]"
        entry = {"kind": item} if isinstance(item, str) else item
        if not isinstance(entry, dict) or not isinstance(entry.get("kind"), str):
            raise _fail(path, key, "must be a kind name or a mapping with a 'kind'")
        kind = entry["kind"]
        if kind not in INIT_KINDS:
            raise _fail(path, f"{key}.kind", f"unknown kind {kind!r}; choose one of {', '.join(INIT_KINDS)}")
        unknown = sorted(set(entry) - {"kind", "name"} - set(INIT_KEYS[kind]))
        if unknown:
            raise _fail(path, f"{key}.{unknown[0]}", f"not a setting of kind {kind} (allowed: "
                        f"{', '.join(('name',) + INIT_KEYS[kind])})")
        options = {k: v for k, v in entry.items() if k not in ("kind", "name")}
        if kind == "checkpoint":
            if "path" not in options:
                raise _fail(path, f"{key}.path", "a checkpoint initialisation needs the checkpoint file")
            options["path"] = _weights(base, path, f"{key}.path", options["path"])
        if kind == "p2x":
            source = options.setdefault("from", "first_stage")
            if isinstance(source, dict):
                options["from"] = {m: v if v == "first_stage" else _weights(base, path, f"{key}.from.{m}", v)
                                   for m, v in source.items()}
            elif source != "first_stage":
                options["from"] = _weights(base, path, f"{key}.from", source)
            options.setdefault("scale_frobenius", True)
            options.setdefault("dead_filters", "copy")
        name = entry.get("name")
        if name is None:
            name = DEFAULT_NAMES.get(kind) or Path(options["path"]).stem
        if not isinstance(name, str) or not name.strip():
            raise _fail(path, f"{key}.name", "must be non-empty text")
        if any(slug(o.name) == slug(name) for o in out):
            raise _fail(path, f"{key}.name", f"{name!r} is used twice (or names the same folder, "
                        f"{slug(name)!r}): every initialisation needs its own name")
        out.append(Initialisation(kind, name, options))
    return out


def load_study_config(path: str | Path, *, out: str | Path | None = None, data: str | Path | None = None,
                      first_stage_data: str | Path | None = None) -> StudyConfig:
    """Read and validate a study file; ``out``, ``data`` and ``first_stage_data`` (relative to the current
    folder) override its ``out``, ``data`` and ``first_stage.data``.

    Raises:
        MedsslError: unreadable YAML, unknown keys, wrong types, missing files (one line: file and key).
    """
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise MedsslError("study file not found", path) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise MedsslError(f"not valid YAML{where} ({getattr(exc, 'problem', None) or exc})", path) from exc
    return study_config_from_dict(raw, path, out=out, data=data, first_stage_data=first_stage_data)


def study_config_from_dict(raw: Any, path: str | Path, *, out: str | Path | None = None,
                           data: str | Path | None = None,
                           first_stage_data: str | Path | None = None) -> StudyConfig:
    """Validate a study given as a dict (``path``: the file it stands for; relative paths start at its folder).
    ``out``, ``data`` and ``first_stage_data`` replace the file's values (paths relative to the current folder);
    the data hashes of the stages cover the data's content, not its location, so a moved dataset keeps them."""
    from medssl.engines.config import METHODS, PretrainConfig
    from medssl.evaluation.run import PROTOCOLS, EvalConfig

    path = Path(path)
    base = path.parent
    if not isinstance(raw, dict):
        raise MedsslError("a study file must hold a mapping (data:, out:, methods:, ...)", path)
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise _fail(path, unknown[0], f"unknown key (allowed: {', '.join(TOP_KEYS)})")
    if data is not None:
        raw = {**raw, "data": str(Path(data).expanduser().resolve())}
    if first_stage_data is not None:
        if not isinstance(raw.get("first_stage"), dict):
            raise _fail(path, "first_stage", "missing: --first-stage-data needs a first_stage section")
        raw = {**raw, "first_stage": {**raw["first_stage"], "data": str(Path(first_stage_data).expanduser().resolve())}}
    if "data" not in raw:
        raise _fail(path, "data", "missing: name the target data (manifest, prepared store or folder)")
    if out is None and "out" not in raw:
        raise _fail(path, "out", "missing: name the output folder (or give --out)")
    cfg = StudyConfig(path=path, data=_path(base, path, "data", raw["data"]),
                      out=Path(out) if out is not None else _path(base, path, "out", raw["out"], must_exist=False))
    for key, kind in (("modality", str), ("seed", int), ("device", str)):
        if key in raw and raw[key] is not None:
            if not isinstance(raw[key], kind) or isinstance(raw[key], bool):
                raise _fail(path, key, f"must be {kind.__name__}, not {raw[key]!r}")
            setattr(cfg, key, raw[key])
    network = _mapping(path, "network", raw.get("network"))
    bad = sorted(set(network) - {"arch", "widen_factor", "small_stem", "norm"})
    if bad:
        raise _fail(path, f"network.{bad[0]}", "unknown setting (allowed: arch, widen_factor, small_stem, norm)")
    if "norm" in network and (network["norm"] not in ("gn", "bn")
                              or not str(network.get("arch", cfg.network["arch"])).startswith("resnetv2")):
        raise _fail(path, "network.norm", "gn or bn, for a resnetv2_* architecture only (ResNet v1.5 has BatchNorm)")
    cfg.network.update(network)
    methods = raw.get("methods", ["simclr"])
    if isinstance(methods, list):
        methods = {m: {} for m in methods}
    if not isinstance(methods, dict) or not methods:
        raise _fail(path, "methods", "must be a non-empty list of methods or a mapping method -> settings")
    for name, overrides in methods.items():
        if name not in METHODS:
            raise _fail(path, f"methods.{name}", f"unknown method; choose from {', '.join(METHODS)}")
        methods[name] = _mapping(path, f"methods.{name}", overrides)
        _check_fields(path, f"methods.{name}", methods[name], PretrainConfig, PRETRAIN_RESERVED)
    cfg.methods = methods
    cfg.pretrain = _mapping(path, "pretrain", raw.get("pretrain"))
    _check_fields(path, "pretrain", cfg.pretrain, PretrainConfig, PRETRAIN_RESERVED)
    if raw.get("first_stage") is not None:
        first = _mapping(path, "first_stage", raw["first_stage"])
        if "data" not in first:
            raise _fail(path, "first_stage.data", "missing: the dataset the first stage trains on")
        first["data"] = str(_path(base, path, "first_stage.data", first["data"]))
        _check_fields(path, "first_stage", first, PretrainConfig, PRETRAIN_RESERVED, extra=("data", "modality"))
        cfg.first_stage = first
    cfg.initialisations = _initialisations(path, base, raw.get("initialisations"))
    for i, init in enumerate(cfg.initialisations):
        for method in cfg.methods if init.kind == "p2x" else ():
            if p2x_source(init, method) is None:
                raise _fail(path, f"initialisations[{i}].from", f"no starting weights for method {method}")
    needs_first = any(i.kind == "first_stage" or (i.kind == "p2x" and "first_stage" in
                                                  [p2x_source(i, m) for m in cfg.methods])
                      for i in cfg.initialisations)
    if needs_first and cfg.first_stage is None:
        raise _fail(path, "first_stage", "missing: an initialisation uses the first stage; say what it trains on")
    evaluation = _mapping(path, "evaluation", raw.get("evaluation"))
    protocols = evaluation.pop("protocols", ["linear"])
    if isinstance(protocols, str):
        protocols = [protocols]
    if not isinstance(protocols, list) or not protocols or any(p not in PROTOCOLS for p in protocols):
        raise _fail(path, "evaluation.protocols", f"must be a list drawn from {', '.join(PROTOCOLS)}")
    baselines = evaluation.pop("baselines", True)
    if not isinstance(baselines, bool):
        raise _fail(path, "evaluation.baselines", f"must be true or false, not {baselines!r}")
    _check_fields(path, "evaluation", evaluation, EvalConfig, EVAL_RESERVED)
    if "fractions" in evaluation:
        fr = evaluation["fractions"]
        if (not isinstance(fr, list) or not fr
                or any(isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1 for f in fr)):
            raise _fail(path, "evaluation.fractions", f"must be a list of fractions in (0, 1], not {fr!r}")
    cfg.evaluation, cfg.protocols, cfg.baselines = evaluation, list(dict.fromkeys(protocols)), baselines
    return cfg
