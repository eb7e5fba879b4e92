"""The kNN monitor reads each labelled image once per run (issue 13, acceptance 5): a counter on the record
reader sees every labelled BUSI image exactly once over three kNN checks, and each check's balanced accuracy
equals the previous implementation's (float eval-transform images, features, a weighted vote written here,
scikit-learn's balanced accuracy) on the checkpoint of that iteration."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

import medssl.data.readers.load as load_module
from medssl.engines.checkpoint import list_checkpoints, load_checkpoint_file
from medssl.engines.config import PretrainConfig
from medssl.engines.handlers import label_index, split_reference_query
from medssl.engines.knn import LabelledImages, dequantize_unit
from medssl.engines.run import run_pretraining
from tests.conftest import write_image_folder


def _busi_subset(shared: Path, dest: Path, per_class: dict[str, int], skip: int = 0) -> Path:
    busi = shared / "busi"
    if not busi.is_dir():
        pytest.skip("BUSI images not in the shared data folder")
    for label, n in per_class.items():
        (dest / label).mkdir(parents=True)
        for src in sorted((busi / label).glob("*.png"))[skip:skip + n]:
            os.symlink(src, dest / label / src.name.replace(" ", "_"))
    return dest


def _old_knn_balanced_accuracy(backbone_state: dict, ref: list[dict], qry: list[dict], classes: dict[str, int],
                               *, k: int, temperature: float, modality: str = "ultrasound",
                               image_size: int = 32) -> float:
    """The monitor before the cache: float images from the eval transform at every check, features in eval
    mode, the InstDisc weighted vote as a plain loop, scikit-learn's balanced accuracy."""
    from medssl.models import IMAGENET_NORMALIZATION, InputNormalization, build_backbone
    from medssl.transforms.presets import build_eval_transform

    backbone = build_backbone("resnet18", small_stem=True, widen_factor=0.125)
    backbone.load_state_dict(backbone_state)
    backbone.eval()
    norm = InputNormalization.from_spec(IMAGENET_NORMALIZATION)
    transform = build_eval_transform(modality, image_size)

    def feats(records: list[dict]) -> np.ndarray:
        with torch.no_grad():
            x = torch.stack([transform(r)["image"] for r in records])
            return backbone.forward_features(norm(x)).double().numpy()

    ref_x, qry_x = feats(ref), feats(qry)
    ref_y = [classes[str(r["label"])] for r in ref]
    preds = []
    for q in qry_x:
        sims = [float(q @ x / (np.linalg.norm(q) * np.linalg.norm(x))) for x in ref_x]
        votes = [0.0] * len(classes)
        for i in sorted(range(len(sims)), key=lambda i: -sims[i])[:k]:
            votes[ref_y[i]] += math.exp(sims[i] / temperature)
        preds.append(int(np.argmax(votes)))
    return float(balanced_accuracy_score([classes[str(r["label"])] for r in qry], preds))


def test_monitor_reads_each_labelled_image_once_and_scores_like_before(shared_data, tmp_path, monkeypatch):
    train = _busi_subset(shared_data, tmp_path / "train", {"benign": 4, "malignant": 4, "normal": 4})
    knn_dir = _busi_subset(shared_data, tmp_path / "knn", {"benign": 8, "malignant": 8, "normal": 8}, skip=4)
    reads: Counter[str] = Counter()
    real_read = load_module.read_record

    def counting_read(record, key="image", **kwargs):
        reads[os.path.realpath(str(record.get(key)))] += 1
        return real_read(record, key, **kwargs)

    monkeypatch.setattr(load_module, "read_record", counting_read)
    config = PretrainConfig(data=str(train), knn_data=str(knn_dir), out=str(tmp_path / "run"), method="simclr",
                            arch="resnet18", small_stem=True, widen_factor=0.125, image_size=32, batch_size=4,
                            iterations=9, workers=0, knn_every=1, knn_k=5, modality="ultrasound",
                            method_options={"projector_hidden_dim": 16, "projector_out_dim": 8}, optimizer="adam",
                            lr=3e-3, warmup_epochs=0, checkpoint_every=3, checkpoint_every_epochs=0,
                            keep_checkpoints=5, seed=0)
    run = run_pretraining(config, progress=False)

    checks = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    checks = [c for c in checks if "knn_balanced_accuracy" in c]
    assert [c["iteration"] for c in checks] == [3, 6, 9]  # one check per epoch of 3 steps
    knn_files = {os.path.realpath(p) for p in knn_dir.rglob("*.png")}
    assert len(knn_files) == 24
    assert {p: reads[p] for p in knn_files} == dict.fromkeys(knn_files, 1)  # once each over three checks
    assert sum(reads.values()) - 24 == 9 * 4  # the training images: one read per sampled image

    from medssl.data.sources import records_from_path

    labelled = [r for r in records_from_path(knn_dir) if r.get("label") is not None]
    ref, qry = split_reference_query(labelled, config.seed)
    classes = label_index([str(r["label"]) for r in labelled])
    ckpts = dict(list_checkpoints(run))
    for check in checks:
        state = load_checkpoint_file(ckpts[check["iteration"]])["method"]
        backbone_state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        expected = _old_knn_balanced_accuracy(backbone_state, ref, qry, classes, k=5, temperature=0.07)
        assert check["knn_balanced_accuracy"] == pytest.approx(expected, abs=1e-9)


