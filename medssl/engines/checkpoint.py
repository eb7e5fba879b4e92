"""Training checkpoints: atomic save, keep-last-K rotation, and exact resume.

A checkpoint (``RUN_DIR/checkpoints/checkpoint_<iteration:08d>.pt``) holds everything a resumed run needs to
continue bit-for-bit: the method's ``state_dict`` (backbone, heads, target network), optimizer, GradScaler,
lr schedule, the method's extra state (SwAV queue), the Python/NumPy/torch RNG states, the optimizer-step
counter and the resolved config. It contains only tensors and plain containers, so it loads with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.errors import MedsslError
from medssl.io import atomic_torch_save

CHECKPOINT_FORMAT = "medssl-pretrain-checkpoint"
_NAME = re.compile(r"^checkpoint_(\d{8})\.pt$")


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA when available) generator states, weights-only serialisable."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = state["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(run_dir: str | Path, iteration: int) -> Path:
    """``RUN_DIR/checkpoints/checkpoint_<iteration:08d>.pt``."""
    return Path(run_dir) / "checkpoints" / f"checkpoint_{iteration:08d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(iteration, path)`` of every checkpoint of a run, oldest first (temporary files ignored)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint with the highest iteration, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(run_dir: str | Path, state: dict[str, Any], *, keep_last: int = 3) -> Path:
    """Write ``state`` (see :func:`build_checkpoint_state`) atomically and delete all but the ``keep_last`` newest.

    Returns:
        The checkpoint path.
    """
    path = checkpoint_path(run_dir, int(state["iteration"]))
    atomic_torch_save(path, state)
    if keep_last > 0:
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            old.unlink(missing_ok=True)
    return path


def build_checkpoint_state(*, iteration: int, epoch: int, method: torch.nn.Module, optimizer: Any,
                           scaler: Any, schedule: Any, config: dict[str, Any],
                           per_rank: list[dict[str, Any]] | None = None, run: str | None = None,
                           skipped_records: list[str] | None = None) -> dict[str, Any]:
    """Gather everything a resume needs into one weights-only-loadable dict.

    Args:
        per_rank: with several processes, every rank's ``{"method_extra", "rng"}`` (index = rank), so each
            rank gets its own SwAV queue and generators back (see :func:`rank_state`).
        run: the run record as JSON text (hashes taken at run start, backbone layout, resume overrides; see
            :mod:`medssl.engines.resume`). Version 2 checkpoints carry it; a resume refuses checkpoints without.
        skipped_records: ids of the unreadable records skipped so far (``--skip-bad-records``), all ranks.
    """
    return {
        "per_rank": per_rank,
        "format": CHECKPOINT_FORMAT,
        "version": 2,
        "run": run,
        "skipped_records": list(skipped_records or []),
        "iteration": int(iteration),
        "epoch": int(epoch),
        "method": method.state_dict(),
        "method_extra": method.extra_state() if hasattr(method, "extra_state") else {},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "schedule": schedule.state_dict(),
        "rng": capture_rng_state(),
        "config": config,
    }


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint (weights only) and check its format.

    Raises:
        MedsslError: missing, truncated or foreign file, or a memory bomb (sizes the file does not back, see
            :mod:`medssl.weights.pickle_guard`; refused before anything is allocated).
    """
    from medssl.weights.pickle_guard import check_torch_file

    if not Path(path).is_file():
        raise MedsslError("checkpoint not found", path)
    check_torch_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise MedsslError("checkpoint not found", path) from exc
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt files
        raise MedsslError(f"cannot read training checkpoint ({type(exc).__name__}: {exc})", path) from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise MedsslError("not a medssl pretraining checkpoint", path)
    return state


def restore_training_state(state: dict[str, Any], *, method: torch.nn.Module, optimizer: Any, scaler: Any,
                           schedule: Any, restore_rng: bool = True, rank: int = 0, world_size: int = 1) -> None:
    """Load a checkpoint dict into the live objects (strict for the method's parameters and buffers)."""
    method.load_state_dict(state["method"], strict=True)
    extra, rng = rank_state(state, rank, world_size)
    if hasattr(method, "load_extra_state"):
        method.load_extra_state(extra or {})
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    schedule.load_state_dict(state["schedule"])
    if restore_rng:
        restore_rng_state(rng)


def rank_state(state: dict[str, Any], rank: int = 0, world_size: int = 1) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(method_extra, rng)`` for ``rank``: its own entry when the checkpoint was written by as many
    processes, else rank 0's (a resume with another process count is not bit-exact)."""
    per_rank = state.get("per_rank")
    if per_rank and len(per_rank) == world_size and world_size > 1:
        return per_rank[rank]["method_extra"], per_rank[rank]["rng"]
    return state.get("method_extra") or {}, state["rng"]
