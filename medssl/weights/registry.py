"""Registry of official checkpoint downloads, a cache folder, and :func:`fetch`.

The entries live in ``official_weights.json`` beside this module: URL, format, architecture and the SHA-256
where it could be verified from the official pages. torchvision file names carry the first 8 hex digits of the
file's SHA-256 (``sha256_prefix``, the check torch.hub does). Entries without a known checksum are downloaded
without verification (and say so in the log) rather than checked against an invented value.

Cache folder: ``$MEDSSL_CACHE`` or ``~/.cache/medssl``. Offline (``MEDSSL_OFFLINE=1`` or no network), a missing
file raises :class:`medssl.errors.OfflineError` naming the file, where it can be downloaded and where to put it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from medssl.errors import MedsslError, OfflineError
from medssl.io import atomic_open

logger = logging.getLogger("medssl.weights.registry")
_DATA = Path(__file__).with_name("official_weights.json")


@dataclass(frozen=True)
class WeightsEntry:
    """One official checkpoint: ``name``, ``url``, ``filename``, ``format``, ``arch``, ``sha256`` (or None),
    ``sha256_prefix`` (or None), ``trust_required`` (the pickle needs ``--trust``), ``source`` (official page)."""

    name: str
    url: str
    filename: str
    format: str
    arch: str
    sha256: str | None = None
    sha256_prefix: str | None = None
    trust_required: bool = False
    source: str = ""


@lru_cache(maxsize=1)
def registry() -> dict[str, WeightsEntry]:
    """All registry entries by name."""
    raw = json.loads(_DATA.read_text(encoding="utf-8"))
    out = {}
    for name, e in raw.items():
        if name.startswith("_"):
            continue
        out[name] = WeightsEntry(name=name, url=e["url"], filename=Path(urlparse(e["url"]).path).name,
                                 format=e["format"], arch=e["arch"], sha256=e.get("sha256"),
                                 sha256_prefix=e.get("sha256_prefix"), trust_required=bool(e.get("trust_required")),
                                 source=e.get("source", ""))
    return out


def cache_dir() -> Path:
    """``$MEDSSL_CACHE`` or ``~/.cache/medssl`` (not created here)."""
    env = os.environ.get("MEDSSL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medssl"


def _checksum_problem(entry: WeightsEntry, digest: str) -> str | None:
    if entry.sha256 and digest != entry.sha256.lower():
        return f"SHA-256 {digest} does not match the registry's {entry.sha256}"
    if entry.sha256_prefix and not digest.startswith(entry.sha256_prefix.lower()):
        return f"SHA-256 {digest} does not start with {entry.sha256_prefix} (from the official file name)"
    return None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def fetch(name: str, *, directory: str | os.PathLike[str] | None = None, offline: bool | None = None,
          timeout: float = 60.0, entry: WeightsEntry | None = None) -> Path:
    """Return the local path of registry checkpoint ``name``, downloading it into the cache if needed.

    Args:
        name: registry name (see :func:`registry`).
        directory: cache folder (default :func:`cache_dir`).
        offline: never download (default: ``MEDSSL_OFFLINE=1`` in the environment).
        timeout: network timeout in seconds.
        entry: use this entry instead of the registry's (tests, private mirrors).

    Raises:
        MedsslError: unknown name, or a checksum mismatch (the bad file is not kept).
        OfflineError: the file is not cached and cannot be downloaded; says which file to put where.
    """
    if entry is None:
        entries = registry()
        if name not in entries:
            raise MedsslError(f"unknown registry entry {name!r}; known: {', '.join(sorted(entries))}")
        entry = entries[name]
    folder = Path(directory) if directory is not None else cache_dir()
    dest = folder / entry.filename
    if dest.is_file():
        problem = _checksum_problem(entry, _file_sha256(dest)) if (entry.sha256 or entry.sha256_prefix) else None
        if problem:
            raise MedsslError(f"cached file is corrupt or not the official one ({problem}); delete it and retry",
                              dest)
        return dest
    how = (f"download {entry.url} (official page {entry.source}) on a machine with network access and put it "
           f"at {dest}, or set MEDSSL_CACHE to the folder that holds {entry.filename}")
    if offline if offline is not None else os.environ.get("MEDSSL_OFFLINE") == "1":
        raise OfflineError(f"offline and {entry.filename} is not cached: {how}", dest)
    logger.info("downloading %s from %s", entry.filename, entry.url)
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(entry.url, timeout=timeout) as response, atomic_open(dest, "wb") as out:
            while block := response.read(1 << 20):
                digest.update(block)
                out.write(block)
            problem = _checksum_problem(entry, digest.hexdigest())
            if problem:
                raise MedsslError(f"download of {entry.url} failed verification ({problem}); nothing was kept",
                                  dest)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise OfflineError(f"cannot download {entry.filename} ({getattr(exc, 'reason', exc)}): {how}",
                           dest) from exc
    if not (entry.sha256 or entry.sha256_prefix):
        logger.warning("%s has no verified checksum in the registry; SHA-256 of the download: %s",
                       entry.filename, digest.hexdigest())
    return dest


def resolve(path_or_name: str | os.PathLike[str]) -> Path:
    """An existing file path as is; otherwise a registry name is fetched (cache or download); otherwise the
    path is returned unchanged so that the reader reports it as missing."""
    path = Path(path_or_name)
    if path.exists() or str(path_or_name) not in registry():
        return path
    return fetch(str(path_or_name))


def resolve_weights(value: str | os.PathLike[str], *, what: str) -> str:
    """``"random"``, an existing checkpoint file, or a registry name (fetched into the cache) -> what to load.

    Args:
        value: the weights a user named (a bundle's ``init`` or ``backbone``).
        what: the setting's name, for the error message.

    Raises:
        MedsslError: neither a file nor a registry name (one line naming the path and the choices);
            :class:`~medssl.errors.OfflineError` when a registry file cannot be downloaded.
    """
    if str(value) == "random":
        return "random"
    if Path(value).is_file():
        return str(value)
    if str(value) in registry():
        return str(fetch(str(value)))
    raise MedsslError(f"{what}: no such checkpoint file; give a checkpoint file, a weights registry name "
                      f"(e.g. {', '.join(sorted(registry())[:3])}, ...) or random", value)
