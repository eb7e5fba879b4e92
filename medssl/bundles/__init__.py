"""The five MONAI bundles shipped inside the package, and the Python pieces their configs build.

``medssl/bundles/<modality>/`` (``histology``, ``xray``, ``mri``, ``ultrasound``, ``dermatoscopy``) are
standard MONAI model-zoo bundles (``configs/train.yaml``, ``evaluate.yaml``, ``inference.yaml``,
``multi_gpu_train.yaml``, ``logging.conf``, ``metadata.json``, ``meta_schema.json``, ``docs/README.md``,
``LICENSE``). They ship as package data, so a plain ``pip install medssl`` has them;
``medssl bundle init MODALITY DIR`` (:func:`init_bundle`) writes one to a folder.

The configs build their components with the library's builders, the same ones ``medssl pretrain`` and
``medssl evaluate`` use (:mod:`medssl.engines.components`, :mod:`medssl.engines.run_handlers`,
:class:`medssl.engines.run_folder.RunFolder`, :func:`medssl.evaluation.components.evaluate_backbone`). Modules
here hold only what the MONAI conventions add: :mod:`medssl.bundles.pretraining` (the SSL method with its run
schedule; the trainer with MONAI's arguments), :mod:`medssl.bundles.transforms` (deterministic resize/crop, the
per-view copies of the view augmentation, the text of a pipeline), :mod:`medssl.bundles.inference` (features of
a folder of images written to ``output_dir``).
"""

from __future__ import annotations

import os
import shutil
from importlib import resources
from pathlib import Path

from medssl.errors import MedsslError

#: the bundles shipped with the package (folder names under ``medssl/bundles``)
MODALITIES: tuple[str, ...] = ("histology", "xray", "mri", "ultrasound", "dermatoscopy")


def bundle_path(modality: str) -> Path:
    """Folder of the installed bundle ``modality`` (inside the package).

    Raises:
        MedsslError: unknown modality (names the choices).
    """
    if modality not in MODALITIES:
        raise MedsslError(f"unknown bundle {modality!r}; choose one of {', '.join(MODALITIES)}")
    return Path(str(resources.files("medssl.bundles").joinpath(modality)))


def init_bundle(modality: str, dest: str | os.PathLike[str]) -> Path:
    """Copy the installed bundle ``modality`` to ``dest`` (created; it must be absent or empty).

    The copy is written into a temporary sibling folder and renamed into place, so ``dest`` never holds half a
    bundle. Only the bundle's files are copied (``configs/``, ``docs/``, ``LICENSE``); no data, runs or models.

    Returns:
        ``dest``.

    Raises:
        MedsslError: unknown modality, or ``dest`` exists and is not an empty folder.
    """
    source = bundle_path(modality)
    out = Path(dest)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MedsslError("destination exists and is not an empty folder", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "runs", "models", "data"))
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out
