"""``run_study(CONFIG)``: run every stage of a study in dependency order, skipping what is complete.

Completion: every stage folder holds ``study_stage.json`` (``{"hash", "status", "seconds", "units"}``). A stage
is complete when its status is ``complete``, its hash equals the planned one and its outputs exist; anything
else reruns it (and, through the hashes, everything downstream).

Resumability after a kill at any point:

- *pretrain*: the run writes checkpoints (``checkpoint_every``, by default a tenth of the stage); a stage
  found ``running`` with its hash and a checkpoint is continued with the engine's exact resume
  (:func:`medssl.engines.run.run_pretraining` ``resume=True``), so the final weights equal those of an
  uninterrupted run. Before a fresh start the old outputs are removed first, then the marker is written, so a
  ``backbone.safetensors`` next to a ``running`` marker of the same hash always comes from that run.
- *evaluate* and *report*: written into ``.<folder>.partial`` with the marker, then renamed into place (one
  atomic rename): the folder is either complete or absent, and an absent one is redone.

Progress: one log line per stage, ``[study k/N] <stage> ... stage ETA ..., study ETA ...``; the ETA multiplies
each stage's work (pretraining iterations; evaluation trials x fractions) by the seconds per unit measured on
the stages of the same kind already run (recorded in their markers, so a restarted study keeps its estimates).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from medssl.errors import MedsslError
from medssl.io import atomic_write_json, atomic_write_text
from medssl.study.config import StudyConfig
from medssl.study.plan import Stage, build_plan, data_name

logger = logging.getLogger("medssl.study")

MARKER = "study_stage.json"


def _marker(folder: Path) -> dict[str, Any]:
    try:
        value = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _outputs_exist(stage: Stage) -> bool:
    name = {"pretrain": "backbone.safetensors", "evaluate": "results.json", "report": "report.md"}[stage.kind]
    return (stage.folder / name).is_file()


def stage_complete(stage: Stage) -> bool:
    """True when ``stage.folder`` holds its outputs and a ``complete`` marker with the planned hash."""
    m = _marker(stage.folder)
    return m.get("hash") == stage.hash and m.get("status") == "complete" and _outputs_exist(stage)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class _Rates:
    """Seconds per unit of work per stage kind, from the markers of stages run (now or before a restart)."""

    def __init__(self, stages: list[Stage]) -> None:
        self.seconds: dict[str, float] = {}
        self.units: dict[str, float] = {}
        for s in stages:
            m = _marker(s.folder)
            if m.get("status") == "complete" and m.get("seconds") and m.get("units"):
                self.add(s.kind, float(m["seconds"]), float(m["units"]))

    def add(self, kind: str, seconds: float, units: float) -> None:
        self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds
        self.units[kind] = self.units.get(kind, 0.0) + units

    def eta(self, stage: Stage) -> float | None:
        if not self.units.get(stage.kind):
            return None
        return stage.units * self.seconds[stage.kind] / self.units[stage.kind]


def _pretrain(stage: Stage, progress: bool) -> None:
    from medssl.engines.checkpoint import list_checkpoints
    from medssl.engines.config import PretrainConfig
    from medssl.engines.run import clear_run_outputs, run_pretraining

    values = {k: v for k, v in stage.settings.items() if k != "data_sha256"}
    values.update(data=stage.call["data"], out=str(stage.folder), init=stage.call["init"],
                  device=stage.call.get("device"))
    if values["init"] != "random":
        values["arch"] = None
    config = PretrainConfig.from_dict(values)
    marker = _marker(stage.folder)
    if marker.get("hash") == stage.hash and (stage.folder / "backbone.safetensors").is_file():
        return  # killed after the run wrote its backbone (outputs are cleared before a 'running' marker)
    found = list_checkpoints(stage.folder)
    resumable = (marker.get("hash") == stage.hash and marker.get("status") == "running" and found
                 and (stage.folder / "config.json").is_file() and found[-1][0] < int(stage.units))
    if resumable:
        logger.info("continuing %s from its checkpoint at iteration %d", stage.folder, found[-1][0])
        run_pretraining(config, resume=True, progress=progress, resume_options={})
    else:
        if stage.folder.is_dir():
            clear_run_outputs(stage.folder)  # first, so a backbone next to a 'running' marker is this run's
        atomic_write_json(stage.folder / MARKER, {"hash": stage.hash, "status": "running"})
        run_pretraining(config, overwrite=True, progress=progress)
    if not (stage.folder / "backbone.safetensors").is_file():
        raise MedsslError("pretraining finished without writing backbone.safetensors", stage.folder)


def _partial(folder: Path) -> Path:
    return folder.parent / f".{folder.name or 'report'}.partial"


def _evaluate(stage: Stage, tmp: Path) -> None:
    from medssl.evaluation.components import evaluate_backbone

    net_keys = ("arch", "small_stem", "widen_factor") + (("norm",) if stage.call["backbone"] == "random" else ())
    s = {k: v for k, v in stage.settings.items() if k not in ("data_sha256", "backbone", "baselines") + net_keys}
    net = {k: stage.settings[k] for k in net_keys if k in stage.settings}
    evaluate_backbone(stage.call["data"], tmp, backbone=stage.call["backbone"], **net, **s)
    if stage.settings.get("baselines"):
        from medssl.evaluation.sanity import run_baselines

        run_baselines(tmp, stage.call["data"])


def _report(stage: Stage, stages: list[Stage], tmp: Path, cfg: StudyConfig) -> None:
    from medssl.evaluation.report import compare_evaluations

    compare_evaluations([stages[i].folder for i in stage.call["evals"]], tmp,
                        pretrain_runs=[stages[i].folder for i in stage.call["pretrain_runs"]],
                        n_resamples=stage.settings["bootstrap"], seed=stage.settings["seed"],
                        cluster_by=None if stage.settings["cluster_by"] == "auto" else stage.settings["cluster_by"])
    # the sanity rows (EVAL_DIR/baselines) and flags (medssl.evaluation.sanity) come with compare_evaluations


def _complete_marker(stage: Stage, seconds: float) -> dict[str, Any]:
    return {"hash": stage.hash, "status": "complete", "seconds": round(seconds, 3), "units": stage.units}


def _run_atomic(stage: Stage, work: Any, started: float) -> None:
    """Run ``work(tmp)`` into the stage's partial folder, add the complete marker and rename it into place."""
    tmp = _partial(stage.folder)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    work(tmp)
    atomic_write_json(tmp / MARKER, _complete_marker(stage, time.perf_counter() - started))
    if stage.folder.exists():
        shutil.rmtree(stage.folder)
    tmp.rename(stage.folder)


