"""Refuse "memory bomb" checkpoints before unpickling them.

A pickle is a tiny program: without running any code it can still ask the loader to allocate far more memory
than the file holds, e.g. a torch storage declared with 10^12 elements (torch allocates the declared size, then
reads the record), ``bytearray(10**12)`` or ``numpy.ndarray((10**6, 10**6))`` (both on the weights-only
allow-lists), a tensor of shape ``(10**12,)`` with stride 0 over a one-element storage (any later copy
allocates it), or a zip record that inflates to terabytes. :func:`check_torch_file` and :func:`check_pickle_bytes`
read the pickle's opcodes with :mod:`pickletools` (nothing is executed or built), follow the stack just far
enough to see constant arguments, and raise one :class:`~medssl.errors.MedsslError` line naming the file when a
declared size is not backed by the file:

- a zip checkpoint's storage ``data/<key>`` must hold at least ``numel * element_size`` bytes;
- a legacy (non-zip) torch file's declared storages must fit in the file;
- no zip member may inflate beyond the archive's own size (torch always stores members uncompressed);
- allocations not backed by file data (``bytearray``/``bytes``/``ndarray`` sizes, expanded tensor views) may
  not exceed ``UNBACKED_LIMIT_BYTES`` plus the file size.
"""

from __future__ import annotations

import io
import math
import os
import pickletools
import zipfile
from pathlib import Path
from typing import Any

from medssl.errors import MedsslError

#: largest allocation a pickle may request beyond the bytes it carries (64 MiB; real checkpoints need none)
UNBACKED_LIMIT_BYTES = 64 * 2**20
_ELEMENT_BYTES = {"Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2, "Char": 1,
                  "Byte": 1, "Bool": 1, "ComplexFloat": 8, "ComplexDouble": 16, "Untyped": 1}
_ALLOCATORS = {("builtins", "bytearray"), ("builtins", "bytes"), ("__builtin__", "bytearray"),
               ("numpy", "ndarray"), ("numpy", "empty"), ("numpy", "zeros"), ("numpy", "ones")}
_REBUILD_TENSOR = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor"),
                   ("torch._utils", "_rebuild_tensor_v3")}


class _Mark:
    pass


class _Global:
    def __init__(self, module: str, name: str) -> None:
        self.key = (module, name)


class _Storage:
    def __init__(self, key: str, numel: int, element_bytes: int) -> None:
        self.key, self.numel, self.element_bytes = key, numel, element_bytes


_MARK = _Mark()
_UNKNOWN = object()


def _storage_bytes(kind: Any) -> int:
    """Element size of a storage class global such as ``torch.FloatStorage`` (1 when unknown)."""
    if isinstance(kind, _Global):
        return _ELEMENT_BYTES.get(kind.key[1].removesuffix("Storage"), 1)
    return 1


def scan_pickle(stream: io.BufferedIOBase | io.BytesIO, path: Any, *,
                unbacked_limit: int) -> list[_Storage]:
    """Walk one pickle (up to its STOP) and return the storages it declares; raise on unbacked allocations."""
    stack: list[Any] = []
    memo: dict[Any, Any] = {}

    def pop_to_mark() -> list[Any]:
        items = []
        while stack and stack[-1] is not _MARK:
            items.append(stack.pop())
        if stack:
            stack.pop()
        return items[::-1]

    storages: list[_Storage] = []
    try:
        for op, arg, _pos in pickletools.genops(stream):
            name = op.name
            if name in ("PROTO", "FRAME", "STOP"):
                if name == "STOP":
                    break
                continue
            if name == "MARK":
                stack.append(_MARK)
            elif name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1] if stack else _UNKNOWN
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(arg, _UNKNOWN))
            elif name == "GLOBAL":
                module, _, attr = str(arg).partition(" ")
                stack.append(_Global(module, attr))
            elif name == "STACK_GLOBAL":
                attr, module = (stack.pop() if stack else ""), (stack.pop() if stack else "")
                stack.append(_Global(str(module), str(attr)))
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                items, stack[-n:] = tuple(stack[-n:]), []
                stack.append(items)
            elif name == "TUPLE":
                stack.append(tuple(pop_to_mark()))
            elif name == "BINPERSID":
                pid = stack.pop() if stack else None
                stack.append(_persistent(pid, storages))
            elif name in ("REDUCE", "NEWOBJ"):
                args = stack.pop() if stack else ()
                func = stack.pop() if stack else None
                stack.append(_check_call(func, args, path, unbacked_limit))
            elif op.arg is not None and not op.stack_before and len(op.stack_after) == 1:
                stack.append(arg)  # literal: ints, strings, bytes, floats
            else:
                for item in reversed(op.stack_before):
                    if item is pickletools.stackslice:
                        pop_to_mark()
                    elif item is pickletools.markobject:
                        continue  # popped with its slice
                    elif stack:
                        stack.pop()
                stack.extend(_UNKNOWN for _ in op.stack_after)
    except (ValueError, IndexError, TypeError):  # malformed or truncated opcodes: the loader reports them
        return storages
    return storages


