"""Deterministic data order and augmentation randomness for exactly resumable runs.

Which images make up optimizer step ``s`` and how each one is augmented are pure functions of
``(seed, epoch, sample index)``, independent of the number of workers and of interruptions:

- :class:`StepBatchSampler` yields, for steps ``start_step, start_step + 1, ...``, the list of keys
  ``(epoch, index)`` of this rank's share of the step's batch. The order of an epoch is
  ``torch.randperm(N, generator=seed + epoch)``, truncated to whole global batches (drop last) and sharded
  ``perm[rank::world_size]`` like ``DistributedSampler``.
- :class:`SeededSampleDataset` receives those keys and seeds the transform (MONAI ``set_random_state``,
  and the Python/NumPy/torch generators that other augmentations draw from) from
  ``SeedSequence([seed, epoch, index])`` before calling it, then restores the generators.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed that depends only on ``(seed, epoch, index)``."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(1)[0])


def step_seed(seed: int, step: int, rank: int) -> int:
    """A 32-bit seed for the batched augmentation of optimizer step ``step`` on process ``rank``."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, step, rank, 1]).generate_state(1)[0])


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch ``epoch`` (0-based): ``randperm`` seeded with ``seed + epoch``."""
    gen = torch.Generator()
    gen.manual_seed(seed + epoch)
    return torch.randperm(num_samples, generator=gen)


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batch sampler over optimizer steps ``[start_step, total_steps)`` (0-based step numbers).

    Args:
        num_samples: dataset size N.
        batch_size: images per step on this rank.
        total_steps: steps of the whole run.
        seed: run seed.
        rank, world_size: this process and the number of processes.
        start_step: first step to yield (the number of steps already done when resuming).

    Each batch is a list of ``(epoch, index)`` keys. ``steps_per_epoch = N // (batch_size * world_size)``.
    """

    def __init__(self, num_samples: int, batch_size: int, total_steps: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, start_step: int = 0) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.total_steps = total_steps
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_step = start_step
        self.steps_per_epoch = num_samples // (batch_size * world_size)
        if self.steps_per_epoch < 1:
            raise ValueError(f"{num_samples} images are fewer than one global batch of "
                             f"{batch_size * world_size}")

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)

    def batch_keys(self, step: int) -> list[tuple[int, int]]:
        """Keys ``(epoch, index)`` of this rank's images at optimizer step ``step`` (0-based)."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        global_batch = self.batch_size * self.world_size
        perm = self._perm(epoch)[pos * global_batch:(pos + 1) * global_batch]
        return [(epoch, int(i)) for i in perm[self.rank::self.world_size]]

    def _perm(self, epoch: int) -> torch.Tensor:
        cached = getattr(self, "_cache", None)
        if cached is None or cached[0] != epoch:
            self._cache = (epoch, epoch_permutation(self.num_samples, self.seed, epoch))
        return self._cache[1]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.total_steps):
            yield self.batch_keys(step)


@contextlib.contextmanager
def seeded_generators(seed: int) -> Iterator[None]:
    """Seed Python ``random``, NumPy's global generator and torch's CPU generator, restoring them after."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)  # CPU only (what fork_rng restores); torch.manual_seed
        # would also queue CUDA/XPU/MTIA seeding, which formats a stack trace per call (~1.5 ms a sample)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class SeededSampleDataset(Dataset):
    """Apply ``transform`` to ``records[index]`` with randomness fixed by ``(seed, epoch, index)``.

    Args:
        records: manifest records (dicts).
        transform: ``record -> dict`` (e.g. ``build_ssl_transform``); a MONAI ``Randomizable`` gets
            ``set_random_state(seed=...)`` before every call.
        seed: run seed (plus the rank offset is NOT applied: keys are global, so every rank agrees).

    ``dataset[(epoch, index)]`` returns the transformed record; ``dataset[index]`` uses epoch 0.
    """

    def __init__(self, records: Sequence[dict[str, Any]], transform: Callable[[dict[str, Any]], Any],
                 seed: int = 0) -> None:
        self.records = list(records)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        epoch, index = key if isinstance(key, tuple) else (0, int(key))
        seed = sample_seed(self.seed, epoch, index)
        with seeded_generators(seed):
            if hasattr(self.transform, "set_random_state"):
                self.transform.set_random_state(seed=seed)
            return self.transform(dict(self.records[index]))


def collate_views(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack ``{"views": [Tensor(C,H,W)] * V}`` samples into ``{"views": [Tensor(B,C,H,W)] * V}``.

    Labels and ids are not needed for the SSL step and are dropped (ids are never logged).
    """
    num_views = len(samples[0]["views"])
    views = [torch.stack([torch.as_tensor(s["views"][v]) for s in samples]) for v in range(num_views)]
    return {"views": views}
