"""Evaluation loaders whose unreadable record stops with one line naming it.

:class:`RecordLoader` is a MONAI ``DataLoader`` over manifest records mapped by an eval transform. A record that
fails to load (missing file, frame or slice out of range, corrupt image) does not surface as MONAI's
``RuntimeError: applying transform <...>`` nor, with loader workers, as torch's multi-line worker
traceback: the worker reports the failure in-band and the main process raises one
:class:`~medssl.errors.MedsslError` ``PATH: record 'ID' cannot be loaded (REASON)``, the same guard the
pretraining loader uses (:class:`~medssl.engines.loaders.GuardedRecords`, ``GuardedCollate`` and
``BadRecordGate`` with a limit of 0: evaluation never skips a record, since every split must be scored whole).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from monai.data import DataLoader, list_data_collate

from medssl.engines.loaders import BadRecordGate, GuardedCollate, GuardedRecords


class _TransformedRecords:
    """``records[index]`` mapped by ``transform``, addressed ``(epoch, index)`` as :class:`GuardedRecords`
    expects (the epoch is unused: evaluation transforms are deterministic per record)."""

    def __init__(self, records: Sequence[Mapping[str, Any]],
                 transform: Callable[[Mapping[str, Any]], Mapping[str, Any]]) -> None:
        self.records = list(records)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.transform(self.records[key[1]])


class _Batches:
    """The plain iteration of a :class:`RecordLoader` (what :class:`BadRecordGate` consumes)."""

    def __init__(self, loader: RecordLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return DataLoader.__len__(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return DataLoader.__iter__(self.loader)


class RecordLoader(DataLoader):
    """A MONAI ``DataLoader`` over ``records`` mapped by ``transform`` whose iteration raises one
    :class:`~medssl.errors.MedsslError` naming the first record that fails to load (its id and file).

    Args:
        records: manifest records (the transform reads ``record["image"]``).
        transform: record -> ``{"image", ...}``.
        batch_size, shuffle, num_workers: as for ``DataLoader``.
        **kwargs: further ``DataLoader`` options (``generator``, ``drop_last``, ...).

    Still a ``DataLoader`` (MONAI's workflows and Ignite read its length and sampler); batches are collated by
    MONAI's ``list_data_collate``, as before.
    """

    def __init__(self, records: Sequence[Mapping[str, Any]],
                 transform: Callable[[Mapping[str, Any]], Mapping[str, Any]], batch_size: int, *, shuffle: bool = False, num_workers: int = 0, **kwargs: Any) -> None:
        super().__init__(GuardedRecords(_TransformedRecords(records, transform)), batch_size=batch_size,
                         shuffle=shuffle, num_workers=num_workers,
                         collate_fn=GuardedCollate(list_data_collate), **kwargs)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(BadRecordGate(_Batches(self)))
