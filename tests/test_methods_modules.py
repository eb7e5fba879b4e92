"""The SSL method modules on a tiny ResNet-18 at 32 px: gradients, hooks, parameter groups, heads, state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medssl.errors import MedsslError
from medssl.methods import build_method, cosine_tau, method_options, simsiam_loss
from medssl.models import MLPHead, build_backbone

TINY = {
    "simclr": {"projector_hidden_dim": 16, "projector_out_dim": 8},
    "swav": {"projector_hidden_dim": 16, "projector_out_dim": 8, "num_prototypes": 5, "num_local_crops": 1,
             "freeze_prototypes_epochs": 1},
    "byol": {"projector_hidden_dim": 16, "projector_out_dim": 8, "predictor_hidden_dim": 16},
    "simsiam": {"projector_hidden_dim": 16, "projector_out_dim": 8, "predictor_hidden_dim": 4},
}


def _backbone():
    return build_backbone("resnet18", widen_factor=0.125, small_stem=True)


def _configured(name, steps_per_epoch=1, global_batch_size=4, **cfg):
    """A method set up as the engine does: built, then told the run's steps per epoch and global batch."""
    method = build_method(name, _backbone(), **cfg)
    method.configure_run(steps_per_epoch=steps_per_epoch, global_batch_size=global_batch_size)
    return method


