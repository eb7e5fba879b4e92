"""HAM10000 (Tschandl et al. 2018): dermatoscopic images, 7 diagnoses, several images per lesion.

Layout (Harvard Dataverse / Kaggle)::

    ROOT/HAM10000_metadata.csv          lesion_id,image_id,dx,dx_type,age,sex,localization[,dataset]
    ROOT/HAM10000_images_part_1/ISIC_0024306.jpg
    ROOT/HAM10000_images_part_2/ISIC_0029306.jpg

``label`` = ``dx`` (akiec, bcc, bkl, df, mel, nv, vasc); ``lesion_id`` -> lesion pseudonym (images of one
lesion must stay in one split); the patient is not published (``patient_id`` null). Age and sex are not copied.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medssl.data.adapters._common import AdapterContext, first_existing, index_images, read_csv
from medssl.errors import MedsslError

METADATA_NAMES = ("HAM10000_metadata.csv", "HAM10000_metadata", "HAM10000_metadata.tab")
COLUMNS = ("lesion_id", "image_id", "dx")


def adapt_ham10000(root: Path, ctx: AdapterContext) -> list[dict[str, Any]]:
    """Records of every row of ``HAM10000_metadata.csv`` whose image is found anywhere under ``root``."""
    meta = first_existing(root, METADATA_NAMES, "HAM10000 metadata table")
    rows = read_csv(meta, COLUMNS)
    images = index_images(root, (".jpg", ".jpeg"))
    if rows and not images:
        raise MedsslError("no .jpg images found (expected HAM10000_images_part_1/ and _part_2/)", root)
    records = []
    for row in rows:
        image_id = row["image_id"]
        path = images.get(image_id)
        if path is None:
            ctx.missing(root / "HAM10000_images_part_1" / f"{image_id}.jpg", "image")
            continue
        extra = {k: row[k] for k in ("dx_type", "localization") if row.get(k)}
        if row.get("dataset"):
            extra["origin"] = row["dataset"]
        records.append(
            ctx.record(path, key=image_id, label=row["dx"], modality="XC", preset="dermatoscopy",
                       lesion=row["lesion_id"], **extra)
        )
    ctx.report_skipped()
    return records
