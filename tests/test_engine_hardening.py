"""Hardened pretraining runs: a resume never escalates trust and checks its files belong together, resume
options are applied or refused, unreadable records are named or skipped deterministically, one writer per run
folder, full disks and memory-bomb checkpoints give one line naming the file, stale temporaries are cleaned."""

from __future__ import annotations

import errno
import fcntl
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.io import imsave

from medssl.cli import main as medssl_main
from medssl.data.sources import records_from_path
from medssl.engines.checkpoint import list_checkpoints, load_checkpoint_file
from medssl.engines.config import PretrainConfig
from medssl.engines.resume import config_sha256
from medssl.engines.run import run_pretraining
from medssl.engines.runlock import RunLock
from medssl.errors import MedsslError
from medssl.io import atomic_write_json

OPTIONS = {"projector_hidden_dim": 16, "projector_out_dim": 8}


def _images(root: Path, n_per_class: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(n_per_class):
            imsave(root / label / f"{i}.png", (rng.random((36, 36, 3)) * 255).astype(np.uint8), check_contrast=False)
    return root


def _config(data: Path, out: Path, **extra) -> PretrainConfig:
    values = {"data": str(data), "out": str(out), "method": "simclr", "arch": "resnet18", "small_stem": True,
              "widen_factor": 0.125, "image_size": 32, "batch_size": 8, "knn_every": 0, "method_options": OPTIONS,
              "checkpoint_every": 0, "checkpoint_every_epochs": 0, "workers": 0, "iterations": 6,
              "warmup_epochs": 0.0, **extra}
    return PretrainConfig(**values)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return _images(tmp_path_factory.mktemp("hardening") / "images")


@pytest.fixture(scope="module")
def stopped_run(images, tmp_path_factory) -> Path:
    """A run of 6 steps stopped after 2 (checkpoint 2); tests work on copies."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    run_pretraining(_config(images, out, stop_after=2), progress=False)
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(run, dest)
    return dest


def _one_line_error(capsys) -> str:
    """The CLI's error: exactly one ``medssl: error:`` line and no traceback (log records aside)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("medssl:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


class _OpensMarker:
    """Unpickling this runs ``open(marker, "w")``: the marker file proves that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _hostile_folder(run: Path, tmp_path: Path) -> tuple[Path, dict]:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": _OpensMarker(marker)}, evil)
    values = json.loads((run / "config.json").read_text())
    values.update(trust=True, init=str(evil))
    (run / "config.json").write_text(json.dumps(values))
    return marker, values


def test_resume_of_an_edited_run_folder_runs_no_code_and_reports_the_mismatch(stopped_run, tmp_path, capsys):
    run = _copy(stopped_run, tmp_path)
    marker, _ = _hostile_folder(run, tmp_path)
    assert medssl_main(["pretrain", "--resume", "--out", str(run), "--no-progress"]) == 2
    err = _one_line_error(capsys)
    assert "config.json" in err and "does not belong to checkpoint_00000002.pt" in err
    assert not marker.exists()


def test_forged_run_record_still_never_reads_the_init_file(stopped_run, tmp_path):
    """Even with config.json and the checkpoint's hash both rewritten, the resume never unpickles the init."""
    run = _copy(stopped_run, tmp_path)
    marker, values = _hostile_folder(run, tmp_path)
    ckpt = list_checkpoints(run)[-1][1]
    state = torch.load(ckpt, weights_only=True)
    record = json.loads(state["run"])
    record["config_sha256"] = config_sha256(values)
    state["run"] = json.dumps(record)
    torch.save(state, ckpt)
    run_pretraining(PretrainConfig(out=str(run)), resume=True, progress=False)
    assert not marker.exists()
    assert list_checkpoints(run)[-1][0] == 6 and (run / "backbone.safetensors").exists()
    # the continuation equals the untouched folder's continuation: nothing from the edit was used
    clean = _copy(stopped_run, tmp_path / "clean")
    run_pretraining(PretrainConfig(out=str(clean)), resume=True, progress=False)
    a = load_checkpoint_file(list_checkpoints(run)[-1][1])["method"]
    b = load_checkpoint_file(list_checkpoints(clean)[-1][1])["method"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_init_and_trust_on_its_command_line(stopped_run, tmp_path, capsys):
    run = _copy(stopped_run, tmp_path)
    assert medssl_main(["pretrain", "--resume", "--out", str(run), "--init", str(tmp_path / "x.pt"),
                        "--trust"]) == 2
    err = _one_line_error(capsys)
    assert "--init" in err and "--trust" in err
    assert list_checkpoints(run)[-1][0] == 2


def test_tampered_config_is_refused(stopped_run, tmp_path, capsys):
    run = _copy(stopped_run, tmp_path)
    values = json.loads((run / "config.json").read_text())
    values["seed"] = 1
    atomic_write_json(run / "config.json", values)
    assert medssl_main(["pretrain", "--resume", "--out", str(run), "--no-progress"]) == 2
    assert "SHA-256" in _one_line_error(capsys)
    # a checkpoint copied in from another run does not match either
    other = tmp_path / "other"
    run_pretraining(_config(Path(values["data"]), other, stop_after=2, seed=3), progress=False)
    fresh = _copy(stopped_run, tmp_path / "fresh")
    shutil.copy(list_checkpoints(other)[-1][1], fresh / "checkpoints" / "checkpoint_00000002.pt")
    assert medssl_main(["pretrain", "--resume", "--out", str(fresh), "--no-progress"]) == 2
    assert "does not belong" in _one_line_error(capsys)


def test_resume_options_are_refused_or_applied_and_recorded(stopped_run, tmp_path, capsys):
    run = _copy(stopped_run, tmp_path)
    config_before = (run / "config.json").read_text()
    assert medssl_main(["pretrain", "--resume", "--out", str(run), "--batch-size", "4", "--seed", "0"]) == 2
    err = _one_line_error(capsys)
    assert "--batch-size" in err and "--seed" in err and "--iterations" in err
    assert list_checkpoints(run)[-1][0] == 2
    rc = medssl_main(["pretrain", "--resume", "--out", str(run), "--iterations", "8", "--stop-after", "4",
                      "--lr", "0.05", "--no-progress"])
    assert rc == 0 and list_checkpoints(run)[-1][0] == 4
    assert medssl_main(["pretrain", "--resume", "--out", str(run), "--no-progress"]) == 0  # keeps 8 and 0.05
    assert list_checkpoints(run)[-1][0] == 8
    assert (run / "config.json").read_text() == config_before  # the run-start record is never rewritten
    resumes = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["applied"]) for r in resumes] == [
        (2, {"iterations": 8, "stop_after": 4, "lr": 0.05}), (4, {})]
    # the lr after the resume follows the cosine schedule of an 8-step run with peak 0.05 (no warmup)
    logged = {e["iteration"]: e["lr"] for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "lr" in e}
    for it in range(3, 9):
        assert logged[it] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * (it - 1) / 8)), rel=1e-9)


