"""Sanity flags of evaluations and pretraining runs: results that look like numbers but mean nothing.

Public functions (used by :func:`medssl.evaluation.run.run_evaluation`, ``medssl report`` and the study report):

- :func:`probe_flags` (summary blocks, classes) -> flags ``degenerate_probe`` and ``best_epoch_first``;
- :func:`trial_flags` (summary blocks) -> flags ``trials_disagree``;
- :func:`pretraining_flags` (RUN_DIR or its ``metrics.jsonl``) -> flags ``collapse_warning``, ``uniform_prototypes``,
  ``spread_falling`` and ``flat_loss``;
- :func:`metrics_path_of_backbone` (checkpoint path) -> the ``metrics.jsonl`` of the run that wrote it, or None;
- :func:`random_init_flags` (paired comparison rows, names of the random-init rows) -> ``not_above_random_init``;
- :func:`evaluation_flags` (results.json dict, summary blocks, backbone path) -> every flag of one evaluation;
- :func:`report_flags` (a loaded ``Evaluation``), :func:`comparison_flags` (evaluations, paired rows, pretraining
  runs) -> the flags of ``report.md`` / ``medssl report``; :func:`with_baselines` adds the sanity-row folders;
- :func:`flag_lines` (flags) -> Markdown bullet lines; :data:`FLAG_DEFINITIONS` -> their definitions;
- :func:`run_baselines` (EVAL_DIR, data) -> the sanity rows ``EVAL_DIR/baselines/random_init`` (random init of
  the same architecture, same settings) and ``EVAL_DIR/baselines/raw_pixels`` (:class:`RawPixels` + linear probe),
  then the ``not_above_random_init`` flags of EVAL_DIR (``medssl evaluate --baselines``);
  :func:`baseline_dirs` (EVAL_DIR) -> those folders when present (``medssl report`` adds them as rows).

Every flag is a dict ``{"flag": KIND, "message": one sentence, ...context (fraction, trial, values)}``.

Thresholds (each a documented rule of thumb, not a statistical test):

- degenerate probe: the most-predicted class takes more than :data:`DEGENERATE_SHARE` (80 %) of the test
  predictions while fewer than 80 % of the test images belong to it, or its predicted share exceeds its true share
  by more than :data:`OVERPREDICTED_SHARE` (40 points; the case "65 % of test images predicted as a rare class");
  the selected probe's best epoch is the first one (of several): validation never improved, the selection
  returned an untrained classifier.
- trials disagree: the std over trials of the balanced accuracy exceeds :data:`TRIAL_STD_THRESHOLD` (0.10 = 10
  points); trials share the test set, so such a spread means the label subset or the seed decides the result.
- not above random init: the paired bootstrap difference (learned - random init, balanced accuracy, same test
  images, :func:`medssl.evaluation.paired.paired_comparisons`) has a 95 % CI whose lower end is not positive.
- SSL run, embedding spread falls steadily: the ``collapse_std`` values of metrics.jsonl, cut into
  :data:`SPREAD_SEGMENTS` (4) consecutive segments, have strictly falling segment means and the last is below
  :data:`SPREAD_FALL_RATIO` (0.75) of the first (the issue's run went 0.044 -> 0.028, ratio 0.64).
- SSL run, loss does not move: ``|L_first - L_last| / max(|L_first|, |L_last|, 1e-3) <`` :data:`FLAT_LOSS_RELATIVE`
  (0.02), with ``L_first``/``L_last`` the mean loss over the first/last :data:`LOSS_WINDOW_FRACTION` (10 %, at
  least one line) of the logged steps (the smoothing); at least :data:`MIN_LOSS_LINES` (10) lines needed.
- SwAV run, uniform prototypes: the mean loss over the last :data:`LOSS_WINDOW_FRACTION` of the logged steps is
  at least ``(1 -`` :data:`UNIFORM_LOSS_RELATIVE` ``) ln K``: the cross-entropy of any codes against uniform
  predictions is exactly ln K, the plateau SwAV sits on when it does not learn (K = 3000 on 28-32 px data,
  docs/results.md; the SwAV authors' issue tracker reports the same plateau on CIFAR-10 and ImageNet subsets).
- SSL run, collapse warning: metrics.jsonl holds ``"warning": "collapse"`` lines of the collapse monitor, whose
  threshold (:data:`medssl.engines.handlers.COLLAPSE_THRESHOLD`) is justified by the measurement in that module,
  and the mean ``collapse_std`` over the last :data:`LOSS_WINDOW_FRACTION` of the logged steps is still below it.
  A dip that recovers is not flagged: SimCLR from random init on PneumoniaMNIST (docs/results.md) went 0.073 ->
  0.019 in its first 16 steps (the monitor warned) and back to 0.073 while its kNN accuracy rose 0.855 -> 0.902.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medssl.engines.handlers import COLLAPSE_THRESHOLD
from medssl.errors import MedsslError
from medssl.io import atomic_write_json

DEGENERATE_SHARE = 0.8
OVERPREDICTED_SHARE = 0.4
TRIAL_STD_THRESHOLD = 0.10
SPREAD_SEGMENTS = 4
SPREAD_FALL_RATIO = 0.75
FLAT_LOSS_RELATIVE = 0.02
LOSS_WINDOW_FRACTION = 0.1
UNIFORM_LOSS_RELATIVE = 0.01
MIN_LOSS_LINES = 10

FLAG_DEFINITIONS = {
    "degenerate_probe": f"the classifier predicts one class for more than {DEGENERATE_SHARE:.0%} of the test "
                        "images (that class holding fewer), or over-predicts one class by more than "
                        f"{OVERPREDICTED_SHARE:.0%} of the test images",
    "best_epoch_first": "the selected probe is its first epoch (of several): validation balanced accuracy never "
                        "improved after it",
    "trials_disagree": f"the std of the balanced accuracy over trials exceeds {TRIAL_STD_THRESHOLD:g}",
    "not_above_random_init": "the paired difference in balanced accuracy (learned - random init of the same "
                             "architecture, same test images) has a 95% CI whose lower end is not positive",
    "collapse_warning": "the collapse monitor logged embedding std below "
                        f"{COLLAPSE_THRESHOLD:g} / sqrt(D) during pretraining and the mean std over the last "
                        f"{LOSS_WINDOW_FRACTION:.0%} of the logged steps is still below it (a dip that recovers is "
                        "not flagged: from random init the embeddings of a run that learns first contract, then "
                        "spread; docs/results.md)",
    "spread_falling": f"the collapse statistic falls in each of {SPREAD_SEGMENTS} consecutive segments of the run "
                      f"and ends below {SPREAD_FALL_RATIO:g} x its first segment",
    "uniform_prototypes": f"SwAV: the loss over the last {LOSS_WINDOW_FRACTION:.0%} of logged steps is within "
                          f"{UNIFORM_LOSS_RELATIVE:.0%} of ln K (K prototypes): the predictions are uniform over "
                          "the prototypes, the swapped-prediction loss gives no learning signal",
    "flat_loss": f"the loss averaged over the last {LOSS_WINDOW_FRACTION:.0%} of logged steps differs from the "
                 f"first {LOSS_WINDOW_FRACTION:.0%} by less than {FLAT_LOSS_RELATIVE:.0%} (relative)",
}


def _flag(kind: str, message: str, **context: Any) -> dict[str, Any]:
    return {"flag": kind, "message": message, **context}


def _pct(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def probe_flags(summary: Sequence[Mapping[str, Any]], classes: Sequence[str]) -> list[dict[str, Any]]:
    """``degenerate_probe`` and ``best_epoch_first`` flags of every trial of ``summary`` (summary blocks with
    per-trial ``confusion_matrix`` (rows true, columns predicted) and optionally ``best_epoch``/``epochs``)."""
    flags = []
    for block in summary:
        for trial in block["trials"]:
            cm = np.asarray(trial["confusion_matrix"], dtype=np.float64)
            n = cm.sum()
            if n <= 0:
                continue
            predicted, true = cm.sum(axis=0) / n, cm.sum(axis=1) / n
            top = int(np.argmax(predicted))
            share, truth = float(predicted[top]), float(true[top])
            where = f"{_pct(block['fraction'])} labels, trial {trial['trial']}"
            if (share > DEGENERATE_SHARE and truth < DEGENERATE_SHARE) or share - truth > OVERPREDICTED_SHARE:
                flags.append(_flag("degenerate_probe", f"{where}: {share:.0%} of the test images predicted as "
                                   f"{classes[top]} (true share {truth:.0%})", fraction=block["fraction"],
                                   trial=trial["trial"], predicted_class=classes[top], predicted_share=share,
                                   true_share=truth))
            if trial.get("best_epoch") == 1 and int(trial.get("epochs", 2)) > 1:
                flags.append(_flag("best_epoch_first", f"{where}: the selected probe is from epoch 1",
                                   fraction=block["fraction"], trial=trial["trial"]))
    return flags


def trial_flags(summary: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``trials_disagree`` for every label fraction whose trials' balanced accuracies have a std (ddof 1, as in
    the summary) above :data:`TRIAL_STD_THRESHOLD`."""
    flags = []
    for block in summary:
        values = np.array([t["balanced_accuracy"] for t in block["trials"]], dtype=np.float64)
        if len(values) < 2:
            continue
        std = float(np.std(values, ddof=1))
        if std > TRIAL_STD_THRESHOLD:
            flags.append(_flag("trials_disagree", f"{_pct(block['fraction'])} labels: balanced accuracy varies "
                               f"by std {std:.3f} over {len(values)} trials (range {values.min():.3f}-"
                               f"{values.max():.3f})", fraction=block["fraction"], std=std))
    return flags


