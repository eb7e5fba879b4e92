"""Prepared store (issue 13): an interrupted ``prepare`` resumed equals an uninterrupted one byte for byte; a
rerun decodes only new or changed records (counter); 4 DataLoader workers and 2 gloo ranks read consistent data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.io import imsave

import medssl.data.store.prepare as prepare_module
from medssl.data.manifest import read_manifest, write_manifest
from medssl.data.readers.load import LoadRecordd
from medssl.data.store import load_index, prepare_store, read_store_array, validate_store
from medssl.data.store.layout import checksum

MAX_PX = 24
SHARD_MB = 0.004  # 4 kB: the 20 small images span several shards


def _images(folder: Path, count: int = 20) -> list[dict]:
    """PNGs of varied sizes (some larger than MAX_PX, so resized), gray and RGB, 8 and 16 bit, plus a broken one."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count - 1):
        shape = (10 + 3 * i, 40 - i) + ((3,) if i % 3 == 0 else ())
        pixels = rng.integers(0, 256, shape, dtype=np.uint8) if i % 4 else rng.integers(0, 65536, shape[:2],
                                                                                          dtype=np.uint16)
        imsave(folder / f"im{i:02d}.png", pixels, check_contrast=False)
        records.append({"id": f"im{i:02d}", "image": str(folder / f"im{i:02d}.png"), "source": "image",
                        "label": "ab"[i % 2], "split": "train"})
    (folder / "broken.png").write_bytes(b"not a png")
    records.append({"id": "broken", "image": str(folder / "broken.png"), "source": "image", "label": "a",
                    "split": "train"})
    return records


def _tree(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p.name != ".prepare.lock"}


class _Stop(Exception):
    pass


def test_interrupted_prepare_resumed_equals_uninterrupted(tmp_path):
    records = _images(tmp_path / "src")
    write_manifest(tmp_path / "m.jsonl", records)
    full = prepare_store(tmp_path / "m.jsonl", tmp_path / "full", max_size_px=MAX_PX, workers=2,
                         shard_size_mb=SHARD_MB, progress=False)
    assert full["prepared"] == 20 and full["failed"] == 1 and full["shards"] >= 3

    def stop_after_13(done: int) -> None:
        if done == 13:
            raise _Stop

    with pytest.raises(_Stop):
        prepare_store(tmp_path / "m.jsonl", tmp_path / "cut", max_size_px=MAX_PX, workers=1,
                      shard_size_mb=SHARD_MB, progress=False, commit_every_records=3, on_record=stop_after_13)
    assert (tmp_path / "cut" / ".journal.jsonl").is_file() and not (tmp_path / "cut" / "index.json").exists()
    resumed = prepare_store(tmp_path / "m.jsonl", tmp_path / "cut", max_size_px=MAX_PX, workers=1,
                            shard_size_mb=SHARD_MB, progress=False)
    assert 9 <= resumed["reused"] <= 13 and resumed["prepared"] == 20 - resumed["reused"]
    assert _tree(tmp_path / "cut") == _tree(tmp_path / "full")
    assert validate_store(tmp_path / "cut") == []
    errors = (tmp_path / "cut" / "errors.jsonl").read_text().splitlines()
    assert [json.loads(e)["id"] for e in errors] == ["broken"]


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from medssl.data.store import prepare_store
    def kill(done):
        if done == 11:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: as a power cut or the OOM killer
    prepare_store(sys.argv[1], sys.argv[2], max_size_px=int(sys.argv[3]), workers=1, shard_size_mb=float(sys.argv[4]),
                  progress=False, commit_every_records=4, on_record=kill)