def _views(method, batch=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    views = [torch.rand(batch, 3, 32, 32, generator=gen) for _ in range(2)]
    views += [torch.rand(batch, 3, 16, 16, generator=gen) for _ in range(method.views_required - 2)]
    return views


def _step(method, opt, views, iteration, max_iterations):
    out = method(views)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    method.on_before_optimizer_step(iteration)
    opt.step()
    return out, method.on_after_optimizer_step(iteration, max_iterations)


@pytest.mark.parametrize("name", ["simclr", "swav", "byol", "simsiam"])
def test_forward_backward_and_param_groups(name):
    torch.manual_seed(0)
    method = _configured(name, **TINY[name])
    out = method(_views(method))
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert out["embeddings"].shape == (4, 8) and not out["embeddings"].requires_grad
    out["loss"].backward()
    # every backbone parameter that takes part receives a gradient
    assert all(p.grad is not None for p in method.backbone.parameters())
    groups = method.param_groups(weight_decay=1e-4, lr=0.1)
    trainable = [p for p in method.parameters() if p.requires_grad]
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len(trainable) and {id(p) for p in grouped} == {id(p) for p in trainable}
    for g in groups:
        assert g["lr"] == 0.1
        for p in g["params"]:
            # SwAV's code applies LARC to every parameter; SimCLR and BYOL keep biases and norm weights out
            assert g["exclude_from_lars"] == (p.ndim <= 1 and name != "swav")
            # SimSiam's and SwAV's code decay every parameter; SimCLR and BYOL keep biases and norm weights out
            assert (g["weight_decay"] == 0.0) == (p.ndim <= 1 and name not in ("simsiam", "swav"))
        if name == "simsiam":
            names = {id(p) for p in method.predictor.parameters()}
            assert g["fixed_lr"] == all(id(p) in names for p in g["params"])
        else:
            assert not g["fixed_lr"]
    torch.optim.SGD(groups, lr=0.1)  # groups are accepted by a torch optimizer


def test_simsiam_fixed_lr_flag_can_be_disabled():
    method = build_method("simsiam", _backbone(), predictor_fixed_lr=False, **TINY["simsiam"])
    assert not any(g["fixed_lr"] for g in method.param_groups(0.0, 1.0))


def test_byol_target_gets_no_gradient_and_follows_ema():
    torch.manual_seed(1)
    method = build_method("byol", _backbone(), **TINY["byol"])
    assert method.target_modules() == [method.target_backbone, method.target_projector]
    opt = torch.optim.SGD(method.param_groups(0.0, 0.5), lr=0.5)
    views = _views(method)
    _step(method, opt, views, 1, 10)
    target_before = {k: v.clone() for k, v in method.target_backbone.named_parameters()}
    out = method(views)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    for module in method.target_modules():
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    opt.step()
    online_after = {k: v.detach().clone() for k, v in method.backbone.named_parameters()}
    logs = method.on_after_optimizer_step(2, 10)
    tau = cosine_tau(1, 10)
    assert logs["tau"] == pytest.approx(tau)
    for k, v in method.target_backbone.named_parameters():
        torch.testing.assert_close(v, tau * target_before[k] + (1 - tau) * online_after[k], atol=1e-6, rtol=0)
    assert any(not torch.equal(v, online_after[k]) for k, v in method.target_backbone.named_parameters())


def test_simsiam_stop_gradient_in_module():
    torch.manual_seed(2)
    method = build_method("simsiam", _backbone(), **TINY["simsiam"])
    views = _views(method)
    feats = [method.encode(v) for v in views]
    z = [method.projector(f) for f in feats]
    p = [method.predictor(zi) for zi in z]
    loss = 0.5 * (simsiam_loss(p[0], z[1]) + simsiam_loss(p[1], z[0]))
    (grad_z0,) = torch.autograd.grad(loss, z[0], retain_graph=True)
    # the gradient reaching z comes only through the predictor branch
    (grad_through_pred,) = torch.autograd.grad(
        0.5 * (-F.cosine_similarity(p[0], z[1].detach()).mean() - F.cosine_similarity(p[1], z[0].detach()).mean()),
        z[0], retain_graph=True)
    torch.testing.assert_close(grad_z0, grad_through_pred, atol=1e-6, rtol=0)
    (grad_without_stop,) = torch.autograd.grad(
        0.5 * (-F.cosine_similarity(p[0], z[1]).mean() - F.cosine_similarity(p[1], z[0]).mean()), z[0])
    assert not torch.allclose(grad_without_stop, grad_through_pred, atol=1e-6)


def test_swav_freeze_normalisation_and_queue_state():
    torch.manual_seed(3)
    cfg = dict(TINY["swav"], queue_length=8, epoch_queue_starts=1)  # 1 step per epoch below
    method = _configured("swav", **cfg)
    assert method.views_required == 3
    norms = method.prototypes.weight.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    opt = torch.optim.SGD(method.param_groups(0.0, 0.5), lr=0.5)
    views = _views(method)
    before = method.prototypes.weight.detach().clone()
    _step(method, opt, views, 1, 10)  # frozen step: prototypes untouched (not even re-normalised)
    assert torch.equal(method.prototypes.weight.detach(), before)
    assert method.queue is None  # queue starts after 1 step
    method(views)["loss"].backward()
    assert method.prototypes.weight.grad is not None
    method.on_before_optimizer_step(2)  # past the freeze: gradient kept
    assert method.prototypes.weight.grad is not None
    opt.step()
    method.on_after_optimizer_step(2, 10)
    assert not torch.equal(method.prototypes.weight.detach(), before)
    norms = method.prototypes.weight.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    # the forward at step 2 pushed 4 embeddings; one more forward fills the 8-long queue
    assert method.queue_filled == 4
    with torch.no_grad():
        method(views)
    assert method.queue_filled == 8
    state = method.extra_state()
    restored = _configured("swav", **cfg)
    restored.load_state_dict(method.state_dict())
    restored.load_extra_state(state)
    assert restored.steps_done == 2 and torch.equal(restored.queue, method.queue)
    new_views = _views(method, seed=9)
    with torch.no_grad():
        a, b = method(new_views)["loss"], restored(new_views)["loss"]
    assert torch.equal(a, b)
    # the full queue changes the assignments, hence the loss, compared with no queue
    plain = _configured("swav", **dict(TINY["swav"], queue_length=0))
    plain.load_state_dict(method.state_dict())
    with torch.no_grad():
        assert not torch.allclose(plain(new_views)["loss"], a)


def test_swav_rejects_wrong_number_of_views():
    method = build_method("swav", _backbone(), **TINY["swav"])
    with pytest.raises(MedsslError, match="3 views"):
        method([torch.rand(2, 3, 32, 32)] * 2)


def test_imported_heads_are_used_and_checked():
    torch.manual_seed(4)
    backbone = _backbone()
    projector = MLPHead(backbone.num_features, 12, 6, num_layers=3, hidden_bias=False, last_bn=True,
                        last_bn_affine=False)
    predictor = MLPHead(6, 3, 6, hidden_bias=False)
    heads = {"projector": projector.state_dict(), "predictor": predictor.state_dict()}
    method = build_method("simsiam", backbone, heads=heads)
    assert method.head_sources == {"projector": "imported", "predictor": "imported"}
    for k, v in projector.state_dict().items():
        assert torch.equal(method.projector.state_dict()[k], v)
    byol = build_method("byol", _backbone(), heads={"projector": projector.state_dict()}, predictor_hidden_dim=5)
    assert byol.head_sources == {"projector": "imported", "predictor": "new"}
    assert byol.predictor.in_dim == 6 and byol.predictor.out_dim == 6
    for k, v in byol.projector.state_dict().items():
        assert torch.equal(byol.target_projector.state_dict()[k], v)
    protos = {"weight": torch.randn(7, 6)}
    swav = build_method("swav", _backbone(), num_local_crops=0, heads={"projector": projector.state_dict(),
                                                                       "prototypes": protos})
    torch.testing.assert_close(swav.prototypes.weight.detach(), F.normalize(protos["weight"], dim=1))
    with pytest.raises(MedsslError, match="ckpt.pth.*input features"):
        build_method("simclr", _backbone(), heads={"projector": MLPHead(99, 4, 4).state_dict()},
                     heads_source="ckpt.pth")
    with pytest.raises(MedsslError, match="dimension"):
        build_method("swav", _backbone(), heads={"projector": projector.state_dict(),
                                                 "prototypes": {"weight": torch.randn(7, 5)}})
    with pytest.raises(MedsslError, match="outputs"):
        build_method("byol", _backbone(), heads={"projector": projector.state_dict(),
                                                 "predictor": MLPHead(6, 3, 5).state_dict()})


def test_build_method_rejects_unknown_names_and_options():
    with pytest.raises(MedsslError, match="unknown SSL method"):
        build_method("moco", _backbone())
    with pytest.raises(MedsslError, match="temprature"):
        build_method("simclr", _backbone(), temprature=0.1)
    assert "queue_length" in method_options("swav")


def _layout(head):
    return [(type(m).__name__, getattr(m, "in_features", None), getattr(m, "out_features", None),
             getattr(m, "affine", None)) for m in head]


def test_paper_heads_follow_the_papers():
    backbone = _backbone()
    c = backbone.num_features
    simclr = build_method("simclr", backbone, paper_heads=True)  # default: scaled (test_cost_visibility.py)
    assert [(n, i, o) for n, i, o, _ in _layout(simclr.projector) if n == "Linear"] == [
        ("Linear", c, 2048), ("Linear", 2048, 128)]
    assert simclr.temperature == 0.1
    byol = build_method("byol", _backbone(), paper_heads=True)
    assert (byol.projector.in_dim, byol.projector[0].out_features, byol.projector.out_dim) == (c, 4096, 256)
    assert (byol.predictor.in_dim, byol.predictor[0].out_features, byol.predictor.out_dim) == (256, 4096, 256)
    assert (byol.base_tau, byol.final_tau) == (0.996, 1.0)
    simsiam = build_method("simsiam", _backbone(), paper_heads=True)
    layout = _layout(simsiam.projector)
    assert [(i, o) for n, i, o, _ in layout if n == "Linear"] == [(c, 2048), (2048, 2048), (2048, 2048)]
    assert layout[-1][0] == "BatchNorm1d" and layout[-1][3] is False
    assert [(i, o) for n, i, o, _ in _layout(simsiam.predictor) if n == "Linear"] == [(2048, 512), (512, 2048)]
    swav = build_method("swav", _backbone())
    assert swav.prototypes.weight.shape == (3000, 128) and swav.views_required == 8
    assert (swav.sinkhorn_eps, swav.sinkhorn_iterations, swav.temperature) == (0.05, 3, 0.1)
