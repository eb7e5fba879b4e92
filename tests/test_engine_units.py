"""Unit checks of the pretraining engine's pieces against closed forms and naive references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from medssl.engines.checkpoint import capture_rng_state, restore_rng_state
from medssl.engines.config import PretrainConfig
from medssl.engines.handlers import CollapseMonitor, collapse_statistic, split_reference_query
from medssl.engines.knn import image_features, weighted_knn_predict
from medssl.engines.optim import LARS, build_optimizer, default_param_groups
from medssl.engines.sampling import SeededSampleDataset, StepBatchSampler, epoch_permutation
from medssl.engines.schedules import WarmupCosineSchedule, warmup_cosine_lr
from medssl.errors import MedsslError


def test_lr_schedule_matches_closed_form():
    base, final, total, warm = 0.8, 0.01, 50, 10
    for t in range(total):
        if t < warm:
            expected = base * (t + 1) / warm
        else:
            expected = final + 0.5 * (base - final) * (1 + math.cos(math.pi * (t - warm) / (total - warm)))
        got = warmup_cosine_lr(t, base_lr=base, max_iterations=total, warmup_iterations=warm, final_lr=final)
        assert got == pytest.approx(expected, rel=1e-12)
    assert warmup_cosine_lr(warm, base_lr=base, max_iterations=total, warmup_iterations=warm) == pytest.approx(base)
    assert warmup_cosine_lr(total, base_lr=base, max_iterations=total, warmup_iterations=warm) == pytest.approx(0.0)


def test_schedule_leaves_fixed_lr_groups_alone():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "fixed_lr": True}], lr=0.5)
    sched = WarmupCosineSchedule(opt, base_lr=0.5, max_iterations=10, warmup_iterations=0)
    lr = sched.step(7)
    assert lr == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 7 / 10)))
    assert opt.param_groups[0]["lr"] == pytest.approx(lr)
    assert opt.param_groups[1]["lr"] == 0.5


def test_lars_step_equals_hand_computation():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    bias = torch.nn.Parameter(torch.randn(4))
    lr, mom, wd, eta = 0.3, 0.9, 1e-2, 1e-3
    opt = LARS([{"params": [w], "weight_decay": wd, "exclude_from_lars": False},
                {"params": [bias], "weight_decay": 0.0, "exclude_from_lars": True}],
               lr=lr, momentum=mom, weight_decay=wd, eta=eta)
    w_np, b_np = w.detach().double().numpy().copy(), bias.detach().double().numpy().copy()
    buf_w = buf_b = None
    for _ in range(3):
        gw, gb = torch.randn(4, 3), torch.randn(4)
        w.grad, bias.grad = gw.clone(), gb.clone()
        opt.step()
        d = gw.double().numpy() + wd * w_np
        trust = eta * np.sqrt((w_np ** 2).sum()) / np.sqrt((d ** 2).sum())
        d = trust * d
        buf_w = d if buf_w is None else mom * buf_w + d
        w_np = w_np - lr * buf_w
        db = gb.double().numpy()  # excluded: no decay, no trust ratio
        buf_b = db if buf_b is None else mom * buf_b + db
        b_np = b_np - lr * buf_b
        np.testing.assert_allclose(w.detach().double().numpy(), w_np, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bias.detach().double().numpy(), b_np, rtol=1e-5, atol=1e-6)


def test_param_groups_exclude_bias_and_norm_from_decay():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    groups = default_param_groups(model, 1e-4)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight), id(model[2].weight)}
    assert all(g["exclude_from_lars"] for g in groups if g["weight_decay"] == 0)
    opt = build_optimizer("adamw", groups, lr=1e-3, weight_decay=1e-4)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    with pytest.raises(ValueError):
        build_optimizer("rmsprop", groups, lr=1e-3, weight_decay=0)


def _naive_knn(train, labels, query, k, t, num_classes):
    preds, probs = [], []
    for q in query:
        sims = [float(np.dot(q, x) / (np.linalg.norm(q) * np.linalg.norm(x))) for x in train]
        order = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in order:
            votes[labels[i]] += math.exp(sims[i] / t)
        total = sum(votes)
        probs.append([v / total for v in votes])
        preds.append(int(np.argmax(votes)))
    return np.array(preds), np.array(probs)


def test_weighted_knn_matches_naive_loop():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(40, 6)).astype(np.float32)
    labels = rng.integers(0, 3, size=40)
    query = rng.normal(size=(9, 6)).astype(np.float32)
    pred, probs = weighted_knn_predict(torch.from_numpy(train), torch.from_numpy(labels), torch.from_numpy(query),
                                       k=7, temperature=0.1, num_classes=3, chunk_size=4)
    ref_pred, ref_probs = _naive_knn(train, labels, query, 7, 0.1, 3)
    np.testing.assert_allclose(probs.numpy(), ref_probs, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(pred.numpy(), ref_pred)


def test_image_features_restores_mode_and_balanced_accuracy():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4), torch.nn.BatchNorm1d(4))
    model.train()
    images = torch.randint(0, 256, (10, 3, 2, 2), dtype=torch.uint8)
    feats = image_features(model, images, "cpu", batch_size=6)
    assert model.training
    model.eval()
    with torch.no_grad():
        np.testing.assert_allclose(feats.numpy(), model(images.double().div(255).float()).numpy(), rtol=1e-5,
                                   atol=1e-6)
        gray = images[:, :1]  # one stored channel is expanded to three
        np.testing.assert_allclose(image_features(model, gray, "cpu").numpy(),
                                   model(gray.repeat(1, 3, 1, 1).float() / 255).numpy(), rtol=1e-5, atol=1e-6)
    # kNN on well separated clusters: balanced accuracy 1
    centers = torch.eye(3) * 5
    ref = torch.cat([centers[c] + 0.1 * torch.randn(5, 3) for c in range(3)])
    ref_y = torch.arange(3).repeat_interleave(5)
    pred, _ = weighted_knn_predict(ref, ref_y, centers + 0.1, k=3, num_classes=3)
    assert balanced_accuracy_score([0, 1, 2], pred.numpy()) == 1.0


def test_collapse_statistic_matches_naive_and_flags_constant_embeddings():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(64, 16))
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    naive = np.mean([np.std(zn[:, d], ddof=1) for d in range(16)])
    assert collapse_statistic(torch.from_numpy(z)) == pytest.approx(naive, rel=1e-5)
    assert abs(naive - 1 / math.sqrt(16)) < 0.05  # healthy value ~ 1/sqrt(D)
    events = []
    mon = CollapseMonitor(0.2, sink=events.append)
    mon.update(torch.from_numpy(z), iteration=1, epoch=1)
    assert events == []
    const = torch.ones(64, 16) * torch.arange(16.0)
    value = mon.update(const, iteration=2, epoch=1)
    assert value == pytest.approx(0.0, abs=1e-6)
    assert events and events[0]["warning"] == "collapse" and events[0]["iteration"] == 2


def test_step_sampler_is_a_pure_function_of_seed_epoch_and_step():
    full = StepBatchSampler(23, 4, 12, seed=5)
    batches = list(full)
    assert full.steps_per_epoch == 5 and len(batches) == 12
    # epoch e, position p is perm(seed + e)[4p:4p+4]
    perm1 = epoch_permutation(23, 5, 1)
    assert batches[6] == [(1, int(i)) for i in perm1[4:8]]
    # resuming at step 7 yields exactly the tail
    assert list(StepBatchSampler(23, 4, 12, seed=5, start_step=7)) == batches[7:]
    # two ranks split each global batch of 8 without overlap, covering perm[:8 * steps]
    r0 = list(StepBatchSampler(23, 4, 4, seed=5, rank=0, world_size=2))
    r1 = list(StepBatchSampler(23, 4, 4, seed=5, rank=1, world_size=2))
    perm0 = epoch_permutation(23, 5, 0)
    assert sorted(i for b in r0[:2] + r1[:2] for _, i in b) == sorted(perm0[:16].tolist())
    assert not {i for b in r0[:2] for _, i in b} & {i for b in r1[:2] for _, i in b}


def test_seeded_dataset_is_reproducible_and_leaves_global_rng_alone():
    def transform(record):
        return {"views": [torch.rand(2), torch.rand(2)], "np": np.random.rand(), "id": record["id"]}

    ds = SeededSampleDataset([{"id": i} for i in range(4)], transform, seed=3)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = ds[(2, 1)]
    assert torch.equal(before, torch.get_rng_state())
    b = ds[(2, 1)]
    c = ds[(3, 1)]
    assert torch.equal(a["views"][0], b["views"][0]) and a["np"] == b["np"]
    assert not torch.equal(a["views"][0], c["views"][0])
    assert not torch.equal(a["views"][0], a["views"][1])


def test_rng_state_roundtrip():
    import random

    state = capture_rng_state()
    x = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == x


def test_config_resolves_paper_defaults_and_rejects_bad_values():
    cfg = PretrainConfig(method="simsiam", batch_size=64, epochs=10).resolve(steps_per_epoch=5)
    assert cfg.optimizer == "sgd" and cfg.lr == pytest.approx(0.05 * 64 / 256) and cfg.weight_decay == 1e-4
    assert cfg.iterations == 50
    simclr = PretrainConfig(method="simclr", batch_size=256, epochs=200).resolve(steps_per_epoch=10)
    assert simclr.optimizer == "lars" and simclr.lr == pytest.approx(0.3) and simclr.warmup_epochs == 10
    assert simclr.warmup_iterations(10) == 100
    short = PretrainConfig(method="byol", iterations=40).resolve(steps_per_epoch=4)
    assert short.warmup_iterations(4) == 4  # clipped to a tenth of the run
    assert PretrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(MedsslError):
        PretrainConfig(method="moco").validate()
    with pytest.raises(MedsslError):
        PretrainConfig(batch_size=6, accumulate=4).validate()
    with pytest.raises(MedsslError):
        PretrainConfig.from_dict({"bogus": 1})


def test_knn_split_uses_val_records_or_a_stratified_split():
    recs = [{"label": "a" if i % 2 else "b", "split": None} for i in range(20)]
    ref, qry = split_reference_query(recs, seed=0)
    assert len(qry) == 4 and sorted(r["label"] for r in qry) == ["a", "a", "b", "b"]
    recs2 = recs + [{"label": "a", "split": "val"}, {"label": "b", "split": "test"}]
    ref2, qry2 = split_reference_query(recs2, seed=0)
    assert qry2 == [{"label": "a", "split": "val"}] and len(ref2) == 20


@pytest.mark.parametrize("name", ["byol", "swav"])
def test_skipped_optimizer_step_skips_the_method_hooks(name):
    """A real (CPU) GradScaler meets inf gradients at step 2 and skips the optimizer step: the BYOL target and
    SwAV's step counter (prototype freezing, queue start) and prototypes stay as after step 1; step 3 goes on."""
    from ignite.engine import Events

    from medssl.engines.trainer import PretrainingTrainer
    from medssl.methods import build_method
    from medssl.models import IMAGENET_NORMALIZATION, InputNormalization, build_backbone

    torch.manual_seed(0)
    backbone = build_backbone("resnet18", widen_factor=0.125, small_stem=True)
    options = {"num_local_crops": 0, "num_prototypes": 4, "freeze_prototypes_epochs": 1 / 3, "queue_length": 0} \
        if name == "swav" else {}
    method = build_method(name, backbone, projector_hidden_dim=8, projector_out_dim=4, **options)
    method.configure_run(steps_per_epoch=3, global_batch_size=4)
    optimizer = build_optimizer("sgd", method.param_groups(0.0, 0.1), lr=0.1, weight_decay=0.0)
    batch = {"views": [torch.rand(4, 3, 16, 16) for _ in range(2)]}
    trainer = PretrainingTrainer(method=method, optimizer=optimizer,
                                 schedule=WarmupCosineSchedule(optimizer, base_lr=0.1, max_iterations=3),
                                 normalization=InputNormalization.from_spec(IMAGENET_NORMALIZATION),
                                 data_loader=[batch] * 3, max_iterations=3, epoch_length=3, device="cpu")
    trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    hook = method.on_before_optimizer_step

    def poison_step_2(iteration):
        hook(iteration)
        if iteration == 2:
            method.backbone.conv1.weight.grad.fill_(float("inf"))

    method.on_before_optimizer_step = poison_step_2
    snapshots, outputs = [], []

    @trainer.on(Events.ITERATION_COMPLETED)
    def _snapshot(engine):
        outputs.append(dict(engine.state.output))
        # parameters (online, target, prototypes) and the step counter; BatchNorm buffers move in every forward
        snapshots.append({k: v.detach().clone() for k, v in method.named_parameters()}
                         | {"steps_done": torch.tensor(getattr(method, "steps_done", -1))})

    trainer.run()
    assert [o.get("skipped_step") for o in outputs] == [None, 1.0, None]
    assert trainer.grad_scaler.get_scale() == 2.0**7  # the scaler backed off once
    first, skipped, third = snapshots
    assert all(torch.equal(first[k], skipped[k]) for k in first)
    if name == "byol":
        assert "tau" not in outputs[1] and outputs[2]["tau"] == pytest.approx(cosine_tau_at(3, 3))
        assert any(not torch.equal(skipped[k], third[k]) for k in third if k.startswith("target_"))
    else:
        assert [int(s["steps_done"]) for s in snapshots] == [1, 1, 2]
        assert not torch.equal(skipped["prototypes.weight"], third["prototypes.weight"])


def cosine_tau_at(iteration, max_iterations):
    """BYOL's tau used after step ``iteration`` (1-based): ``1 - (1 - 0.996) * (cos(pi k / K) + 1) / 2``, k = it - 1."""
    return 1 - (1 - 0.996) * (math.cos(math.pi * (iteration - 1) / max_iterations) + 1) / 2