""")


def test_killed_prepare_resumed_equals_uninterrupted(tmp_path):
    write_manifest(tmp_path / "m.jsonl", _images(tmp_path / "src"))
    prepare_store(tmp_path / "m.jsonl", tmp_path / "full", max_size_px=MAX_PX, workers=1, shard_size_mb=SHARD_MB,
                  progress=False)
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "m.jsonl"), str(tmp_path / "cut"),
                           str(MAX_PX), str(SHARD_MB)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    journal = (tmp_path / "cut" / ".journal.jsonl").read_text().splitlines()
    # commits every 4 records and at each new shard: the last records written were not journaled yet
    assert 4 <= len(journal) < 11
    resumed = prepare_store(tmp_path / "m.jsonl", tmp_path / "cut", max_size_px=MAX_PX, workers=1,
                            shard_size_mb=SHARD_MB, progress=False)
    assert resumed["reused"] == len(journal) and resumed["prepared"] == 20 - len(journal)
    assert _tree(tmp_path / "cut") == _tree(tmp_path / "full")


def test_rerun_prepares_only_new_and_changed_records(tmp_path, monkeypatch):
    records = _images(tmp_path / "src", count=8)
    write_manifest(tmp_path / "m.jsonl", records)
    prepare_store(tmp_path / "m.jsonl", tmp_path / "s", max_size_px=MAX_PX, workers=1, progress=False)
    decoded: list[str] = []
    real = prepare_module._decode
    monkeypatch.setattr(prepare_module, "_decode", lambda r, m: decoded.append(r["id"]) or real(r, m))

    again = prepare_store(tmp_path / "m.jsonl", tmp_path / "s", max_size_px=MAX_PX, workers=1, progress=False)
    assert decoded == [] and again["reused"] == 8  # nothing changed: nothing decoded (the broken one neither)

    changed = tmp_path / "src" / "im01.png"
    new_pixels = np.full((12, 9), 200, np.uint8)
    imsave(changed, new_pixels, check_contrast=False)
    stamp = changed.stat().st_mtime_ns + 5 * 10**9
    os.utime(changed, ns=(stamp, stamp))
    imsave(tmp_path / "src" / "new.png", np.full((5, 6), 3, np.uint8), check_contrast=False)
    kept = [r for r in records if r["id"] != "im05"]
    kept.append({"id": "new", "image": str(tmp_path / "src" / "new.png"), "source": "image", "label": "b",
                 "split": "train"})
    write_manifest(tmp_path / "m.jsonl", kept)
    summary = prepare_store(tmp_path / "m.jsonl", tmp_path / "s", max_size_px=MAX_PX, workers=1, progress=False)
    assert sorted(decoded) == ["im01", "new"]
    assert (summary["prepared"], summary["reused"], summary["removed"]) == (2, 6, 1)
    assert summary["stale_bytes"] > 0 and validate_store(tmp_path / "s") == []
    prepared = {r["id"]: r for r in read_manifest(tmp_path / "s" / "manifest.jsonl")}
    assert "im05" not in prepared
    np.testing.assert_array_equal(read_store_array(prepared["im01"])[0][0], new_pixels)
    np.testing.assert_array_equal(read_store_array(prepared["new"])[0][0], np.full((5, 6), 3, np.uint8))

    decoded.clear()  # another longer side changes every key: everything is decoded again
    prepare_store(tmp_path / "m.jsonl", tmp_path / "s", max_size_px=MAX_PX + 4, workers=1, progress=False)
    assert len(decoded) == 8


class _StoreDataset(torch.utils.data.Dataset):
    def __init__(self, records: list[dict]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, str, torch.Tensor]:
        out = LoadRecordd()(self.records[i])
        return i, checksum(read_store_array(self.records[i])[0]), torch.as_tensor(out["image"])


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_four_loader_workers_read_the_indexed_bytes(tmp_path):
    write_manifest(tmp_path / "m.jsonl", _images(tmp_path / "src"))
    prepare_store(tmp_path / "m.jsonl", tmp_path / "s", max_size_px=MAX_PX, workers=1, shard_size_mb=SHARD_MB,
                  progress=False)
    records = read_manifest(tmp_path / "s" / "manifest.jsonl")
    sha = {e["id"]: e["sha256"] for e in load_index(tmp_path / "s")["records"]}
    loader = torch.utils.data.DataLoader(_StoreDataset(records), batch_size=None, num_workers=4, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    seen = set()
    for i, digest, image in loader:
        record = records[int(i)]
        assert digest == sha[record["id"]]
        codes = read_store_array(record)[0]  # this process's own map of the shard
        assert torch.equal(image, torch.as_tensor(codes.astype(np.float32)))
        seen.add(record["id"])
    assert seen == set(sha) and len(seen) == 19


RANKS_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    from medssl.data.manifest import read_manifest
    from medssl.data.readers.load import LoadRecordd
    from medssl.data.store import read_store_array
    from medssl.data.store.layout import checksum
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    records = read_manifest(sys.argv[1])
    order = records if rank == 0 else records[::-1]  # both ranks read every record, in opposite orders
    mine = {}
    for _ in range(3):
        for r in order:
            codes, rng = read_store_array(r)
            image = LoadRecordd()(r)["image"]
            assert (image == codes).all() and rng[0] == 0
            mine[r["id"]] = checksum(codes)
    gathered = [None, None]
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        open(sys.argv[2], "w").write(json.dumps(gathered))
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_two_gloo_ranks_read_the_same_indexed_bytes(tmp_path):
    write_manifest(tmp_path / "m.jsonl", _images(tmp_path / "src"))
    prepare_store(tmp_path / "m.jsonl", tmp_path / "s", max_size_px=MAX_PX, workers=1, shard_size_mb=SHARD_MB,
                  progress=False)
    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path / "s" / "manifest.jsonl"), str(tmp_path / "out.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sha = {e["id"]: e["sha256"] for e in load_index(tmp_path / "s")["records"]}
    first, second = json.loads((tmp_path / "out.json").read_text())
    assert first == second == sha
