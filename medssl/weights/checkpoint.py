"""Load any supported published checkpoint into medssl names: :func:`load_checkpoint` and
:func:`build_from_checkpoint`.

Formats (``LoadedCheckpoint.format``): ``torchvision``, ``simclr_v1``, ``simclr_v2``, ``swav``, ``byol_torch``,
``byol_solo``, ``byol_mmselfsup``, ``byol_jax``, ``simsiam``, ``moco_v2``, ``moco_v3``, ``dino``, ``bit_npz``,
``timm_resnetv2``, ``medssl`` (layouts in docs/checkpoints.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medssl.errors import MedsslError
from medssl.weights import detect
from medssl.weights.formats import bit, byol_jax, byol_torch, moco, simclr_v2, simsiam, swav, torchvision
from medssl.weights.formats.arch import infer_arch
from medssl.weights.formats.common import ReaderOutput

Reader = Callable[[Any, "str | os.PathLike[str]"], ReaderOutput]

#: format name -> reader (the medssl format is read by medssl.weights.medssl_file)
READERS: dict[str, Reader] = {
    "torchvision": torchvision.read_torchvision,
    "simclr_v1": torchvision.read_simclr_v1,
    "simclr_v2": simclr_v2.read_simclr_v2,
    "swav": swav.read_swav,
    "byol_torch": torchvision.read_byol_torch,
    "byol_solo": byol_torch.read_byol_solo,
    "byol_mmselfsup": byol_torch.read_byol_mmselfsup,
    "byol_jax": byol_jax.read_byol_jax,
    "simsiam": simsiam.read_simsiam,
    "moco_v2": moco.read_moco_v2,
    "moco_v3": moco.read_moco_v3,
    "dino": torchvision.read_dino,
    "bit_npz": bit.read_bit_npz,
    "timm_resnetv2": bit.read_timm_resnetv2,
}
FORMATS = (*READERS, "medssl")
_V2_ONLY = ("norm", "stem_width", "ws_eps")


@dataclass
class LoadedCheckpoint:
    """A checkpoint read into medssl names.

    Attributes:
        path: the file read. format: detected or forced format name. file_kind: torch|npz|safetensors|pickle.
        arch, arch_kwargs: ``build_backbone(arch, **arch_kwargs)`` builds a matching backbone.
        backbone: tensors in medssl names. heads: ``{"projector"|"predictor"|"prototypes": state_dict}``.
        input_normalization: ``{"mean", "std", "description"}`` for inputs in [0, 1].
        loaded: backbone keys that match the architecture (name and shape).
        skipped: source keys deliberately not imported (momentum encoders, optimizer, queues, ...).
        unexpected: backbone keys the architecture does not have (or with another shape).
        missing: architecture keys the file does not provide.
        notes: remarks about the format and choices made. provenance: medssl files' own provenance record.
    """

    path: str
    format: str
    file_kind: str
    arch: str
    arch_kwargs: dict[str, Any]
    backbone: dict[str, torch.Tensor]
    heads: dict[str, dict[str, torch.Tensor]]
    input_normalization: dict[str, Any]
    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        """A JSON-able summary (no tensors): format, arch, normalisation, key lists, head shapes, notes."""
        return {
            "path": self.path,
            "format": self.format,
            "file_kind": self.file_kind,
            "arch": self.arch,
            "arch_kwargs": self.arch_kwargs,
            "input_normalization": self.input_normalization,
            "num_backbone_tensors": len(self.backbone),
            "num_parameters": int(sum(v.numel() for v in self.backbone.values() if v.is_floating_point())),
            "loaded": self.loaded,
            "missing": self.missing,
            "unexpected": self.unexpected,
            "skipped": self.skipped,
            "heads": {name: {k: list(v.shape) for k, v in state.items()} for name, state in self.heads.items()},
            "notes": self.notes,
            "provenance": self.provenance,
        }


def _read_raw(path: str | os.PathLike[str], kind: str, trust: bool) -> tuple[Any, dict[str, str]]:
    if kind == "torch":
        from medssl.weights.pickle_guard import check_torch_file

        check_torch_file(path)  # memory bombs are refused before torch allocates anything
        return detect.load_torch_file(path, trust=trust), {}
    if kind == "npz":
        return detect.load_npz(path), {}
    if kind == "safetensors":
        return detect.load_safetensors(path)
    from medssl.weights.safe_unpickle import safe_load_pickle

    obj, _stubbed = safe_load_pickle(path)
    return obj, {}


def _complete_bn(state: dict[str, torch.Tensor]) -> None:
    """Add ``num_batches_tracked = 0`` next to every ``running_mean`` that lacks it (converted files)."""
    for key in [k for k in state if k.endswith(".running_mean")]:
        state.setdefault(key[: -len("running_mean")] + "num_batches_tracked", torch.tensor(0, dtype=torch.long))


def _to_float32(state: dict[str, torch.Tensor], notes: list[str]) -> None:
    low = [k for k, v in state.items() if v.is_floating_point() and v.dtype != torch.float32]
    for key in low:
        state[key] = state[key].float()
    if low:
        notes.append(f"{len(low)} floating-point tensors not stored as float32 were converted to float32")


def _architecture(out: ReaderOutput, arch: str | None, path: Any) -> tuple[str, dict[str, Any]]:
    try:
        inferred, kwargs = infer_arch(out.backbone)
    except (ValueError, KeyError) as exc:
        if arch is None:
            raise MedsslError(f"cannot infer the architecture ({exc}); pass --arch", path) from exc
        inferred, kwargs = arch, {}
    if out.ws_eps is not None and inferred.startswith("resnetv2"):
        kwargs["ws_eps"] = out.ws_eps
    if arch is None:
        return inferred, kwargs
    if not arch.startswith("resnetv2"):
        kwargs = {k: v for k, v in kwargs.items() if k not in _V2_ONLY}
    return arch, kwargs


def compare_keys(backbone: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                 ) -> tuple[list[str], list[str], list[str], list[str]]:
    """(loaded, unexpected, missing, shape notes) of ``backbone`` against an expected state_dict."""
    loaded, unexpected, notes = [], [], []
    for key, value in backbone.items():
        if key not in expected:
            unexpected.append(key)
        elif tuple(expected[key].shape) != tuple(value.shape):
            unexpected.append(key)
            notes.append(f"{key}: shape {tuple(value.shape)} in file, {tuple(expected[key].shape)} in the model")
        else:
            loaded.append(key)
    have = set(loaded)
    missing = [k for k in expected if k not in have]
    return loaded, unexpected, missing, notes


def load_checkpoint(path: str | os.PathLike[str], *, arch: str | None = None, trust: bool = False,
                    format: str | None = None) -> LoadedCheckpoint:  # noqa: A002 - documented keyword
    """Read a published checkpoint (any format in :data:`FORMATS`) into medssl names.

    Args:
        path: the checkpoint file.
        arch: force the architecture (default: inferred from tensor shapes).
        trust: allow ``torch.load(weights_only=False)`` for pickles that need arbitrary classes.
        format: force the format instead of auto-detection.

    Raises:
        MedsslError: unreadable, truncated, unknown or inconsistent file (the message names the file).
        UntrustedPickleError: the pickle needs arbitrary classes and ``trust`` is False.
    """
    if format is not None and format not in FORMATS:
        raise MedsslError(f"unknown format {format!r}; supported: {', '.join(FORMATS)}", path)
    kind = detect.sniff_file_kind(path)
    obj, metadata = _read_raw(path, kind, trust)
    if kind == "safetensors" and (format == "medssl" or (format is None and metadata.get("medssl_format"))):
        return _load_medssl(path, arch, (obj, metadata))
    fmt = format or detect.detect_format(obj, kind=kind, path=path, metadata=metadata)
    try:
        out = READERS[fmt](obj, path)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise MedsslError(f"does not match the {fmt} layout ({type(exc).__name__}: {exc})", path) from exc
    if not out.backbone:
        raise MedsslError(f"no backbone weights found for format {fmt}", path)
    arch_name, arch_kwargs = _architecture(out, arch, path)
    return _finish(path, fmt, kind, arch_name, arch_kwargs, out, {})


def _load_medssl(path: str | os.PathLike[str], arch: str | None, contents: tuple) -> LoadedCheckpoint:
    from medssl.weights.medssl_file import read_medssl_file

    out, arch_name, arch_kwargs, provenance = read_medssl_file(path, contents)
    if arch is not None and arch != arch_name:
        arch_name = arch
        if not arch.startswith("resnetv2"):
            arch_kwargs = {k: v for k, v in arch_kwargs.items() if k not in _V2_ONLY}
    return _finish(path, "medssl", "safetensors", arch_name, arch_kwargs, out, provenance)


def _finish(path: Any, fmt: str, kind: str, arch: str, arch_kwargs: dict[str, Any], out: ReaderOutput,
            provenance: dict[str, Any]) -> LoadedCheckpoint:
    from medssl.models import build_backbone

    backbone = dict(out.backbone)
    notes = list(out.notes)
    _to_float32(backbone, notes)
    for state in out.heads.values():
        _complete_bn(state)
    try:
        with torch.device("meta"):
            expected = build_backbone(arch, **arch_kwargs).state_dict()
    except (ValueError, TypeError) as exc:
        raise MedsslError(f"cannot build architecture {arch} with {arch_kwargs}: {exc}", path) from exc
    for key in expected:
        if key.endswith(".num_batches_tracked") and key not in backbone \
                and key[: -len("num_batches_tracked")] + "running_mean" in backbone:
            backbone[key] = torch.tensor(0, dtype=torch.long)
    loaded, unexpected, missing, shape_notes = compare_keys(backbone, expected)
    return LoadedCheckpoint(
        path=os.fspath(path), format=fmt, file_kind=kind, arch=arch, arch_kwargs=dict(arch_kwargs),
        backbone=backbone, heads=out.heads, input_normalization=dict(out.input_normalization),
        loaded=loaded, skipped=list(out.skipped), unexpected=unexpected, missing=missing,
        notes=notes + shape_notes, provenance=provenance,
    )


def build_from_checkpoint(path_or_loaded: str | os.PathLike[str] | LoadedCheckpoint, *, trust: bool = False,
                          arch: str | None = None, allow_missing: bool = False,
                          **backbone_kwargs: Any) -> tuple[nn.Module, LoadedCheckpoint]:
    """Build the backbone a checkpoint describes and load its weights.

    Args:
        path_or_loaded: a checkpoint file or the result of :func:`load_checkpoint`.
        trust, arch: as in :func:`load_checkpoint` (used when a path is given).
        allow_missing: accept architecture keys the file lacks (left at their initialisation).
        **backbone_kwargs: override ``arch_kwargs`` (e.g. ``num_classes=0`` drops the classifier,
            ``small_stem=True``).

    Returns:
        (model in eval mode, the LoadedCheckpoint).

    Raises:
        MedsslError: the file lacks weights the model needs (unless ``allow_missing``).
    """
    loaded = path_or_loaded if isinstance(path_or_loaded, LoadedCheckpoint) else \
        load_checkpoint(path_or_loaded, arch=arch, trust=trust)
    from medssl.models import build_backbone

    model = build_backbone(loaded.arch, **{**loaded.arch_kwargs, **backbone_kwargs})
    expected = model.state_dict()
    _ok, _unexpected, missing, shape_notes = compare_keys(loaded.backbone, expected)
    if missing and not allow_missing:
        shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
        raise MedsslError(f"checkpoint lacks weights for {loaded.arch}: {shown}"
                          + (f"; {shape_notes[0]}" if shape_notes else ""), loaded.path)
    state = {k: v for k, v in loaded.backbone.items() if k in expected and v.shape == expected[k].shape}
    model.load_state_dict(state, strict=False)
    _replay_folding(model, loaded)
    return model.eval(), loaded


def folded_layers(provenance: Mapping[str, Any]) -> list[str]:
    """Names of the convs whose weight standardisation was folded, from a medssl file's provenance."""
    names: list[str] = []
    for op in provenance.get("operations") or []:
        if isinstance(op, Mapping) and op.get("operation") == "fold_weight_standardization":
            names += [str(n) for n in op.get("layers", [])]
    return names


def _replay_folding(model: nn.Module, loaded: LoadedCheckpoint) -> None:
    """Weights saved after WS folding are already standardised: switch those StdConv2d layers to plain convs."""
    from medssl.models import StdConv2d

    for name in folded_layers(loaded.provenance):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(module, StdConv2d):
            module.standardize = False


def build_heads(loaded: LoadedCheckpoint) -> dict[str, nn.Module]:
    """The checkpoint's heads as modules: ``MLPHead`` for projector/predictor, ``Prototypes`` for prototypes."""
    from medssl.models import MLPHead, Prototypes

    heads: dict[str, nn.Module] = {}
    for name, state in loaded.heads.items():
        if name == "prototypes":
            k, dim = state["weight"].shape
            proto = Prototypes(int(dim), int(k))
            proto.load_state_dict(state, strict=True)
            heads[name] = proto
        else:
            heads[name] = MLPHead.from_state_dict(state)
    return heads


def source_name(path: str | os.PathLike[str]) -> str:
    """The file name only (no folders) for provenance records."""
    return Path(path).name
