"""Builders of the components of a pretraining run: the one pipeline definition behind both front doors.

``medssl pretrain`` (through :func:`medssl.engines.run.run_pretraining`) and the MONAI bundles build a run
from these functions, so the same settings give the same objects. Each is usable on its own as a bundle
``_target_``; every keyword is named like the :class:`~medssl.engines.config.PretrainConfig` field it comes
from and defaults to that field's default (the one set of defaults: ``PretrainConfig`` and
``METHOD_DEFAULTS``; ``None`` = the method's paper value). :func:`config_kwargs` picks a builder's keywords
out of a config.

Stable API (names and signatures; keyword-only after the first argument unless shown):

- ``build_network(arch=None, *, init="random", norm="keep", small_stem=False, widen_factor=1.0,
  scale_frobenius=False, frobenius_rule="paper", fold_ws=False, dead_filters="none", trust=False, seed=0,
  resumed=None)``
  -> backbone (``nn.Module``, train mode) carrying ``.medssl_origin`` (:class:`NetworkOrigin`).
- ``record_network(config, network)`` -> ``config`` with the architecture built (``arch``, ``small_stem``,
  ``widen_factor``, ``arch_kwargs``), as ``config.json`` records it.
- ``build_input_normalization(network)`` -> :class:`~medssl.models.InputNormalization` of the network's weights.
- ``build_feature_extractor(network, *, channels_last=False)`` -> :class:`~medssl.models.FeatureExtractor`.
- ``build_ssl_method(method="simclr", network=None, *, method_options=None, use_checkpoint_heads=False,
  seed=0, device=None, sync_bn=False, channels_last=False)`` -> ``SSLMethod`` on ``device``.
- ``resolve_pretrain_config(config, *, num_images, world_size=None)`` -> resolved ``PretrainConfig``.
- ``build_optimizer(ssl_method, *, optimizer=None, lr=None, weight_decay=None, momentum=0.9, lars_eta=1e-3,
  batch_size=128, world_size=None)`` -> ``torch.optim.Optimizer``.
- ``build_lr_scheduler(optimizer, *, iterations, steps_per_epoch, warmup_epochs=None, final_lr=0.0,
  method="simclr")`` -> :class:`~medssl.engines.schedules.WarmupCosineSchedule`.
- ``pretraining_records(data, required_splits=())`` -> the SSL records (``pretrain`` split, else all but val/test).
- ``build_pretraining_dataset(data="", *, ssl_method=None, method="simclr", method_options=None,
  modality="generic", image_size=224, augment_on="loader", seed=0, skip_bad_records=0, records=None)``
  -> map-style dataset keyed by ``(epoch, index)`` (see :mod:`medssl.engines.loaders`).
- ``build_view_augment(ssl_method=None, *, method="simclr", method_options=None, modality="generic",
  image_size=224, augment_on="loader", device=None)`` -> batched view augmentation or None.
- ``build_pretraining_dataloader(dataset, *, batch_size=128, iterations, seed=0, workers=4,
  augment_on="loader", skip_bad_records=0, start_step=0, device=None, errors_path=None, skipped=None)``.
- ``build_pretraining_trainer(ssl_method, optimizer, lr_scheduler, dataloader, *, iterations,
  steps_per_epoch, batch_size=128, device=None, precision="fp32", channels_last=False, accumulate=1,
  compile=False, view_augment=None, seed=0, collapse_threshold=0.3, collapse_sink=None, last_checkpoint=None,
  handlers=())`` -> :class:`~medssl.engines.trainer.PretrainingTrainer` (DDP-wrapped under several processes;
  ``trainer.method_schedule`` = what ``configure_run`` resolved).
- ``seed_everything(seed)``: Python, NumPy and torch generators (identical initial state on every rank).
- Handlers with ``attach(engine)`` for ``handlers`` / a bundle's ``train#handlers``:
  :mod:`medssl.engines.run_handlers` (``RunCheckpointer(run_dir, config, run_record)``,
  ``RunLogs(run_dir, *, metrics=None, log_every=1, progress=True, tensorboard=True)``,
  ``BackboneWriter(run_dir, config, *, spec, reports, source, out_dir=None, model_file=None)``,
  ``KnnCheck(config, records, *, logs=None, transform=None)``, ``CollapseGuard(threshold=0.3, *, logs=None)``) and
  :class:`medssl.engines.run_folder.RunFolder` (``RunFolder(run_dir, *, resume=False, overwrite=False)``: lock,
  resume verification, run record, ``config.json``).

Randomness: :func:`build_network` and :func:`build_ssl_method` draw their initial weights from a forked torch
generator seeded with ``component_seed(seed, name)``, so the objects do not depend on the order in which a
config instantiates them. The rank and world size come from ``ignite.distributed`` (1 process when none).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from torch import nn

from medssl.engines.config import PretrainConfig, default_lr, default_warmup_epochs, method_default
from medssl.engines.config import steps_per_epoch as count_steps
from medssl.engines.data_builders import (  # noqa: F401 - part of this module's API (bundle ``_target_`` names)
    build_pretraining_dataloader,
    build_pretraining_dataset,
    build_view_augment,
    pretraining_records,
    select_pretraining_records,
)
from medssl.errors import MedsslError

logger = logging.getLogger("medssl.engines.components")

#: the library defaults every builder keyword falls back to
DEFAULTS = PretrainConfig()


@dataclasses.dataclass
class NetworkOrigin:
    """Where a built backbone's weights come from (attached as ``backbone.medssl_origin``).

    ``input_normalization``: ``{"mean", "std", ...}`` the weights expect; ``heads``: SSL head state dicts the
    init checkpoint provides (None if none); ``reports``: preparation steps applied; ``source``: init format,
    file name and SHA-256 (``{"format": "random_init"}`` for random init).
    """

    input_normalization: dict[str, Any]
    heads: dict[str, dict[str, torch.Tensor]] | None = None
    reports: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    source: dict[str, Any] = dataclasses.field(default_factory=dict)


def config_kwargs(config: PretrainConfig, builder: Callable[..., Any], **extra: Any) -> dict[str, Any]:
    """The keywords of ``builder`` taken from the same-named fields of ``config``, updated with ``extra``.

    Keyword-only parameters and positional ones with a default are settings; a positional parameter without
    default is an object (``build_lr_scheduler(optimizer, ...)`` takes the optimizer, not the ``optimizer`` name).
    """
    names = {f.name for f in dataclasses.fields(config)}
    params = inspect.signature(builder).parameters
    kinds = {inspect.Parameter.KEYWORD_ONLY: True, inspect.Parameter.POSITIONAL_OR_KEYWORD: False}
    values = {k: getattr(config, k) for k, p in params.items()
              if k in names and p.kind in kinds and (kinds[p.kind] or p.default is not p.empty)}
    values.update(extra)
    return values


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator (``seed mod 2**32``) and torch's CPU (and CUDA)
    generators with ``seed``."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def component_seed(seed: int, name: str) -> int:
    """A 63-bit seed for component ``name``: the first 8 bytes of ``SHA-256(f"{seed}:{name}")``."""
    return int.from_bytes(hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()[:8], "big") >> 1


@contextlib.contextmanager
def _seeded(seed: int, name: str) -> Iterator[None]:
    """Draw from torch's CPU generator seeded with :func:`component_seed`; its previous state is restored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(component_seed(seed, name))
        yield


