"""medssl: second-stage self-supervised pretraining for medical imaging.

``__version__`` is the installed distribution's version (``importlib.metadata``, i.e. ``pyproject.toml``'s
``version`` at install time), or ``"0+unknown"`` when the package runs from a source tree that was never
installed.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _distribution_version

try:
    __version__: str = _distribution_version("medssl")
except PackageNotFoundError:  # a source tree on sys.path without an install: no metadata to read
    __version__ = "0+unknown"
