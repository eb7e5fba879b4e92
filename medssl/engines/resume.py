"""Resuming a pretraining run safely: what a resume reads, what it may change, and how it is checked.

A resume never escalates trust. It reads ``RUN_DIR/config.json`` and the newest checkpoint, and nothing else
from the run folder: the init checkpoint is **not** read again (the training checkpoint holds the whole method,
and its run record holds how to rebuild the backbone's layout, its input normalisation, the imported head names
and the provenance of the init), so ``trust`` and ``init`` in a (possibly edited) ``config.json`` are never
acted upon. ``--init`` and ``--trust`` on a resuming command line are refused as meaningless.

Run record (JSON string ``state["run"]`` of every checkpoint, written from the first checkpoint on):

- ``config_sha256``: SHA-256 of the run-start ``config.json`` values, serialised as canonical JSON
  (``json.dumps(values, sort_keys=True, separators=(",", ":"))``). A resume recomputes it from the
  ``config.json`` it reads; a mismatch (edited config, checkpoint copied from another run) is a one-line error.
  This detects mix-ups and edits, not a forger who rewrites both files: that one still gains no code execution.
- ``init_sha256``: SHA-256 of the init checkpoint file at run start (None for random init).
- ``overrides``: the options applied by earlier resumes (cumulative), re-applied on every later resume.
- ``backbone``: ``arch``, ``arch_kwargs``, ``input_normalization``, ``heads`` (names of imported SSL heads),
  ``reports`` (preparation steps) and ``source`` (init file name, format, SHA-256) for the final provenance.

Options that a resume may change (:data:`RESUMABLE`): ``iterations`` (the schedule is re-spanned to the new
total from the current step on; must exceed the checkpoint's step), ``stop_after``, ``workers``, ``device``,
``knn_every``, ``checkpoint_every``, ``checkpoint_every_epochs``, ``keep_checkpoints``, ``skip_bad_records``
and ``lr`` (the new peak rate; the warmup/cosine factor of the current step is kept, so the rate continues
from ``new_lr * factor(step)``: how one lowers the rate after a divergence). None of them changes data order
or augmentation. Any other option is refused with one line listing them. Each resume appends
``{"iteration", "checkpoint", "applied", "time"}`` to ``RUN_DIR/resumes.jsonl``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medssl.engines.config import PretrainConfig
from medssl.errors import MedsslError

RESUMABLE = ("iterations", "stop_after", "workers", "device", "knn_every", "checkpoint_every",
             "checkpoint_every_epochs", "keep_checkpoints", "skip_bad_records", "lr")
#: options that only apply to the invocation that gets them (not carried to later resumes)
PER_INVOCATION = ("stop_after",)
RUN_RECORD_VERSION = 1


def config_sha256(values: dict[str, Any]) -> str:
    """SHA-256 (hex) of canonical JSON of a config dict (sorted keys, no whitespace)."""
    text = json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_plain)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def flag(name: str) -> str:
    """The CLI spelling of a config field (``batch_size`` -> ``--batch-size``)."""
    return "--" + name.replace("_", "-")


def refuse_options(given: dict[str, Any]) -> None:
    """Raise one :class:`MedsslError` line listing the options in ``given`` that a resume cannot apply."""
    refused = sorted(k for k in given if k not in RESUMABLE)
    if refused:
        raise MedsslError(
            f"cannot change {', '.join(flag(k) for k in refused)} when resuming (the run keeps its recorded "
            f"settings; --init and --trust are never needed); options a resume applies: "
            f"{', '.join(flag(k) for k in RESUMABLE)}")


def given_options(config: PretrainConfig, recorded: PretrainConfig | None = None) -> dict[str, Any]:
    """The options a Python caller gives to a resume: fields of ``config`` that differ from the defaults and
    (when given) from the run's ``recorded`` settings, ``out`` excluded. So passing the run's own full config
    again (e.g. a bundle re-run with ``resume=True``) gives nothing, and only real changes are applied or
    refused."""
    default = PretrainConfig()
    given = {}
    for f in dataclasses.fields(PretrainConfig):
        value = getattr(config, f.name)
        if f.name == "out" or value == getattr(default, f.name):
            continue
        if recorded is not None and f.name not in PER_INVOCATION and value == getattr(recorded, f.name):
            continue
        given[f.name] = value
    return given


def make_run_record(config: PretrainConfig, *, backbone: nn.Module, spec: dict[str, Any],
                    heads: dict[str, Any] | None, reports: list[dict], source: dict[str, Any]) -> dict[str, Any]:
    """The run record of a new run (see the module docstring)."""
    return {
        "version": RUN_RECORD_VERSION,
        "config_sha256": config_sha256(config.to_dict()),
        "init_sha256": source.get("sha256"),
        "overrides": {},
        "backbone": {"arch": backbone.arch, "arch_kwargs": dict(backbone.arch_kwargs),
                     "input_normalization": spec, "heads": sorted(heads or {}), "reports": reports,
                     "source": source},
    }


def encode_run_record(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, default=_plain)


def _plain(obj: Any) -> Any:
    """JSON fallback as in config.json: arrays/scalars as lists/numbers, anything else (paths) as text."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def resume_config(run_dir: Path, state: dict[str, Any], checkpoint: Path, given: dict[str, Any] | None = None,
                  requested: PretrainConfig | None = None) -> tuple[PretrainConfig, dict[str, Any], dict[str, Any]]:
    """The configuration of a resumed run, its updated run record and the options given.

    Args:
        run_dir: the run folder (``config.json`` is read from it).
        state: the newest checkpoint, already loaded (weights only).
        checkpoint: its path (for messages).
        given: the options of the resuming invocation (field name -> value), e.g. from the command line.
        requested: instead of ``given``, a config whose fields that differ from the defaults and from the
            recorded settings are the options given (:func:`given_options`).

    Raises:
        MedsslError: refused options, no run record, config.json not belonging to the checkpoint, or an
            ``iterations`` not beyond the checkpoint.
    """
    raw = state.get("run")
    if not isinstance(raw, str):
        raise MedsslError("checkpoint has no run record (written by an older medssl): it cannot be verified "
                          "against config.json; start a new run", checkpoint)
    try:
        record = json.loads(raw)
        backbone = record["backbone"]
        overrides = dict(record.get("overrides") or {})
        expected = str(record["config_sha256"])
    except (ValueError, KeyError, TypeError) as exc:
        raise MedsslError(f"checkpoint run record is malformed ({type(exc).__name__})", checkpoint) from exc
    if not isinstance(backbone, dict) or not set(overrides) <= set(RESUMABLE):
        raise MedsslError("checkpoint run record is malformed", checkpoint)
    config_path = run_dir / "config.json"
    values = _read_json_object(config_path)
    if config_sha256(values) != expected:
        raise MedsslError(f"does not belong to {checkpoint.name} (SHA-256 of the settings differs from the one "
                          "recorded at run start: config.json was edited or the checkpoint comes from another "
                          "run)", config_path)
    config = PretrainConfig.from_dict(values, config_path)
    if given is None:
        recorded = dataclasses.replace(config, **overrides)
        given = given_options(requested if requested is not None else PretrainConfig(), recorded)
    refuse_options(given)
    start = int(state["iteration"])
    applied = {k: v for k, v in given.items() if k not in PER_INVOCATION}
    overrides.update(applied)
    changes = {**overrides, "out": str(run_dir), "stop_after": given.get("stop_after"), "trust": False}
    config = dataclasses.replace(config, **changes)
    # only a length given now must extend the run; one recorded by an earlier resume may equal the last step
    # (the run is then complete and the trainer says so)
    if "iterations" in given and (config.iterations is None or config.iterations <= start):
        raise MedsslError(f"--iterations {config.iterations} must exceed the checkpoint's {start} steps",
                          checkpoint)
    if config.lr is not None and not config.lr > 0:
        raise MedsslError(f"--lr must be positive, not {config.lr}")
    record["overrides"] = overrides
    return config, record, given


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise MedsslError("no config.json: not a medssl pretraining run folder", path) from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise MedsslError(f"config.json is not valid JSON ({exc})", path) from exc
    if not isinstance(values, dict):
        raise MedsslError("config.json must hold a JSON object", path)
    return values


