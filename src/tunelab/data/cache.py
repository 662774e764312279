"""A cache of tokenized data, so that the second run on the same data starts in seconds.

One pass over a data file (read, validate, render, tokenize, the over-length policy: `pipeline.build`)
is stored under `$TUNELAB_CACHE/data/<key>/` (default `~/.cache/tunelab`; `$TUNELAB_DATA_CACHE` names
another folder): the examples as an Arrow
IPC file (`examples.arrow`, memory-mapped when read), everything else the pass learned (bad records
with their `file:line`, counts, the messages it logged) as `meta.json`. The key is a sha256 of
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tunelab.config import DataConfig
from tunelab.data.types import Example
from tunelab.world.resolve import cache_root

CACHE_VERSION = 1
_CODE_DIR = Path(__file__).resolve().parent


def data_cache_dir() -> Path:
    """`$TUNELAB_DATA_CACHE`, else `$TUNELAB_CACHE/data`."""
    return Path(os.environ["TUNELAB_DATA_CACHE"]) if os.environ.get("TUNELAB_DATA_CACHE") else cache_root() / "data"


def _hash_file(h: Any, path: Path) -> None:
    h.update(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)


def _hash_source(h: Any, source: str) -> None:
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
    _hash_source(h, path)
    if train is not None and train != path:  # the label order of a classification eval comes from train
        h.update(b"train:")
        _hash_source(h, train)
    return h.hexdigest()


# ----------------------------------------------------------------------------- Arrow <-> examples


def _table(examples: list[Example]) -> Any:
    import pyarrow as pa

    ids = pa.list_(pa.int32())
    rej = [e.rejected for e in examples]
    return pa.table({
        "input_ids": pa.array([e.input_ids for e in examples], ids),
        "labels": pa.array([e.labels for e in examples], ids),
        "where": pa.array([e.where for e in examples], pa.string()),
        "label": pa.array([e.label for e in examples], pa.int64()),
        "rejected_input_ids": pa.array([r.input_ids if r else None for r in rej], ids),
        "rejected_labels": pa.array([r.labels if r else None for r in rej], ids),
        "rejected_where": pa.array([r.where if r else None for r in rej], pa.string()),
    })


def _examples(table: Any) -> list[Example]:
    cols = {name: table.column(name).to_pylist() for name in table.column_names}
    out = []
    for i in range(table.num_rows):
        rejected = None
        if cols["rejected_input_ids"][i] is not None:
            rejected = Example(cols["rejected_input_ids"][i], cols["rejected_labels"][i], cols["rejected_where"][i])
        out.append(Example(cols["input_ids"][i], cols["labels"][i], cols["where"][i], cols["label"][i], rejected))
    return out


# ----------------------------------------------------------------------------- entries


def load(key: str) -> tuple[list[Example], dict[str, Any]] | None:
    """The entry's examples and meta, or None (absent, or damaged: then it is rebuilt)."""
    entry = data_cache_dir() / key
    try:
        import pyarrow as pa

        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        with pa.memory_map(str(entry / "examples.arrow")) as source:
            table = pa.ipc.open_file(source).read_all()
        if meta.get("version") != CACHE_VERSION or table.num_rows != meta.get("n_examples"):
            return None
        return _examples(table), meta
    except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
        if not isinstance(e, FileNotFoundError):
            shutil.rmtree(entry, ignore_errors=True)  # damaged: rebuilt by this run
        return None
    except Exception as e:  # pyarrow's own errors (a truncated file)
        if type(e).__module__.split(".")[0] != "pyarrow":
            raise
        shutil.rmtree(entry, ignore_errors=True)
        return None


def store(key: str, examples: list[Example], meta: dict[str, Any]) -> None:
    """Write the entry next to its place, then rename it in (another process may have won: fine)."""
    import pyarrow as pa

    root = data_cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:16]}-", dir=root))
    except OSError:
        return  # a read-only cache is no cache, not an error
    try:
        table = _table(examples)
        with pa.OSFile(str(tmp / "examples.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        (tmp / "meta.json").write_text(json.dumps({**meta, "version": CACHE_VERSION, "n_examples": len(examples)}),
                                       encoding="utf-8")
        os.rename(tmp, root / key)
    except OSError:
        pass  # the entry exists (another process), or the disk is full: this run goes on without it
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def recorder(log: Callable[[str], Any]) -> tuple[Callable[[str], Any], list[str]]:
    """A log that also keeps what it said (replayed when the entry is used)."""
    said: list[str] = []

    def say(line: str) -> Any:
        said.append(line)
        return log(line)

    return say, said
