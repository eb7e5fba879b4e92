"""Brain Tumor MRI Dataset (Nickparvar 2021, Kaggle): 7,023 axial MRI slices, 4 classes, fixed train/test.

Layout::

    ROOT/Training/{glioma,meningioma,notumor,pituitary}/Tr-gl_0010.jpg
    ROOT/Testing/{glioma,meningioma,notumor,pituitary}/Te-gl_0010.jpg

``label`` = class folder; ``Training`` -> split ``train``, ``Testing`` -> ``test``. Patients are not published
(the dataset merges figshare, SARTAJ and Br35H; several slices may come from one patient).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from medssl.data.adapters._common import AdapterContext, list_images, require_dir, subfolders
from medssl.errors import MedsslError

logger = logging.getLogger("medssl.data.adapters")

CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
SPLIT_FOLDERS = (("Training", "train"), ("Testing", "test"))


def adapt_brain_tumor_mri(root: Path, ctx: AdapterContext) -> list[dict[str, Any]]:
    """Records of ``Training/`` (train) and ``Testing/`` (test) class folders."""
    records = []
    for folder_name, split in SPLIT_FOLDERS:
        split_dir = require_dir(root / folder_name, f"Brain Tumor MRI '{folder_name}' folder")
        classes = subfolders(split_dir)
        if not classes:
            raise MedsslError(f"no class folders (expected {', '.join(CLASSES)})", split_dir)
        for cls_dir in classes:
            if cls_dir.name not in CLASSES:
                logger.warning("%s: unexpected class folder, kept as label %r", cls_dir, cls_dir.name)
            for path in list_images(cls_dir):
                records.append(ctx.record(path, key=f"{folder_name}/{cls_dir.name}/{path.name}",
                                          label=cls_dir.name, modality="MR", preset="mri", split=split))
    return records
