"""Acceptance 3: a run stopped after 3 steps and resumed with ``medssl pretrain --resume`` ends with exactly the
parameters of a straight 6-step run, for every method (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medssl.cli import main as medssl_main
from medssl.engines.checkpoint import list_checkpoints, load_checkpoint_file
from medssl.engines.config import PretrainConfig
from medssl.engines.run import run_pretraining
from tests.conftest import write_image_folder

METHOD_OPTIONS = {
    "simclr": {"projector_hidden_dim": 16, "projector_out_dim": 8},
    "swav": {"projector_hidden_dim": 16, "projector_out_dim": 8, "num_prototypes": 6, "num_local_crops": 2,
             "freeze_prototypes_epochs": 1, "queue_length": 16, "epoch_queue_starts": 1},
    "byol": {"projector_hidden_dim": 16, "projector_out_dim": 8},
    "simsiam": {"projector_hidden_dim": 16, "projector_out_dim": 16, "predictor_hidden_dim": 8},
}


def _untimed(line: str) -> dict:
    """A metrics.jsonl line without its wall-clock ``time`` stamp."""
    return {k: v for k, v in json.loads(line).items() if k != "time"}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("tiny_images"), height=36, width=36, seed=0)


def _config(data: Path, out: Path, method: str, **extra) -> PretrainConfig:
    values = {"workers": 0, **extra}
    return PretrainConfig(data=str(data), out=str(out), method=method, arch="resnet18", small_stem=True,
                          widen_factor=0.125, image_size=32, batch_size=8, iterations=6, knn_every=0,
                          method_options=METHOD_OPTIONS[method], checkpoint_every=0, checkpoint_every_epochs=0,
                          **values)


@pytest.mark.parametrize("method", ["simclr", "swav", "byol", "simsiam"])
def test_resume_continues_exactly(tiny_folder, tmp_path, method):
    straight = run_pretraining(_config(tiny_folder, tmp_path / "straight", method), progress=False)
    stopped = _config(tiny_folder, tmp_path / "stopped", method, stop_after=3,
                      workers=2 if method == "simclr" else 0)  # worker count must not matter
    run_pretraining(stopped, progress=False)
    assert [it for it, _ in list_checkpoints(tmp_path / "stopped")] == [3]
    assert not (tmp_path / "stopped" / "backbone.safetensors").exists()
    mid = load_checkpoint_file(list_checkpoints(tmp_path / "stopped")[0][1])["method"]

    rc = medssl_main(["pretrain", "--resume", "--out", str(tmp_path / "stopped"), "--no-progress"])
    assert rc == 0
    a = load_checkpoint_file(list_checkpoints(straight)[-1][1])
    b = load_checkpoint_file(list_checkpoints(tmp_path / "stopped")[-1][1])
    assert a["iteration"] == b["iteration"] == 6
    assert a["method"].keys() == b["method"].keys()
    diff = max((a["method"][k].double() - b["method"][k].double()).abs().max().item() for k in a["method"])
    assert diff <= 1e-6
    moved = max((a["method"][k].double() - mid[k].double()).abs().max().item()
                for k in a["method"] if a["method"][k].is_floating_point())
    assert moved > 1e-4  # the last three steps did change the weights
    # the metrics log of the resumed run equals the straight one line for line
    # (apart from the wall-clock "time" stamp of each line)
    lines_a = [_untimed(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    lines_b = [_untimed(x) for x in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert lines_a == lines_b and len(lines_a) == 6
    assert (tmp_path / "stopped" / "backbone.safetensors").exists()


def test_refuses_non_empty_run_dir(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "something.txt").write_text("x")
    rc = medssl_main(["pretrain", "--data", str(tiny_folder), "--method", "simclr", "--out", str(out)])
    assert rc == 2
    assert "not empty" in capsys.readouterr().err
    rc = medssl_main(["pretrain", "--resume", "--out", str(tmp_path / "missing")])
    assert rc == 2


def test_device_augmentation_resumes_exactly_and_cuts_the_views_itself(tiny_folder, tmp_path, monkeypatch):
    """``augment_on="device"``: the loader delivers the 36 px images at their stored size (never enlarged to the
    2 x 32 px base) and the trainer cuts 2 global + 2 local SwAV views with kornia; 3 steps + resume + 3 equal 6
    straight steps."""
    from medssl.engines.trainer import PretrainingTrainer

    seen: list[tuple] = []
    original = PretrainingTrainer._views

    def spy(self, batchdata, iteration):
        views = original(self, batchdata, iteration)
        if "image" in batchdata:
            seen.append((tuple(batchdata["image"].shape), [tuple(v.shape) for v in views]))
        return views

    monkeypatch.setattr(PretrainingTrainer, "_views", spy)
    straight = run_pretraining(_config(tiny_folder, tmp_path / "straight", "swav", augment_on="device"),
                               progress=False)
    assert seen[0] == ((8, 3, 36, 36), [(8, 3, 32, 32)] * 2 + [(8, 3, 14, 14)] * 2)
    run_pretraining(_config(tiny_folder, tmp_path / "stopped", "swav", augment_on="device", stop_after=3),
                    progress=False)
    run_pretraining(PretrainConfig(out=str(tmp_path / "stopped")), resume=True, progress=False)
    a = load_checkpoint_file(list_checkpoints(straight)[-1][1])["method"]
    b = load_checkpoint_file(list_checkpoints(tmp_path / "stopped")[-1][1])["method"]
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) <= 1e-6
    seen.clear()
    loader_run = run_pretraining(_config(tiny_folder, tmp_path / "loader", "swav"), progress=False)
    assert not seen  # the default path hands finished views to the trainer
    c = load_checkpoint_file(list_checkpoints(loader_run)[-1][1])["method"]
    assert max((a[k].double() - c[k].double()).abs().max().item() for k in a) > 1e-4  # other views, other run


def test_device_views_depend_only_on_seed_step_and_rank():
    from types import SimpleNamespace

    from medssl.engines.trainer import PretrainingTrainer
    from medssl.transforms.batched import BatchedSSLAugment

    trainer = SimpleNamespace(view_augment=BatchedSSLAugment("generic", 16), augment_seed=5, rank=0,
                              state=SimpleNamespace(device=torch.device("cpu")))
    batch = {"image": torch.rand(4, 3, 32, 32)}

    def views(step, rank=0):
        trainer.rank = rank
        return PretrainingTrainer._views(trainer, batch, step)

    torch.manual_seed(123)
    first = views(7)
    after = torch.rand(1)
    torch.manual_seed(999)  # whatever the global generator did before, step 7 gets the same views
    assert all(torch.equal(a, b) for a, b in zip(first, views(7)))
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), after)  # the global generator is left as it was
    assert not torch.equal(first[0], views(8)[0])
    assert not torch.equal(first[0], views(7, rank=1)[0])


def test_resume_after_a_kill_between_last_checkpoint_and_backbone_writes_the_backbone(tiny_folder, tmp_path):
    """A run killed after its final checkpoint but before backbone.safetensors: ``--resume`` writes the file
    (same tensors as the uninterrupted run's) instead of only saying the run is finished."""
    from safetensors.torch import load_file

    run = run_pretraining(_config(tiny_folder, tmp_path / "run", "simclr"), progress=False)
    backbone = run / "backbone.safetensors"
    expected = load_file(backbone)
    backbone.unlink()  # what a kill at that moment leaves
    assert medssl_main(["pretrain", "--resume", "--out", str(run), "--no-progress"]) == 0
    written = load_file(backbone)
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)