def test_iterations_must_exceed_the_checkpoint(stopped_run, tmp_path, capsys):
    run = _copy(stopped_run, tmp_path)
    assert medssl_main(["pretrain", "--resume", "--out", str(run), "--iterations", "2"]) == 2
    assert "must exceed" in _one_line_error(capsys)


def test_resuming_a_run_completed_by_an_earlier_resume_is_a_no_op(stopped_run, tmp_path, capsys):
    """--iterations recorded by an earlier resume is not re-checked: the completed run just says it is finished."""
    run = _copy(stopped_run, tmp_path)
    assert medssl_main(["pretrain", "--resume", "--out", str(run), "--iterations", "3", "--no-progress"]) == 0
    last = list_checkpoints(run)[-1]
    assert last[0] == 3
    before = last[1].read_bytes()
    assert medssl_main(["pretrain", "--resume", "--out", str(run), "--no-progress"]) == 0
    assert list_checkpoints(run)[-1][0] == 3 and list_checkpoints(run)[-1][1].read_bytes() == before
    resumes = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["applied"]) for r in resumes] == [(2, {"iterations": 3}), (3, {})]
    # giving the same length again is still refused: it would not extend the run
    assert medssl_main(["pretrain", "--resume", "--out", str(run), "--iterations", "3"]) == 2
    assert "must exceed" in _one_line_error(capsys)


def _corrupt(path: Path) -> None:
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")


def _record_of(folder: Path, image: Path) -> dict:
    return next(r for r in records_from_path(str(folder)) if Path(r["image"]).resolve() == image.resolve())


