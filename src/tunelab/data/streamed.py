"""`data.streaming`: a training file read and tokenized a window of records at a time while the run trains.

The first pass (data/firstpass.py) tokenizes a whole file before the first step and keeps the result. A
streamed run instead reads `data.stream_window` records of a JSON Lines file, validates, renders and
tokenizes them with the first pass's own batched code (`firstpass.encode_records`, the same over-length
policy, the same checks: `pipeline.enforce` on each window), trains on them in an order shuffled within
the window (seeded by the run's seed, the epoch and the window's number), then reads the next window.
Memory holds one window; nothing is written; the first step comes after one window whatever the file's
size, so a file larger than memory (or than the disk could hold tokenized) trains.

Resume is exact: the stream's cursor (`data_cursor` in a checkpoint) is the epoch, the window's number,
the byte offset and line it starts at, and the row reached in it. A resumed run seeks to that offset,
reads the window again (the same bytes tokenized the same way give the same rows) and goes on from the
row. The data fingerprint that refuses a resume on changed data is the cache key of the first pass
(data/cache.py: the file's bytes, the settings, the tokenizer) with the window size.

What streaming costs, said in docs/data.md: the order is shuffled within a window only; a bad record is
met when the run reaches it (`on_error: raise` stops the run there, naming it by file:line; `tunelab
data check` lists every one before a run); each process of a multi-process run reads and tokenizes
every window and keeps its share of the micro-batches.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from tunelab.config import DataConfig
from tunelab.data import cache
from tunelab.data.built import Built, check_format, split_path
from tunelab.data.firstpass import BATCH, encode_records
from tunelab.data.formats import FORMATS, EncodeContext, resolve_format
from tunelab.data.pipeline import enforce
from tunelab.data.sources import Record, jsonl_from
from tunelab.data.stream import BatchStream, epoch_rows
from tunelab.data.table import SCHEMA, ExampleTable
from tunelab.data.templates import resolve_template
from tunelab.errors import DataError, TunelabError

Log = Callable[[str], Any]


@dataclass
class Window:
    examples: ExampleTable  # in memory: one window's kept examples, in file order
    n_records: int  # 0: the file ended before this window
    end: int  # byte offset after the window's last record
    end_line: int  # line number of the window's last record


@dataclass
class StreamedSource:
    """A JSON Lines training file, read a window at a time (`read`) by a `StreamedBatchStream`."""

    path: str
    fmt: str
    cfg: DataConfig
    ctx: EncodeContext
    fingerprint: str
    log: Log

    def read(self, offset: int, line: int) -> Window:
        """The window of `cfg.stream_window` records from byte `offset` (after line `line`), encoded and put
        through the error and over-length policies (a DataError when a run would stop there)."""
        started = time.perf_counter()
        records: list[Record] = []
        end, end_line = offset, line
        for after, lineno, record in jsonl_from(Path(self.path), self.path, offset, line):
            records.append(record)
            end, end_line = after, lineno
            if len(records) == self.cfg.stream_window:
                break
        if not records:
            return Window(ExampleTable(SCHEMA.empty_table()), 0, end, end_line)
        first, last = records[0][0].rsplit(":", 1)[1], end_line
        part = Built(f"{self.path} (lines {first}-{last}, streamed)", self.fmt, n_records=len(records))
        batches: list[pa.RecordBatch] = []
        for i in range(0, len(records), BATCH):
            built, batch = encode_records(records[i:i + BATCH], self.fmt, self.cfg, self.ctx)
            part.add(built)
            if batch is not None:
                batches.append(batch)
        enforce(part, self.cfg, self.log)
        examples = ExampleTable(pa.Table.from_batches(batches, schema=SCHEMA))
        self.log(f"data: streamed lines {first}-{last}: {len(examples):,} examples, {part.n_tokens:,} tokens, "
                 f"{part.n_trained:,} trained ({time.perf_counter() - started:.1f} s)")
        return Window(examples, len(records), end, end_line)


def open_streamed(cfg: DataConfig, tokenizer: Any, *, mask_prompt: bool, formats: Sequence[str], log: Log,
                  labels: Sequence[str] | None = None) -> StreamedSource:
    """The training file of `cfg` (`data.streaming`), its format found from the first window's records."""
    path = split_path(cfg, "train")
    p = Path(path)
    if not p.is_file() or p.suffix.lower() != ".jsonl":
        what = "no such file" if not p.exists() else "a folder" if p.is_dir() else f"a {p.suffix or 'suffixless'} file"
        raise DataError(f"{path}: data.streaming reads a JSON Lines (.jsonl) file a window at a time; this is {what}",
                        fix="convert the data to .jsonl (one JSON object per line), or set data.streaming=false")
    head = [r for _, _, r in itertools.islice(jsonl_from(p, path), cfg.stream_window)]
    fmt = resolve_format(cfg.format, head, path)
    check_format(path, fmt, formats)
    spec = FORMATS[fmt]
    if spec.no_packing and cfg.packing:
        raise DataError(f"data.packing cannot be used with {spec.no_packing}", fix="set data.packing=false")
    if spec.label_order is not None:
        raise DataError(f"{path}: {fmt} data takes its label order from the whole file; it cannot be streamed",
                        fix="set data.streaming=false")
    template = resolve_template(cfg.chat_template, tokenizer, log) if spec.chat else None
    ctx = EncodeContext(tokenizer, template, mask_prompt)
    key = cache.cache_key(path, cfg.model_copy(update={"cache": True}), tokenizer, mask_prompt, labels, None)
    if key is None:  # a tokenizer without a serialised state: the file's bytes and the settings alone
        h = hashlib.sha256(cfg.model_dump_json().encode())
        cache.hash_source(h, path)
        key = h.hexdigest()
    fingerprint = hashlib.sha256(f"streamed {cfg.stream_window} {key}".encode()).hexdigest()
    log(f"data: train streamed from {path} ({fmt}), {cfg.stream_window:,} records a window")
    return StreamedSource(path, fmt, cfg, ctx, fingerprint, log)