def build_network(arch: str | None = DEFAULTS.arch, *, init: str = DEFAULTS.init, norm: str = DEFAULTS.norm,
                  small_stem: bool = DEFAULTS.small_stem, widen_factor: float = DEFAULTS.widen_factor,
                  scale_frobenius: bool = DEFAULTS.scale_frobenius, frobenius_rule: str = DEFAULTS.frobenius_rule,
                  fold_ws: bool = DEFAULTS.fold_ws, dead_filters: str = DEFAULTS.dead_filters,
                  trust: bool = DEFAULTS.trust, seed: int = DEFAULTS.seed, resumed: Any = None) -> nn.Module:
    """The backbone to pretrain: random init or a checkpoint, prepared as asked (Ciga et al., Lu et al.).

    Args:
        arch: architecture (None = the checkpoint's; ``resnet50`` for random init).
        init: ``"random"`` or a checkpoint file (any format :func:`medssl.weights.build_from_checkpoint` reads).
        norm: ``keep`` or ``bn`` (GroupNorm -> BatchNorm for BiT; random ``resnetv2_*`` built with BN).
        small_stem, widen_factor: layout options (3x3 stride-1 stem without max-pool; channel multiplier).
        scale_frobenius, frobenius_rule, fold_ws, dead_filters: weight preparation, see
            :func:`medssl.weights.prepare.prepare_backbone`.
        trust: allow pickled checkpoints that need arbitrary classes.
        seed: random init and random dead-filter repair are drawn from it.
        resumed: a :class:`~medssl.engines.run_folder.RunFolder` that resumes a run: the backbone is rebuilt
            from its checkpoint's run record (layout, input normalisation, imported heads, provenance; the
            weights are restored from the checkpoint) and ``init`` / ``trust`` are not acted upon, so a resume
            reads no init file. None, or a new run: built from ``init``.

    Returns:
        The backbone in train mode with ``medssl_origin`` (:class:`NetworkOrigin`).
    """
    from medssl.models import IMAGENET_NORMALIZATION, build_backbone

    if resumed is not None and resumed.resume:
        return resumed.rebuilt_backbone().train()

    extra: dict[str, Any] = {}
    if small_stem:
        extra["small_stem"] = True
    if float(widen_factor) != 1.0:
        extra["widen_factor"] = float(widen_factor)
    heads = None
    with _seeded(seed, "network"):
        if init == "random":
            name = arch or "resnet50"
            if name.startswith("resnetv2") and norm == "bn":
                extra["norm"] = "bn"
            backbone = build_backbone(name, **extra)
            spec, source = dict(IMAGENET_NORMALIZATION), {"format": "random_init"}
        else:
            from medssl.weights import build_from_checkpoint, sha256_of

            backbone, loaded = build_from_checkpoint(init, trust=trust, arch=arch, num_classes=0, **extra)
            spec, heads = dict(loaded.input_normalization), loaded.heads
            source = {"format": loaded.format, "file": Path(init).name, "sha256": sha256_of(init)}
    reports: list[dict] = []
    if (norm == "bn" and init != "random") or scale_frobenius or dead_filters != "none" or fold_ws:
        from medssl.weights.prepare import prepare_backbone

        # weight standardisation is folded only when asked (fold_ws); scaling a still-standardised network
        # (or one without conv+BN pairs) is refused by prepare_backbone with a one-line error
        try:
            reports = prepare_backbone(backbone, norm=norm if init != "random" else "keep", fold_ws=fold_ws,
                                       scale_frobenius=scale_frobenius, frobenius_rule=frobenius_rule,
                                       dead_filters=dead_filters, seed=seed)
        except MedsslError as exc:
            if exc.path is None and init != "random":  # name the checkpoint that was refused
                raise MedsslError(exc.reason, init) from exc
            raise
    backbone.medssl_origin = NetworkOrigin(spec, heads, reports, source)
    return backbone.train()


