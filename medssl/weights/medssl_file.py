"""medssl's own checkpoint file: safetensors with ``backbone.<name>`` and ``heads.<head>.<name>`` tensors and
string metadata ``medssl_format="1"``, ``arch``, ``arch_kwargs``, ``input_normalization`` and ``provenance``
(JSON; source format, file name, sha256, operations applied). See docs/architecture.md."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import torch

from medssl.errors import MedsslError
from medssl.io import atomic_write_bytes
from medssl.weights.detect import load_safetensors, metadata_json
from medssl.weights.formats.common import ReaderOutput

MEDSSL_FORMAT_VERSION = "1"


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    # safetensors refuses views that share storage; a contiguous copy is always safe
    return tensor.detach().to("cpu").contiguous().clone()


def save_medssl_file(
    path: str | os.PathLike[str],
    backbone_state: Mapping[str, torch.Tensor],
    *,
    arch: str,
    arch_kwargs: Mapping[str, Any],
    heads: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    input_normalization: Mapping[str, Any],
    provenance: Mapping[str, Any],
) -> None:
    """Write a medssl safetensors file atomically.

    Args:
        path: output file (``.safetensors``).
        backbone_state: backbone state_dict in medssl names.
        arch, arch_kwargs: ``build_backbone(arch, **arch_kwargs)`` rebuilds the backbone.
        heads: optional ``{"projector"|"predictor"|"prototypes": state_dict}``.
        input_normalization: ``{"mean", "std", "description"}`` for inputs in [0, 1].
        provenance: JSON-able record (source format, file name, sha256, operations, pretraining run,
            ``preparation`` counts, ``bn_statistics``: one of ``medssl.weights.prepare.BN_STATISTICS``).
    """
    from safetensors.torch import save

    tensors = {f"backbone.{k}": _plain(v) for k, v in backbone_state.items()}
    for head, state in (heads or {}).items():
        if "." in head:
            raise ValueError(f"head name {head!r} must not contain '.'")
        tensors.update({f"heads.{head}.{k}": _plain(v) for k, v in state.items()})
    metadata = {
        "medssl_format": MEDSSL_FORMAT_VERSION,
        "arch": arch,
        "arch_kwargs": json.dumps(dict(arch_kwargs)),
        "input_normalization": json.dumps(dict(input_normalization)),
        "provenance": json.dumps(dict(provenance), default=str),
    }
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def read_medssl_file(path: str | os.PathLike[str], contents: tuple[dict, dict] | None = None,
                     ) -> tuple[ReaderOutput, str, dict[str, Any], dict[str, Any]]:
    """Read a medssl file: (reader output, arch, arch_kwargs, provenance).

    ``contents`` = (tensors, metadata) when the caller already read the safetensors file.

    Raises:
        MedsslError: not a medssl file, or its metadata is incomplete.
    """
    tensors, metadata = contents if contents is not None else load_safetensors(path)
    if metadata.get("medssl_format") != MEDSSL_FORMAT_VERSION:
        raise MedsslError(f"not a medssl file version {MEDSSL_FORMAT_VERSION} "
                          f"(medssl_format={metadata.get('medssl_format')!r})", path)
    if "arch" not in metadata:
        raise MedsslError("medssl file metadata has no 'arch'", path)
    arch_kwargs = metadata_json(metadata, "arch_kwargs", path)
    normalization = metadata_json(metadata, "input_normalization", path)
    provenance = metadata_json(metadata, "provenance", path) if "provenance" in metadata else {}
    backbone = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
    heads: dict[str, dict[str, torch.Tensor]] = {}
    skipped = []
    for key, value in tensors.items():
        if key.startswith("heads."):
            head, _, name = key[len("heads."):].partition(".")
            heads.setdefault(head, {})[name] = value
        elif not key.startswith("backbone."):
            skipped.append(key)
    out = ReaderOutput(backbone, normalization, heads=heads, skipped=sorted(skipped))
    ops = provenance.get("operations") or []
    if ops:
        out.notes.append("operations applied: " + ", ".join(str(op.get("operation", "?")) if isinstance(op, Mapping)
                                                            else str(op) for op in ops))
    return out, metadata["arch"], arch_kwargs, provenance


def sha256_of(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
