"""Shared pytest fixtures.

Real data: ``MEDSSL_SHARED_DATA`` (set by ``.ci/run``) points at the shared real-data folder (its README.md
describes the datasets); without it we look for ``../shared/data`` beside the repository. Tests that
need it skip with a clear reason when it is absent.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """The shared real-data folder, or None when it is not available."""
    env = os.environ.get("MEDSSL_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(REPO_ROOT.parent / "shared" / "data")
    for cand in candidates:
        if cand.is_dir():
            return cand
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of the shared real-data folder; skips the test when it is absent."""
    path = shared_data_dir()
    if path is None:
        pytest.skip("shared real data not found: set MEDSSL_SHARED_DATA to the shared/data folder")
    return path


@pytest.fixture(autouse=True)
def _torch_threads():
    """One thread per test process (pytest-xdist runs two of them on our 2 cores) and make it deterministic where torch allows."""
    import torch

    torch.set_num_threads(1)
    yield


def _all_loggers() -> list[logging.Logger]:
    manager = logging.Logger.manager
    return [logging.getLogger()] + [lg for lg in manager.loggerDict.values() if isinstance(lg, logging.Logger)]


@pytest.fixture(autouse=True)
def _drop_cli_log_handlers():
    """The CLI (``logging.basicConfig``) and Ignite bind stream handlers to this test's captured stderr; drop
    the handlers a test added so that the next test's stderr holds only its own output."""
    before = {id(lg): list(lg.handlers) for lg in _all_loggers()}
    yield
    for lg in _all_loggers():
        for handler in lg.handlers[:]:
            if isinstance(handler, logging.StreamHandler) and handler not in before.get(id(lg), []):
                lg.removeHandler(handler)


def write_image_folder(root: Path, *, height: int, width: int, seed: int, per_class: int = 8) -> Path:
    """A labelled image folder ``root/{a,b}/{i}.png`` of random RGB uint8 images (height x width), seeded."""
    import numpy as np
    from skimage.io import imsave

    rng = np.random.default_rng(seed)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            image = (rng.random((height, width, 3)) * 255).astype(np.uint8)
            imsave(root / label / f"{i}.png", image, check_contrast=False)
    return root


@pytest.fixture
def finetune_runs(monkeypatch) -> list:
    """``(model, record)`` of every ``finetune_once`` call during the test (the trained network and its
    training record), recorded by wrapping the real function."""
    import medssl.evaluation.protocols.finetune as ft

    calls: list = []
    original = ft.finetune_once

    def spy(model, *args, **kwargs):
        record = original(model, *args, **kwargs)
        calls.append((model, record))
        return record

    monkeypatch.setattr(ft, "finetune_once", spy)
    return calls