def record_network(config: PretrainConfig, network: nn.Module) -> PretrainConfig:
    """``config`` with the architecture actually built, as ``config.json`` records it: ``arch`` =
    ``network.arch``, ``small_stem`` / ``widen_factor`` = those of ``network.arch_kwargs`` (their defaults when
    absent) and ``arch_kwargs`` = every build option (``build_backbone(arch, **arch_kwargs)`` rebuilds the
    layout; after a GroupNorm -> BatchNorm conversion or a weight-standardisation fold it is the converted one).
    A checkpoint init (``arch`` None: the checkpoint's) so records its real layout. A network without these
    attributes (built elsewhere) leaves ``config`` as it is."""
    arch = getattr(network, "arch", None)
    kwargs = getattr(network, "arch_kwargs", None)
    if not isinstance(arch, str) or not isinstance(kwargs, dict):
        return config
    kwargs = dict(kwargs)
    return dataclasses.replace(config, arch=arch, small_stem=bool(kwargs.get("small_stem", False)),
                               widen_factor=float(kwargs.get("widen_factor", 1.0)), arch_kwargs=kwargs)


def network_origin(network: nn.Module) -> NetworkOrigin:
    """``network.medssl_origin``, or ImageNet normalisation and no heads for a backbone built elsewhere."""
    from medssl.models import IMAGENET_NORMALIZATION

    origin = getattr(network, "medssl_origin", None)
    return origin if origin is not None else NetworkOrigin(dict(IMAGENET_NORMALIZATION))


