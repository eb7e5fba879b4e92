"""A restricted unpickler for non-torch pickles (the original BYOL JAX checkpoint, a dill pickle).

Only numpy array reconstruction and a few inert builtins are resolved to real callables. Every other global
(the experiment's own NamedTuple state class, haiku's FlatMapping, optax states, jax array wrappers, dill
helpers) is replaced by an inert :class:`StubObject` subclass that only records the arguments and state it was
given, so no code from the file runs. Callers then walk the resulting tree of dicts, lists, tuples, numpy
arrays and stubs. ``trust=True`` is not offered here: a fully trusted load would need the original classes.
"""

from __future__ import annotations

import io
import os
import pickle
from collections import OrderedDict
from typing import Any

import numpy as np
from numpy._core import multiarray as _np_multiarray
from numpy._core import numeric as _np_numeric

from medssl.errors import MedsslError

#: globals resolved to real objects: array reconstruction only (no file, process or import access)
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
    ("builtins", "bytearray"): bytearray,
    ("_codecs", "encode"): lambda s, enc="utf-8", *a: s.encode(enc),
}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _SAFE_GLOBALS[(_mod, "_reconstruct")] = _np_multiarray._reconstruct
    _SAFE_GLOBALS[(_mod, "scalar")] = _np_multiarray.scalar
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _SAFE_GLOBALS[(_mod, "_frombuffer")] = _np_numeric._frombuffer
_SAFE_GLOBALS[("numpy", "ndarray")] = np.ndarray
_SAFE_GLOBALS[("numpy", "dtype")] = np.dtype
for _name in ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool_"):
    _SAFE_GLOBALS[("numpy", _name)] = getattr(np, _name)
for _mod in ("numpy.dtypes", "numpy._core.dtypes"):
    for _name in ("Float16DType", "Float32DType", "Float64DType", "Int32DType", "Int64DType",
                  "UInt8DType", "UInt32DType", "BoolDType"):
        _SAFE_GLOBALS[(_mod, _name)] = getattr(np.dtypes, _name)


class StubObject:
    """Inert stand-in for an instance of a class the pickle names but we do not import.

    Attributes:
        stub_module, stub_name: the global the pickle referred to.
        args, kwargs: constructor / reduce arguments as found in the pickle.
        state: whatever ``__setstate__`` received (often the instance ``__dict__``).
        items: entries appended or set through the pickle's list/dict opcodes.
    """

    stub_module = ""
    stub_name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> StubObject:
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.items = args, kwargs, None, {}
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # arguments already recorded by __new__
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.items[len(self.items)] = value

    def extend(self, values: Any) -> None:
        for value in values:
            self.append(value)

    def __repr__(self) -> str:
        return f"<stub {self.stub_module}.{self.stub_name}>"


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, fh: Any) -> None:
        super().__init__(fh)
        self.stubbed: set[str] = set()
        self._stub_types: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        key = (module, name)
        if key not in self._stub_types:
            self.stubbed.add(f"{module}.{name}")
            self._stub_types[key] = type(f"Stub_{name}", (StubObject,),
                                         {"stub_module": module, "stub_name": name})
        return self._stub_types[key]

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids (torch storages) are not expected in this pickle")


def safe_load_pickle(path: str | os.PathLike[str]) -> tuple[Any, list[str]]:
    """Unpickle ``path`` with numpy arrays resolved and every other class replaced by an inert stub.

    Returns:
        (object, sorted names of the globals that were stubbed).

    Raises:
        MedsslError: the file is truncated or not a valid pickle, or asks for allocations it does not back
            (see :mod:`medssl.weights.pickle_guard`).
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise MedsslError(f"cannot read file ({exc.strerror or exc})", path) from exc
    from medssl.weights.pickle_guard import check_pickle_bytes

    check_pickle_bytes(data, path)  # sizes declared but not backed by the file (memory bombs)
    unpickler = _RestrictedUnpickler(io.BytesIO(data))
    try:
        obj = unpickler.load()
    except EOFError as exc:
        raise MedsslError("truncated pickle (unexpected end of file)", path) from exc
    except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        if "truncated" in str(exc):
            raise MedsslError(f"truncated pickle ({exc})", path) from exc
        raise MedsslError(f"malformed pickle ({type(exc).__name__}: {exc})", path) from exc
    return obj, sorted(unpickler.stubbed)


def stub_children(obj: Any) -> list[Any]:
    """The values a stub (or container) holds, in pickle order, for tree walks."""
    if isinstance(obj, StubObject):
        out: list[Any] = list(obj.args) + list(obj.kwargs.values())
        if obj.state is not None:
            out.append(obj.state)
        out.extend(obj.items.values())
        return out
    if isinstance(obj, dict):
        return list(obj.values())
    if isinstance(obj, (list, tuple)):
        return list(obj)
    return []
