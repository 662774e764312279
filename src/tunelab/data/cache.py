"""A cache of tokenized data, so that the second run on the same data starts in seconds.

One pass over a data file (read, validate, render, tokenize, the over-length policy: `pipeline.build`)
is stored under `$TUNELAB_CACHE/data/<key>/` (default `~/.cache/tunelab`; `$TUNELAB_DATA_CACHE` names
another folder): the examples as an Arrow IPC file (`examples.arrow`, written by the pass itself and
memory-mapped when read: data/table.py), everything else the pass learned (bad records with their
`file:line`, counts, the fingerprint, the messages it logged) as `meta.json`. The key is a sha256 of
everything the pass depends on:
- the data file's path (messages name it) and bytes (every file of a saved-datasets folder), and the train file's when
  the format takes its label order from it (classification);
- the settings `build` reads: format, max_length, overlength, chat template (a .jinja file's bytes),
  packing, the prompt mask, a given label order (not the formats an objective accepts: checked on use,
  so `tunelab data check` and a run share an entry);
- the tokenizer: its whole serialised state (vocabulary, merges, normaliser, pre-tokenizer,
  post-processor), its chat template and special tokens;
- the source of tunelab's data code itself: a fix in an encoder never meets a stale entry.
A tokenizer without a serialised state (a slow tokenizer) is not cached. Nothing in the cache is
unpickled or executed: it is read as Arrow arrays and JSON. An entry is written to a temporary folder
and renamed into place, so a reader never sees half of one; a damaged entry is ignored and rebuilt.
`data.cache: false` turns it off for a run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.config import DataConfig
from tunelab.data.table import ExampleTable
from tunelab.world.resolve import cache_root

CACHE_VERSION = 2
_CODE_DIR = Path(__file__).resolve().parent


def data_cache_dir() -> Path:
    """`$TUNELAB_DATA_CACHE`, else `$TUNELAB_CACHE/data`."""
    return Path(os.environ["TUNELAB_DATA_CACHE"]) if os.environ.get("TUNELAB_DATA_CACHE") else cache_root() / "data"


def _hash_file(h: Any, path: Path) -> None:
    h.update(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)


def hash_source(h: Any, source: str) -> None:
    p = Path(source)
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        _hash_file(h, f)


@functools.cache
def _code() -> str:
    """sha256 of tunelab's data code (this package's .py files), once per process."""
    h = hashlib.sha256()
    for f in sorted(_CODE_DIR.rglob("*.py")):
        h.update(str(f.relative_to(_CODE_DIR)).encode())
        _hash_file(h, f)
    return h.hexdigest()


def tokenizer_state(tokenizer: Any) -> str | None:
    """The tokenizer's whole serialised state, or None when it has none (not cacheable)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    extra = {"class": type(tokenizer).__name__, "chat_template": getattr(tokenizer, "chat_template", None),
             "special": {k: str(v) for k, v in (getattr(tokenizer, "special_tokens_map", None) or {}).items()}}
    return backend.to_str() + json.dumps(extra, sort_keys=True, default=str)


def cache_key(path: str, cfg: DataConfig, tokenizer: Any, mask_prompt: bool, labels: Sequence[str] | None,
              train: str | None) -> str | None:
    """The entry's key, or None when this data cannot be cached."""
    if not cfg.cache or tokenizer is None or not all(Path(p).exists() for p in (path, train) if p is not None):
        return None  # a missing file: the pass says so, with its fix
    state = tokenizer_state(tokenizer)
    if state is None:
        return None
    h = hashlib.sha256(f"tunelab-data-cache {CACHE_VERSION}\n".encode())
    h.update(_code().encode())
    h.update(hashlib.sha256(state.encode()).hexdigest().encode())
    settings = {"format": cfg.format, "max_length": cfg.max_length, "overlength": cfg.overlength,
                "chat_template": cfg.chat_template, "packing": cfg.packing, "mask_prompt": mask_prompt,
                "labels": list(labels) if labels is not None else None}
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(f"path:{path}\n".encode())  # messages name the file: the same bytes elsewhere are another entry
    template = Path(cfg.chat_template) if cfg.chat_template and cfg.chat_template.endswith(".jinja") else None
    if template is not None and template.is_file():
        _hash_file(h, template)
    hash_source(h, path)
    if train is not None and train != path:  # the label order of a classification eval comes from train
        h.update(b"train:")
        hash_source(h, train)
    return h.hexdigest()


# ----------------------------------------------------------------------------- entries


def load(key: str) -> tuple[ExampleTable, dict[str, Any]] | None:
    """The entry's examples (memory-mapped) and meta, or None (absent, or damaged: then it is rebuilt)."""
    entry = data_cache_dir() / key
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        if meta.get("version") != CACHE_VERSION:
            return None
        table = ExampleTable.open(entry / "examples.arrow")
        if len(table) != meta.get("n_examples"):
            raise ValueError("the entry's table and meta disagree")
        return table, meta
    except (OSError, ValueError, KeyError, TypeError) as e:
        if not isinstance(e, FileNotFoundError):
            shutil.rmtree(entry, ignore_errors=True)  # damaged: rebuilt by this run
        return None
    except Exception as e:  # pyarrow's own errors (a truncated file)
        if type(e).__module__.split(".")[0] != "pyarrow":
            raise
        shutil.rmtree(entry, ignore_errors=True)
        return None


@dataclass
class Entry:
    """An entry being written: the pass writes `arrow`, `commit` puts the entry in place."""

    key: str
    dir: Path

    @property
    def arrow(self) -> Path:
        return self.dir / "examples.arrow"

    def commit(self, meta: dict[str, Any]) -> None:
        """Write meta.json and rename the entry in (another process may have won: fine)."""
        try:
            (self.dir / "meta.json").write_text(json.dumps({**meta, "version": CACHE_VERSION}), encoding="utf-8")
            os.rename(self.dir, self.dir.parent / self.key)
        except OSError:
            pass  # the entry exists (another process), or the disk is full: this run goes on without it


@contextmanager
def new_entry(key: str | None) -> Iterator[Entry | None]:
    """A temporary folder beside its place for the entry `key` (None: no key, or a cache that cannot be
    written — a read-only cache is no cache, not an error); removed on leaving unless committed."""
    if key is None:
        yield None
        return
    root = data_cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:16]}-", dir=root))
    except OSError:
        yield None
        return
    try:
        yield Entry(key, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def recorder(log: Callable[[str], Any]) -> tuple[Callable[[str], Any], list[str]]:
    """A log that also keeps what it said (replayed when the entry is used)."""
    said: list[str] = []

    def say(line: str) -> Any:
        said.append(line)
        return log(line)

    return say, said
