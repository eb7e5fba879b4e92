"""Multi-view wrappers: every view owns its transform instances and random state.

One random transform applied to two keys gives both the same draw, so a two-view SSL pipeline must run two
separately seeded instances. :class:`MultiViewd` holds one composed pipeline per view and seeds each from its
own generator; :class:`SSLTransform` puts the deterministic part (read, scale, channels) in front of it, so
the file is read once per record and all views are cut from the same image.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, Randomizable
from monai.utils import MAX_SEED


def _as_plain_tensor(x: Any) -> torch.Tensor:
    if hasattr(x, "as_tensor"):
        x = x.as_tensor()
    return torch.as_tensor(x, dtype=torch.float32).contiguous()


class MultiViewd(Randomizable):
    """Apply ``len(view_transforms)`` independent pipelines to copies of one record.

    Args:
        view_transforms: one callable (dict -> dict) per view; pass distinct instances.
        key: the image key each pipeline transforms.

    ``__call__(data)`` returns the list of views: float32 tensors ``(C, H, W)`` (the pipelines decide H, W).
    ``set_random_state(seed)`` derives one seed per view, so a seed fixes every view.
    """

    def __init__(self, view_transforms: Sequence[Callable[[dict], dict]], key: Hashable = "image") -> None:
        if len({id(t) for t in view_transforms}) != len(view_transforms):
            raise ValueError("each view needs its own transform instance")
        self.view_transforms = list(view_transforms)
        self.key = key
        self.set_random_state(seed=int(np.random.randint(MAX_SEED)))

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> MultiViewd:
        super().set_random_state(seed, state)
        for t in self.view_transforms:
            if isinstance(t, Randomizable):
                t.set_random_state(seed=int(self.R.randint(MAX_SEED, dtype="uint32")))
        return self

    def randomize(self, data: Any = None) -> None:
        """Views draw their own parameters; nothing to draw here."""

    def __call__(self, data: Mapping[Hashable, Any]) -> list[torch.Tensor]:
        return [_as_plain_tensor(t(dict(data))[self.key]) for t in self.view_transforms]


class SSLTransform(Randomizable):
    """``record -> {"views": [Tensor(3,H,W) float32 in [0,1]], "label": ..., "id": ...}``.

    Args:
        base: deterministic pipeline (reader + intensity scaling) producing ``data[key]`` as (3, H, W) in [0, 1].
        views: the :class:`MultiViewd` that cuts the views.
        key: image key.
    """

    def __init__(self, base: Callable[[dict], dict], views: MultiViewd, key: Hashable = "image") -> None:
        self.base = base
        self.views = views
        self.key = key

    @property
    def num_views(self) -> int:
        return len(self.views.view_transforms)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> SSLTransform:
        super().set_random_state(seed, state)
        self.views.set_random_state(seed=int(self.R.randint(MAX_SEED, dtype="uint32")))
        return self

    def randomize(self, data: Any = None) -> None:
        """Views draw their own parameters; nothing to draw here."""

    def __call__(self, record: Mapping[Hashable, Any]) -> dict[str, Any]:
        data = self.base(dict(record))
        return {"views": self.views(data), "label": record.get("label"), "id": record.get("id")}


def compose(transforms: Sequence[Callable]) -> Compose:
    """MONAI Compose without lazy resampling or per-call metadata; kept as one helper for the presets."""
    return Compose(list(transforms))
