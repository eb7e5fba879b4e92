"""NCT-CRC-HE-100K and CRC-VAL-HE-7K (Kather et al. 2019): 224x224 H&E colorectal tissue tiles, 9 classes.

Layout (Zenodo 1214456)::

    ROOT/NCT-CRC-HE-100K/{ADI,BACK,DEB,LYM,MUC,MUS,NORM,STR,TUM}/ADI-AAAFLCLY.tif   (training set)
    ROOT/CRC-VAL-HE-7K/{ADI,...,TUM}/ADI-TCGA-AAICEQFN.tif                          (external test set)

ROOT may also be one of those folders itself (then ``split`` is null). With both present, NCT-CRC-HE-100K
(or NCT-CRC-HE-100K-NONORM) -> ``train`` and CRC-VAL-HE-7K -> ``test``, the split of the original paper.
``label`` = tissue class; patients/slides are not published per tile.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medssl.data.adapters._common import AdapterContext, list_images
from medssl.errors import MedsslError

CLASSES = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
SET_FOLDERS = (("NCT-CRC-HE-100K", "train"), ("NCT-CRC-HE-100K-NONORM", "train"), ("CRC-VAL-HE-7K", "test"))


def _class_records(base: Path, split: str | None, ctx: AdapterContext) -> list[dict[str, Any]]:
    present = [c for c in CLASSES if (base / c).is_dir()]
    if not present:
        raise MedsslError(f"no tissue class folders (expected {', '.join(CLASSES)})", base)
    records = []
    for cls in present:
        for path in list_images(base / cls):
            records.append(ctx.record(path, key=f"{base.name}/{cls}/{path.name}", label=cls, modality="SM",
                                      preset="histology", split=split))
    return records


def adapt_nct_crc(root: Path, ctx: AdapterContext) -> list[dict[str, Any]]:
    """Records of the tiles in ``root`` (a set folder, or a folder holding the 100K and/or 7K sets)."""
    sets = [(root / name, split) for name, split in SET_FOLDERS if (root / name).is_dir()]
    if (root / "NCT-CRC-HE-100K").is_dir():  # both colour variants present: keep the normalised one
        sets = [(base, split) for base, split in sets if base.name != "NCT-CRC-HE-100K-NONORM"]
    if not sets:
        return _class_records(root, None, ctx)
    records = []
    for base, split in sets:
        records.extend(_class_records(base, split, ctx))
    return records
