"""SSL losses against naive references written with explicit Python loops (values and gradients)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from medssl.methods import (
    byol_loss,
    cosine_tau,
    ema_update_,
    nt_xent_loss,
    simsiam_loss,
    sinkhorn_knopp,
    swav_loss,
)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dot = sum(a[d] * b[d] for d in range(a.shape[0]))
    na = torch.sqrt(sum(a[d] * a[d] for d in range(a.shape[0])))
    nb = torch.sqrt(sum(b[d] * b[d] for d in range(b.shape[0])))
    return dot / (na * nb)


def _naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Loop over anchors and candidates: -log(exp(s_pos/T) / sum_{k != a} exp(s_ak/T)), mean over 2B anchors."""
    z = [z1[i] for i in range(z1.shape[0])] + [z2[i] for i in range(z2.shape[0])]
    n = z1.shape[0]
    losses = []
    for a in range(2 * n):
        pos = a + n if a < n else a - n
        denom = 0.0
        for k in range(2 * n):
            if k != a:
                denom = denom + torch.exp(_cos(z[a], z[k]) / temperature)
        losses.append(-torch.log(torch.exp(_cos(z[a], z[pos]) / temperature) / denom))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_matches_naive_loops_with_gradients(temperature):
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(5, 6, generator=gen, dtype=torch.float64).float().requires_grad_(True)
    z2 = torch.randn(5, 6, generator=gen, dtype=torch.float64).float().requires_grad_(True)
    loss = nt_xent_loss(z1, z2, temperature, gather=False)
    g1, g2 = torch.autograd.grad(loss, (z1, z2))
    r1 = z1.detach().double().requires_grad_(True)
    r2 = z2.detach().double().requires_grad_(True)
    ref = _naive_nt_xent(r1, r2, temperature)
    h1, h2 = torch.autograd.grad(ref, (r1, r2))
    assert abs(loss.item() - ref.item()) < 1e-5
    torch.testing.assert_close(g1.double(), h1, atol=1e-5, rtol=0)
    torch.testing.assert_close(g2.double(), h2, atol=1e-5, rtol=0)


def test_nt_xent_is_scale_invariant_and_rejects_bad_shapes():
    gen = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    assert abs(nt_xent_loss(z1, z2).item() - nt_xent_loss(3 * z1, 0.5 * z2).item()) < 1e-5
    with pytest.raises(ValueError):
        nt_xent_loss(z1, z2[:3])


def _naive_sinkhorn(scores: np.ndarray, eps: float, iterations: int) -> np.ndarray:
    """SwAV's algorithm with explicit loops over prototypes (rows of Q) and samples (columns)."""
    b, k = scores.shape
    q = [[math.exp(scores[i, j] / eps) for i in range(b)] for j in range(k)]
    total = sum(sum(row) for row in q)
    q = [[v / total for v in row] for row in q]
    for _ in range(iterations):
        for j in range(k):
            s = sum(q[j])
            q[j] = [v / s / k for v in q[j]]
        for i in range(b):
            s = sum(q[j][i] for j in range(k))
            for j in range(k):
                q[j][i] = q[j][i] / s / b
    return np.array([[q[j][i] * b for j in range(k)] for i in range(b)])


@pytest.mark.parametrize("eps,iterations", [(0.05, 3), (0.1, 1), (0.05, 10)])
def test_sinkhorn_matches_naive_loops(eps, iterations):
    gen = torch.Generator().manual_seed(2)
    z = nn.functional.normalize(torch.randn(12, 8, generator=gen), dim=1)
    protos = nn.functional.normalize(torch.randn(5, 8, generator=gen), dim=1)
    scores = z @ protos.T
    q = sinkhorn_knopp(scores, eps, iterations)
    ref = _naive_sinkhorn(scores.double().numpy(), eps, iterations)
    assert q.shape == (12, 5)
    np.testing.assert_allclose(q.double().numpy(), ref, atol=1e-5, rtol=0)


def test_sinkhorn_marginals():
    gen = torch.Generator().manual_seed(3)
    z = nn.functional.normalize(torch.randn(48, 16, generator=gen), dim=1)
    protos = nn.functional.normalize(torch.randn(6, 16, generator=gen), dim=1)
    q = sinkhorn_knopp(z @ protos.T, eps=0.05, iterations=100)
    assert (q >= 0).all()
    # each sample's assignment is a probability vector; each prototype receives B / K samples
    np.testing.assert_allclose(q.sum(dim=1).numpy(), np.ones(48), atol=1e-3)
    np.testing.assert_allclose(q.sum(dim=0).numpy(), np.full(6, 48 / 6), atol=1e-3)
    # with the default 3 iterations the sample marginal is still exact (last step normalises samples)
    q3 = sinkhorn_knopp(z @ protos.T)
    np.testing.assert_allclose(q3.sum(dim=1).numpy(), np.ones(48), atol=1e-5)


def test_sinkhorn_large_scores_stay_finite_and_exact():
    # |scores / eps| reaches 120: exp overflows float32 but not float64, so the naive loops are the reference
    scores = torch.tensor([[6.0, -6.0, 0.0], [5.8, 2.0, -0.6], [0.0, 0.0, 6.0], [-6.0, -5.0, -5.6]])
    q = sinkhorn_knopp(scores, eps=0.05, iterations=3)
    assert torch.isfinite(q).all()
    np.testing.assert_allclose(q.double().numpy(), _naive_sinkhorn(scores.double().numpy(), 0.05, 3), atol=1e-5)
    np.testing.assert_allclose(q.sum(dim=1).numpy(), np.ones(4), atol=1e-5)


