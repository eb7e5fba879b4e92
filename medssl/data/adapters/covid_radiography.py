"""COVID-19 Radiography Database (Chowdhury et al. 2020; Rahman et al. 2021): chest radiographs, 4 classes.

Layout (Kaggle release 4 and later; the ``masks/`` folders and ``*.metadata.xlsx`` files are ignored)::

    ROOT/COVID-19_Radiography_Dataset/COVID/images/COVID-1.png
    ROOT/COVID-19_Radiography_Dataset/{Normal,Lung_Opacity,Viral Pneumonia}/images/*.png

Earlier releases keep the PNGs directly in the class folders (``COVID/``, ``NORMAL/``, ``Viral Pneumonia/``);
those are accepted too. ``label`` = class folder name as published; patients are not published.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medssl.data.adapters._common import AdapterContext, list_images, subfolders
from medssl.errors import MedsslError

CLASSES = ("COVID", "Normal", "Lung_Opacity", "Viral Pneumonia")
BASE_NAMES = ("COVID-19_Radiography_Dataset", "COVID-19 Radiography Database")


def adapt_covid_radiography(root: Path, ctx: AdapterContext) -> list[dict[str, Any]]:
    """Records of the radiographs in the class folders (``images/`` sub-folder when present)."""
    base = next((root / n for n in BASE_NAMES if (root / n).is_dir()), root)
    known = {c.lower(): c for c in CLASSES}
    folders = [f for f in subfolders(base) if f.name.lower() in known]
    if len(folders) < 2:
        raise MedsslError(f"expected class folders {', '.join(CLASSES)} (at least two of them)", base)
    records = []
    for folder in folders:
        images_dir = folder / "images" if (folder / "images").is_dir() else folder
        for path in list_images(images_dir):
            records.append(ctx.record(path, key=f"{folder.name}/{path.name}", label=folder.name,
                                      modality="DX", preset="xray"))
    return records