def _persistent(pid: Any, storages: list[_Storage]) -> Any:
    if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[4], int):
        storage = _Storage(str(pid[2]), pid[4], _storage_bytes(pid[1]))
        storages.append(storage)
        return storage
    return _UNKNOWN


def _check_call(func: Any, args: Any, path: Any, limit: int) -> Any:
    if not isinstance(func, _Global) or not isinstance(args, tuple):
        return _UNKNOWN
    if func.key in _ALLOCATORS and args:
        size = args[0]
        count = size if isinstance(size, int) else _product(size)
        if count is not None and count * (8 if func.key[0] == "numpy" else 1) > limit:
            raise MedsslError(f"refusing to load: the pickle asks {func.key[0]}.{func.key[1]} for "
                              f"{count:,} elements, far more than the file holds (memory bomb?)", path)
    if func.key in _REBUILD_TENSOR and len(args) >= 3 and isinstance(args[0], _Storage):
        numel = _product(args[2])
        storage = args[0]
        if numel is not None and numel > storage.numel and numel * storage.element_bytes > limit:
            raise MedsslError(f"refusing to load: a tensor of shape {tuple(args[2])} is declared over a storage "
                              f"of {storage.numel:,} elements (memory bomb?)", path)
    return _UNKNOWN


def _product(shape: Any) -> int | None:
    if isinstance(shape, tuple) and all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        return math.prod(shape)
    return None


def check_pickle_bytes(data: bytes, path: Any) -> None:
    """Raise :class:`MedsslError` when the pickle in ``data`` requests allocations its bytes do not back."""
    scan_pickle(io.BytesIO(data), path, unbacked_limit=UNBACKED_LIMIT_BYTES + len(data))


def check_torch_file(path: str | os.PathLike[str]) -> None:
    """Check a ``torch.save`` file (zip or legacy) for declared sizes the file does not back (see module doc).

    Raises:
        MedsslError: the file names a storage, array or zip member larger than what it holds.
    """
    file = Path(path)
    try:
        size = file.stat().st_size
    except OSError:
        return  # the loader reports missing files
    limit = UNBACKED_LIMIT_BYTES + size
    if zipfile.is_zipfile(file):
        _check_zip(file, size, limit)
        return
    with open(file, "rb") as fh:
        per_key: dict[str, int] = {}  # a storage shared by several tensors is declared once per tensor
        for _ in range(5):  # legacy layout: magic, protocol, sys info, then the object pickle
            storages = scan_pickle(fh, path, unbacked_limit=limit)
            for s in storages:
                per_key[s.key] = max(per_key.get(s.key, 0), s.numel * s.element_bytes)
            if storages or fh.tell() >= size:
                break
        declared = sum(per_key.values())
        if declared > size:
            raise MedsslError(f"refusing to load: the file declares {declared:,} bytes of tensor storage but "
                              f"holds {size:,} bytes (memory bomb?)", path)


def _check_zip(file: Path, size: int, limit: int) -> None:
    try:
        with zipfile.ZipFile(file) as archive:
            members = {info.filename: info for info in archive.infolist()}
            for info in members.values():
                if info.file_size > size:
                    raise MedsslError(f"refusing to load: zip member {info.filename} inflates to "
                                      f"{info.file_size:,} bytes, more than the whole file (memory bomb?)", file)
            pickles = [n for n in members if n.endswith("data.pkl")]
            if not pickles:
                return
            data = archive.read(pickles[0])
    except (zipfile.BadZipFile, OSError, NotImplementedError):
        return  # torch's reader reports damaged archives itself
    prefix = pickles[0][: -len("data.pkl")]
    for storage in scan_pickle(io.BytesIO(data), file, unbacked_limit=limit):
        record = members.get(f"{prefix}data/{storage.key}")
        held = record.file_size if record is not None else 0
        wanted = storage.numel * storage.element_bytes
        if wanted > held:
            raise MedsslError(f"refusing to load: storage {storage.key} declares {wanted:,} bytes but the file "
                              f"holds {held:,} for it (memory bomb?)", file)
