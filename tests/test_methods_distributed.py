"""Two CPU processes (gloo): gathered NT-Xent and distributed Sinkhorn equal one process on the whole batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medssl.methods import nt_xent_loss, sinkhorn_knopp

WORLD = 2
BATCH = 3  # per rank
DIM, PROTOTYPES = 5, 4
UNEVEN = (2, 4)  # per-rank batch sizes of the uneven check


def _inputs():
    gen = torch.Generator().manual_seed(11)
    z1 = torch.randn(WORLD * BATCH, DIM, generator=gen)
    z2 = torch.randn(WORLD * BATCH, DIM, generator=gen)
    scores = torch.nn.functional.normalize(torch.randn(WORLD * BATCH, DIM, generator=gen), dim=1)
    protos = torch.nn.functional.normalize(torch.randn(PROTOTYPES, DIM, generator=gen), dim=1)
    return z1, z2, scores @ protos.T


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        z1, z2, scores = _inputs()
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        l1 = z1[rows].clone().requires_grad_(True)
        l2 = z2[rows].clone().requires_grad_(True)
        loss = nt_xent_loss(l1, l2, 0.2, gather=True)
        loss.backward()
        q = sinkhorn_knopp(scores[rows], eps=0.05, iterations=3)
        start = sum(UNEVEN[:rank])
        uneven = slice(start, start + UNEVEN[rank])
        uneven_loss = nt_xent_loss(z1[uneven], z2[uneven], 0.2, gather=True)
        uneven_q = sinkhorn_knopp(scores[uneven], eps=0.05, iterations=3)
        local_only = nt_xent_loss(z1[rows], z2[rows], 0.2, gather=False)
        torch.save({"loss": loss.detach(), "g1": l1.grad, "g2": l2.grad, "q": q, "uneven_loss": uneven_loss,
                    "uneven_q": uneven_q, "local_only": local_only}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out_dir = tmp_path_factory.mktemp("ranks")
    # fork (Linux) reuses the parent's imports; spawn re-imports torch and MONAI in every child (seconds each)
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True, start_method=method)
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_gathered_nt_xent_equals_single_process(rank_results):
    z1, z2, _ = _inputs()
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    single = nt_xent_loss(z1, z2, 0.2, gather=False)
    single.backward()
    # the mean of the per-rank losses is the loss of one process holding the 2B images
    mean_loss = sum(r["loss"] for r in rank_results) / WORLD
    assert abs(mean_loss.item() - single.item()) < 1e-5
    # per-rank gradients, averaged over ranks as DistributedDataParallel does, equal the single-process ones
    g1 = torch.cat([r["g1"] for r in rank_results]) / WORLD
    g2 = torch.cat([r["g2"] for r in rank_results]) / WORLD
    torch.testing.assert_close(g1, z1.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(g2, z2.grad, atol=1e-5, rtol=0)
    # and the gather mattered: without it each rank sees fewer negatives
    assert all(abs(r["loss"].item() - r["local_only"].item()) > 1e-3 for r in rank_results)


def test_gathered_nt_xent_with_uneven_batches(rank_results):
    z1, z2, _ = _inputs()
    single = nt_xent_loss(z1, z2, 0.2, gather=False)
    weighted = sum(n * r["uneven_loss"] for n, r in zip(UNEVEN, rank_results)) / sum(UNEVEN)
    assert abs(weighted.item() - single.item()) < 1e-5


def test_distributed_sinkhorn_equals_single_process(rank_results):
    _, _, scores = _inputs()
    expected = sinkhorn_knopp(scores, eps=0.05, iterations=3, distributed=False)
    torch.testing.assert_close(torch.cat([r["q"] for r in rank_results]), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.cat([r["uneven_q"] for r in rank_results]), expected, atol=1e-6, rtol=0)
    # a per-rank (non-distributed) Sinkhorn gives different assignments
    half = sinkhorn_knopp(scores[:BATCH], eps=0.05, iterations=3, distributed=False)
    assert not torch.allclose(half, expected[:BATCH], atol=1e-3)
