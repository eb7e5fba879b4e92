"""The package version: one number in pyproject.toml, read back through the installed metadata by
``medssl.__version__``, ``medssl --version`` and the bundles' ``required_packages_version``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import medssl
from medssl.bundles import MODALITIES, bundle_path

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_version() -> str:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    project = text.split("[project]", 1)[1].split("\n[", 1)[0]
    return re.search(r'^version\s*=\s*"([^"]+)"', project, re.MULTILINE).group(1)


def test_version_is_the_installed_metadata_and_pyproject():
    """``__version__`` is what importlib.metadata reports, which is pyproject's (a stale install fails here)."""
    assert medssl.__version__ == version("medssl") == _pyproject_version()
    assert re.fullmatch(r"\d+\.\d+\.\d+", medssl.__version__)


def test_cli_version_prints_the_package_version():
    out = subprocess.run([sys.executable, "-m", "medssl", "--version"], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == f"medssl {_pyproject_version()}"


def test_bundles_require_this_version():
    for modality in MODALITIES:
        meta = json.loads((bundle_path(modality) / "configs" / "metadata.json").read_text(encoding="utf-8"))
        assert meta["required_packages_version"] == {"medssl": _pyproject_version()}, modality
