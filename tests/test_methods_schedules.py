"""Epoch-based SwAV knobs converted with the run's steps per epoch (checked against the loop of the SwAV code,
``main_swav.py``), SwAV's default queue, and SimSiam's weight decay on every parameter."""

from __future__ import annotations

import pytest
import torch

from medssl.engines.optim import build_optimizer
from medssl.errors import MedsslError
from medssl.methods import build_method
from medssl.methods.swav import swav_schedule
from medssl.models import build_backbone


def _backbone():
    return build_backbone("resnet18", widen_factor=0.125, small_stem=True)


def _swav_code_reference(steps_per_epoch, epochs, freeze_prototypes_niters, epoch_queue_starts):
    """Per step (in order): (prototype gradient dropped, queue started), as ``main_swav.py`` decides:
    ``iteration = epoch * len(loader) + it``; frozen while ``iteration < freeze_prototypes_niters``; the queue is
    created at the start of every epoch ``>= epoch_queue_starts``."""
    out = []
    for epoch in range(epochs):
        for it in range(steps_per_epoch):
            out.append((epoch * steps_per_epoch + it < freeze_prototypes_niters, epoch >= epoch_queue_starts))
    return out


@pytest.mark.parametrize("steps_per_epoch,freeze_epochs,queue_epochs", [(1, 1, 2), (3, 1, 2), (4, 2, 1), (7, 1, 0),
                                                                         (5, 0.4, 3)])
def test_freezing_and_queue_start_follow_the_swav_code(steps_per_epoch, freeze_epochs, queue_epochs):
    torch.manual_seed(0)
    epochs = 4
    method = build_method("swav", _backbone(), projector_hidden_dim=8, projector_out_dim=4, num_prototypes=3,
                          num_local_crops=0, freeze_prototypes_epochs=freeze_epochs, queue_length=4,
                          epoch_queue_starts=queue_epochs)
    schedule = method.configure_run(steps_per_epoch=steps_per_epoch, global_batch_size=4)
    assert schedule["freeze_prototypes_steps"] == round(freeze_epochs * steps_per_epoch)
    assert schedule["queue_start_step"] == queue_epochs * steps_per_epoch and schedule["queue_length"] == 4
    views = [torch.rand(4, 3, 8, 8) for _ in range(2)]
    seen = []
    for step in range(1, epochs * steps_per_epoch + 1):
        with torch.no_grad():
            method(views)
        queue_filled_now = method.queue is not None and method.queue_filled > 0  # once started, it stays on
        method.prototypes.weight.grad = torch.ones_like(method.prototypes.weight)
        method.on_before_optimizer_step(step)
        seen.append((method.prototypes.weight.grad is None, queue_filled_now))
        method.on_after_optimizer_step(step, epochs * steps_per_epoch)
    reference = _swav_code_reference(steps_per_epoch, epochs, round(freeze_epochs * steps_per_epoch), queue_epochs)
    assert seen == reference


def test_published_recipes_and_default_queue_lengths():
    # the SwAV recipes' --freeze_prototypes_niters is one ImageNet epoch: 313 steps at 4096, 5005 at 256
    assert swav_schedule(steps_per_epoch=313, global_batch_size=4096)["freeze_prototypes_steps"] == 313
    bs256 = swav_schedule(steps_per_epoch=5005, global_batch_size=256, queue_length=3840)
    assert (bs256["freeze_prototypes_steps"], bs256["queue_length"]) == (5005, 3840)
    assert bs256["queue_start_step"] == 15 * 5005
    # default: a queue below a global batch of 256: min(3840, one epoch's images), a multiple of the batch
    cases = {(1000, 64): 3840, (1000, 100): 3800, (10, 64): 640, (3, 24): 72, (1000, 256): 0, (50, 1024): 0}
    for (spe, batch), expected in cases.items():
        got = swav_schedule(steps_per_epoch=spe, global_batch_size=batch)["queue_length"]
        assert got == expected and got % batch == 0, (spe, batch, got)
    # explicit lengths are rounded down to a multiple of the global batch, as main_swav.py does; 0 = off
    assert swav_schedule(steps_per_epoch=10, global_batch_size=100, queue_length=3840)["queue_length"] == 3800
    assert swav_schedule(steps_per_epoch=10, global_batch_size=8, queue_length=0)["queue_length"] == 0
    assert swav_schedule(steps_per_epoch=10, global_batch_size=512, queue_length=3840)["queue_length"] == 3584
    with pytest.raises(MedsslError, match="epoch_queue_starts"):
        swav_schedule(steps_per_epoch=10, global_batch_size=8, epoch_queue_starts=1.5)
    with pytest.raises(MedsslError, match="queue_length"):
        build_method("swav", _backbone(), queue_length=-1)


def test_unconfigured_swav_refuses_to_train():
    method = build_method("swav", _backbone(), projector_hidden_dim=8, projector_out_dim=4, num_prototypes=3,
                          num_local_crops=0)
    views = [torch.rand(2, 3, 8, 8) for _ in range(2)]
    with pytest.raises(MedsslError, match="configure_run"):
        method(views)
    with pytest.raises(MedsslError, match="configure_run"):
        method.on_before_optimizer_step(1)
    method.eval()
    with torch.no_grad():
        assert torch.isfinite(method(views)["loss"])  # evaluation needs no schedule


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_simsiam_decays_every_parameter_and_the_others_keep_1d_out(optimizer):
    torch.manual_seed(0)
    wd, lr = 1e-2, 0.5
    for name in ("simsiam", "byol", "simclr"):
        method = build_method(name, _backbone(), projector_hidden_dim=8, projector_out_dim=8)
        opt = build_optimizer(optimizer, method.param_groups(wd, lr), lr=lr, weight_decay=wd, momentum=0.0)
        group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
        trainable = [p for p in method.parameters() if p.requires_grad]
        assert {id(p) for p in trainable} == set(group_of)
        for p in trainable:
            assert group_of[id(p)]["weight_decay"] == (wd if name == "simsiam" or p.ndim > 1 else 0.0)
        # one step with zero loss gradients: only weight decay moves the weights, w <- w - lr * wd * w
        # (for 1-D tensors LARS uses trust 1, so the closed form holds for both optimizers)
        one_d = [p for p in trainable if p.ndim == 1 and p.detach().abs().sum() > 0]
        before = [p.detach().clone() for p in one_d]
        for p in trainable:
            p.grad = torch.zeros_like(p)
        opt.step()
        for p, b in zip(one_d, before):
            expected = b * (1 - lr * wd) if name == "simsiam" else b
            torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)