def rebuild_backbone(record: dict[str, Any], state: dict[str, Any], checkpoint: Path,
                     ) -> tuple[nn.Module, dict[str, Any], dict[str, Any] | None, list[dict], dict[str, Any]]:
    """Backbone (layout only; the weights come from the checkpoint), normalisation spec, imported heads (sized
    from the checkpoint's method state), preparation reports and source record, without reading the init file.
    """
    from medssl.models import StdConv2d, build_backbone
    from medssl.weights.checkpoint import folded_layers

    info = record["backbone"]
    try:
        backbone = build_backbone(str(info["arch"]), **dict(info["arch_kwargs"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise MedsslError(f"checkpoint run record names an unusable backbone ({exc})", checkpoint) from exc
    reports = list(info.get("reports") or [])
    for name in folded_layers({"operations": reports}):
        module = dict(backbone.named_modules()).get(name)
        if isinstance(module, StdConv2d):
            module.standardize = False
    heads = None
    names = list(info.get("heads") or [])
    if names:
        method_state: dict[str, torch.Tensor] = state["method"]
        heads = {n: {k[len(n) + 1:]: v for k, v in method_state.items() if k.startswith(n + ".")} for n in names}
    return backbone.train(), dict(info["input_normalization"]), heads, reports, dict(info.get("source") or {})


def log_resume(run_dir: Path, *, iteration: int, checkpoint: Path, applied: dict[str, Any]) -> None:
    """Append this resume to ``RUN_DIR/resumes.jsonl``."""
    entry = {"iteration": iteration, "checkpoint": checkpoint.name, "applied": applied,
             "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    with (run_dir / "resumes.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
