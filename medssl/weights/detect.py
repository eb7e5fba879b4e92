"""Open a checkpoint file of any supported kind and detect its format from the file type and key patterns.

File kinds (by content, not extension): ``torch`` (zip archive with ``data.pkl``, or the legacy pickle with
torch's magic number), ``npz`` (zip of ``.npy`` arrays), ``safetensors`` (8-byte header length + JSON) and
``pickle`` (any other pickle, e.g. the BYOL JAX dill file, read by :mod:`medssl.weights.safe_unpickle`).
torch files are read with ``weights_only=True``; a file that needs other classes raises
:class:`medssl.errors.UntrustedPickleError` unless ``trust=True``.
"""

from __future__ import annotations

import json
import os
import pickletools
import re
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.errors import MedsslError, UntrustedPickleError
from medssl.weights.formats.common import looks_torchvision, tensor_items

FILE_KINDS = ("torch", "npz", "safetensors", "pickle")
_TORCH_MAGIC = 0x1950A86A20F9469CFC6C


def sniff_file_kind(path: str | os.PathLike[str]) -> str:
    """The container kind of ``path``: one of :data:`FILE_KINDS`.

    Raises:
        MedsslError: missing, empty, truncated or unrecognised file (the message says what was seen).
    """
    p = Path(path)
    if not p.is_file():
        raise MedsslError("no such file" if not p.exists() else "not a regular file", path)
    size = p.stat().st_size
    if size == 0:
        raise MedsslError("empty file", path)
    with open(p, "rb") as fh:
        head = fh.read(16)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(p) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile as exc:
            raise MedsslError(f"truncated or corrupt zip archive ({exc})", path) from exc
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        raise MedsslError(f"zip archive that is neither a torch file nor an npz (entries: {names[:5]})", path)
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        return "torch" if _first_pickle_is_torch_magic(p) else "pickle"
    raise MedsslError(f"unknown file type (first bytes {head[:8]!r}): not a torch, npz, safetensors or pickle "
                      "checkpoint", path)


def _first_pickle_is_torch_magic(path: Path) -> bool:
    """Legacy (non-zip) torch files start with a small pickle holding torch's magic number."""
    with open(path, "rb") as fh:
        try:
            for opcode, arg, _pos in pickletools.genops(fh):
                if opcode.name in ("LONG1", "LONG4", "LONG", "INT"):
                    return arg == _TORCH_MAGIC
                if opcode.name not in ("PROTO", "FRAME"):
                    return False
        except ValueError:
            return False
    return False


def _untrusted_globals(message: str) -> str:
    found = sorted(set(re.findall(r"(?:GLOBAL|global) ([\w.]+)", message)))
    return ", ".join(found) if found else "classes outside torch's safe list"


def load_torch_file(path: str | os.PathLike[str], *, trust: bool = False) -> Any:
    """``torch.load`` on CPU with ``weights_only=True`` (``False`` only when ``trust``).

    Raises:
        UntrustedPickleError: the pickle needs arbitrary classes and ``trust`` is False.
        MedsslError: truncated or corrupt file.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for bad files
        message = str(exc)
        if not trust and ("Weights only load failed" in message or "Unsupported global" in message):
            raise UntrustedPickleError(
                f"the checkpoint pickle needs arbitrary Python classes ({_untrusted_globals(message)}); "
                "loading it can run code from the file. Pass --trust (trust=True) only if you trust its source",
                path,
            ) from exc
        first_line = message.strip().splitlines()[0] if message.strip() else type(exc).__name__
        if isinstance(exc, EOFError) or "central directory" in message or "unexpected end" in message.lower():
            raise MedsslError(f"truncated or corrupt torch file ({first_line})", path) from exc
        raise MedsslError(f"cannot read torch file ({type(exc).__name__}: {first_line})", path) from exc


def load_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """All arrays of an npz file (``allow_pickle=False``)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: np.array(data[k]) for k in data.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise MedsslError(f"truncated or corrupt npz ({exc})", path) from exc


def load_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, string metadata) of a safetensors file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError) as exc:
        raise MedsslError(f"truncated or corrupt safetensors file ({exc})", path) from exc
    return tensors, metadata


def _keys(obj: Any) -> list[str]:
    return [k for k in obj if isinstance(k, str)] if isinstance(obj, Mapping) else []