def build_input_normalization(network: nn.Module) -> nn.Module:
    """The :class:`~medssl.models.InputNormalization` (``(x - mean) / std``) the network's weights expect."""
    from medssl.models import InputNormalization

    return InputNormalization.from_spec(network_origin(network).input_normalization)


def build_feature_extractor(network: nn.Module, *, channels_last: bool = DEFAULTS.channels_last) -> nn.Module:
    """[0, 1] images -> features: :class:`~medssl.models.FeatureExtractor` with the network's normalisation."""
    from medssl.models import FeatureExtractor

    return FeatureExtractor(network, build_input_normalization(network), channels_last=channels_last)


def build_ssl_method(method: str = DEFAULTS.method, network: nn.Module | None = None, *,
                     method_options: dict[str, Any] | None = None,
                     use_checkpoint_heads: bool = DEFAULTS.use_checkpoint_heads, seed: int = DEFAULTS.seed,
                     device: str | torch.device | None = DEFAULTS.device, sync_bn: bool = DEFAULTS.sync_bn,
                     channels_last: bool = DEFAULTS.channels_last) -> nn.Module:
    """The SSL method (heads sized from the backbone) around ``network``, on ``device``.

    Args:
        method: ``simclr`` | ``swav`` | ``byol`` | ``simsiam``.
        network: the backbone (:func:`build_network`; None = a random ResNet-50).
        method_options: keyword options of the method (paper values by default; see :mod:`medssl.methods`).
        use_checkpoint_heads: start from the SSL heads of the init checkpoint (when it has them).
        seed: the heads' initial weights are drawn from it.
        device: None = ``idist.device()`` (the process's GPU, else CPU).
        sync_bn: SyncBatchNorm when several processes train on CUDA.
        channels_last: channels-last memory format.
    """
    from medssl.methods import build_method

    network = network if network is not None else build_network(seed=seed)
    origin = network_origin(network)
    options = dict(method_options or {})
    if use_checkpoint_heads and origin.heads:
        options.update(heads=origin.heads, heads_source=str(origin.source.get("file", "")))
    with _seeded(seed, "heads"):
        ssl = build_method(method, network, **options)
    device = torch.device(device) if device else idist.device()
    if sync_bn and idist.get_world_size() > 1:
        if device.type == "cuda":
            from medssl.weights.norm import convert_to_sync_bn

            ssl = convert_to_sync_bn(ssl)
        else:
            logger.warning("sync_bn needs CUDA (torch SyncBatchNorm); BatchNorm stays per-process on %s", device)
    ssl = ssl.to(device)
    return ssl.to(memory_format=torch.channels_last) if channels_last else ssl


def resolve_pretrain_config(config: PretrainConfig, *, num_images: int,
                            world_size: int | None = None) -> PretrainConfig:
    """``config`` with every method default filled in for ``num_images`` images on ``world_size`` processes.

    Raises:
        MedsslError: invalid settings, or fewer images than one global batch.
    """
    world = idist.get_world_size() if world_size is None else int(world_size)
    per_epoch = count_steps(num_images, config.batch_size, world)
    if per_epoch < 1:
        raise MedsslError(f"{num_images} images are fewer than one batch of {config.batch_size * world}",
                          config.data or None)
    return config.resolve(steps_per_epoch=per_epoch, world_size=world)


