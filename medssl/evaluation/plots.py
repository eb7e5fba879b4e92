"""PNG plots for evaluation reports (matplotlib, Agg backend): confusion matrices, t-SNE of test embeddings,
and pretraining curves (loss, kNN balanced accuracy) from a pretraining run's ``metrics.jsonl``."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402

from medssl.errors import MedsslError  # noqa: E402
from medssl.io import atomic_open  # noqa: E402


def _save(fig: plt.Figure, path: str | os.PathLike[str]) -> Path:
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def plot_confusion_matrix(cm: np.ndarray, classes: Sequence[str], path: str | os.PathLike[str],
                          title: str = "") -> Path:
    """Counts (rows true class, columns predicted) with per-cell numbers; written to ``path`` (PNG)."""
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2.5, 1.2 * len(classes) + 2))
    ConfusionMatrixDisplay(np.asarray(cm), display_labels=list(classes)).plot(ax=ax, colorbar=False,
                                                                              cmap="Blues")
    ax.set_title(title)
    return _save(fig, path)


def tsne_embedding(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE (sklearn, PCA init) of features (N, D); perplexity min(30, (N-1)/3); exact gradients up to
    N = 1000 (faster than Barnes-Hut at that size), Barnes-Hut above."""
    n = features.shape[0]
    if n < 5:
        raise ValueError("t-SNE needs at least 5 points")
    perplexity = float(min(30.0, (n - 1) / 3.0))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                method="exact" if n <= 1000 else "barnes_hut").fit_transform(
        np.asarray(features, dtype=np.float64))


def plot_tsne(features: np.ndarray, labels: np.ndarray, classes: Sequence[str], path: str | os.PathLike[str],
              title: str = "", seed: int = 0) -> Path:
    """Scatter of the t-SNE of ``features`` (N, D) coloured by integer ``labels`` (N,)."""
    xy = tsne_embedding(features, seed)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for c, name in enumerate(classes):
        sel = np.asarray(labels) == c
        ax.scatter(xy[sel, 0], xy[sel, 1], s=10, label=f"{name} (n={int(sel.sum())})", alpha=0.8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=8, markerscale=1.5)
    ax.set_title(title or "t-SNE of test embeddings")
    return _save(fig, path)


def read_metrics_jsonl(path: str | os.PathLike[str]) -> list[dict]:
    """Rows of a pretraining run's metrics.jsonl (bad lines raise MedsslError naming the file and line)."""
    rows = []
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise MedsslError(f"line {lineno} is not JSON ({exc.msg})", path) from exc
    except OSError as exc:
        raise MedsslError(f"cannot read metrics ({exc.strerror})", path) from exc
    return rows


def plot_pretraining_curves(run_dirs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
                            labels: Sequence[str] | None = None) -> list[Path]:
    """``pretrain_loss.png`` (loss vs iteration) and
    ``pretrain_knn_balanced_accuracy.png`` (kNN monitor vs epoch) for the given run folders."""
    out_dir = Path(out_dir)
    series = []
    for i, run in enumerate(run_dirs):
        path = Path(run) / "metrics.jsonl"
        if not path.is_file():
            raise MedsslError("pretraining run folder has no metrics.jsonl", run)
        rows = read_metrics_jsonl(path)
        name = labels[i] if labels else Path(run).name
        loss = [r for r in rows if r.get("loss") is not None]
        knn = [r for r in rows if r.get("knn_balanced_accuracy") is not None]
        series.append((name, loss, knn))
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, loss, _ in series:
        if loss:
            ax.plot([r["iteration"] for r in loss], [r["loss"] for r in loss], label=name, linewidth=1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("pretraining loss")
    ax.legend(fontsize=8)
    written.append(_save(fig, out_dir / "pretrain_loss.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, _, knn in series:
        if knn:
            ax.plot([r["epoch"] for r in knn], [r["knn_balanced_accuracy"] for r in knn], marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("kNN balanced accuracy")
    ax.legend(fontsize=8)
    written.append(_save(fig, out_dir / "pretrain_knn_balanced_accuracy.png"))
    return written

