"""Two-stage cluster bootstrap: CIs of trial-mean metrics and paired comparisons of two initialisations.

**Unit of independence.** Images of one patient (or one lesion) are not independent: resampling images makes
an interval too narrow by up to ``sqrt(images per patient)``. Test images are therefore grouped into clusters
(:class:`Clusters`: ``lesion_id`` where set, else ``patient_id``, else the image itself; the choice is made by
:func:`medssl.evaluation.predictions.cluster_ids`) and whole clusters are resampled.

**Stratification.** Each cluster has one class stratum: the most frequent true label of its images (ties: the
lowest class index; a patient with images of several classes is counted in the class of most of its images).
Each resample draws, with replacement, exactly ``G_s`` clusters from the ``G_s`` clusters of every stratum s,
so the class composition stays (nearly, exactly for one-class clusters) that of the test set and the
balanced-accuracy denominators stay fixed, as in the image-level stratified bootstrap it generalises.

**Trials (label subsets).** A trial mean ``m = (1/T) sum_t m_t`` over T trials that share the test set varies
with the test set *and* with the label subsets. Resample b has two independent stages: cluster multiplicities
``w_b`` (shared by all trials, as the design is crossed: trials x test clusters) and trial multiplicities
``v_b ~ Multinomial(T, 1/T)``. With ``M_tb`` the metric of trial t on the test set weighted by ``w_b`` and
``m_t`` its value on the observed test set,

    c_b = (1/T) sum_t M_tb                                  (cluster stage: test-set sampling)
    s_b = c_b + f_T * ((1/T) sum_t v_bt m_t - (1/T) sum_t m_t)  (+ trial stage: subset-to-subset variation)
    f_T = t_{T-1}((1+level)/2) / z((1+level)/2) * sqrt(T / (T-1))

and the 95 % interval is the 2.5/97.5 percentile of ``s_b`` (clipped to the metric's range [0, 1], which the
trial stage can leave; a difference to [-1, 1]). Choices and why: (1) the trial stage resamples
the observed per-trial values instead of re-scoring resampled trials on resampled clusters, so the trial x
image noise, already in ``c_b``, is not counted a second time (crossed designs: Owen 2007, "The pigeonhole
bootstrap", Ann. Appl. Stat.); (2) resampling T values underestimates the variance of their mean by
(T-1)/T and treats their spread as known, so ``f_T`` (2.69 for T = 3, 1.58 for T = 5, 1.22 for T = 10,
-> 1) restores the Student-t width of the trial stage. Simulated coverage of the true mean (2 classes, 250
test images, subset sd 0.15 in per-class accuracy, 400 runs): T = 3: 95 % with ``f_T``, 77 % with f = 1,
~31 % for the interval that keeps the trials fixed (what medssl reported before); T = 5: 96 % / 87 %. When the
trials hardly differ the interval is conservative (99.5 % without any subset effect, T = 3). With one trial the
trial stage is skipped and the interval covers test-set sampling only.

Resamples are drawn in blocks (:func:`_blocks`: up to :data:`BLOCK_RESAMPLES`, fewer for very many clusters so a
block's weights stay ~16 MB) from one seeded numpy Generator (cluster weights
(B, G), trial multiplicities (B, T)) and scored with batched confusion matrices ``w_b @ C`` where ``C`` (G, K*K)
holds the per-cluster confusion counts, so 1,000 resamples of thousands of images take milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from medssl.evaluation.metrics import metrics_from_confusion

#: the metrics whose bootstrap CI is reported
CI_METRICS = ("balanced_accuracy", "macro_f1", "accuracy")
#: ``--cluster-by`` choices; ``auto`` = lesion_id if any test image has one, else patient_id, else image
CLUSTER_BY_CHOICES = ("auto", "lesion_id", "patient_id", "none")
#: resamples drawn per block (memory: block x clusters int64 weights)
BLOCK_RESAMPLES = 1000
#: cap on block x clusters (2e6 int64 weights = 16 MB)
BLOCK_WEIGHTS = 2_000_000
#: a paired test with fewer resampled differences at least as extreme as observed draws more resamples
MIN_EXCEEDANCES = 10
#: resamples of a paired test when p is small (fewer than MIN_EXCEEDANCES exceedances at the first B)
MAX_PAIRED_RESAMPLES = 10_000

BOOTSTRAP_DEFINITION = (
    "95% percentile interval of a two-stage bootstrap of the trial mean: each resample draws whole test "
    "clusters (lesions where lesion_id is set, else patients, else images; see 'unit') with replacement "
    "within each class stratum (a cluster's class = the most frequent true label of its images, ties to the "
    "lowest class index) and, with T > 1 trials, adds the deviation of the mean of T trials drawn with "
    "replacement from their observed values, scaled by f_T = t_{T-1,0.975}/z_{0.975}*sqrt(T/(T-1)) "
    "(small-sample correction; 2.69 for T = 3). The "
    "interval covers test-set sampling and label-subset (trial-to-trial) variation; with one trial only "
    "test-set sampling. Seeded"
)
PAIRED_DEFINITION = (
    "paired two-stage bootstrap over the test images common to both evaluations (matched by image id), "
    "resampling the same test clusters for A and B (stratified by class) and the trials of each side "
    "(jointly when both used the same label subsets: same manifest, seed and trials); difference = "
    "mean-over-trials balanced accuracy of A minus that of B; CI = 95% percentile interval of the resampled "
    "differences; two-sided p = (count + 1) / (B + 1), count = resampled differences, centred at 0, whose "
    "absolute value is >= the observed absolute difference (null hypothesis: no difference); B = 1,000, raised "
    "to 10,000 when count < 10; p is shown at its resolution ('< 0.001' = no exceedance in 1,000); p_holm = "
    "Holm step-down adjusted p over all paired comparisons of the report"
)


@dataclass(frozen=True)
class Clusters:
    """Test images grouped into independent units.

    Attributes:
        index: (N,) int64, cluster index in ``[0, G)`` of every image (clusters numbered by first appearance).
        stratum: (G,) int64, class stratum of every cluster (most frequent true label, ties: lowest index).
        unit: ``"lesion_id"``, ``"patient_id"`` or ``"image"``.
    """

    index: np.ndarray
    stratum: np.ndarray
    unit: str = "image"

    @property
    def n_clusters(self) -> int:
        return int(len(self.stratum))


def make_clusters(y_true: np.ndarray, cluster_ids: Sequence[object] | np.ndarray | None = None,
                  unit: str = "image") -> Clusters:
    """Clusters of the test images: one per distinct ``cluster_ids`` value, or one per image when ``None``."""
    y_true = np.asarray(y_true, dtype=np.int64)
    n = len(y_true)
    if cluster_ids is None:
        index = np.arange(n, dtype=np.int64)
        return Clusters(index, y_true.copy(), "image")
    ids = np.asarray([str(c) for c in cluster_ids], dtype=object)
    if len(ids) != n:
        raise ValueError(f"{len(ids)} cluster ids for {n} images")
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    index = rank[inverse.ravel()]
    k = int(y_true.max()) + 1 if n else 1
    counts = np.bincount(index * k + y_true, minlength=len(first) * k).reshape(len(first), k)
    return Clusters(index, counts.argmax(axis=1).astype(np.int64), unit)


def cluster_weights(clusters: Clusters, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Multiplicities (n_resamples, G) int64: per stratum s, G_s draws with replacement among its G_s clusters."""
    g = clusters.n_clusters
    flat = np.zeros(n_resamples * g, dtype=np.int64)
    offsets = (np.arange(n_resamples, dtype=np.int64) * g)[:, None]
    for s in np.unique(clusters.stratum):
        members = np.flatnonzero(clusters.stratum == s)
        draws = members[rng.integers(0, len(members), size=(n_resamples, len(members)))]
        flat += np.bincount((draws + offsets).ravel(), minlength=n_resamples * g)
    return flat.reshape(n_resamples, g)


