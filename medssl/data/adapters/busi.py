"""BUSI, Breast Ultrasound Images (Al-Dhabyani et al. 2020): 780 images of 600 women, 3 classes.

Original layout (the ``_mask.png`` / ``_mask_1.png`` segmentation masks are excluded and recorded in ``masks``)::

    ROOT/Dataset_BUSI_with_GT/benign/benign (1).png, benign (1)_mask.png, benign (4)_mask_1.png, ...
    ROOT/Dataset_BUSI_with_GT/malignant/...   ROOT/Dataset_BUSI_with_GT/normal/...

The redistributed resized variant (256x256 RGB copies) is ROOT/{benign,malignant,normal}/*.png without
masks; both are accepted. ``label`` = folder name; patients are not published (``patient_id`` null).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from medssl.data.adapters._common import AdapterContext, list_images, require_dir

CLASSES = ("benign", "malignant", "normal")
MASK = re.compile(r"_mask(_\d+)?$")


def adapt_busi(root: Path, ctx: AdapterContext) -> list[dict[str, Any]]:
    """Records of the BUSI images (masks excluded) under ``root`` or ``root/Dataset_BUSI_with_GT``."""
    base = root / "Dataset_BUSI_with_GT" if (root / "Dataset_BUSI_with_GT").is_dir() else root
    records = []
    for cls in CLASSES:
        folder = require_dir(base / cls, f"BUSI class folder '{cls}'")
        masks: dict[str, list[str]] = {}
        for mask in list_images(folder):
            if MASK.search(mask.stem):
                masks.setdefault(MASK.sub("", mask.stem), []).append(str(mask))
        for path in list_images(folder, exclude=MASK):
            extra = {"masks": masks[path.stem]} if path.stem in masks else {}
            records.append(ctx.record(path, key=f"{cls}/{path.name}", label=cls, modality="US",
                                      preset="ultrasound", **extra))
    return records
