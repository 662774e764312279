"""Read dataset records from disk, one `(location, record or error)` pair at a time.

Supported: `.jsonl`, `.json` (a list of objects, or JSON Lines saved as .json), `.csv`, `.parquet`, and
a folder written by `datasets.Dataset.save_to_disk`. A bad record never stops reading: its parse
error is yielded in place of the record, so the caller can report every bad record of the file at
once. Locations are `file:line` (1-based file lines) for text formats and `file:row N` (0-based,
as in `ds[N]`) for columnar ones.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunelab.data.validate import RecordError, type_name
from tunelab.errors import DataError
from tunelab.world.resolve import is_tinyworld, resolve_task

SUPPORTED = ".jsonl, .json, .csv, .parquet, or a folder saved with datasets.Dataset.save_to_disk"

# CSV cells that hold structured values (a chat, a prompt given as messages) are JSON text.
_JSON_CELLS = ("messages", "conversations", "prompt")

Record = tuple[str, "dict[str, Any] | Exception"]


def resolve_source(path: str) -> str:
    """The one place `tinyworld:<task>[@<split>]` names become files: the generated TinyWorld task
    file (built into the cache on first use); any other path as it is."""
    return str(resolve_task(path)) if is_tinyworld(path) else path


def read_records(path: str) -> Iterator[Record]:
    """Yield `("file:line", record)` or `("file:line", RecordError)` for every record of `path`."""
    p = Path(path)
    if p.is_dir():
        yield from _read_saved_dataset(p, path)
        return
    if not p.exists():
        raise DataError(f"{path}: no such file or folder", fix=f"point data.train/data.eval at a {SUPPORTED}")
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    reader = readers.get(p.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type {p.suffix!r}", fix=f"use a {SUPPORTED}")
    yield from reader(p, path)


def read_all(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Every record of a file (the first `limit`); any unreadable record is an error listing each by file:line."""
    good, bad = [], []
    for where, record in read_records(str(path)):
        (bad if isinstance(record, Exception) else good).append((where, record))
    if bad:
        raise DataError(f"{path}: {len(bad)} unreadable record(s)", problems=[f"{w}: {e}" for w, e in bad])
    return [r for _, r in good[:limit]] if limit is not None else [r for _, r in good]


def _as_record(value: object) -> dict[str, Any] | Exception:
    if isinstance(value, dict):
        return value
    return RecordError("not an object", f"not a JSON object (got {type_name(value)})")


def _json_error(e: Exception) -> RecordError:
    """A line json cannot turn into a value: bad syntax, an integer past Python's digit limit
    (ValueError), or nesting deeper than the interpreter's recursion limit."""
    if isinstance(e, json.JSONDecodeError):
        return RecordError("bad JSON", f"bad JSON: {e.msg} (column {e.colno})")
    if isinstance(e, RecursionError):
        return RecordError("bad JSON", "bad JSON: nested too deeply")
    return RecordError("bad JSON", f"bad JSON: {str(e).split(';')[0]}")


_BAD_JSON = (ValueError, RecursionError)  # json.JSONDecodeError is a ValueError


def _read_jsonl(p: Path, name: str) -> Iterator[Record]:
    for _, _, record in jsonl_from(p, name):
        yield record


def jsonl_from(p: Path, name: str, offset: int = 0, lines: int = 0) -> Iterator[tuple[int, int, Record]]:
    """`(byte offset after its line, its line number, ("file:line", record or RecordError))` for each record
    of a JSON Lines file from byte `offset`, which starts line `lines + 1` (a streamed run reads a window of
    records this way and resumes at one: data/streamed.py)."""
    # Decoding per line keeps one line of invalid UTF-8 a per-record error, not a crash. Lines are read
    # one at a time (split at b"\n" only, like bytes.split): memory holds a line, not the file.
    with p.open("rb") as f:
        f.seek(offset)
        for lineno, raw in enumerate(f, start=lines + 1):
            offset += len(raw)
            raw = raw.removesuffix(b"\n")
            record = _parse_line(raw.removeprefix(b"\xef\xbb\xbf") if lineno == 1 else raw)
            if record is not None:  # blank lines are allowed
                yield offset, lineno, (f"{name}:{lineno}", record)


def _parse_line(raw: bytes) -> dict[str, Any] | Exception | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return RecordError("invalid UTF-8", f"invalid UTF-8 (byte {e.start + 1} of the line)")
    if not text.strip():
        return None
    try:
        record = _as_record(json.loads(text))
    except _BAD_JSON as e:
        return _json_error(e)
    # strict UTF-8 decoding refuses surrogates: only a JSON \u escape can put one in a string
    return _check_surrogates(record) if b"\\u" in raw else record


