"""Two CPU processes (torchrun, gloo): a SwAV run with a queue, stopped after 3 steps and resumed, ends exactly
where the straight run ends (each rank gets its own queue and generators back), and only rank 0 writes logs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from medssl.engines.checkpoint import list_checkpoints, load_checkpoint_file
from tests.conftest import write_image_folder

SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from medssl.engines.config import PretrainConfig
    from medssl.engines.run import run_pretraining
    data, out, mode = sys.argv[1:4]
    if mode == "resume":
        run_pretraining(PretrainConfig(out=out), resume=True, progress=False)
    else:
        opts = {"projector_hidden_dim": 16, "projector_out_dim": 8, "num_prototypes": 6, "num_local_crops": 0,
                "freeze_prototypes_epochs": 1, "queue_length": 8, "epoch_queue_starts": 1}
        run_pretraining(PretrainConfig(
            data=data, out=out, method="swav", arch="resnet18", small_stem=True, widen_factor=0.125, image_size=16,
            batch_size=4, iterations=6, workers=0, knn_every=0, method_options=opts, checkpoint_every_epochs=0,
            device="cpu", stop_after=3 if mode == "stop" else None), progress=False)
""")


def _torchrun(script: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_two_process_resume_is_exact(tmp_path):
    data = write_image_folder(tmp_path / "images", height=20, width=20, seed=0)
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    _torchrun(script, str(data), str(tmp_path / "a"), "straight")
    _torchrun(script, str(data), str(tmp_path / "b"), "stop")
    _torchrun(script, str(data), str(tmp_path / "b"), "resume")
    a = load_checkpoint_file(list_checkpoints(tmp_path / "a")[-1][1])
    b = load_checkpoint_file(list_checkpoints(tmp_path / "b")[-1][1])
    assert a["iteration"] == b["iteration"] == 6
    assert len(a["per_rank"]) == 2
    queues = [r["method_extra"]["queue"] for r in a["per_rank"]]
    assert queues[0] is not None and not queues[0].equal(queues[1])  # each rank keeps its own queue
    diff = max((a["method"][k].double() - b["method"][k].double()).abs().max().item() for k in a["method"])
    assert diff <= 1e-6
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [1, 2, 3, 4, 5, 6]  # one writer
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["lr"] == pytest.approx(0.6 * 4 * 2 / 256)  # default lr scales with the global batch
    lines_b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in x.items() if k != "time"} for x in lines_b] == \
        [{k: v for k, v in x.items() if k != "time"} for x in lines]  # all but the wall-clock stamps