def read_metrics_lines(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The JSON objects of a metrics.jsonl (a partial last line, as left by a kill, is skipped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MedsslError(f"cannot read metrics.jsonl ({exc.strerror})", path) from exc
    lines = []
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            lines.append(obj)
    return lines


def _series(lines: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    """Values of ``key`` on the per-iteration lines (not the warning / kNN lines), in iteration order."""
    by_it = {int(o["iteration"]): float(o[key]) for o in lines
             if "warning" not in o and isinstance(o.get(key), (int, float)) and "iteration" in o
             and math.isfinite(float(o[key]))}
    return np.array([by_it[i] for i in sorted(by_it)], dtype=np.float64)


def _window(series: np.ndarray) -> int:
    """Values in the smoothing window at either end of a run: :data:`LOSS_WINDOW_FRACTION` of them, at least 1."""
    return max(1, int(round(LOSS_WINDOW_FRACTION * len(series))))


def pretraining_flags(run: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """``collapse_warning``, ``uniform_prototypes``, ``spread_falling`` and ``flat_loss`` of a pretraining run
    (RUN_DIR or its metrics.jsonl); each flag carries ``run`` (the path)."""
    path = Path(run)
    if path.is_dir():
        path = path / "metrics.jsonl"
    lines = read_metrics_lines(path)
    flags = []
    warnings = [o for o in lines if o.get("warning") == "collapse"]
    spread = _series(lines, "collapse_std")
    if warnings:
        low = min(float(o["collapse_std"]) for o in warnings)
        limit = COLLAPSE_THRESHOLD * float(warnings[-1].get("healthy_std") or 0.0)
        end = float(spread[-_window(spread):].mean()) if len(spread) else low
        if not limit or end < limit:  # still collapsed at the end (an early dip that recovers is not flagged)
            flags.append(_flag("collapse_warning", f"{path.parent.name}: {len(warnings)} steps with embedding std "
                               f"below {COLLAPSE_THRESHOLD:g}/sqrt(D) (lowest {low:.3g}; {end:.3g} over the last "
                               f"{LOSS_WINDOW_FRACTION:.0%} of the run)", run=str(path.parent),
                               steps=len(warnings)))
    if len(spread) >= SPREAD_SEGMENTS * 2:
        means = [float(s.mean()) for s in np.array_split(spread, SPREAD_SEGMENTS)]
        if all(b < a for a, b in zip(means, means[1:])) and means[-1] < SPREAD_FALL_RATIO * means[0]:
            flags.append(_flag("spread_falling", f"{path.parent.name}: embedding spread falls steadily "
                               f"({means[0]:.3g} -> {means[-1]:.3g} over {len(spread)} logged steps)",
                               run=str(path.parent), segment_means=means))
    loss = _series(lines, "loss")
    prototypes = swav_prototypes(path.parent)
    if prototypes and len(loss):
        end = float(loss[-_window(loss):].mean())
        if end >= (1 - UNIFORM_LOSS_RELATIVE) * math.log(prototypes):
            flags.append(_flag("uniform_prototypes", f"{path.parent.name}: the SwAV loss ends at {end:.4g}, ln K = "
                               f"{math.log(prototypes):.4g} for K = {prototypes} prototypes: uniform predictions, "
                               "no learning signal (fewer prototypes; see docs/results.md)", run=str(path.parent)))
    if len(loss) >= MIN_LOSS_LINES:
        window = _window(loss)
        first, last = float(loss[:window].mean()), float(loss[-window:].mean())
        relative = abs(first - last) / max(abs(first), abs(last), 1e-3)
        if relative < FLAT_LOSS_RELATIVE:
            flags.append(_flag("flat_loss", f"{path.parent.name}: the loss did not move ({first:.4g} -> "
                               f"{last:.4g}, relative change {relative:.2%} over {len(loss)} logged steps)",
                               run=str(path.parent), relative_change=relative))
    return flags


def swav_prototypes(run_dir: str | os.PathLike[str]) -> int | None:
    """K of a SwAV run (RUN_DIR/config.json: ``method_options.num_prototypes``, else the method's default),
    None for other methods or an unreadable config."""
    import inspect

    from medssl.methods.swav import SwAV

    try:
        config = json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("method") != "swav":
        return None
    options = config.get("method_options") if isinstance(config.get("method_options"), dict) else {}
    k = options.get("num_prototypes", inspect.signature(SwAV).parameters["num_prototypes"].default)
    return int(k) if isinstance(k, int) and not isinstance(k, bool) and k > 1 else None


def metrics_path_of_backbone(backbone: Any) -> Path | None:
    """``metrics.jsonl`` next to a checkpoint written by a pretraining run (RUN_DIR/backbone.safetensors), else
    None (a random init, a module, a published checkpoint)."""
    if not isinstance(backbone, (str, os.PathLike)) or str(backbone) == "random":
        return None
    path = Path(backbone)
    for folder in (path.parent, path.parent.parent):  # RUN_DIR/backbone.safetensors or RUN_DIR/models/...
        if (folder / "metrics.jsonl").is_file():
            return folder / "metrics.jsonl"
    return None


def random_init_flags(paired_rows: Sequence[Mapping[str, Any]], random_names: Sequence[str]) -> list[dict]:
    """``not_above_random_init`` for every paired row (see ``paired_comparisons``) of a learned backbone
    against one of ``random_names`` whose 95 % CI of (learned - random) does not lie above 0."""
    random_names = set(random_names)
    flags = []
    for row in paired_rows:
        if (row["a"] in random_names) == (row["b"] in random_names):
            continue
        sign = 1.0 if row["b"] in random_names else -1.0
        learned, rand = (row["a"], row["b"]) if sign > 0 else (row["b"], row["a"])
        diff = sign * float(row["difference"])
        low = min(sign * float(row["ci_low"]), sign * float(row["ci_high"]))
        high = max(sign * float(row["ci_low"]), sign * float(row["ci_high"]))
        if not low > 0:
            flags.append(_flag("not_above_random_init", f"{learned} vs {rand}, {row['dataset']} "
                               f"{_pct(row['fraction'])} labels: difference {diff:+.4f} (95% CI {low:.4f} to "
                               f"{high:.4f}) is not above 0", name=learned, baseline=rand,
                               fraction=row["fraction"], difference=diff, ci_low=low, ci_high=high))
    return flags


def evaluation_flags(results: Mapping[str, Any], summary: Sequence[Mapping[str, Any]],
                     backbone: Any = None) -> list[dict[str, Any]]:
    """Every flag of one evaluation: probe (linear/finetune; the training records of ``results["results"]``
    give ``best_epoch``), trials, and the pretraining run's flags when ``backbone`` came from a run folder."""
    classes = results.get("data", {}).get("classes", [])
    epochs = int(results.get("config", {}).get("epochs") or 0)
    records = {(float(b["fraction"]), t["trial"]): t for b in results.get("results", []) for t in b["trials"]}
    blocks = []
    for block in summary:
        trials = []
        for t in block["trials"]:
            extra = records.get((float(block["fraction"]), t["trial"]), {})
            trials.append({**t, "best_epoch": extra.get("best_epoch", t.get("best_epoch")), "epochs": epochs})
        blocks.append({**block, "trials": trials})
    flags = probe_flags(blocks, classes) + trial_flags(blocks)
    metrics = metrics_path_of_backbone(backbone)
    if metrics is not None:
        flags += pretraining_flags(metrics)
    return flags


def flag_lines(flags: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown bullets, one per flag: ``- **(!) kind**: message``."""
    return [f"- **(!) {f['flag']}**: {f['message']}" for f in flags]


#: side (px) of the raw-pixel baseline's images: 16 x 16 x 3 = 768 features (medssl's choice: few enough for a
#: linear probe on a few hundred labelled images, enough to keep coarse shape and intensity)
RAW_PIXEL_SIDE = 16
BASELINES = ("random_init", "raw_pixels")


class RawPixels(nn.Module):
    """A "backbone" whose features are the input pixels: ``adaptive_avg_pool2d(x, side).flatten(1)``, i.e. the
    (normalised) image averaged down to ``side x side`` pixels, (N, 3 * side * side). No parameters."""

    arch = "raw_pixels"

    def __init__(self, side: int = RAW_PIXEL_SIDE) -> None:
        super().__init__()
        self.side = int(side)
        self.arch_kwargs = {"side": self.side}
        self.num_features = 3 * self.side * self.side

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x.float(), self.side).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def baseline_dirs(eval_dir: str | os.PathLike[str]) -> list[Path]:
    """``EVAL_DIR/baselines/<name>`` folders holding a results.json, in :data:`BASELINES` order."""
    root = Path(eval_dir) / "baselines"
    return [root / name for name in BASELINES if (root / name / "results.json").is_file()]


def run_baselines(eval_dir: str | os.PathLike[str], data: str | os.PathLike[str] | None, *,
                  records: Sequence[Mapping[str, Any]] | None = None, transform: Any = None,
                  transform_desc: str | None = None, raw_side: int = RAW_PIXEL_SIDE) -> list[Path]:
    """The sanity rows of the evaluation in ``eval_dir``, on the same data, splits, label fractions, trials,
    seed, bootstrap and transform (the settings of its results.json):

    - ``baselines/random_init``: the random initialisation (seed of the evaluation) of the same architecture
      and options, same protocol and input normalisation (skipped when the evaluated backbone is random);
    - ``baselines/raw_pixels``: :class:`RawPixels` (``raw_side`` px) and the linear probe (same loss; the
      evaluation's epochs / lr / weight decay when it was a linear probe, else the linear defaults): a
      multinomial logistic regression on the downsampled pixels.

    Then the paired comparison of EVAL_DIR against its random init is made
    (:func:`medssl.evaluation.paired.paired_comparisons`), its ``not_above_random_init`` flags are added to
    EVAL_DIR/results.json (``flags``; ``baselines`` lists the folders) and report.md is rewritten. Costs about
    one more evaluation of the backbone, plus a cheap linear probe. Returns the baseline folders.
    """
    from medssl.evaluation.paired import paired_comparisons
    from medssl.evaluation.report import load_evaluation, write_eval_report
    from medssl.evaluation.run import run_evaluation

    eval_dir = Path(eval_dir)
    main = load_evaluation(eval_dir)
    res = main.results
    cfg = dict(res.get("config", {}))
    backbone_info = res.get("backbone", {})
    keep = ("fractions", "trials", "modality", "image_size", "batch_size", "loss", "gamma", "k", "temperature",
            "seed", "bootstrap", "cluster_by", "device", "num_workers")
    common = {k: cfg[k] for k in keep if k in cfg}
    shared = dict(records=records, transform=transform, transform_desc=transform_desc,
                  input_normalization=backbone_info.get("input_normalization"))
    written = []
    if backbone_info.get("source") != "random":
        arch = backbone_info.get("arch")
        written.append(run_evaluation(
            data, eval_dir / "baselines" / "random_init", backbone="random", **shared, **common,
            protocol=cfg.get("protocol", "linear"), arch=arch, arch_kwargs=backbone_info.get("arch_kwargs") or {},
            norm=cfg.get("norm", "keep"), recalibrate_bn=bool(cfg.get("recalibrate_bn", False)),
            recalibrate_batches=cfg.get("recalibrate_batches"), epochs=cfg.get("epochs"), lr=cfg.get("lr"),
            weight_decay=cfg.get("weight_decay"), name=f"Random init ({arch})"))
    linear = cfg.get("protocol") == "linear"
    written.append(run_evaluation(
        data, eval_dir / "baselines" / "raw_pixels", backbone=RawPixels(raw_side), **shared, **common,
        protocol="linear", epochs=cfg.get("epochs") if linear else None, lr=cfg.get("lr") if linear else None,
        weight_decay=cfg.get("weight_decay") if linear else None,
        name=f"Raw pixels {raw_side}x{raw_side} (logistic regression)"))
    flags = [f for f in res.get("flags", []) if f.get("flag") != "not_above_random_init"]
    random_dir = eval_dir / "baselines" / "random_init"
    if (random_dir / "results.json").is_file():
        rand = load_evaluation(random_dir)
        rows = paired_comparisons([main, rand], n_resamples=int(cfg.get("bootstrap", 1000)),
                                  seed=int(cfg.get("seed", 0)))
        flags += random_init_flags(rows, [rand.name])
    res["flags"] = flags
    res["baselines"] = {p.name: f"baselines/{p.name}" for p in written}
    atomic_write_json(eval_dir / "results.json", res)
    write_eval_report(eval_dir)
    return written


def report_flags(ev: Any) -> list[dict]:
    """Sanity flags of one evaluation (:mod:`medssl.evaluation.sanity`): probe and trial flags recomputed from
    predictions.csv and the training records, the others (pretraining run, random init) as in results.json."""
    recomputed = evaluation_flags(ev.results, ev.summary)
    kinds = {"degenerate_probe", "best_epoch_first", "trials_disagree"}
    return recomputed + [f for f in ev.results.get("flags", []) if f.get("flag") not in kinds]


def with_baselines(evals: list[Any], cluster_by: str | None) -> list[Any]:
    """``evals`` plus the sanity rows under each EVAL_DIR/baselines (``medssl evaluate --baselines``), once per
    name, dataset and protocol."""
    from medssl.evaluation.report import load_evaluation

    seen = {(ev.name, ev.dataset, ev.results.get("protocol")) for ev in evals}
    out = list(evals)
    for ev in evals:
        for folder in baseline_dirs(ev.path):
            extra = load_evaluation(folder, cluster_by)
            key = (extra.name, extra.dataset, extra.results.get("protocol"))
            if key not in seen:
                seen.add(key)
                out.append(extra)
    return out


#: flags computed from a pretraining run's metrics.jsonl (:func:`pretraining_flags`)
PRETRAINING_FLAGS = ("collapse_warning", "uniform_prototypes", "spread_falling", "flat_loss")


def _run_dir(run: str | os.PathLike[str]) -> Path:
    path = Path(run)
    return (path.parent if path.name == "metrics.jsonl" else path).resolve()


def comparison_flags(evals: Sequence[Any], paired: Sequence[dict], pretrain_runs: Sequence = ()) -> list:
    """Sanity flags of a comparison: each evaluation's own (:func:`report_flags`, prefixed with its name),
    learned backbones not above the random init of the same architecture (paired rows), and the pretraining
    runs' flags (``--pretrain-runs``), recomputed from their metrics.jsonl (an evaluation's stored copy of a
    listed run's flags is dropped: the run may have been continued since)."""
    keyed = []  # (kind, message): a pretraining run's flag is keyed by its own message, so it is reported once
    # whether it comes from an evaluation of its backbone, from several, or from ``pretrain_runs``; the other
    # flags of an evaluation by the message with the evaluation's name
    fresh = {_run_dir(r) for r in pretrain_runs}  # recomputed below: their flags stored by an evaluation are stale
    for ev in evals:
        for f in report_flags(ev):
            if f["flag"] in PRETRAINING_FLAGS and f.get("run") and _run_dir(f["run"]) in fresh:
                continue
            if f["flag"] != "not_above_random_init":
                named = {**f, "message": f"{ev.name}: {f['message']}", "evaluation": ev.name, "dataset": ev.dataset}
                keyed.append(((f["flag"], f["message"] if f["flag"] in PRETRAINING_FLAGS else named["message"]),
                              named))
    arch = {ev.name: ev.results.get("backbone", {}).get("arch") for ev in evals}
    random_names = [ev.name for ev in evals if ev.results.get("backbone", {}).get("source") == "random"]
    same_arch = [r for r in paired if arch.get(r["a"]) == arch.get(r["b"])]
    flags = random_init_flags(same_arch, random_names) + [f for run in pretrain_runs for f in pretraining_flags(run)]
    keyed += [((f["flag"], f["message"]), f) for f in flags]
    unique: dict[tuple[str, str], dict] = {}
    for key, f in keyed:
        unique.setdefault(key, f)
    return list(unique.values())
