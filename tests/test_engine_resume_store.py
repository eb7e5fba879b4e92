"""Issue 13, acceptance 5: exact resume of pretraining holds on a prepared manifest (``medssl prepare``): 3 steps,
then ``medssl pretrain --resume`` for 3 more, equal 6 straight steps (max abs parameter difference 0, metrics
log line for line), and the kNN monitor reads each labelled store record once per run invocation."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from skimage.io import imsave

import medssl.data.readers.load as load_module
from medssl.cli import main as medssl_main
from medssl.data.manifest import write_manifest
from medssl.data.sources import records_from_path
from medssl.engines.checkpoint import list_checkpoints, load_checkpoint_file
from medssl.engines.config import PretrainConfig
from medssl.engines.run import run_pretraining


def _untimed(line: str) -> dict:
    """A metrics.jsonl line without its wall-clock ``time`` stamp."""
    return {k: v for k, v in json.loads(line).items() if k != "time"}


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_store")
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / "images" / label).mkdir(parents=True)
        for i in range(8):
            imsave(root / "images" / label / f"{i}.png", (rng.random((36, 40, 3)) * 255).astype(np.uint8),
                   check_contrast=False)
    write_manifest(root / "source.jsonl", records_from_path(root / "images"))
    assert medssl_main(["prepare", str(root / "source.jsonl"), "-o", str(root / "store"), "--workers", "1",
                        "--no-progress"]) == 0
    return root / "store" / "manifest.jsonl"


def _config(data: Path, out: Path, **extra) -> PretrainConfig:
    return PretrainConfig(data=str(data), out=str(out), method="simclr", arch="resnet18", small_stem=True,
                          widen_factor=0.125, image_size=32, batch_size=8, iterations=6, knn_every=1, knn_k=5,
                          workers=0, method_options={"projector_hidden_dim": 16, "projector_out_dim": 8},
                          checkpoint_every=0, checkpoint_every_epochs=0, **extra)


def test_resume_on_prepared_manifest_is_exact(tiny_store, tmp_path, monkeypatch):
    records = records_from_path(tiny_store)
    assert len(records) == 16 and all(r["source"] == "store" for r in records)
    reads: Counter[str] = Counter()
    real_read = load_module.read_record

    def counting_read(record, key="image", **kwargs):
        assert record.get("source") == "store"  # nothing is decoded from the source files
        reads[str(record["id"])] += 1
        return real_read(record, key, **kwargs)

    monkeypatch.setattr(load_module, "read_record", counting_read)
    straight = run_pretraining(_config(tiny_store, tmp_path / "straight"), progress=False)
    reads.clear()
    run_pretraining(_config(tiny_store, tmp_path / "stopped", stop_after=3), progress=False)
    assert [it for it, _ in list_checkpoints(tmp_path / "stopped")] == [3]
    first = sum(reads.values())
    mid = load_checkpoint_file(list_checkpoints(tmp_path / "stopped")[0][1])["method"]
    assert first == 3 * 8 + 16  # 3 steps of 8 images + every labelled record once for the check at step 2
    reads.clear()
    assert medssl_main(["pretrain", "--resume", "--out", str(tmp_path / "stopped"), "--no-progress"]) == 0
    # the resumed invocation reads the labelled records once more (new process memory), for its 2 checks
    assert sum(reads.values()) == 3 * 8 + 16

    a = load_checkpoint_file(list_checkpoints(straight)[-1][1])
    b = load_checkpoint_file(list_checkpoints(tmp_path / "stopped")[-1][1])
    assert a["iteration"] == b["iteration"] == 6
    assert a["method"].keys() == b["method"].keys()
    diff = max((a["method"][k].double() - b["method"][k].double()).abs().max().item() for k in a["method"])
    assert diff == 0.0
    moved = max((a["method"][k].double() - mid[k].double()).abs().max().item()
                for k in a["method"] if a["method"][k].is_floating_point())
    assert moved > 1e-4  # the resumed steps did change the weights
    lines_a = [_untimed(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]  # "time" differs
    lines_b = [_untimed(x) for x in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert lines_a == lines_b and sum("knn_balanced_accuracy" in line for line in lines_a) == 3
