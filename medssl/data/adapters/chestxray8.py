"""NIH ChestX-ray8 / ChestX-ray14 (Wang et al. 2017): 112,120 frontal radiographs of 30,805 patients.

Layout::

    ROOT/Data_Entry_2017_v2020.csv (or Data_Entry_2017.csv): Image Index, Finding Labels, Follow-up #,
        Patient ID, Patient Age, Patient Gender, View Position, OriginalImage[Width, Height], ...
    ROOT/images/00000001_000.png  or  ROOT/images_001/images/00000001_000.png ... images_012/
    ROOT/train_val_list.txt, ROOT/test_list.txt (optional official patient-wise split)

``label`` = the full ``Finding Labels`` string (e.g. ``Cardiomegaly|Effusion``), ``labels`` = its parts;
``Patient ID`` -> patient pseudonym, (Patient ID, Follow-up #) -> study pseudonym; ``view`` = View Position.
With the official lists, images in ``test_list.txt`` get split ``test`` and those in ``train_val_list.txt``
``train``. Age and gender are not copied. Note: the published file names begin with the zero-padded NIH
patient number; they stay in ``image`` because they are the file paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medssl.data.adapters._common import AdapterContext, first_existing, index_images, read_csv
from medssl.errors import MedsslError

CSV_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
COLUMNS = ("Image Index", "Finding Labels", "Patient ID")


def _read_list(path: Path) -> set[str]:
    return {line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}


def adapt_chestxray8(root: Path, ctx: AdapterContext) -> list[dict[str, Any]]:
    """Records of every row of the Data_Entry table whose PNG is found under ``root``."""
    table = first_existing(root, CSV_NAMES, "ChestX-ray8 Data_Entry table")
    rows = read_csv(table, COLUMNS)
    images = index_images(root, (".png",))
    if rows and not images:
        raise MedsslError("no .png images found (expected images/ or images_001/images/ ...)", root)
    test_list = root / "test_list.txt"
    train_list = root / "train_val_list.txt"
    official = test_list.is_file() and train_list.is_file()
    test_names = _read_list(test_list) if official else set()
    train_names = _read_list(train_list) if official else set()
    records = []
    for row in rows:
        name = row["Image Index"]
        path = images.get(Path(name).stem)
        if path is None:
            ctx.missing(root / "images" / name, "image")
            continue
        findings = row["Finding Labels"]
        split = "test" if name in test_names else "train" if name in train_names else None
        follow_up = row.get("Follow-up #")
        patient = row["Patient ID"]
        patient = str(int(patient)) if patient.isdigit() else patient  # "00001" and "1" are one patient
        extra: dict[str, Any] = {"labels": sorted(f.strip() for f in findings.split("|") if f.strip())}
        if row.get("View Position"):
            extra["view"] = row["View Position"]
        records.append(
            ctx.record(path, key=name, label=findings, modality="DX", preset="xray", split=split,
                       patient=patient, study=None if not follow_up else f"{patient}:{follow_up}", **extra)
        )
    ctx.report_skipped()
    return records