def test_unreadable_record_is_named_with_its_id_and_path(tmp_path, capsys):
    from monai.transforms import Compose

    from medssl.data.readers.load import LoadRecordd, RecordLoadError, find_record_error

    folder = _images(tmp_path / "images")
    bad = folder / "b" / "3.png"
    _corrupt(bad)
    record = _record_of(folder, bad)
    out = tmp_path / "run"
    args = ["pretrain", "--data", str(folder), "--method", "simclr", "--arch", "resnet18", "--small-stem",
            "--widen-factor", "0.125", "--image-size", "32", "--batch-size", "8", "--iterations", "2",
            "--knn-every", "0", "--workers", "2", "--method-options", json.dumps(OPTIONS), "--out", str(out),
            "--no-progress"]
    assert medssl_main(args) == 2
    err = _one_line_error(capsys)
    assert record["id"] in err and str(bad) in err and "RuntimeError" not in err
    # missing file, straight from the load transform and through MONAI's Compose wrapper
    missing = {"id": "rec-7", "image": str(tmp_path / "gone.png")}
    with pytest.raises(RecordLoadError) as info:
        LoadRecordd()(missing)
    assert "rec-7" in str(info.value) and str(tmp_path / "gone.png") in str(info.value)
    with pytest.raises(RuntimeError) as wrapped:
        Compose([LoadRecordd()])(missing)
    assert find_record_error(wrapped.value).record_id == "rec-7"


def test_skip_bad_records_is_deterministic_logged_and_bounded(tmp_path, capsys):
    folder = _images(tmp_path / "images")
    bad = folder / "a" / "5.png"
    _corrupt(bad)
    bad_id = _record_of(folder, bad)["id"]
    straight = run_pretraining(_config(folder, tmp_path / "straight", skip_bad_records=1), progress=False)
    errors = [json.loads(line) for line in (straight / "errors.jsonl").read_text().splitlines()]
    assert [e["id"] for e in errors] == [bad_id] and str(bad) not in (straight / "errors.jsonl").read_text()
    assert errors[0]["reason"].startswith("cannot decode image") and "5.png" not in errors[0]["reason"]
    state = load_checkpoint_file(list_checkpoints(straight)[-1][1])
    assert state["skipped_records"] == [bad_id]
    # stopped after 3 steps and resumed: the same replacement, the same parameters, no second log line
    run_pretraining(_config(folder, tmp_path / "stopped", skip_bad_records=1, stop_after=3), progress=False)
    run_pretraining(PretrainConfig(out=str(tmp_path / "stopped")), resume=True, progress=False)
    a = load_checkpoint_file(list_checkpoints(straight)[-1][1])["method"]
    b = load_checkpoint_file(list_checkpoints(tmp_path / "stopped")[-1][1])["method"]
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) <= 1e-6
    assert (tmp_path / "stopped" / "errors.jsonl").read_text() == (straight / "errors.jsonl").read_text()
    # a second bad record is one too many
    _corrupt(folder / "b" / "1.png")
    args = ["pretrain", "--data", str(folder), "--method", "simclr", "--arch", "resnet18", "--small-stem",
            "--widen-factor", "0.125", "--image-size", "32", "--batch-size", "8", "--iterations", "6",
            "--knn-every", "0", "--workers", "0", "--skip-bad-records", "1", "--method-options", json.dumps(OPTIONS),
            "--out", str(tmp_path / "two"), "--no-progress"]
    assert medssl_main(args) == 2
    err = _one_line_error(capsys)
    assert "more than 1 unreadable records" in err
    assert len((tmp_path / "two" / "errors.jsonl").read_text().splitlines()) == 2


HOLDER = """
import fcntl, json, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": os.getpid(), "host": "ward-7", "started": "2026-01-01T00:00:00+00:00"}).encode())
print("locked", flush=True)
time.sleep(60)
"""