def build_optimizer(ssl_method: nn.Module, *, optimizer: str | None = DEFAULTS.optimizer,
                    lr: float | None = DEFAULTS.lr, weight_decay: float | None = DEFAULTS.weight_decay,
                    momentum: float = DEFAULTS.momentum, lars_eta: float = DEFAULTS.lars_eta,
                    batch_size: int = DEFAULTS.batch_size, world_size: int | None = None) -> torch.optim.Optimizer:
    """The optimizer over the method's parameter groups (bias and norm parameters without weight decay).

    ``None`` = the method's paper value (``METHOD_DEFAULTS``): optimizer, weight decay, and
    ``lr = lr_per_256 * batch_size * world_size / 256`` (``world_size`` None = ``idist.get_world_size()``).
    """
    from medssl.engines.optim import build_optimizer as make_optimizer

    name = str(ssl_method.name)
    world = idist.get_world_size() if world_size is None else int(world_size)
    lr = float(lr) if lr is not None else default_lr(name, batch_size, world)
    weight_decay = float(weight_decay) if weight_decay is not None else method_default(name, "weight_decay")
    return make_optimizer((optimizer or method_default(name, "optimizer")).lower(),
                          ssl_method.param_groups(weight_decay, lr), lr=lr, weight_decay=weight_decay,
                          momentum=momentum, eta=lars_eta)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, *, iterations: int, steps_per_epoch: int,
                       warmup_epochs: float | None = DEFAULTS.warmup_epochs, final_lr: float = DEFAULTS.final_lr,
                       method: str = DEFAULTS.method) -> Any:
    """Per-step linear warmup + cosine decay from the optimizer's ``lr`` to ``final_lr`` over ``iterations``.

    ``warmup_epochs`` None = ``method``'s paper warmup cut to a tenth of the run
    (:func:`~medssl.engines.config.default_warmup_epochs`).
    """
    from medssl.engines.schedules import WarmupCosineSchedule

    if warmup_epochs is None:
        warmup_epochs = default_warmup_epochs(method, int(iterations), steps_per_epoch)
    return WarmupCosineSchedule(optimizer, base_lr=float(optimizer.defaults["lr"]), max_iterations=int(iterations),
                                warmup_iterations=int(round(float(warmup_epochs) * steps_per_epoch)),
                                final_lr=final_lr)


def build_pretraining_trainer(ssl_method: nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler: Any,
                              dataloader: Any, *, iterations: int, steps_per_epoch: int,
                              batch_size: int = DEFAULTS.batch_size,
                              device: str | torch.device | None = DEFAULTS.device,
                              precision: str = DEFAULTS.precision, channels_last: bool = DEFAULTS.channels_last,
                              accumulate: int = DEFAULTS.accumulate, compile: bool = DEFAULTS.compile,
                              view_augment: nn.Module | None = None, seed: int = DEFAULTS.seed,
                              collapse_threshold: float = DEFAULTS.collapse_threshold,
                              collapse_sink: Callable[[dict[str, Any]], None] | None = None,
                              last_checkpoint: Callable[[], Path | None] | None = None,
                              handlers: Sequence[Any] = ()) -> Any:
    """The MONAI/Ignite trainer: one SSL optimizer step per iteration, ``iterations`` steps in all.

    First the method's epoch-based knobs become steps of this run (``ssl_method.configure_run`` with
    ``steps_per_epoch``, the global batch ``batch_size * world_size`` and ``iterations``; SwAV's prototype
    freezing and queue); the result is ``trainer.method_schedule`` (recorded in ``config.json``). Under several
    processes the forward pass goes through DistributedDataParallel (``idist.auto_model``); ``compile`` wraps it
    in ``torch.compile``. The input normalisation is the one the backbone's weights expect. ``handlers``: objects
    with ``attach(engine)`` (MONAI/Ignite handlers), attached in order.
    """
    from medssl.engines.handlers import CollapseMonitor
    from medssl.engines.trainer import PretrainingTrainer

    device = torch.device(device) if device else idist.device()
    method_schedule = ssl_method.configure_run(steps_per_epoch=int(steps_per_epoch),
                                               global_batch_size=int(batch_size) * idist.get_world_size(),
                                               max_iterations=int(iterations))
    network: nn.Module = ssl_method
    if idist.get_world_size() > 1:
        network = idist.auto_model(ssl_method, sync_bn=False, find_unused_parameters=ssl_method.name == "swav")
    if compile:
        network = torch.compile(network)
    trainer = PretrainingTrainer(
        method=ssl_method, optimizer=optimizer, schedule=lr_scheduler,
        normalization=build_input_normalization(ssl_method.backbone).to(device), data_loader=dataloader,
        max_iterations=int(iterations), epoch_length=int(steps_per_epoch), device=device, precision=precision,
        channels_last=channels_last, accumulate=accumulate, network=network,
        collapse_monitor=CollapseMonitor(collapse_threshold, sink=collapse_sink), last_checkpoint=last_checkpoint,
        view_augment=view_augment, augment_seed=seed, rank=idist.get_rank())
    trainer.method_schedule = method_schedule
    for handler in handlers:
        handler.attach(trainer)
    return trainer
