"""Tokenized examples in Arrow: written batch by batch by the first pass, read back memory-mapped.

The first pass (data/firstpass.py) writes its examples as record batches of an Arrow IPC file
(`ExampleWriter`), hashing them for the data fingerprint on the way. `ExampleTable` reads that file
memory-mapped and is the sequence of `Example`s the stream, evaluation and the objectives index: an
example becomes Python lists only when it is indexed, so the memory of a run does not grow with its
dataset. `lengths` (every example's token count, a numpy array read from the list offsets alone) is
what packing and the epoch order need.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tunelab.data.types import Example

_IDS = pa.list_(pa.int32())
SCHEMA = pa.schema([
    ("input_ids", _IDS), ("labels", _IDS), ("where", pa.string()), ("label", pa.int64()),
    ("rejected_input_ids", _IDS), ("rejected_labels", _IDS), ("rejected_where", pa.string()),
])
_SEQS = ("input_ids", "labels", "rejected_input_ids", "rejected_labels")


def to_batch(examples: Sequence[Example]) -> pa.RecordBatch:
    """The examples as one record batch of `SCHEMA`."""
    rej = [e.rejected for e in examples]
    return pa.record_batch([
        _int_lists([e.input_ids for e in examples]),
        _int_lists([e.labels for e in examples]),
        pa.array([e.where for e in examples], pa.string()),
        pa.array([e.label for e in examples], pa.int64()),
        _int_lists([r.input_ids if r else None for r in rej]),
        _int_lists([r.labels if r else None for r in rej]),
        pa.array([r.where if r else None for r in rej], pa.string()),
    ], schema=SCHEMA)


def _int_lists(seqs: Sequence[list[int] | None]) -> pa.ListArray:
    """list<int32> of `seqs` (None: a null row), built through numpy: several times faster than from lists."""
    lens = np.fromiter((len(s) if s is not None else 0 for s in seqs), dtype=np.int64, count=len(seqs))
    offsets = np.zeros(len(seqs) + 1, dtype=np.int32)
    np.cumsum(lens, out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(s for s in seqs if s is not None), dtype=np.int32,
                         count=int(offsets[-1]))
    nulls = np.fromiter((s is None for s in seqs), dtype=bool, count=len(seqs))
    arr = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values), mask=pa.array(nulls) if nulls.any() else None)
    return arr.cast(_IDS)


def hash_batch(h: Any, batch: pa.RecordBatch) -> None:
    """Feed `h` what `pipeline.fingerprint` feeds it for these examples, in order: per example its ids,
    labels (and the rejected reply's), each as int32 little-endian prefixed by its length."""
    if batch.num_rows == 0:
        return
    has_rej = ~np.asarray(batch.column("rejected_input_ids").is_null(), dtype=bool)
    cols = [_list_parts(batch.column(name)) for name in _SEQS]
    sizes = [np.where(has_rej, 1 + lens, 0) if k >= 2 else 1 + lens for k, (lens, _, _) in enumerate(cols)]
    row_size = np.sum(sizes, axis=0)  # (n,)
    out = np.empty(int(row_size.sum()), dtype="<i4")
    at = np.cumsum(row_size) - row_size  # where the next sequence of each row starts
    for (lens, offsets, values), size in zip(cols, sizes, strict=True):
        rows = np.flatnonzero(size)  # the rows that hold this sequence
        out[at[rows]] = lens[rows]
        out[_ranges(at[rows] + 1, lens[rows])] = values[_ranges(offsets[rows], lens[rows])]
        at += size
    h.update(out.tobytes())


def _ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """concatenate(arange(s, s + n) for s, n in zip(starts, lens)), vectorised."""
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    first = np.cumsum(lens) - lens  # (rows,) where each range begins in the output
    return np.arange(total, dtype=np.int64) + np.repeat(starts.astype(np.int64) - first, lens)


def _list_parts(arr: pa.ListArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lengths, start offsets, flat values) of a list<int32> array; null rows have length 0."""
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values.to_numpy(zero_copy_only=False) if len(arr.values) else np.zeros(0, dtype=np.int32)
    return np.diff(offsets), offsets[:-1], values


class ExampleWriter:
    """Record batches of examples into an Arrow IPC file; `close()` gives the fingerprint of what was written."""

    def __init__(self, path: Path):
        self.path = path
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_file(self._sink, SCHEMA)
        self._hash = hashlib.sha256()

    def write(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)
        hash_batch(self._hash, batch)

    def close(self) -> str:
        self._writer.close()
        self._sink.close()
        return self._hash.hexdigest()


def private_file() -> Path:
    """A file of this process's own for a pass that is not cached (open it, then `unlink` it)."""
    fd, name = tempfile.mkstemp(prefix="tunelab-examples-", suffix=".arrow")
    os.close(fd)
    return Path(name)


class ExampleTable(Sequence[Example]):
    """A read-only sequence of `Example`s over an Arrow table of `SCHEMA`, or over some of its rows (`index`:
    a slice is such a view, sharing the table and what was read of it)."""

    def __init__(self, table: pa.Table, index: np.ndarray | None = None, *, _rows: _Rows | None = None):
        self._rows = _rows if _rows is not None else _Rows(table)
        self.table = self._rows.table
        self._index = index
        # (n,) tokens of each example
        self.lengths: np.ndarray = self._rows.lengths if index is None else self._rows.lengths[index]

    @classmethod
    def open(cls, path: Path) -> ExampleTable:
        """The table of an Arrow IPC file, memory-mapped; raises (OSError, pyarrow's errors) when it is damaged."""
        table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
        if not table.schema.equals(SCHEMA):
            raise ValueError(f"{path}: not a table of tokenized examples")
        table.validate(full=True)
        return cls(table)

    @classmethod
    def from_examples(cls, examples: Sequence[Example]) -> ExampleTable:
        return cls(pa.Table.from_batches([to_batch(examples)], schema=SCHEMA))

    @classmethod
    def concat(cls, parts: Sequence[ExampleTable]) -> ExampleTable:
        """Several tables end to end (zero-copy)."""
        if all(p._index is None for p in parts):
            return cls(pa.concat_tables([p.table for p in parts]) if parts else SCHEMA.empty_table())
        return cls.from_examples([ex for p in parts for ex in p])

    def __len__(self) -> int:
        return len(self.lengths)

    @overload
    def __getitem__(self, i: int) -> Example: ...
    @overload
    def __getitem__(self, i: slice) -> ExampleTable: ...

    def __getitem__(self, i: int | slice) -> Example | ExampleTable:
        if isinstance(i, slice):
            rows = np.arange(len(self))[i]
            return ExampleTable(self.table, rows if self._index is None else self._index[rows], _rows=self._rows)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"example {i} of {n}")
        return self._rows.example(int(self._index[i]) if self._index is not None else int(i) % n)

    def __iter__(self) -> Iterator[Example]:
        if self._index is not None:
            yield from (self[i] for i in range(len(self)))
            return
        for b in range(len(self._rows.batches)):
            yield from self._rows.columns(b).examples()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ExampleTable({len(self)} examples)"


