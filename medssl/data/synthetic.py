"""A deterministic synthetic dataset for the built-in demo and smoke tests (downloads nothing).

The images are SYNTHETIC, ultrasound-like 8-bit grayscale textures, and every report built on them says so.
Three classes mimic the BUSI layout: ``normal`` (speckled tissue only), ``benign`` (a dark oval lesion with a
smooth margin) and ``malignant`` (a dark lesion with an irregular, spiculated margin). A second, unlabelled
"source" domain with different texture statistics stands in for a large public pretraining set in the demo's
first stage. Everything is a pure function of the seed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from medssl.io import atomic_open, atomic_write_bytes

CLASSES = ("normal", "benign", "malignant")


def _tissue(rng: np.random.Generator, size: int, smooth: float, speckle: float) -> np.ndarray:
    """Background tissue: a smooth random field times Rayleigh speckle, values roughly in [0, 1]."""
    field = gaussian_filter(rng.standard_normal((size, size)), sigma=size / 8) * 4.0
    layers = np.linspace(0, 1, size)[:, None] * rng.uniform(-0.3, 0.3)
    base = 0.45 + 0.12 * field + layers
    speck = rng.rayleigh(scale=speckle, size=(size, size))
    return gaussian_filter(base * speck, sigma=smooth)


def _lesion_mask(rng: np.random.Generator, size: int, irregular: bool) -> np.ndarray:
    """Soft mask (0..1) of one lesion: smooth oval (benign) or spiculated star-like outline (malignant)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cy, cx = rng.uniform(0.35, 0.65, size=2) * size
    r0 = rng.uniform(0.14, 0.24) * size
    theta = np.arctan2(yy - cy, xx - cx)
    dist = np.hypot(yy - cy, xx - cx)
    aspect = rng.uniform(0.6, 1.0)
    radius = r0 * (1 + (aspect - 1) * np.cos(theta - rng.uniform(0, np.pi)) ** 2)
    if irregular:
        for k in rng.choice(np.arange(5, 13), size=3, replace=False):
            radius = radius * (1 + rng.uniform(0.12, 0.25) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)))
    edge = 0.6 if not irregular else 1.6
    return 1.0 / (1.0 + np.exp((dist - radius) / edge))


def synthetic_image(label: str, seed: int, size: int = 64, domain: str = "target") -> np.ndarray:
    """One synthetic image, uint8 (size, size).

    Args:
        label: one of :data:`CLASSES` (ignored shape-wise for ``domain="source"``, which draws any class).
        seed: integer seed; the image is a pure function of (label, seed, size, domain).
        size: side length in pixels. Default 64.
        domain: ``"target"`` (the demo's hospital data) or ``"source"`` (coarser texture, other contrast).
    """
    if label not in CLASSES:
        raise ValueError(f"label must be one of {CLASSES}, not {label!r}")
    digest = hashlib.sha256(f"{domain}:{label}:{seed}:{size}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    smooth, speckle = (0.8, 0.7) if domain == "target" else (1.6, 0.9)
    img = _tissue(rng, size, smooth, speckle)
    if label != "normal":
        mask = _lesion_mask(rng, size, irregular=label == "malignant")
        interior = rng.uniform(0.08, 0.2)
        img = img * (1 - mask) + interior * mask * rng.rayleigh(0.8, size=(size, size))
        if label == "benign":  # posterior acoustic enhancement below a benign cyst-like lesion
            ys = np.argmax(mask > 0.5, axis=0)
            shadow = np.zeros_like(img)
            for x in np.nonzero(mask.max(axis=0) > 0.5)[0]:
                shadow[ys[x]:, x] = 0.12
            img = img + gaussian_filter(shadow, 1.5) * (1 - mask)
    if domain == "source":
        img = 1.0 - 0.8 * img
    return np.clip(img * 255.0, 0, 255).astype(np.uint8)


def _png_bytes(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def write_synthetic_dataset(
    root: str | Path,
    *,
    per_class: int = 60,
    size: int = 64,
    domain: str = "target",
    seed: int = 0,
    ratios: tuple[float, float, float] = (0.6, 0.2, 0.2),
) -> Path:
    """Write PNGs in one folder per class plus ``manifest.jsonl`` with a stratified train/val/test split.

    Args:
        root: output folder (created).
        per_class: images per class. Default 60.
        size: image side in pixels. Default 64.
        domain: ``"target"`` or ``"source"`` (see :func:`synthetic_image`).
        seed: dataset seed.
        ratios: train/val/test fractions per class.

    Returns:
        Path of the manifest (records follow ``data_manifests/manifest.schema.json``; every image is its
        own "patient" since synthetic images share no subject).
    """
    root = Path(root)
    records = []
    for label in CLASSES:
        n_train = int(round(ratios[0] * per_class))
        n_val = int(round(ratios[1] * per_class))
        for i in range(per_class):
            rel = f"{label}/{domain}_{label}_{i:04d}.png"
            path = root / rel
            if not path.exists():
                atomic_write_bytes(path, _png_bytes(synthetic_image(label, seed * 100003 + i, size, domain)))
            split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
            rid = hashlib.sha256(f"synthetic:{domain}:{rel}:{seed}".encode()).hexdigest()[:16]
            records.append({
                "id": f"syn-{rid}", "image": rel, "frame": None, "slice": None, "axis": None,
                "label": label, "patient_id": f"syn-pat-{rid}", "study_id": None, "series_id": None,
                "lesion_id": None, "modality": "US", "photometric": "MONOCHROME2", "rows": size,
                "columns": size, "split": split, "source": "image", "burned_in": False,
                "synthetic": True,
            })
    manifest = root / "manifest.jsonl"
    with atomic_open(manifest, "w") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
    return manifest