class StreamedBatchStream(BatchStream):
    """The micro-batches of a `StreamedSource`: a BatchStream over one window at a time (its `examples` and
    `lengths` are the window's), the cursor extended by where the window starts."""

    def __init__(self, source: StreamedSource, *, batch_size: int, packing: bool, max_length: int, seed: int,
                 pad_id: int, rank: int = 0, world: int = 1):
        self.source = source
        self.batch_size, self.packing, self.max_length = batch_size, packing, max_length
        self.seed, self.pad_id, self.rank, self.world = seed, pad_id, rank, world
        self.epoch, self.index, self.samples = 0, 0, 0
        self.window, self.offset, self.line = 0, 0, 0
        self._load()

    def _load(self) -> None:
        """Read the window at the cursor; past the file's end the next epoch's first; windows left with no
        example (every record bad and skipped) are passed over."""
        empty_epochs = 0
        while True:
            w = self.source.read(self.offset, self.line)
            if w.n_records == 0:  # the end of the file
                empty_epochs += 1
                if empty_epochs > 1 or (self.window == 0 and self.offset == 0):
                    raise DataError(f"{self.source.path}: no examples left in the file after validation and the "
                                    "over-length policy", fix="check data.format, data.max_length and "
                                    "data.overlength (see `tunelab data check`)")
                self.epoch, self.window, self.offset, self.line = self.epoch + 1, 0, 0, 0
                continue
            if len(w.examples):
                break
            self.window, self.offset, self.line = self.window + 1, w.end, w.end_line
        self.examples = w.examples
        self.lengths = w.examples.lengths
        self._end = (w.end, w.end_line)
        self._rows = epoch_rows(self.lengths, self.seed, f"{self.epoch}/{self.window}", self.packing, self.max_length)

    def micro_batches_per_epoch(self) -> int:
        raise TunelabError("a streamed file's length is not known before it is read", fix="set train.max_steps")

    def state(self) -> dict[str, int]:
        return {**super().state(), "window": self.window, "offset": self.offset, "line": self.line}

    def restore(self, state: dict[str, int]) -> None:
        if "offset" not in state:
            raise TunelabError("this checkpoint's data cursor is not a streamed one (data.streaming changed)",
                               fix="resume with the data settings of the checkpoint's run")
        self.epoch, self.index, self.samples = state["epoch"], state["index"], state["samples"]
        self.window, self.offset, self.line = state["window"], state["offset"], state["line"]
        self._load()

    def _advance(self) -> None:  # the window is used up: the next one
        self.window, self.index = self.window + 1, 0
        self.offset, self.line = self._end
        self._load()
