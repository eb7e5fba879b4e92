"""Adapters that turn published public-dataset layouts into medssl manifest records.

``ADAPTERS`` maps a dataset name to an :class:`Adapter`; :func:`build_manifest` runs one and returns the
records (see ``data_manifests/adapters.md`` for each layout). Records follow docs/architecture.md: absolute
``image`` paths, pseudonymised grouping ids, ``split`` from the official split where the dataset has one.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medssl.data.adapters._common import AdapterContext
from medssl.data.adapters.brain_tumor_mri import adapt_brain_tumor_mri
from medssl.data.adapters.busi import adapt_busi
from medssl.data.adapters.chestxray8 import adapt_chestxray8
from medssl.data.adapters.covid_radiography import adapt_covid_radiography
from medssl.data.adapters.generic import adapt_csv, adapt_folder
from medssl.data.adapters.grouped_split import assign_splits, parse_ratios
from medssl.data.adapters.ham10000 import adapt_ham10000
from medssl.data.adapters.medmnist import adapt_medmnist
from medssl.data.adapters.nct_crc import adapt_nct_crc
from medssl.data.adapters.pcam import adapt_pcam
from medssl.data.manifest import normalize_labels
from medssl.errors import MedsslError

__all__ = ["ADAPTERS", "Adapter", "AdapterContext", "assign_splits", "build_manifest", "parse_ratios"]


@dataclass(frozen=True)
class Adapter:
    """One dataset layout: ``func(root, ctx, **options) -> records`` and a one-line description."""

    name: str
    func: Callable[..., list[dict[str, Any]]]
    description: str


ADAPTERS: dict[str, Adapter] = {
    a.name: a
    for a in (
        Adapter("ham10000", adapt_ham10000, "HAM10000 dermatoscopy: HAM10000_metadata.csv + image folders"),
        Adapter("busi", adapt_busi, "BUSI breast ultrasound: benign/malignant/normal folders, masks excluded"),
        Adapter("chestxray8", adapt_chestxray8, "NIH ChestX-ray8/14: Data_Entry_2017(_v2020).csv + images*/"),
        Adapter("covid-radiography", adapt_covid_radiography,
                "COVID-19 Radiography Database: COVID/Normal/Lung_Opacity/Viral Pneumonia/images"),
        Adapter("brain-tumor-mri", adapt_brain_tumor_mri, "Brain Tumor MRI (Kaggle): Training/ and Testing/"),
        Adapter("pcam", adapt_pcam, "PatchCamelyon: camelyonpatch_level_2_split_*_{x,y}.h5"),
        Adapter("nct-crc-he", adapt_nct_crc, "NCT-CRC-HE-100K / CRC-VAL-HE-7K tissue-class folders"),
        Adapter("medmnist", adapt_medmnist, "MedMNIST .npz: {train,val,test}_{images,labels}"),
        Adapter("folder", adapt_folder, "generic: one folder per class (optionally under train/val/test)"),
        Adapter("csv", adapt_csv, "generic: CSV with file/label/group columns + image folder"),
    )
}


def build_manifest(
    name: str,
    root: str | os.PathLike[str],
    *,
    deid: Any = None,
    split_ratios: Mapping[str, float] | str | None = None,
    seed: int = 0,
    probe_images: bool = True,
    on_missing: str = "error",
    **options: Any,
) -> list[dict[str, Any]]:
    """Manifest records of dataset ``name`` laid out under ``root``.

    Args:
        name: a key of :data:`ADAPTERS` (``ham10000``, ``busi``, ``chestxray8``, ``covid-radiography``,
            ``brain-tumor-mri``, ``pcam``, ``nct-crc-he``, ``medmnist``, ``folder``, ``csv``).
        root: dataset folder (for ``medmnist`` also the ``.npz`` file, for ``csv`` also the CSV file).
        deid: a :class:`medssl.data.deid.Pseudonymizer`; default ``Pseudonymizer.from_env()``, which raises
            MedsslError when ``MEDSSL_DEID_KEY`` is unset.
        split_ratios: e.g. ``{"train": .7, "val": .1, "test": .2}`` or ``"train=0.7,val=0.1,test=0.2"``:
            re-split the records without an official val/test split, grouped by lesion/patient and stratified
            by label (:func:`assign_splits`). Default None: official splits only.
        seed: seed of the ratio split.
        probe_images: read each image header for rows/columns/photometric (default True).
        on_missing: ``"error"`` (default) or ``"skip"`` for images listed in a table but absent.
        options: adapter-specific keyword options (``folder``: modality, preset; ``csv``: csv_path,
            image_column, label_column, group_column, group_kind, split_column, image_root, suffix, ...).

    Returns:
        list of record dicts (absolute ``image`` paths; labels NFC-normalised, two labels equal after NFC are
        an error; ``deidentified`` true when ``deid`` has a secret key of >= 128 bits), ready for
        ``medssl.data.manifest.write_manifest`` (which puts the paths in the private map).
    """
    adapter = ADAPTERS.get(name)
    if adapter is None:
        raise MedsslError(f"unknown dataset adapter {name!r}; available: {', '.join(ADAPTERS)}")
    if on_missing not in ("error", "skip"):
        raise MedsslError(f"on_missing must be 'error' or 'skip', not {on_missing!r}")
    root_path = Path(root).expanduser().resolve()
    if not root_path.exists():
        raise MedsslError("dataset root not found", root_path)
    if deid is None:
        from medssl.data.deid import Pseudonymizer

        deid = Pseudonymizer.from_env()
    ctx = AdapterContext(dataset=name, pseudonymizer=deid, probe_images=probe_images, on_missing=on_missing,
                         namespaced=name != "csv")
    try:
        inspect.signature(adapter.func).bind(root_path, ctx, **options)
    except TypeError as exc:
        raise MedsslError(f"bad options for adapter {name!r}: {exc}") from None
    records = adapter.func(root_path, ctx, **options)
    if not records:
        raise MedsslError(f"no images found for dataset {name!r}", root_path)
    normalize_labels(records, root_path)
    deidentified = bool(getattr(deid, "deidentified", False))
    for record in records:
        record["deidentified"] = deidentified
    if split_ratios is not None:
        ratios = parse_ratios(split_ratios) if isinstance(split_ratios, str) else dict(split_ratios)
        assign_splits(records, ratios, seed=seed)
    return records
