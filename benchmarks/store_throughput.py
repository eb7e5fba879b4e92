"""Sources vs the prepared store vs a hand-written torch pipeline, and two epochs of pretraining from each.

Part of ``benchmarks/data_throughput.py`` (``--mode sources`` and ``--mode pretrain``); kept in its own module.

``sources``: for each source kind (chest CR in JPEG 2000 and uncompressed, pydicom-data ``RG1_J2KR`` /
``RG1_UNCR``; BUSI PNGs; slices of the T1 NIfTI volume), the per-sample SSL path (record -> 2 views of ``S`` px,
seeded per sample as in training, :class:`~medssl.engines.sampling.SeededSampleDataset`) from the source files
and from a store prepared from them (:func:`medssl.data.store.prepare_store`, default ``--max-size``), next to a
minimal hand-written torch pipeline on the same stored arrays (1-channel and 3-channel): crop box + antialiased
resize, horizontal flip, rotation of up to 10 degrees (p 0.5), brightness/contrast (p 0.8), Gaussian blur by a
separable ``conv2d`` (p 0.5), i.e. the x-ray preset's operations without any framework. Prints view-pairs/s per
core and the cores needed for 3,000 pairs/s.

``pretrain``: two epochs of ``medssl pretrain`` (SimCLR, tiny ResNet-18, one loader process) on 24 JPEG 2000 chest
radiographs, from the source manifest and from its prepared store, end to end (wall clock of
:func:`medssl.engines.run.run_pretraining`); the ratio is printed, with and without the one-off ``prepare`` time.
"""

from __future__ import annotations

import math
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

TARGET_PAIRS_PER_S = 3000.0


def dicom_file(name: str) -> str | None:
    from pydicom.data import get_testdata_file

    return get_testdata_file(name)