def _has_prefix(keys: list[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def detect_format(obj: Any, *, kind: str, path: str | os.PathLike[str],
                  metadata: Mapping[str, str] | None = None) -> str:
    """The checkpoint format name (see :mod:`medssl.weights.checkpoint`) of a loaded object.

    Flat torchvision-named dicts without ``fc`` are ambiguous (DINO backbone, BYOL regex ports): the file
    name decides when it contains ``dino`` or ``byol``, otherwise ``torchvision``; all three expect the same
    ImageNet input normalisation.

    Raises:
        MedsslError: nothing recognisable; the message lists what was seen.
    """
    name = Path(path).name.lower()
    if kind == "npz":
        if any(k.startswith("resnet/root_block/") for k in obj):
            return "bit_npz"
    elif kind == "safetensors":
        if metadata and metadata.get("medssl_format"):
            return "medssl"
        keys = list(obj)
        if "stem.conv.weight" in keys:
            return "timm_resnetv2"
        if looks_torchvision(keys):
            return "torchvision"
    elif kind == "pickle":
        if isinstance(obj, Mapping) and "experiment_state" in obj:
            return "byol_jax"
    elif isinstance(obj, Mapping):
        keys = _keys(obj)
        if {"resnet", "head"} <= set(keys) and "net.0.0.weight" in _keys(obj["resnet"]):
            return "simclr_v2"
        if {"student", "teacher"} <= set(keys):
            return "dino"
        if "state_dict" in keys and isinstance(obj["state_dict"], Mapping):
            inner = _keys(obj["state_dict"])
            if "author" in keys and _has_prefix(inner, "backbone."):
                return "byol_mmselfsup"
            if _has_prefix(inner, "module.encoder_q."):
                return "moco_v2"
            if _has_prefix(inner, "module.base_encoder."):
                return "moco_v3"
            if _has_prefix(inner, "module.encoder.") or _has_prefix(inner, "encoder."):
                return "simsiam"
            if _has_prefix(inner, "backbone."):
                return "byol_solo"
            if "module.conv1.weight" in inner:
                return "swav" if _swav_like(inner, name) else "torchvision"
            if looks_torchvision(inner):
                return "simclr_v1"
        if "module.conv1.weight" in keys:
            return "swav" if _swav_like(keys, name) else "torchvision"
        if "stem.conv.weight" in keys:
            return "timm_resnetv2"
        if looks_torchvision(keys):
            if "fc.weight" in keys:
                return "torchvision"
            if "dino" in name:
                return "dino"
            if "byol" in name:
                return "byol_torch"
            return "torchvision"
    raise MedsslError(f"unknown checkpoint layout: {describe(obj)}", path)


def _swav_like(keys: list[str], name: str) -> bool:
    """SwAV files carry a projection head or prototypes (or say swav in their name); other ``module.``-prefixed
    torchvision dicts are plain DataParallel saves."""
    return "swav" in name or any(k.startswith(("module.prototypes", "module.projection_head")) for k in keys)


def describe(obj: Any, limit: int = 6) -> str:
    """A short description of what a loaded object contains, for error messages."""
    if isinstance(obj, Mapping):
        keys = [str(k) for k in list(obj)[:limit]]
        more = f", ... ({len(obj)} entries)" if len(obj) > limit else ""
        return f"{type(obj).__name__} with keys {keys}{more}"
    if isinstance(obj, torch.nn.Module):
        return f"a pickled nn.Module ({type(obj).__name__}); save its state_dict() instead"
    return f"a {type(obj).__name__}"


def tensors_only(obj: Any, path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensor entries of a state_dict-like mapping; MedsslError when there are none."""
    if not isinstance(obj, Mapping):
        raise MedsslError(f"expected a state_dict (mapping of tensors), found {describe(obj)}", path)
    out = tensor_items(obj)
    if not out:
        raise MedsslError(f"no tensors in {describe(obj)}", path)
    return out


def metadata_json(metadata: Mapping[str, str], key: str, path: str | os.PathLike[str]) -> Any:
    """Decode a JSON-valued metadata entry of a medssl file."""
    try:
        return json.loads(metadata[key])
    except (KeyError, json.JSONDecodeError) as exc:
        raise MedsslError(f"medssl file metadata {key!r} missing or not JSON", path) from exc