def cluster_confusions(y_true: np.ndarray, y_pred: np.ndarray, clusters: Clusters, num_classes: int) -> np.ndarray:
    """Per-cluster confusion counts (G, K*K) float64; row g flattened C[true, predicted] of cluster g."""
    k2 = num_classes * num_classes
    codes = clusters.index * k2 + np.asarray(y_true, dtype=np.int64) * num_classes + np.asarray(y_pred, np.int64)
    return np.bincount(codes, minlength=clusters.n_clusters * k2).reshape(clusters.n_clusters, k2).astype(float)


def trial_expansion(n_trials: int, level: float = 0.95) -> float:
    """f_T = t_{T-1}((1+level)/2) / z((1+level)/2) * sqrt(T/(T-1)) (module docstring); 1.0 for T = 1."""
    if n_trials < 2:
        return 1.0
    q = (1 + level) / 2
    return float(stats.t.ppf(q, n_trials - 1) / stats.norm.ppf(q) * math.sqrt(n_trials / (n_trials - 1)))


def _as_trials(y_pred: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    arr = y_pred if isinstance(y_pred, (list, tuple)) else [y_pred]
    return [np.asarray(p, dtype=np.int64) for p in arr]


def _trial_stage(centre: np.ndarray, observed: np.ndarray, multiplicities: np.ndarray | None,
                 level: float) -> np.ndarray:
    """``s_b`` (B,): cluster-stage values ``c_b`` (B,) plus the expanded trial-stage deviation of the observed
    per-trial values (T,) under trial multiplicities (B, T) (None or T = 1: cluster stage only)."""
    if multiplicities is None or len(observed) < 2:
        return centre
    resampled = multiplicities @ observed / len(observed)
    return centre + trial_expansion(len(observed), level) * (resampled - observed.mean())


def _per_trial(confusions: list[np.ndarray], weights: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Metrics (T, B) of every trial on every weighted resample (weights (B, G))."""
    w = weights.astype(np.float64)
    per = [metrics_from_confusion((w @ c).reshape(-1, k, k)) for c in confusions]
    return {m: np.stack([p[m] for p in per]) for m in CI_METRICS}


def _blocks(n_resamples: int, n_clusters: int) -> list[int]:
    """Block sizes summing to ``n_resamples``: min(BLOCK_RESAMPLES, BLOCK_WEIGHTS / clusters), at least 50."""
    block = max(50, min(BLOCK_RESAMPLES, BLOCK_WEIGHTS // max(n_clusters, 1)))
    return [block] * (n_resamples // block) + ([n_resamples % block] if n_resamples % block else [])


def bootstrap_distribution(
    y_true: np.ndarray,
    y_pred: np.ndarray | Sequence[np.ndarray],
    num_classes: int,
    *,
    clusters: Clusters | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    trial_stage: bool = True,
) -> dict[str, np.ndarray]:
    """Two-stage bootstrap values ``s_b`` (n_resamples,) of :data:`CI_METRICS` for the trial mean.

    ``trial_stage=False`` keeps the trials fixed (``c_b``: an interval conditional on the trained classifiers,
    covering test-set sampling only; what medssl reported before trials were resampled).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    trials = _as_trials(y_pred)
    clusters = clusters or make_clusters(y_true)
    confusions = [cluster_confusions(y_true, p, clusters, num_classes) for p in trials]
    observed = _per_trial(confusions, np.ones((1, clusters.n_clusters), dtype=np.int64), num_classes)
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {m: [] for m in CI_METRICS}
    for size in _blocks(n_resamples, clusters.n_clusters):
        weights = cluster_weights(clusters, size, rng)
        mult = rng.multinomial(len(trials), np.full(len(trials), 1 / len(trials)), size=size)
        per = _per_trial(confusions, weights, num_classes)
        for m in CI_METRICS:
            out[m].append(_trial_stage(per[m].mean(axis=0), observed[m][:, 0], mult if trial_stage else None,
                                       level))
    return {m: np.concatenate(v) for m, v in out.items()}


def bootstrap_ci(
    y_true: np.ndarray,
    y_pred: np.ndarray | Sequence[np.ndarray],
    num_classes: int,
    *,
    clusters: Clusters | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    trial_stage: bool = True,
) -> dict[str, dict[str, float]]:
    """Percentile CIs of the trial-mean balanced accuracy, macro F1 and accuracy (module docstring).

    Args:
        y_true: (N,) true class indices of the test images.
        y_pred: (N,) predicted indices, or a list of T of them (trials; the statistic is their mean).
        num_classes: K.
        clusters: grouping of the N images (:func:`make_clusters`); default one cluster per image.
        n_resamples: B, default 1,000.
        seed: numpy seed of the resampling.
        level: coverage of the interval, default 0.95.
        trial_stage: resample the trials too (default; see :func:`bootstrap_distribution`).

    Returns:
        ``{metric: {"low": float, "high": float}}``.
    """
    if n_resamples < 1:
        raise ValueError("n_resamples must be >= 1")
    dist = bootstrap_distribution(y_true, y_pred, num_classes, clusters=clusters, n_resamples=n_resamples,
                                  seed=seed, level=level, trial_stage=trial_stage)
    tail = 100 * (1 - level) / 2
    # the trial stage can step outside the metric's range [0, 1]; clipping an endpoint loses no coverage
    return {m: {"low": float(np.clip(np.percentile(v, tail), 0, 1)),
                "high": float(np.clip(np.percentile(v, 100 - tail), 0, 1))}
            for m, v in dist.items()}


#: below this many clusters of one class in the test split an interval is flagged (the stratified bootstrap
#: can only redraw those few clusters); the same threshold as the per-class image count of the split checks
MIN_CLUSTERS_PER_CLASS = 5


def interval_description(clusters: Clusters, n_trials: int, n_resamples: int, level: float = 0.95) -> dict:
    """What an interval of :func:`bootstrap_ci` covers, for results.json and report headers."""
    noun = {"lesion_id": "lesions", "patient_id": "patients"}.get(clusters.unit, "images")
    covers = f"test-set sampling ({clusters.n_clusters} {noun}, stratified by class)"
    covers += (f" and label-subset variation ({n_trials} trials resampled, trial-stage factor "
               f"{trial_expansion(n_trials, level):.2f})" if n_trials > 1 else
               "; one trial: label-subset variation is not covered")
    per_class = np.bincount(clusters.stratum)
    thin = [int(c) for c in np.flatnonzero((per_class > 0) & (per_class < MIN_CLUSTERS_PER_CLASS))]
    warning = None
    if thin:
        # a stratum of k clusters can only be redrawn from those k: with k = 1 it contributes no sampling
        # variation at all, and with a few the percentile interval is far too narrow
        counts = ", ".join(f"class {c}: {per_class[c]}" for c in thin)
        warning = (f"fewer than {MIN_CLUSTERS_PER_CLASS} {noun} in some classes ({counts}): the interval "
                   "understates the uncertainty of those classes; do not report it as a 95% CI")
    return {"unit": clusters.unit, "n_clusters": clusters.n_clusters, "n_images": int(len(clusters.index)),
            "n_trials": int(n_trials), "n_resamples": int(n_resamples), "level": level, "covers": covers,
            "warning": warning}


def paired_bootstrap(
    y_true: np.ndarray,
    y_pred_a: np.ndarray | Sequence[np.ndarray],
    y_pred_b: np.ndarray | Sequence[np.ndarray],
    num_classes: int,
    *,
    clusters: Clusters | None = None,
    n_resamples: int = 1000,
    max_resamples: int = MAX_PAIRED_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
    paired_trials: bool = False,
) -> dict[str, float]:
    """Paired two-stage bootstrap of the balanced-accuracy difference A - B on the same test images.

    Both prediction sets must be aligned with ``y_true`` (same images, same order). Each resample shares the
    cluster weights between A and B; the trials are resampled jointly (``paired_trials``: trial t of A and of
    B used the same label subset; needs T_A = T_B) or independently per side, each with :func:`trial_expansion`.
    If fewer than :data:`MIN_EXCEEDANCES` centred differences reach the observed one after ``n_resamples``,
    resampling continues (same seeded stream) up to ``max_resamples`` so a small p is resolved.

    Returns ``{"difference", "ci_low", "ci_high", "p_value", "exceedances", "n", "n_clusters", "unit",
    "n_resamples", "trials_paired"}``; see :data:`PAIRED_DEFINITION`.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    trials_a, trials_b = _as_trials(y_pred_a), _as_trials(y_pred_b)
    if paired_trials and len(trials_a) != len(trials_b):
        raise ValueError(f"paired trials need as many trials on both sides ({len(trials_a)} vs {len(trials_b)})")
    clusters = clusters or make_clusters(y_true)
    conf_a = [cluster_confusions(y_true, p, clusters, num_classes) for p in trials_a]
    conf_b = [cluster_confusions(y_true, p, clusters, num_classes) for p in trials_b]
    ones = np.ones((1, clusters.n_clusters), dtype=np.int64)
    obs_a = _per_trial(conf_a, ones, num_classes)["balanced_accuracy"][:, 0]
    obs_b = _per_trial(conf_b, ones, num_classes)["balanced_accuracy"][:, 0]
    observed = float(obs_a.mean() - obs_b.mean())
    rng = np.random.default_rng(seed)

    def draw(size: int) -> np.ndarray:
        weights = cluster_weights(clusters, size, rng)
        mult_a = rng.multinomial(len(trials_a), np.full(len(trials_a), 1 / len(trials_a)), size=size)
        mult_b = rng.multinomial(len(trials_b), np.full(len(trials_b), 1 / len(trials_b)), size=size)
        va = _per_trial(conf_a, weights, num_classes)["balanced_accuracy"]
        vb = _per_trial(conf_b, weights, num_classes)["balanced_accuracy"]
        centre = va.mean(axis=0) - vb.mean(axis=0)
        if paired_trials:
            return _trial_stage(centre, obs_a - obs_b, mult_a, level)
        return (_trial_stage(centre, obs_a, mult_a, level) - _trial_stage(np.zeros_like(centre), obs_b, mult_b,
                                                                           level))

    def exceedances(d: np.ndarray) -> int:
        return int(np.sum(np.abs(d - d.mean()) >= abs(observed) - 1e-12))

    diffs = np.concatenate([draw(size) for size in _blocks(n_resamples, clusters.n_clusters)])
    if exceedances(diffs) < MIN_EXCEEDANCES and max_resamples > len(diffs):
        more = _blocks(max_resamples - len(diffs), clusters.n_clusters)
        diffs = np.concatenate([diffs, *(draw(size) for size in more)])
    count = exceedances(diffs)
    tail = 100 * (1 - level) / 2
    return {
        "difference": observed,
        "ci_low": float(np.clip(np.percentile(diffs, tail), -1, 1)),
        "ci_high": float(np.clip(np.percentile(diffs, 100 - tail), -1, 1)),
        "p_value": (count + 1) / (len(diffs) + 1),
        "exceedances": count,
        "n": int(len(y_true)),
        "n_clusters": clusters.n_clusters,
        "unit": clusters.unit,
        "n_resamples": int(len(diffs)),
        "trials_paired": bool(paired_trials),
    }


def holm_adjust(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm (1979) step-down adjusted p-values, same order as the input.

    With the m p-values sorted ascending, p_(1) <= ... <= p_(m): adj_(i) = min(1, max_{j <= i} (m - j + 1) p_(j)).
    Rejecting where adj <= alpha controls the family-wise error rate at alpha for any dependence.
    """
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    scaled = (len(p) - np.arange(len(p))) * p[order]
    out = np.empty_like(p)
    out[order] = np.minimum(1.0, np.maximum.accumulate(scaled)) if len(p) else scaled
    return out


def p_decimals(n_resamples: int) -> int:
    """Decimals that resolve 1 / n_resamples (3 at 1,000, 4 at 10,000)."""
    return max(1, math.ceil(math.log10(max(n_resamples, 2)) - 1e-9))


def format_p_value(p: float, n_resamples: int, *, upper_bound: bool = False, adjusted: bool = False) -> str:
    """A bootstrap p-value at its resolution: ``< 0.001`` when no resample of 1,000 was as extreme
    (p = 1/(B+1)), never ``0.000``; else ``p`` with :func:`p_decimals` decimals. ``upper_bound``: ``p`` is a
    bound (e.g. a Holm value computed from a ``< 1/B`` p-value), shown as ``< p``; ``adjusted``: ``p`` is a
    multiplicity-adjusted value (no floor test).
    """
    d = p_decimals(n_resamples)
    if upper_bound:
        return f"< {min(p, 1.0):.{d}f}"
    if not adjusted and p * (n_resamples + 1) < 1.5:
        return f"< {1 / n_resamples:.{d}f}"
    return f"{min(p, 1.0):.{d}f}"
