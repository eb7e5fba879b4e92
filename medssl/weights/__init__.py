"""Reading published checkpoints into medssl names, medssl's own weight files, and the weight registry.

Main entry points: :func:`load_checkpoint`, :func:`build_from_checkpoint`, :func:`build_heads`,
:func:`save_medssl_file`, :func:`read_medssl_file`. Norm conversion, surgery and statistics live in
``medssl.weights.norm``, ``surgery``, ``stats`` and ``prepare``.
"""

from medssl.weights.checkpoint import (
    FORMATS,
    LoadedCheckpoint,
    build_from_checkpoint,
    build_heads,
    load_checkpoint,
)
from medssl.weights.medssl_file import read_medssl_file, save_medssl_file, sha256_of

__all__ = [
    "FORMATS",
    "LoadedCheckpoint",
    "build_from_checkpoint",
    "build_heads",
    "load_checkpoint",
    "read_medssl_file",
    "save_medssl_file",
    "sha256_of",
]
