"""Norm-layer conversion for second-stage pretraining (Lu et al., *Contrastive learning meets transfer learning*;
BiT layout in docs/checkpoints.md).

- :func:`convert_gn_to_bn`: every ``nn.GroupNorm`` becomes a default-initialised ``nn.BatchNorm2d`` of the same
  width (Lu et al.: SimSiam collapses on BiT's GroupNorm and trains once it is replaced by BatchNorm); the conv
  weights are not touched.
- :func:`fold_weight_standardization`: each weight-standardised ``StdConv2d`` becomes a plain ``nn.Conv2d``
  holding its standardised weight (exact: the convolution computes the same function).
- :func:`recalibrate_bn`: re-estimate BatchNorm running statistics on target-domain batches.
- :func:`convert_to_sync_bn`: BatchNorm -> SyncBatchNorm for multi-GPU training.

All functions work in place on the module tree and return a JSON-able report (``convert_to_sync_bn`` returns
the module, as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from medssl.errors import MedsslError
from medssl.models.resnetv2 import StdConv2d

logger = logging.getLogger("medssl.weights.norm")


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def convert_gn_to_bn(model: nn.Module, *, copy_affine: bool = False) -> dict[str, Any]:
    """Replace every ``nn.GroupNorm`` in ``model`` by an ``nn.BatchNorm2d`` with the same channel count, in place.

    The BatchNorm is default-initialised as in Lu et al. (gamma 1, beta 0, running mean 0, running var 1,
    eps 1e-5, momentum 0.1, affine), on the GroupNorm's device and dtype. With ``copy_affine=True`` the
    GroupNorm's per-channel gamma/beta are copied into the BatchNorm instead (when the GroupNorm has them).
    Convolution weights and every other parameter stay bit-identical. If the model records its build options
    (``arch_kwargs`` with a ``"norm"`` key, as medssl's ResNetV2 does) the record is set to ``"bn"`` so that
    ``build_backbone(model.arch, **model.arch_kwargs)`` rebuilds the converted layout.

    Args:
        model: any module; GroupNorms are assumed to normalise 4D (N, C, H, W) activations.
        copy_affine: copy GroupNorm weight/bias into the BatchNorm. Default False (paper: default init).

    Returns:
        ``{"operation": "gn_to_bn", "count": int, "layers": [names], "copy_affine": bool}``.
    """
    names = [name for name, m in model.named_modules() if isinstance(m, nn.GroupNorm)]
    if isinstance(model, nn.GroupNorm):
        raise MedsslError("convert_gn_to_bn needs a model containing GroupNorm layers, not a bare GroupNorm")
    for name in names:
        gn = model.get_submodule(name)
        assert isinstance(gn, nn.GroupNorm)
        ref = gn.weight if gn.weight is not None else next(iter(gn.buffers()), None)
        factory: dict[str, Any] = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        bn = nn.BatchNorm2d(gn.num_channels, **factory)
        if copy_affine and gn.affine:
            with torch.no_grad():
                bn.weight.copy_(gn.weight)
                bn.bias.copy_(gn.bias)
        bn.train(gn.training)
        _set_submodule(model, name, bn)
    kwargs = getattr(model, "arch_kwargs", None)
    if names and isinstance(kwargs, dict) and "norm" in kwargs:
        kwargs["norm"] = "bn"
    logger.info("replaced %d GroupNorm layers by BatchNorm2d (copy_affine=%s)", len(names), copy_affine)
    return {"operation": "gn_to_bn", "count": len(names), "layers": names, "copy_affine": bool(copy_affine)}


def fold_weight_standardization(model: nn.Module) -> dict[str, Any]:
    """Replace each ``StdConv2d`` with ``standardize=True`` by a plain ``nn.Conv2d`` holding its standardised weight.

    Weight standardisation is a fixed function of the weight: per output filter over (in, kh, kw),
    ``w_hat = (w - mean) / sqrt(var + eps)`` (biased variance, the layer's own ``eps``). Computing ``w_hat``
    once (in float64, stored in the conv's dtype) and convolving with it is the same function, so outputs match
    to float rounding. Stride, padding, dilation, groups, bias and padding mode are kept; the new conv has the
    same name, so state_dict keys do not change.

    If the model records its build options in ``arch_kwargs`` with a ``"standardize"`` key, it is set to False
    so that a rebuild gives plain convs. Otherwise (medssl.models today has no such option) rebuilding from
    ``arch_kwargs`` gives standardising convs again: loading folded weights into them re-standardises already
    standardised filters, the identity up to a relative ``eps/var`` -- but NOT after Frobenius scaling or any
    other change of the folded weights' scale, which re-standardisation would undo.

    Returns:
        ``{"operation": "fold_weight_standardization", "count": int, "layers": [names]}``.
    """
    names = [name for name, m in model.named_modules() if isinstance(m, StdConv2d) and m.standardize]
    if isinstance(model, StdConv2d):
        raise MedsslError("fold_weight_standardization needs a model containing StdConv2d layers, not a bare conv")
    for name in names:
        std = model.get_submodule(name)
        assert isinstance(std, StdConv2d)
        w = std.weight.detach().double()
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        folded = ((w - mean) / torch.sqrt(var + std.eps)).to(std.weight.dtype)
        conv = nn.Conv2d(
            std.in_channels, std.out_channels, std.kernel_size, stride=std.stride, padding=std.padding,
            dilation=std.dilation, groups=std.groups, bias=std.bias is not None, padding_mode=std.padding_mode,
            device=std.weight.device, dtype=std.weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(folded)
            if std.bias is not None:
                conv.bias.copy_(std.bias)
        conv.weight.requires_grad_(std.weight.requires_grad)
        conv.train(std.training)
        _set_submodule(model, name, conv)
    kwargs = getattr(model, "arch_kwargs", None)
    if names and isinstance(kwargs, dict) and "standardize" in kwargs:
        kwargs["standardize"] = False
    logger.info("folded weight standardisation into %d convolutions", len(names))
    return {"operation": "fold_weight_standardization", "count": len(names), "layers": names}


def _batch_tensor(batch: Any) -> torch.Tensor:
    """The image tensor of a batch: the tensor itself, the first item of a tuple/list, or ``batch["image"]``."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict) and isinstance(batch.get("image"), torch.Tensor):
        return batch["image"]
    raise MedsslError(f"recalibration batches must be tensors (N, C, H, W), not {type(batch).__name__}")


class _PooledMoments:
    """Per-channel count, mean and sum of squared deviations of a BatchNorm's inputs, merged over batches in
    float64 with Chan et al.'s pairwise update (no cancellation, unlike sum / sum of squares)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        values = x.transpose(0, 1).reshape(x.shape[1], -1).double()  # (C, N*H*W)
        n = values.shape[1]
        mean = values.mean(dim=1)
        m2 = (values - mean[:, None]).square().sum(dim=1)
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.n * n / total)
        self.n = total


def recalibrate_bn(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Re-estimate every BatchNorm's running statistics on ``num_batches`` batches of target data, in place.

    The model runs forward in eval mode with only the BatchNorms in train mode (so each BatchNorm normalises
    with its batch statistics, as during training, and dropout and similar stay off) under
    ``torch.no_grad()``. Each BatchNorm's running statistics become the pooled statistics of its inputs over
    all calibration images: with ``M`` the number of values per channel (images x height x width, all
    batches), ``running_mean = sum(x) / M`` and ``running_var = sum((x - running_mean)**2) / (M - 1)``
    (unbiased, as BatchNorm stores it); ``num_batches_tracked`` is the number of batches. This is the
    population estimate that ``torch.optim.swa_utils.update_bn`` (cumulative average with ``momentum=None``)
    approximates: its variance is the mean of the per-batch variances, which misses the spread of the batch
    means; both agree for a single batch. Each module's train/eval mode is restored at the end, even on error.
    A BatchNorm that no batch reached keeps its previous statistics and is listed under ``unused``.

    Args:
        model: module containing BatchNorm layers.
        batches: iterable of image tensors (N, C, H, W) in the range the model expects; a tuple/list
            (image first) or a dict with ``"image"`` is accepted too. Batches of one sample are rejected by
            BatchNorm in train mode.
        num_batches: how many batches to use (>= 1); fewer are used if the iterable ends first.
        device: where to run; default the device of the model's first parameter (CPU if none).

    Returns:
        ``{"operation": "bn_recalibration", "statistics": "pooled", "num_batches": int, "num_samples": int,
        "count": int, "layers": [names], "unused": [names]}``.
    """
    if int(num_batches) < 1:
        raise MedsslError(f"num_batches must be >= 1, got {num_batches}")
    bns = [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        raise MedsslError("the model has no BatchNorm layers with running statistics to recalibrate")
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    modes = {m: m.training for m in model.modules()}
    moments = {name: _PooledMoments() for name, _ in bns}
    handles = [bn.register_forward_pre_hook(moments[name]) for name, bn in bns]
    seen = samples = 0
    try:
        model.eval()
        for _, bn in bns:
            bn.train()
        with torch.no_grad():
            for batch in batches:
                if seen >= num_batches:
                    break
                images = _batch_tensor(batch).to(device)
                model(images)
                seen += 1
                samples += int(images.shape[0])
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes.items():
            m.training = mode
    if seen == 0:
        raise MedsslError("no batches were given for BatchNorm recalibration")
    unused = []
    with torch.no_grad():
        for name, bn in bns:
            acc = moments[name]
            if acc.mean is None or acc.m2 is None or acc.n < 2:
                unused.append(name)
                continue
            bn.running_mean.copy_(acc.mean)
            bn.running_var.copy_(acc.m2 / (acc.n - 1))
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.fill_(seen)
    logger.info("recalibrated %d BatchNorm layers on %d batches (%d images)", len(bns) - len(unused), seen,
                samples)
    return {"operation": "bn_recalibration", "statistics": "pooled", "num_batches": seen, "num_samples": samples,
            "count": len(bns) - len(unused), "layers": [name for name, _ in bns if name not in unused],
            "unused": unused}


def convert_to_sync_bn(model: nn.Module) -> nn.Module:
    """Convert every BatchNorm to ``nn.SyncBatchNorm`` (``torch.nn.SyncBatchNorm.convert_sync_batchnorm``).

    Parameters and running statistics are carried over; the returned module is ``model`` itself unless the
    root is a BatchNorm. Attributes such as ``arch`` and ``num_features`` of the root are kept.
    """
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