class _Rows:
    """What an `ExampleTable` and its views share: the table's record batches (their columns read on first
    use) and every example's length, from the offsets alone."""

    def __init__(self, table: pa.Table):
        self.table = table
        self.batches = [b for b in table.to_batches() if b.num_rows]
        self.starts = np.cumsum([0, *(b.num_rows for b in self.batches)])
        lengths = pc.list_value_length(table.column("input_ids"))
        self.lengths = lengths.to_numpy().astype(np.int64) if len(lengths) else np.zeros(0, np.int64)
        self._columns: dict[int, _Columns] = {}

    def columns(self, b: int) -> _Columns:
        if b not in self._columns:
            self._columns[b] = _Columns(self.batches[b])
        return self._columns[b]

    def example(self, row: int) -> Example:
        b = int(np.searchsorted(self.starts, row, side="right")) - 1
        return self.columns(b).example(row - int(self.starts[b]))


class _Columns:
    """One record batch's columns as numpy views, for turning a row into an `Example` quickly."""

    def __init__(self, batch: pa.RecordBatch):
        self.batch, self.n = batch, batch.num_rows

    @functools.cached_property
    def seqs(self) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        return {name: _list_parts(self.batch.column(name)) for name in _SEQS}

    @functools.cached_property
    def has_rej(self) -> np.ndarray:
        return ~np.asarray(self.batch.column("rejected_input_ids").is_null(), dtype=bool)

    def _seq(self, name: str, j: int) -> list[int]:
        lens, starts, values = self.seqs[name]
        return values[starts[j] : starts[j] + lens[j]].tolist()

    def example(self, j: int) -> Example:
        b = self.batch
        rejected = None
        if self.has_rej[j]:
            rejected = Example(self._seq("rejected_input_ids", j), self._seq("rejected_labels", j),
                               b.column("rejected_where")[j].as_py())
        return Example(self._seq("input_ids", j), self._seq("labels", j), b.column("where")[j].as_py(),
                       b.column("label")[j].as_py(), rejected)

    def examples(self) -> Iterator[Example]:
        cols = {name: self.batch.column(name).to_pylist() for name in SCHEMA.names}
        for j in range(self.n):
            rejected = None
            if cols["rejected_input_ids"][j] is not None:
                rejected = Example(cols["rejected_input_ids"][j], cols["rejected_labels"][j], cols["rejected_where"][j])
            yield Example(cols["input_ids"][j], cols["labels"][j], cols["where"][j], cols["label"][j], rejected)


def lengths_of(examples: Sequence[Example]) -> np.ndarray:
    """(n,) the token count of every example: read from the offsets of an `ExampleTable`, else counted."""
    if isinstance(examples, ExampleTable):
        return examples.lengths
    return np.fromiter((len(e.input_ids) for e in examples), dtype=np.int64, count=len(examples))