def source_sets(data: Path, n: int) -> dict[str, tuple[str, list[dict[str, Any]]]]:
    """``{label: (modality, records)}`` of the four source kinds (records of one set may share a file)."""
    sets: dict[str, tuple[str, list[dict[str, Any]]]] = {}
    for label, name, count in (("CR JPEG 2000", "RG1_J2KR.dcm", max(2, n // 8)), ("CR uncompressed", "RG1_UNCR.dcm",
                                                                                   max(2, n // 4))):
        path = dicom_file(name)
        if path is not None:
            sets[label] = ("xray", [{"id": f"{name}-{i}", "image": path, "source": "dicom"} for i in range(count)])
    pngs = sorted((data / "busi" / "benign").glob("*.png"))[:n]
    if pngs:
        sets["PNG (BUSI)"] = ("ultrasound", [{"id": f"busi-{i}", "image": str(p), "source": "image"}
                                             for i, p in enumerate(pngs)])
    t1 = data / "mri" / "T1.nii.gz"
    if t1.is_file():
        sets["NIfTI T1 slices"] = ("mri", [{"id": f"t1-{i}", "image": str(t1), "source": "nifti", "slice": 60 + i,
                                            "axis": 2} for i in range(n)])
    return sets


def prepare(records: list[dict[str, Any]], folder: Path, max_size_px: int | None = None) -> tuple[list[dict], float]:
    """Write ``records`` as a manifest, prepare its store in ``folder``; (store records, seconds)."""
    from medssl.data.manifest import read_manifest, write_manifest
    from medssl.data.store import DEFAULT_MAX_SIZE_PX, prepare_store

    folder.mkdir(parents=True, exist_ok=True)
    write_manifest(folder / "source.jsonl", records)
    start = time.perf_counter()
    prepare_store(folder / "source.jsonl", folder / "store", max_size_px=max_size_px or DEFAULT_MAX_SIZE_PX,
                  workers=1, progress=False)
    return read_manifest(folder / "store" / "manifest.jsonl"), time.perf_counter() - start


def per_sample_pairs_per_s(modality: str, records: list[dict[str, Any]], size: int, repeats: int) -> float:
    """Samples (2 views each) per second through the training per-sample path, fastest of ``repeats``."""
    from medssl.engines.sampling import SeededSampleDataset
    from medssl.transforms.presets import build_ssl_transform

    dataset = SeededSampleDataset(records, build_ssl_transform(modality, size), seed=0)
    dataset[(0, 0)]  # warm caches (volume arrays, imports)
    best = math.inf
    for epoch in range(repeats):
        start = time.perf_counter()
        for i in range(len(records)):
            dataset[(epoch, i)]
        best = min(best, time.perf_counter() - start)
    return len(records) / best


def _blur_conv(x: torch.Tensor, sigma: float) -> torch.Tensor:
    k = max(3, int(round(x.shape[-1] * 0.1)) | 1)
    taps = torch.arange(k, dtype=torch.float32) - (k - 1) / 2
    g = torch.exp(-(taps**2) / (2 * sigma**2))
    g = g / g.sum()
    c = x.shape[0]
    y = F.pad(x[None], (k // 2, k // 2, k // 2, k // 2), mode="reflect")
    y = F.conv2d(y, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(y, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)[0]


def handwritten_view(image: torch.Tensor, size: int, rng: random.Random) -> torch.Tensor:
    """One x-ray-preset view in plain torch (see the module docstring)."""
    h, w = image.shape[-2:]
    for _ in range(10):
        area = h * w * rng.uniform(0.2, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            break
    else:
        cw, ch = w, h
    top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
    x = F.interpolate(image[None, :, top:top + ch, left:left + cw], size=(size, size), mode="bilinear",
                      align_corners=False, antialias=True)[0]
    if rng.random() < 0.5:
        x = x.flip(-1)
    if rng.random() < 0.5:
        a = math.radians(rng.uniform(-10, 10))
        theta = torch.tensor([[[math.cos(a), math.sin(a), 0.0], [-math.sin(a), math.cos(a), 0.0]]])
        grid = F.affine_grid(theta, [1, x.shape[0], size, size], align_corners=False)
        x = F.grid_sample(x[None], grid, padding_mode="border", align_corners=False)[0]
    if rng.random() < 0.8:
        x = x * rng.uniform(0.6, 1.4)
        mean = x.mean()
        x = (x - mean) * rng.uniform(0.6, 1.4) + mean
    if rng.random() < 0.5:
        x = _blur_conv(x, rng.uniform(0.1, 2.0))
    return x.clamp_(0, 1)


def handwritten_pairs_per_s(store_records: list[dict[str, Any]], size: int, channels: int, repeats: int) -> float:
    """Samples per second of the hand-written pipeline on the stored arrays (read, scale, 2 views)."""
    from medssl.data.store import read_store_array

    def sample(record: dict[str, Any], rng: random.Random) -> list[torch.Tensor]:
        codes, (_, high) = read_store_array(record)
        image = torch.from_numpy(codes.astype("float32")).mul_(1.0 / high)
        if image.shape[0] == 3 and channels == 1:
            image = image[:1]
        if image.shape[0] == 1 and channels == 3:
            image = image.expand(3, *image.shape[1:]).contiguous()
        return [handwritten_view(image, size, rng) for _ in range(2)]

    rng = random.Random(0)
    sample(store_records[0], rng)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for record in store_records:
            sample(record, rng)
        best = min(best, time.perf_counter() - start)
    return len(store_records) / best


def run_sources(data: Path, size: int, records: int, repeats: int) -> list[dict[str, Any]]:
    """Print and return one row per source kind (pairs/s per core: source, store, hand-written 1/3 channels)."""
    rows = []
    print(f"view pairs/s per core (1 torch thread), 2 views of {size} px, best of {repeats}; "
          f"cores = {TARGET_PAIRS_PER_S:.0f} / pairs per s")
    print(f"{'source':<18}{'modality':<11}{'n':>4}{'source':>9}{'store':>9}{'hand 1ch':>10}{'hand 3ch':>10}"
          f"{'store/src':>11}{'store/hand1':>12}{'cores src':>10}{'cores store':>12}")
    with tempfile.TemporaryDirectory(prefix="medssl-bench-") as tmp:
        for i, (label, (modality, recs)) in enumerate(source_sets(data, records).items()):
            stored, _ = prepare(recs, Path(tmp) / f"set{i}")
            src_reps = 1 if "2000" in label else repeats
            src = per_sample_pairs_per_s(modality, recs, size, src_reps)
            store_recs = (stored * max(1, records // len(stored)))[:max(records, len(stored))]
            store = per_sample_pairs_per_s(modality, store_recs, size, repeats)
            hand1 = handwritten_pairs_per_s(store_recs, size, 1, repeats)
            hand3 = handwritten_pairs_per_s(store_recs, size, 3, repeats)
            row = {"source": label, "modality": modality, "n": len(recs), "source_pairs_s": src,
                   "store_pairs_s": store, "hand1_pairs_s": hand1, "hand3_pairs_s": hand3}
            rows.append(row)
            print(f"{label:<18}{modality:<11}{len(recs):>4}{src:>9.1f}{store:>9.1f}{hand1:>10.1f}{hand3:>10.1f}"
                  f"{store / src:>10.1f}x{store / hand1:>11.2f}x{TARGET_PAIRS_PER_S / src:>10.0f}"
                  f"{TARGET_PAIRS_PER_S / store:>12.1f}", flush=True)
    return rows


def run_pretrain(records: int = 24, image_size: int = 64, epochs: int = 2) -> dict[str, float]:
    """Two epochs of pretraining on ``records`` JPEG 2000 chest radiographs from the source manifest and from
    its prepared store (wall clock, one process, 1 torch thread); prints and returns the timings."""
    from medssl.engines.config import PretrainConfig
    from medssl.engines.run import run_pretraining

    names = [n for n in ("RG1_J2KR.dcm", "RG3_J2KR.dcm") if dicom_file(n)]
    if not names:
        raise SystemExit("pydicom-data's JPEG 2000 chest radiographs are not installed")
    with tempfile.TemporaryDirectory(prefix="medssl-bench-") as tmp:
        root = Path(tmp)
        (root / "files").mkdir()
        recs = []
        for i in range(records):  # distinct files, as an export would have
            target = root / "files" / f"cr{i:02d}.dcm"
            shutil.copyfile(dicom_file(names[i % len(names)]), target)
            recs.append({"id": f"cr{i:02d}", "image": str(target), "source": "dicom"})
        _, prepare_s = prepare(recs, root / "prep")
        timings = {"prepare_s": prepare_s}
        batch = 8
        for name, manifest in (("source", root / "prep" / "source.jsonl"),
                               ("store", root / "prep" / "store" / "manifest.jsonl")):
            config = PretrainConfig(data=str(manifest), out=str(root / f"run-{name}"), method="simclr",
                                    arch="resnet18", small_stem=True, widen_factor=0.25, modality="xray",
                                    image_size=image_size, batch_size=batch, iterations=epochs * (records // batch),
                                    workers=0, knn_every=0, checkpoint_every=0, checkpoint_every_epochs=0,
                                    method_options={"projector_hidden_dim": 32, "projector_out_dim": 16})
            start = time.perf_counter()
            run_pretraining(config, progress=False)
            timings[f"{name}_s"] = time.perf_counter() - start
    ratio = timings["source_s"] / timings["store_s"]
    with_prepare = timings["source_s"] / (timings["store_s"] + timings["prepare_s"])
    print(f"pretraining, {epochs} epochs x {records} JPEG 2000 CRs, SimCLR ResNet-18/0.25 at {image_size} px, "
          f"batch {batch}, 1 process, 1 torch thread")
    print(f"  source manifest {timings['source_s']:.1f} s | prepared manifest {timings['store_s']:.1f} s | "
          f"prepare (once, 1 worker) {timings['prepare_s']:.1f} s")
    print(f"  speed-up from the store: {ratio:.1f}x (including the one-off prepare: {with_prepare:.2f}x)", flush=True)
    return {**timings, "ratio": ratio, "ratio_with_prepare": with_prepare}
