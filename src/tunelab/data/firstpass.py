"""The first pass over a data file, in batches, written straight to Arrow.

A scan reads every record once (it detects the format and stops at an unreadable file before anything
else, as the per-record pass did); then `BATCH` records at a time are validated, rendered and tokenized
(each format's `encode_batch`: few calls to the template and the fast tokenizer, data/batched.py), put
through the over-length policy (built.keep) and written as one Arrow record batch (data/table.py), hashed
for the fingerprint on the way. Memory holds one batch of records, never the file; the result is the
written file, memory-mapped.

Bad records, counts and messages are exactly those of the record-by-record pass
(`pipeline.build_per_record`, the reference tests/test_data_firstpass.py compares it with): every batch
is reported in record order, and a fatal error stops the pass at the record where that pass stops.

`data.num_proc` > 1 encodes the batches in that many worker processes while this one reads, hashes and
writes, in order. Workers are forked where the platform can (a spawned worker would import the caller's
main script again, which breaks any script that calls tunelab without an `if __name__ == "__main__"`
guard); they only validate, render and tokenize, never touch torch, and the tokenizer is told not to
use its own threads in them. `datasets.Dataset.map(num_proc=...)` does the same for data already in
Arrow; here the records are untyped JSON (a bad record must reach its check as written, e.g. a number
where text belongs), which Arrow cannot hold without a schema, so batches travel as Python records.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa

from tunelab.config import DataConfig
from tunelab.data.built import Built, check_format, keep, split_path
from tunelab.data.formats import FORMATS, EncodeContext, FormatSpec, resolve_format
from tunelab.data.sources import Record, read_records
from tunelab.data.table import ExampleTable, ExampleWriter, private_file, to_batch
from tunelab.data.templates import resolve_template
from tunelab.data.types import Example
from tunelab.data.validate import RecordError
from tunelab.errors import DataError

BATCH = 1024  # records encoded together
AUTO_PROC_BYTES = 64 << 20  # data.num_proc unset: files at least this large are spread over the CPUs
MAX_AUTO_PROCS = 8


def build(
    path: str, cfg: DataConfig, tokenizer: Any, mask_prompt: bool, formats: Iterable[str], log: Any,
    labels: Sequence[str] | None = None, *, arrow: Path | None = None,
) -> Built:
    """One pass over `path`: read, validate, render, tokenize and apply the over-length policy. The examples
    go to the Arrow file `arrow` (default: a private file, gone once the process ends) and come back as an
    `ExampleTable` over it."""
    fmt, n_records = scan(cfg.format, path)
    check_format(path, fmt, formats)
    out = Built(path, fmt, n_records=n_records)
    spec = FORMATS[fmt]
    if spec.no_packing and cfg.packing and tokenizer is not None:
        raise DataError(f"data.packing cannot be used with {spec.no_packing}", fix="set data.packing=false")
    if spec.label_order is not None and tokenizer is not None:  # one label order for every split: the train file's
        train = split_path(cfg, "train") if cfg.train is not None else path
        out.labels = spec.label_order(read_records(train), labels)
    template = resolve_template(cfg.chat_template, tokenizer, log) if spec.chat and tokenizer is not None else None
    ctx = EncodeContext(tokenizer, template, mask_prompt, out.labels)
    target = arrow if arrow is not None else private_file()
    try:
        writer = ExampleWriter(target)
        try:
            for part, batch in _parts(_batches(read_records(path)), fmt, cfg, ctx, num_procs(cfg, path, tokenizer)):
                out.add(part)
                if batch is not None:
                    writer.write(batch)
        finally:
            out.fingerprint = writer.close()
        out.kept = ExampleTable.open(target)
    finally:
        if arrow is None:
            target.unlink(missing_ok=True)  # the table keeps it mapped while it is used
    return out


def scan(configured: str, path: str) -> tuple[str, int]:
    """(the format, the number of records) of `path`: every record read once, so an unreadable file stops
    here, before any other check (as the record-by-record pass, which read the whole file first)."""
    n = 0

    def counted() -> Iterator[Record]:
        nonlocal n
        for item in read_records(path):
            n += 1
            yield item

    if configured == "auto":
        fmt = resolve_format(configured, counted(), path)
    else:
        for _ in counted():
            pass
        fmt = resolve_format(configured, [], path)
    return fmt, n


def num_procs(cfg: DataConfig, path: str, tokenizer: Any) -> int:
    """`data.num_proc`, or when unset: 1 for a file under AUTO_PROC_BYTES, else one per CPU (at most 8; in a
    multi-process run, whose processes on this machine all read the data, their share of the CPUs)."""
    if tokenizer is None:
        return 1  # a check without a tokenizer only validates
    if cfg.num_proc is not None:
        return cfg.num_proc
    p = Path(path)
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cpus //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # set by torchrun's launcher
    return 1 if size < AUTO_PROC_BYTES else max(1, min(cpus, MAX_AUTO_PROCS))


def _batches(records: Iterable[Record]) -> Iterator[list[Record]]:
    batch: list[Record] = []
    for item in records:
        batch.append(item)
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


Part = tuple[Built, "pa.RecordBatch | None"]


def encode_records(records: list[Record], fmt: str, cfg: DataConfig, ctx: EncodeContext) -> Part:
    """The pass over one batch of records: what it learned, and its kept examples as a record batch."""
    spec = FORMATS[fmt]
    out = Built("", fmt)
    problems = [_problem(spec, record) for _, record in records]
    valid = [(where, r) for (where, r), p in zip(records, problems, strict=True) if p is None]
    results = iter(_encode(spec, valid, ctx)) if ctx.tokenizer is not None else None
    kept: list[Example] = []
    for (where, _), problem in zip(records, problems, strict=True):
        if problem is not None:
            out.bad.append((where, *problem))
            continue
        if results is None:  # validation only (data check without a tokenizer)
            continue
        result = next(results)
        if isinstance(result, RecordError):
            out.bad.append((where, result.kind, result.reason))
            continue
        if isinstance(result, DataError):
            raise result
        kept += [ex for ex in (keep(out, e, cfg) for e in result) if ex is not None]
    return out, to_batch(kept) if kept else None


def _problem(spec: FormatSpec, record: Any) -> tuple[str, str] | None:
    if isinstance(record, RecordError):
        return record.kind, record.reason
    problem = spec.validate(record)
    return None if problem is None else (problem.kind, problem.reason)


def _encode(spec: FormatSpec, items: list[tuple[str, dict[str, Any]]], ctx: EncodeContext) -> list[Any]:
    if spec.encode_batch is not None:
        return spec.encode_batch(items, ctx) if items else []
    out: list[Any] = []
    for where, record in items:  # a format without a batched form: record by record, errors in place
        try:
            out.append(spec.encode(record, where, ctx))
        except DataError as e:
            out.append(e)
    return out


# ----------------------------------------------------------------------------- worker processes


def _parts(
    batches: Iterator[list[Record]], fmt: str, cfg: DataConfig, ctx: EncodeContext, procs: int
) -> Iterator[Part]:
    """The encoded batches, in order: here, or in `procs` worker processes (at most 2 batches each in flight)."""
    if procs <= 1:
        for records in batches:
            yield encode_records(records, fmt, cfg, ctx)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    with _no_tokenizer_threads(), ProcessPoolExecutor(procs, mp_context=context, initializer=_start_worker,
                                                      initargs=(fmt, cfg, ctx)) as pool:
        pending: deque[Any] = deque()
        try:
            for records in batches:
                pending.append(pool.submit(_work, records))
                if len(pending) >= 2 * procs:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


@contextmanager
def _no_tokenizer_threads() -> Iterator[None]:
    """TOKENIZERS_PARALLELISM=false while workers are started (unless the user set it): a forked worker
    cannot use the thread pool of its parent, and the tokenizers library says so on stderr unless told."""
    if "TOKENIZERS_PARALLELISM" in os.environ:
        yield
        return
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)


_WORKER: tuple[str, DataConfig, EncodeContext] | None = None


def _start_worker(fmt: str, cfg: DataConfig, ctx: EncodeContext) -> None:
    global _WORKER
    _WORKER = (fmt, cfg, ctx)


def _work(records: list[Record]) -> Part:
    assert _WORKER is not None
    return encode_records(records, *_WORKER)