def run_stages(cfg: StudyConfig, stages: list[Stage], *, progress: bool = True) -> dict[str, Any]:
    """Run the stages not yet complete; returns ``{label: {"status", "seconds"}}``."""
    rates = _Rates(stages)
    done = [stage_complete(s) for s in stages]
    total = len(stages)
    record: dict[str, Any] = {}
    for k, stage in enumerate(stages, 1):
        if done[k - 1]:
            logger.info("[study %d/%d] %s: complete (settings unchanged), skipped", k, total, stage.label)
            record[stage.label] = {"status": "skipped", "folder": stage.folder.relative_to(cfg.out).as_posix()}
            continue
        remaining = [(s.kind, rates.eta(s)) for i, s in enumerate(stages) if not done[i] and i >= k - 1]
        untimed = sorted({kind for kind, eta in remaining if eta is None})
        timed = [eta for _, eta in remaining if eta is not None]
        study_eta = _duration(sum(timed)) if timed else "unknown"
        if untimed and timed:
            study_eta += f" + the {', '.join(untimed)} stages (not timed yet)"
        work = f"{stage.units:g} iterations" if stage.kind == "pretrain" else \
            f"{stage.units:g} trials x fractions" if stage.kind == "evaluate" else "tables and plots"
        logger.info("[study %d/%d] %s (%s) -> %s; stage ETA %s, study ETA %s", k, total, stage.label, work,
                    stage.folder.relative_to(cfg.out).as_posix() or ".", _duration(rates.eta(stage)), study_eta)
        started = time.perf_counter()
        if stage.kind == "pretrain":
            _pretrain(stage, progress)
            atomic_write_json(stage.folder / MARKER, _complete_marker(stage, time.perf_counter() - started))
        elif stage.kind == "evaluate":
            _run_atomic(stage, lambda tmp, s=stage: _evaluate(s, tmp), started)
        else:
            _run_atomic(stage, lambda tmp, s=stage: _report(s, stages, tmp, cfg), started)
        seconds = time.perf_counter() - started
        rates.add(stage.kind, seconds, stage.units)
        done[k - 1] = True
        record[stage.label] = {"status": "run", "seconds": round(seconds, 1),
                               "folder": stage.folder.relative_to(cfg.out).as_posix()}
        logger.info("[study %d/%d] %s done in %s", k, total, stage.label, _duration(seconds))
    return record


