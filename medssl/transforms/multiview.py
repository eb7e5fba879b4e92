"""Multi-view wrappers: every view owns its transform instances and random state.

One random transform applied to two keys gives both the same draw, so a two-view SSL pipeline must run two
separate instances. :class:`MultiViewd` holds one composed pipeline per view; :class:`SSLTransform` puts the
deterministic part (read, scale) in front of it, so the file is read once per record and all views are cut from
the same image.

Randomness: one generator per sample. ``set_random_state(seed)`` builds a single
``numpy.random.RandomState(seed)`` and hands it to every random transform of every view (they draw from it in
order: view 1's transforms, then view 2's, ...), instead of one generator per transform. The views are still
independent draws and a seed still fixes every view.

Channels: a grayscale image stays 1-channel through every view transform; each view is expanded to 3 channels
last, as a stride-0 ``expand`` view of its single channel (no copy; collating into a batch materialises it).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import Randomizable
from monai.utils import MAX_SEED


def _as_plain_tensor(x: Any) -> torch.Tensor:
    if hasattr(x, "as_tensor"):
        x = x.as_tensor()
    return torch.as_tensor(x, dtype=torch.float32)


def as_rgb_view(x: torch.Tensor) -> torch.Tensor:
    """(1, H, W) -> (3, H, W) as an ``expand`` view (stride 0 on the channel dim, no copy); (3, H, W) unchanged."""
    return x.expand(3, *x.shape[-2:]) if x.shape[-3] == 1 else x


def random_transforms(transform: Any) -> list[Randomizable]:
    """Every ``Randomizable`` inside ``transform`` (walking ``Compose``-like ``.transforms`` lists)."""
    found: list[Randomizable] = []
    stack = [transform]
    while stack:
        t = stack.pop()
        inner = getattr(t, "transforms", None)
        if isinstance(inner, (list, tuple)):
            stack.extend(reversed(inner))
        elif isinstance(t, Randomizable):
            found.append(t)
    return found


def share_generator(transforms: Sequence[Randomizable], generator: np.random.RandomState) -> None:
    """Make every transform draw from ``generator`` (assigns ``R``; no reseeding)."""
    for t in transforms:
        t.R = generator


class MultiViewd(Randomizable):
    """Apply ``len(view_transforms)`` independent pipelines to copies of one record.

    Args:
        view_transforms: one callable (dict -> dict) per view; pass distinct instances.
        key: the image key each pipeline transforms.

    ``__call__(data)`` returns the list of views: float32 tensors ``(3, H, W)`` (the pipelines decide H, W; a
    1-channel result is expanded as a view, :func:`as_rgb_view`). ``set_random_state(seed)`` gives every random
    transform of every view the one generator ``RandomState(seed)``, so a seed fixes every view.
    """

    def __init__(self, view_transforms: Sequence[Callable[[dict], dict]], key: Hashable = "image") -> None:
        if len({id(t) for t in view_transforms}) != len(view_transforms):
            raise ValueError("each view needs its own transform instance")
        self.view_transforms = list(view_transforms)
        self.key = key
        self._random = [r for t in self.view_transforms for r in random_transforms(t)]
        if len({id(t) for t in self._random}) != len(self._random):
            raise ValueError("each view needs its own transform instance")
        self.set_random_state(seed=int(np.random.randint(MAX_SEED)))

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> MultiViewd:
        super().set_random_state(seed, state)
        share_generator(self._random, self.R)
        return self

    def randomize(self, data: Any = None) -> None:
        """Views draw their own parameters; nothing to draw here."""

    def __call__(self, data: Mapping[Hashable, Any]) -> list[torch.Tensor]:
        return [as_rgb_view(_as_plain_tensor(t(dict(data))[self.key])) for t in self.view_transforms]


class SSLTransform(Randomizable):
    """``record -> {"views": [Tensor(3,H,W) float32 in [0,1]], "label": ..., "id": ...}``.

    Args:
        base: deterministic pipeline (reader + intensity scaling) producing ``data[key]`` as (C, H, W) in [0, 1]
            (C = 1 for grayscale, expanded to 3 only at the end of each view).
        views: the :class:`MultiViewd` that cuts the views.
        key: image key.

    ``set_random_state(seed)`` is the sample's one generator setup: ``RandomState(seed)`` shared by every view.
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
        self.views.set_random_state(state=self.R)
        return self

    def randomize(self, data: Any = None) -> None:
        """Views draw their own parameters; nothing to draw here."""

    def __call__(self, record: Mapping[Hashable, Any]) -> dict[str, Any]:
        data = self.base(dict(record))
        return {"views": self.views(data), "label": record.get("label"), "id": record.get("id")}


class Pipeline(Randomizable):
    """Apply ``transforms`` (dict -> dict) in order: MONAI ``Compose`` without its per-call bookkeeping (lazy
    resampling checks, transform tracing), which cost ~30 us a transform. An exception propagates unchanged.
    ``set_random_state(seed)`` gives every random transform inside the one generator ``RandomState(seed)``."""

    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> Pipeline:
        super().set_random_state(seed, state)
        share_generator(random_transforms(self), self.R)
        return self

    def randomize(self, data: Any = None) -> None:
        """The transforms draw their own parameters."""

    def __call__(self, data: Any) -> Any:
        for t in self.transforms:
            data = t(data)
        return data


def compose(transforms: Sequence[Callable]) -> Pipeline:
    """The presets' sequential pipeline (:class:`Pipeline`)."""
    return Pipeline(transforms)