def test_second_run_on_a_locked_folder_fails_naming_the_holder(images, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = ["pretrain", "--data", str(images), "--method", "simclr", "--out", str(out), "--no-progress"]
        assert medssl_main(args) == 2
        err = _one_line_error(capsys)
        assert "in use" in err and f"pid {holder.pid}" in err and "ward-7" in err
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written by the refused run
    finally:
        holder.kill()  # a killed holder leaves its .lock file behind, but flock died with it
        holder.wait()
    run_pretraining(_config(images, out, iterations=2), progress=False)
    assert list_checkpoints(out)[-1][0] == 2
    # released after an error too: the lock can be taken again at once
    with pytest.raises(MedsslError):
        run_pretraining(_config(images, out, iterations=2), progress=False)  # not empty
    with RunLock(out):
        fd = os.open(out / ".lock", os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(images, tmp_path, monkeypatch, capsys):
    """The kernel's own ENOSPC (/dev/full) through torch.save: one line naming the file, checkpoint 2 intact."""
    real_mkstemp = tempfile.mkstemp

    def full_disk_for_step_4(*args, **kwargs):
        if "checkpoint_00000004" in kwargs.get("prefix", ""):
            return os.open("/dev/full", os.O_WRONLY), str(Path(kwargs["dir"]) / ".never-created.tmp")
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", full_disk_for_step_4)
    out = tmp_path / "run"
    args = ["pretrain", "--data", str(images), "--method", "simclr", "--arch", "resnet18", "--small-stem",
            "--widen-factor", "0.125", "--image-size", "32", "--batch-size", "8", "--iterations", "4",
            "--checkpoint-every", "2", "--checkpoint-every-epochs", "0", "--knn-every", "0", "--workers", "0",
            "--method-options", json.dumps(OPTIONS), "--out", str(out), "--no-progress"]
    assert medssl_main(args) == 2
    err = _one_line_error(capsys)
    assert f"disk full writing {out / 'checkpoints' / 'checkpoint_00000004.pt'}" in err
    assert [it for it, _ in list_checkpoints(out)] == [2]
    assert load_checkpoint_file(list_checkpoints(out)[0][1])["iteration"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint_00000002.pt"]


def test_disk_full_at_fsync_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    atomic_write_json(target, {"old": 1})

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(MedsslError) as info:
        atomic_write_json(target, {"new": 2})
    assert str(info.value).startswith(f"disk full writing {target}") and "\n" not in str(info.value)
    assert json.loads(target.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def _torch_zip_with_pickle(path: Path, pickle_bytes: bytes) -> Path:
    """A torch zip checkpoint whose data.pkl is replaced by ``pickle_bytes``."""
    buffer = io.BytesIO()
    torch.save({"a": 1}, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = pickle_bytes if info.filename.endswith("data.pkl") else src.read(info.filename)
            dst.writestr(info, data)
    return path


#: ``{"x": bytearray(2**28)}``: 40 bytes asking for 256 MiB (bytearray is on torch's weights-only allow-list)
BYTEARRAY_BOMB = b"\x80\x02}q\x00X\x01\x00\x00\x00xq\x01cbuiltins\nbytearray\nq\x02J\x00\x00\x00\x10\x85q\x03Rq\x04s."


@pytest.mark.parametrize("loader", ["training", "weights"])
def test_memory_bomb_checkpoint_is_refused_before_allocating(tmp_path, loader):
    from medssl.weights import load_checkpoint

    bomb = _torch_zip_with_pickle(tmp_path / "bomb.pt", BYTEARRAY_BOMB)
    tracemalloc.start()
    try:
        with pytest.raises(MedsslError) as info:
            (load_checkpoint_file if loader == "training" else load_checkpoint)(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert message.startswith(str(bomb)) and "memory bomb" in message and "\n" not in message
    assert peak < 32 * 2**20  # the 256 MiB were never allocated


def test_declared_storages_beyond_the_file_and_pickled_array_bombs_are_refused(tmp_path):
    from medssl.weights.pickle_guard import check_torch_file
    from medssl.weights.safe_unpickle import safe_load_pickle

    shared = tmp_path / "views.pt"  # legitimate: one storage declared once per view of it
    w = torch.randn(200, 100)
    torch.save({"w": w, "rows": w[10:], "t": w.t(), "col": w[:, 3]}, shared, _use_new_zipfile_serialization=False)
    check_torch_file(shared)
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.arange(6.0)}, legacy, _use_new_zipfile_serialization=False)
    # the storage's persistent id (..., location 'cpu', BINPUT n, numel BININT1 6): declare 2**31 - 1 floats
    bombed, count = re.subn(rb"(X\x03\x00\x00\x00cpuq.)K\x06", lambda m: m.group(1) + b"J\xff\xff\xff\x7f",
                            legacy.read_bytes(), flags=re.DOTALL)
    assert count == 1
    legacy.write_bytes(bombed)
    with pytest.raises(MedsslError) as info:
        load_checkpoint_file(legacy)
    assert "declares" in str(info.value) and "memory bomb" in str(info.value)
    # a plain pickle asking numpy for an 8 TiB array
    pkl = tmp_path / "state.pkl"
    pkl.write_bytes(b"\x80\x02cnumpy\nndarray\nq\x00J\x00\x00\x10\x00J\x00\x00\x10\x00\x86q\x01\x85q\x02Rq\x03.")
    with pytest.raises(MedsslError) as info:
        safe_load_pickle(pkl)
    assert str(info.value).startswith(str(pkl)) and "memory bomb" in str(info.value)


def test_stale_temporaries_are_cleaned_at_start(stopped_run, tmp_path):
    from medssl.io import _host_tag

    run = _copy(stopped_run, tmp_path)
    stale = [run / ".config.json.abc123.tmp",
             run / "checkpoints" / f".checkpoint_00000004.pt.999999@{_host_tag()}.x.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    keep = run / "notes.tmp"  # not an atomic-write temporary
    keep.write_text("mine")
    run_pretraining(PretrainConfig(out=str(run), stop_after=4), resume=True, progress=False)
    assert not any(p.exists() for p in stale) and keep.exists()
    assert list_checkpoints(run)[-1][0] == 4


def test_atomic_write_removes_only_dead_writers_temporaries(tmp_path):
    from medssl.io import _host_tag

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    dead = tmp_path / f".out.json.{dead_pid}@{_host_tag()}.k2.tmp"
    alive = tmp_path / f".out.json.{os.getpid()}@{_host_tag()}.k3.tmp"
    other_host = tmp_path / f".out.json.{dead_pid}@elsewhere.k4.tmp"
    for path in (dead, alive, other_host):
        path.write_text("partial")
    atomic_write_json(tmp_path / "out.json", {"a": 1})
    assert not dead.exists() and alive.exists() and other_host.exists()


def test_python_resume_with_the_runs_own_config_changes_nothing(images, stopped_run, tmp_path):
    """A bundle re-run passes its whole config again: equal settings are not 'given', changed ones are refused."""
    run = _copy(stopped_run, tmp_path)
    with pytest.raises(MedsslError, match="--batch-size"):
        run_pretraining(_config(images, run, batch_size=4), resume=True, progress=False)
    run_pretraining(_config(images, run, stop_after=4), resume=True, progress=False)
    assert list_checkpoints(run)[-1][0] == 4
    resumes = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert resumes[-1]["applied"] == {"stop_after": 4}


def test_resume_of_a_run_from_an_init_checkpoint_needs_no_init_file(images, tmp_path):
    """Init from a medssl file with its SSL heads and Frobenius scaling; the init file is deleted before the
    resume, which rebuilds the layout and heads from the checkpoint and ends exactly like a straight run."""
    first = run_pretraining(_config(images, tmp_path / "first", iterations=2), progress=False)
    init = tmp_path / "init.safetensors"
    shutil.copy(first / "backbone.safetensors", init)
    p2x = {"init": str(init), "use_checkpoint_heads": True, "scale_frobenius": True}
    straight = run_pretraining(_config(images, tmp_path / "straight", **p2x), progress=False)
    stopped = tmp_path / "stopped"
    run_pretraining(_config(images, stopped, stop_after=3, **p2x), progress=False)
    init.unlink()
    run_pretraining(PretrainConfig(out=str(stopped)), resume=True, progress=False)
    a = load_checkpoint_file(list_checkpoints(straight)[-1][1])
    b = load_checkpoint_file(list_checkpoints(stopped)[-1][1])
    assert a["iteration"] == b["iteration"] == 6
    assert max((a["method"][k].double() - b["method"][k].double()).abs().max().item() for k in a["method"]) <= 1e-6
    record = json.loads(b["run"])
    assert record["backbone"]["heads"] == ["projector"] and record["init_sha256"] == json.loads(a["run"])["init_sha256"]
    from medssl.weights import load_checkpoint

    prov_a = load_checkpoint(straight / "backbone.safetensors").provenance
    prov_b = load_checkpoint(stopped / "backbone.safetensors").provenance
    assert prov_a["sha256"] == prov_b["sha256"] and prov_a["operations"] == prov_b["operations"]