def study_markdown(cfg: StudyConfig, stages: list[Stage]) -> str:
    """The study's ``report.md``: what was compared, then each protocol's comparison (plot links relinked)."""
    methods = ", ".join(cfg.methods)
    budget = ", ".join(f"{k} {v}" for k, v in sorted(cfg.pretrain.items()) if k != "method_options")
    evaluation = ", ".join(f"{k} {v}" for k, v in sorted(cfg.evaluation.items()))
    lines = [f"# Study: {cfg.path.stem} on {data_name(cfg.data)}", "",
             f"- data: `{data_name(cfg.data)}` (modality preset {cfg.modality}); seed {cfg.seed}",
             f"- network of random initialisations: {cfg.network['arch']}, widen factor "
             f"{cfg.network['widen_factor']:g}, {'small' if cfg.network['small_stem'] else 'standard'} stem"
             + ({"gn": ", GroupNorm", "bn": ", BatchNorm"}.get(cfg.network.get("norm"), "")),
             f"- methods: {methods}; pretraining budget: {budget or 'PretrainConfig defaults'}",
             "- initialisations: " + ", ".join(i.name for i in cfg.initialisations),
             f"- evaluation: protocols {', '.join(cfg.protocols)}; {evaluation or 'EvalConfig defaults'}",
             "- stages: " + ", ".join(f"{s.kind} `{s.folder.relative_to(cfg.out).as_posix() or '.'}`"
                                      for s in stages), ""]
    for stage in stages:
        if stage.kind != "report":
            continue
        rel = stage.folder.relative_to(cfg.out).as_posix()
        text = (stage.folder / "report.md").read_text(encoding="utf-8")
        depth = 1
        if len(cfg.protocols) > 1:
            lines += [f"## Protocol: {stage.settings['protocol']}", ""]
            depth = 2
        text = "\n".join("#" * depth + line if line.startswith("#") else line for line in text.splitlines())
        lines += [text.replace("](plots/", f"]({rel}/plots/"), ""]
    return "\n".join(lines)


def run_study(config: StudyConfig, *, progress: bool = True) -> Path:
    """Run ``config`` (see :func:`medssl.study.config.load_study_config`) and return ``OUT/report.md``.

    Writes ``OUT/study.json`` (stage folders, hashes, this invocation's timings) and ``OUT/report.md``. The
    output folder is locked while the study runs (a second invocation fails naming the holder).
    """
    from medssl.engines.runlock import RunLock

    cfg = config
    cfg.out.mkdir(parents=True, exist_ok=True)
    with RunLock(cfg.out):
        started = time.perf_counter()
        stages = build_plan(cfg)
        logger.info("study %s: %d stages (%d complete) -> %s", cfg.path.name, len(stages),
                    sum(stage_complete(s) for s in stages), cfg.out)
        record = run_stages(cfg, stages, progress=progress)
        report = cfg.out / "report.md"
        atomic_write_text(report, study_markdown(cfg, stages))
        atomic_write_json(cfg.out / "study.json", {
            "study": str(cfg.path), "data": str(cfg.data),
            "stages": [{"kind": s.kind, "label": s.label, "folder": s.folder.relative_to(cfg.out).as_posix(),
                        "hash": s.hash, "depends_on": [stages[d].label for d in s.deps]} for s in stages],
            "this_invocation": record, "seconds": round(time.perf_counter() - started, 1)})
        logger.info("study finished: %s", report)
    return report
