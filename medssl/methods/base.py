"""The interface every SSL method implements, and helpers shared by the methods.

A method is an ``nn.Module`` that owns the backbone, its heads and (for BYOL) a target network. The training
engine calls, per optimizer step::

    method.configure_run(steps_per_epoch=..., global_batch_size=..., max_iterations=...)   # once, at start
    out = method(views)                    # {"loss": scalar, "embeddings": (N, D) detached, ...}
    out["loss"].backward()
    method.on_before_optimizer_step(iteration)
    optimizer.step()                       # may be skipped (fp16 GradScaler found inf/NaN gradients) ...
    logs = method.on_after_optimizer_step(iteration, max_iterations)   # ... and then this is not called

``iteration`` is the 1-based number of the optimizer step being taken (Ignite's ``engine.state.iteration``
inside the process function): the first step is 1, the last is ``max_iterations``. A step the optimizer
skips gets no ``on_after_optimizer_step``: EMA updates, step counters and re-normalisations only follow
steps that changed the weights.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from medssl.errors import MedsslError
from medssl.models import MLPHead, Prototypes

#: names of the heads an imported checkpoint may provide (keys of ``LoadedCheckpoint.heads``)
HEAD_NAMES = ("projector", "predictor", "prototypes")


class SSLMethod(nn.Module, abc.ABC):
    """Base class of the SSL methods.

    Attributes:
        backbone: the network being pretrained (``forward_features(x) -> (N, num_features)``).
        name: method name as accepted by :func:`medssl.methods.build_method`.
        views_required: number of views per sample ``forward`` expects (2; SwAV multi-crop 2 + local crops).
        head_sources: for each head the method uses, ``"imported"`` or ``"new"``.
    """

    name: str = ""
    views_required: int = 2
    #: weight decay on every parameter (SimSiam's and SwAV's code), not only on weight matrices / conv kernels
    decay_all_parameters: bool = False
    #: LARS trust ratio on every parameter (SwAV's code wraps SGD over all parameters in LARC) instead of only on
    #: weight matrices / conv kernels (SimCLR, BYOL: biases and norm parameters are excluded)
    lars_all_parameters: bool = False
    #: view pipelines the engine builds (``medssl.transforms.presets.VIEW_RECIPES``): ``"symmetric"`` (every view
    #: the modality preset) or ``"byol"`` (BYOL's asymmetric blur/solarize pair)
    view_recipe: str = "symmetric"

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        if not hasattr(backbone, "forward_features") or not hasattr(backbone, "num_features"):
            raise TypeError("the backbone must provide forward_features(x) and num_features (see medssl.models)")
        self.backbone = backbone
        self.head_sources: dict[str, str] = {}

    @property
    def num_features(self) -> int:
        """Width of the backbone's pooled features."""
        return int(self.backbone.num_features)

    @abc.abstractmethod
    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Compute the loss on a list of views, each (N, C, H, W).

        Returns:
            ``{"loss": scalar tensor, "embeddings": (N, D) detached embeddings of the first view}`` and
            possibly further entries.
        """

    def configure_run(self, *, steps_per_epoch: int, global_batch_size: int,
                      max_iterations: int | None = None) -> dict[str, Any]:
        """Called once before training with the run's real steps per epoch, global batch (images per optimizer
        step over all processes) and length, so epoch-based knobs become steps (SwAV). Returns the resolved
        schedule to record (JSON-safe). Default: nothing to convert, ``{}``."""
        return {}

    def on_before_optimizer_step(self, iteration: int) -> None:
        """Called after ``backward`` and before ``optimizer.step()`` (gradient surgery). Default: nothing."""

    def on_after_optimizer_step(self, iteration: int, max_iterations: int) -> dict[str, float]:
        """Called after ``optimizer.step()`` (EMA targets, prototype normalisation).

        Returns:
            scalars to log, e.g. ``{"tau": 0.997}``. Default: nothing to do, ``{}``.
        """
        return {}

    def extra_state(self) -> dict[str, Any]:
        """State outside ``state_dict`` that a resume must restore (queues, counters). Default ``{}``."""
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned. Default: nothing to restore."""

    def target_modules(self) -> list[nn.Module]:
        """Modules that must never receive gradients (BYOL's EMA target). Default ``[]``."""
        return []

    def _fixed_lr_modules(self) -> dict[str, nn.Module]:
        """Submodules whose parameter groups get ``"fixed_lr": True`` (the SimSiam predictor). Default none."""
        return {}

    def param_groups(self, weight_decay: float, lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups.

        Parameters with ``ndim <= 1`` (biases, norm gammas/betas) get ``weight_decay=0`` and
        ``"exclude_from_lars": True`` (SimCLR and BYOL, as their papers say); the rest get ``weight_decay``.
        Methods with :attr:`decay_all_parameters` (SimSiam, SwAV: their code passes every parameter to SGD with
        ``weight_decay``) give ``weight_decay`` to the 1-D parameters too; they stay ``exclude_from_lars`` unless
        :attr:`lars_all_parameters` (SwAV, whose code wraps that SGD in LARC). Submodules listed by
        :meth:`_fixed_lr_modules` form their own groups flagged ``"fixed_lr": True`` (the scheduler must leave
        their lr at its initial value). Parameters that do not require grad (target networks) are left out.
        Every group carries ``name``, ``lr``, ``weight_decay``, ``exclude_from_lars`` and ``fixed_lr``; empty
        groups are dropped.

        Args:
            weight_decay: decay for weight matrices / conv kernels.
            lr: initial learning rate of every group.
        """
        seen: set[int] = set()
        frozen = {id(p) for m in self.target_modules() for p in m.parameters()}
        buckets: list[tuple[str, bool, list[nn.Parameter]]] = []
        for prefix, module in self._fixed_lr_modules().items():
            buckets += self._split_decay(prefix, True, module.parameters(), seen, frozen)
        buckets += self._split_decay("main", False, self.parameters(), seen, frozen)
        groups = []
        for name, fixed, params in buckets:
            one_d = name.endswith("no_decay")
            if one_d and self.decay_all_parameters:
                name = name[: -len("no_decay")] + "1d_decay"
            groups.append({
                "name": name,
                "params": params,
                "lr": lr,
                "weight_decay": weight_decay if self.decay_all_parameters or not one_d else 0.0,
                "exclude_from_lars": one_d and not self.lars_all_parameters,
                "fixed_lr": fixed,
            })
        return groups

    @staticmethod
    def _split_decay(prefix, fixed, params, seen, frozen) -> list[tuple[str, bool, list[nn.Parameter]]]:
        decay, no_decay = [], []
        for p in params:
            if id(p) in seen or id(p) in frozen or not p.requires_grad:
                continue
            seen.add(id(p))
            (no_decay if p.ndim <= 1 else decay).append(p)
        out = []
        if decay:
            out.append((f"{prefix}_decay", fixed, decay))
        if no_decay:
            out.append((f"{prefix}_no_decay", fixed, no_decay))
        return out

    def check_views(self, views: Sequence[torch.Tensor]) -> None:
        """Raise :class:`MedsslError` when ``views`` does not hold ``views_required`` batches of equal size."""
        if not isinstance(views, (list, tuple)) or len(views) != self.views_required:
            got = len(views) if isinstance(views, (list, tuple)) else type(views).__name__
            raise MedsslError(f"method {self.name} expects a list of {self.views_required} views per batch, got {got}")
        sizes = {int(v.shape[0]) for v in views}
        if len(sizes) != 1:
            raise MedsslError(f"method {self.name}: all views must hold the same number of images, got {sorted(sizes)}")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features (N, num_features) of a batch of images (N, C, H, W)."""
        return self.backbone.forward_features(x)


#: feature width of the backbone the four papers sized their heads for (ResNet-50)
PAPER_FEATURE_WIDTH = 2048
#: smallest scaled head width
MIN_SCALED_HEAD_WIDTH = 64


def head_width(width: int, paper_width: int, num_features: int, *, paper_heads: bool = False) -> int:
    """The width of a hidden (or SimSiam output) head layer that fits the backbone.

    The papers sized their heads for a ResNet-50 (2048 features); on a narrow backbone these heads cost more than
    the backbone itself (a 2048-wide SimSiam head on a 2.8 M-parameter ResNet). Rule (medssl):
    ``min(paper_width, max(64, round(paper_width * num_features / 2048)))``: the paper's width scaled by the
    backbone's feature width relative to ResNet-50's, at least 64 and never wider than the paper's. A ResNet-50 or
    BiT R50x1 thus gets exactly the paper's heads; a ResNet-18 (512 features) a quarter of them.

    ``width`` is returned unchanged when ``paper_heads`` is set (the method's paper setting:
    ``--method-options '{"paper_heads": true}'``) or when it differs from ``paper_width`` (a width asked for).
    """
    if paper_heads or int(width) != int(paper_width):
        return int(width)
    scaled = int(round(paper_width * num_features / PAPER_FEATURE_WIDTH))
    return min(int(paper_width), max(MIN_SCALED_HEAD_WIDTH, scaled))


def resolve_mlp_head(
    role: str,
    heads: Mapping[str, Mapping[str, torch.Tensor]] | None,
    default: MLPHead,
    *,
    in_dim: int,
    out_dim: int | None = None,
    source: str | None = None,
) -> tuple[MLPHead, str]:
    """Use the imported head ``heads[role]`` when present, else ``default``.

    Args:
        role: ``"projector"`` or ``"predictor"``.
        heads: heads found in an imported checkpoint (MLPHead state_dict layout), or None.
        default: the freshly initialised head to use when none is imported.
        in_dim: input width the head must accept.
        out_dim: output width the head must produce (None: any).
        source: the checkpoint's path, for error messages.

    Returns:
        ``(head, "imported" | "new")``.

    Raises:
        MedsslError: when the imported head does not fit the MLPHead layout or the required widths.
    """
    if not heads or role not in heads:
        return default, "new"
    try:
        head = MLPHead.from_state_dict(heads[role])
    except (ValueError, RuntimeError, KeyError) as exc:
        raise MedsslError(f"imported {role} head cannot be used: {exc}", source) from exc
    if head.in_dim != in_dim:
        raise MedsslError(
            f"imported {role} head takes {head.in_dim} input features but {in_dim} are fed to it", source)
    if out_dim is not None and head.out_dim != out_dim:
        raise MedsslError(f"imported {role} head outputs {head.out_dim} features but {out_dim} are needed", source)
    return head, "imported"


def resolve_prototypes(
    heads: Mapping[str, Mapping[str, torch.Tensor]] | None,
    dim: int,
    num_prototypes: int,
    *,
    source: str | None = None,
) -> tuple[Prototypes, str]:
    """Imported SwAV prototypes (``{"weight": (K, dim)}``) when present, else new ones of shape (num_prototypes, dim).

    Raises:
        MedsslError: when the imported prototypes have the wrong layout or dimension.
    """
    if not heads or "prototypes" not in heads:
        return Prototypes(dim, num_prototypes), "new"
    state = heads["prototypes"]
    weight = state.get("weight") if isinstance(state, Mapping) else None
    if weight is None or set(state) != {"weight"} or weight.ndim != 2:
        raise MedsslError("imported prototypes must be a single 'weight' tensor of shape (K, dim)", source)
    if weight.shape[1] != dim:
        raise MedsslError(
            f"imported prototypes have dimension {weight.shape[1]} but the projector outputs {dim}", source)
    protos = Prototypes(dim, int(weight.shape[0]))
    protos.load_state_dict({"weight": weight}, strict=True)
    return protos, "imported"