def test_labelled_images_read_once_as_uint8_and_kept_one_channel_when_gray():
    rng = np.random.default_rng(0)
    color = torch.from_numpy(rng.random((5, 3, 8, 8), dtype=np.float32))
    gray = torch.from_numpy(rng.random((5, 1, 8, 8), dtype=np.float32)).expand(-1, 3, -1, -1)
    labels = torch.tensor([0, 1, 0, 1, 1])
    for images, channels in ((color, 3), (gray, 1)):
        calls = []

        def batches(images=images, calls=calls):
            calls.append(1)
            return [{"image": images[:3], "label": labels[:3]}, {"image": images[3:], "label": labels[3:]}]

        cache = LabelledImages(batches, 5)
        assert not cache.loaded and cache.nbytes == 0
        stored, y = cache.tensors()
        stored2, _ = cache.tensors()
        assert len(calls) == 1 and stored2 is stored
        assert stored.dtype == torch.uint8 and stored.shape == (5, channels, 8, 8)
        assert cache.nbytes == 5 * channels * 8 * 8  # N x C x S x S bytes
        assert y.tolist() == labels.tolist()
        back = dequantize_unit(stored).expand(-1, 3, -1, -1)
        assert float((back - images).abs().max()) <= 0.5 / 255 + 1e-7  # uint8 rounding only
    with pytest.raises(ValueError, match="announced"):
        LabelledImages(lambda: [{"image": color, "label": labels}], 6).tensors()


SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    torch.set_num_threads(1)
    import medssl.data.readers.load as load
    from medssl.engines.config import PretrainConfig
    from medssl.engines.run import run_pretraining
    reads, real_read = [], load.read_record
    load.read_record = lambda record, *a, **kw: reads.append(1) or real_read(record, *a, **kw)
    run_pretraining(PretrainConfig(
        data=sys.argv[1], out=sys.argv[2], method="simclr", arch="resnet18", small_stem=True, widen_factor=0.125,
        image_size=16, batch_size=4, iterations=4, workers=0, knn_every=1, knn_k=5, device="cpu",
        method_options={"projector_hidden_dim": 16, "projector_out_dim": 8}, checkpoint_every_epochs=0),
        progress=False)
    with open(os.path.join(sys.argv[2], "reads-" + os.environ["RANK"] + ".json"), "w") as fh:
        json.dump(len(reads), fh)
""")


@pytest.mark.slow
def test_two_process_run_checks_on_rank_zero_only(tmp_path):
    """Under torchrun (2 gloo ranks) the monitor runs on rank 0 alone, the run does not stall at the other
    rank's next collective, and each check equals the float/naive-vote reference on rank 0's weights."""

    from medssl.data.sources import records_from_path

    data = write_image_folder(tmp_path / "images", height=20, width=20, seed=0)
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(data), str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    checks = [x for x in lines if "knn_balanced_accuracy" in x]
    assert [c["iteration"] for c in checks] == [2, 4]  # 16 images / (4 x 2 ranks): 2 steps per epoch
    reads = [json.loads((tmp_path / "run" / f"reads-{rank}.json").read_text()) for rank in (0, 1)]
    assert reads == [4 * 4 + 16, 4 * 4]  # 4 steps of 4 images per rank; the 16 labelled images once, on rank 0
    labelled = records_from_path(data)
    ref, qry = split_reference_query(labelled, 0)
    classes = label_index([str(r["label"]) for r in labelled])
    state = load_checkpoint_file(list_checkpoints(tmp_path / "run")[-1][1])["method"]
    backbone_state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    expected = _old_knn_balanced_accuracy(backbone_state, ref, qry, classes, k=5, temperature=0.07,
                                          modality="generic", image_size=16)
    assert checks[-1]["knn_balanced_accuracy"] == pytest.approx(expected, abs=1e-9)
