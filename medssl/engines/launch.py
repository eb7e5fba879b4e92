"""The process's place in a ``torchrun`` launch *before* (or after) its process group exists.

Inside a run, medssl asks ``ignite.distributed`` (``idist.get_rank()``, ``idist.get_world_size()``,
``idist.device()``, ``idist.barrier()``, ``idist.all_gather``): that is the one distributed API. Only code that
runs outside the process group must read the launcher's environment, and does so here:

- :func:`run_pretraining` chooses the backend of ``idist.Parallel`` from the world size and lets only rank 0
  lock, clean and empty the run folder *before* ``idist.Parallel`` starts the group;
- bundle steps that run after the group is closed (writing ``models/model.pt``) keep to rank 0;
- a bundle's ``device`` and its global batch (the default learning rate) under ``torchrun`` are settings,
  resolved before any process group exists (:func:`launch_device`, :func:`launch_world_size`).

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; a plain ``python`` process has none of them
(rank 0 of 1).
"""

from __future__ import annotations

import os

import torch


def launch_rank() -> int:
    """This process's global rank as the launcher set it (``RANK``; 0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


def launch_world_size() -> int:
    """The number of launched processes (``WORLD_SIZE``; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launch_local_rank() -> int:
    """This process's rank on its machine (``LOCAL_RANK``; 0 without a launcher)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def launch_device() -> torch.device:
    """The device of this launched process: ``cuda:<LOCAL_RANK>`` when CUDA is available, else the CPU (a bundle's
    ``device`` under ``torchrun``, known before the process group exists)."""
    return torch.device(f"cuda:{launch_local_rank()}") if torch.cuda.is_available() else torch.device("cpu")


def is_launch_main_process() -> bool:
    """True unless this process is a non-zero rank of a ``torchrun`` launch."""
    return launch_rank() == 0