def _naive_swav(scores, assignments, temperature, crops_for_assign):
    total = 0.0
    n_views = len(scores)
    for q, a in zip(assignments, crops_for_assign):
        sub = 0.0
        for v in range(n_views):
            if v == a:
                continue
            s = scores[v]
            per_sample = 0.0
            for i in range(s.shape[0]):
                lse = torch.log(sum(torch.exp(s[i, k] / temperature) for k in range(s.shape[1])))
                ce = 0.0
                for k in range(s.shape[1]):
                    ce = ce - q[i, k] * (s[i, k] / temperature - lse)
                per_sample = per_sample + ce
            sub = sub + per_sample / s.shape[0]
        total = total + sub / (n_views - 1)
    return total / len(crops_for_assign)


@pytest.mark.parametrize("crops_for_assign", [(0, 1), (0,)])
def test_swav_loss_matches_naive_loops_with_gradients(crops_for_assign):
    gen = torch.Generator().manual_seed(4)
    scores = [torch.randn(3, 4, generator=gen).requires_grad_(True) for _ in range(4)]
    assignments = [torch.softmax(torch.randn(3, 4, generator=gen), dim=1) for _ in crops_for_assign]
    loss = swav_loss(scores, assignments, 0.1, crops_for_assign)
    grads = torch.autograd.grad(loss, scores, allow_unused=True, materialize_grads=True)
    ref_scores = [s.detach().double().requires_grad_(True) for s in scores]
    ref = _naive_swav(ref_scores, [q.double() for q in assignments], 0.1, crops_for_assign)
    ref_grads = torch.autograd.grad(ref, ref_scores, allow_unused=True, materialize_grads=True)
    assert abs(loss.item() - ref.item()) < 1e-5 * max(1.0, abs(ref.item()))
    for g, h in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), h, atol=1e-5, rtol=0)


def test_swav_loss_assignments_are_constants():
    scores = [torch.randn(3, 4, requires_grad=True) for _ in range(2)]
    q = torch.softmax(torch.randn(3, 4), dim=1).requires_grad_(True)
    swav_loss(scores, [q, q.clone()], 0.1).backward()
    assert q.grad is None


@pytest.mark.parametrize("loss_fn, pair_term, seed", [
    (byol_loss, lambda p, z: 2 - 2 * _cos(p, z), 5),  # BYOL: 2 - 2 cos per pair
    (simsiam_loss, lambda p, z: -_cos(p, z), 6),  # SimSiam: negative cosine per pair
], ids=["byol", "simsiam"])
def test_predictor_loss_matches_naive_and_stops_target_gradient(loss_fn, pair_term, seed):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(4, 5, generator=gen).requires_grad_(True)
    z = torch.randn(4, 5, generator=gen).requires_grad_(True)
    loss = loss_fn(p, z)
    loss.backward()
    assert z.grad is None
    rp = p.detach().double().requires_grad_(True)
    rz = z.detach().double()
    ref = sum(pair_term(rp[i], rz[i]) for i in range(4)) / 4
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    torch.testing.assert_close(p.grad.double(), rp.grad, atol=1e-5, rtol=0)


def test_cosine_tau_closed_form():
    assert cosine_tau(0, 100) == pytest.approx(0.996)
    assert cosine_tau(100, 100) == pytest.approx(1.0)
    assert cosine_tau(50, 100) == pytest.approx(0.998)
    for k in (7, 33, 81):
        expected = 1 - (1 - 0.99) * (np.cos(np.pi * k / 90) + 1) / 2
        assert cosine_tau(k, 90, base_tau=0.99) == pytest.approx(expected, abs=1e-12)
    taus = [cosine_tau(k, 20) for k in range(21)]
    assert all(a <= b for a, b in zip(taus, taus[1:]))


def _pair():
    torch.manual_seed(7)
    online = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    target = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    online.train()(torch.randn(6, 3))  # move online BN statistics away from the target's
    target[1].running_mean.fill_(0.5)
    return online, target


@pytest.mark.parametrize("policy", ["own", "copy", "ema"])
def test_ema_update_equals_closed_form(policy):
    online, target = _pair()
    tau = 0.9
    before_p = {k: v.detach().clone() for k, v in target.named_parameters()}
    before_b = {k: v.clone() for k, v in target.named_buffers()}
    online_sd = {k: v.detach().clone() for k, v in online.state_dict().items()}
    ema_update_(target, online, tau, buffers=policy)
    for name, p in target.named_parameters():
        torch.testing.assert_close(p.detach(), tau * before_p[name] + (1 - tau) * online_sd[name], atol=1e-7, rtol=0)
    for name, b in target.named_buffers():
        if policy == "own":
            expected = before_b[name]
        elif policy == "copy" or not b.is_floating_point():
            expected = online_sd[name]
        else:
            expected = tau * before_b[name] + (1 - tau) * online_sd[name]
        torch.testing.assert_close(b, expected, atol=1e-7, rtol=0)
    # online network untouched
    for k, v in online.state_dict().items():
        assert torch.equal(v, online_sd[k])


def test_ema_update_rejects_mismatched_networks():
    with pytest.raises(ValueError):
        ema_update_(nn.Linear(3, 4), nn.Linear(3, 5), 0.9)