def _read_json(p: Path, name: str) -> Iterator[Record]:
    text = _decode_whole(p)
    start = len(text) - len(text.lstrip())
    if text[start : start + 1] == "{":  # JSON Lines under a .json name
        for lineno, line in enumerate(text.split("\n"), start=1):
            record = _parse_line(line.encode("utf-8", "surrogateescape"))
            if record is not None:
                yield f"{name}:{lineno}", record
        return
    if text[start : start + 1] != "[":
        raise DataError(f"{name}: a .json dataset must be a list of objects", fix="write [{...}, {...}] or JSON Lines")
    yield from _json_array_items(text, start + 1, name)


def _decode_whole(p: Path) -> str:
    # surrogateescape keeps invalid bytes visible per record instead of failing the whole file.
    return p.read_bytes().removeprefix(b"\xef\xbb\xbf").decode("utf-8", "surrogateescape")


def _json_array_items(text: str, pos: int, name: str) -> Iterator[Record]:
    """Walk a top-level JSON array item by item so each item knows the line it starts on."""
    decoder = json.JSONDecoder()
    n = len(text)
    expect_item = True
    while True:
        while pos < n and text[pos] in " \t\r\n":
            pos += 1
        if pos >= n:
            raise DataError(f"{name}: the JSON list is not closed with ']'", fix="fix the file's JSON syntax")
        if text[pos] == "]":
            return
        if not expect_item:
            if text[pos] != ",":
                line = text.count("\n", 0, pos) + 1
                raise DataError(f"{name}:{line}: bad JSON: expected ',' or ']' between items")
            pos += 1
            expect_item = True
            continue
        where = f"{name}:{text.count(chr(10), 0, pos) + 1}"
        try:
            value, pos = decoder.raw_decode(text, pos)
        except _BAD_JSON as e:
            raise DataError(f"{where}: {_json_error(e).reason}", fix="fix the file's JSON syntax") from None
        yield where, _check_surrogates(_as_record(value))
        expect_item = False


def _check_surrogates(record: dict[str, Any] | Exception) -> dict[str, Any] | Exception:
    """Lone surrogates are not text: a record decoded with surrogateescape holds them where its
    bytes were not UTF-8 (\udc80-\udcff), and a JSON escape such as "\\ud800" puts one in a string.
    A tokenizer cannot encode either."""
    if not isinstance(record, dict):
        return record
    try:  # UTF-8 encodes every string but a lone surrogate: the whole record checked at C speed
        json.dumps(record, ensure_ascii=False).encode("utf-8")
        return record
    except UnicodeEncodeError as e:
        found = e.object[e.start]
    if "\udc80" <= found <= "\udcff":
        return RecordError("invalid UTF-8", "invalid UTF-8")
    return RecordError("invalid text", f"a lone surrogate (\\u{ord(found):04x}) is not text")


def _read_csv(p: Path, name: str) -> Iterator[Record]:
    # The csv module refuses fields over 128 KiB by default; a long document is a record like any
    # other (the over-length policy applies after tokenizing), so lift the limit to the file's size.
    csv.field_size_limit(max(csv.field_size_limit(), min(p.stat().st_size + 1, 2**31 - 1)))
    reader = csv.reader(io.StringIO(_decode_whole(p), newline=""))
    header = next(reader, None)
    if header is None:
        return
    for row in reader:
        if not row:  # a blank line
            continue
        # a row ends at reader.line_num and spans one line more than the line breaks in its cells
        start = reader.line_num - sum(cell.count("\n") for cell in row)
        record: dict[str | None, Any] = dict(zip(header, row, strict=False))  # fewer cells: fields absent
        if len(row) > len(header):
            record[None] = row[len(header):]
        yield f"{name}:{start}", _check_surrogates(_csv_record(record))


def _csv_record(row: dict[str | None, Any]) -> dict[str, Any] | Exception:
    if None in row:
        return RecordError("bad CSV", "bad CSV: more cells than header columns")
    record = {k: v for k, v in row.items() if k is not None and v is not None}
    for key in _JSON_CELLS:
        cell = record.get(key)
        if isinstance(cell, str) and cell.lstrip().startswith("["):
            try:
                record[key] = json.loads(cell)
            except _BAD_JSON as e:
                return RecordError("bad JSON", f"{_json_error(e).reason} in column {key!r}")
    return record


def _columnar(rows: Iterator[dict[str, Any]], name: str) -> Iterator[Record]:
    # Arrow fills a column missing from a row with null; treat it as an absent field.
    for i, row in enumerate(rows):
        yield f"{name}:row {i}", {k: v for k, v in row.items() if v is not None}


def _read_parquet(p: Path, name: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{name}: not a readable parquet file ({e})") from None
    yield from _columnar(iter(table.to_pylist()), name)


def _read_saved_dataset(p: Path, name: str) -> Iterator[Record]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError:
        raise DataError(
            f"{name}: a folder, but not one saved by datasets.save_to_disk", fix=f"use a {SUPPORTED}"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        splits = ", ".join(ds)
        raise DataError(
            f"{name}: holds several splits ({splits})", fix=f"point at one split's folder, e.g. {name}/{next(iter(ds))}"
        )
    yield from _columnar(iter(ds), name)
