"""Documents -> chunks of at most `size` tokens, consecutive chunks sharing `overlap` tokens.

Documents: `.txt` and `.md` files (one document a file; with `per_line`, each non-blank line of a
`.txt` file is one, as in TinyWorld's `knowledge.txt`) and `.jsonl` files (one `{"text": ...}`
record a line, with an optional `"id"`; other keys are kept as the chunk's metadata). A folder is
read recursively in name order (hidden entries and other file types skipped). A TinyWorld name
(`tinyworld:new-facts@knowledge`) reads its generated file.

A chunk is an exact substring of its document: its boundaries come from the tokenizer's offset
mapping (a fast tokenizer), so `doc.text[start:end] == chunk.text` always holds, the first chunk
starts at 0 and the last ends at the document's end. Chunks whose normalised text (NFKC,
case-folded, whitespace collapsed) hashes alike are duplicates: the first one is kept.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from tunelab.data.sources import resolve_source
from tunelab.errors import ConfigError, DataError

SUFFIXES = (".txt", ".md", ".jsonl")
MAX_DOC_BYTES = 50 * 2**20


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    source: str  # the file as given
    line: int | None = None  # 1-based line of a per-line text document or a jsonl record
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Chunk:
    id: str  # <document id>#<n>
    text: str
    source: str
    doc: str  # the document's id
    line: int | None
    start: int  # character span in the document: text == document[start:end]
    end: int
    tokens: tuple[int, int]  # token span in the document's tokenization
    key: str  # hash of the normalised text, for dedupe
    meta: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "source": self.source, "doc": self.doc, "line": self.line,
                "start": self.start, "end": self.end, "tokens": list(self.tokens), "key": self.key, "meta": self.meta}


def text_key(text: str) -> str:
    """The dedupe key: sha1 of the text NFKC-normalised, case-folded, whitespace collapsed."""
    norm = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return hashlib.sha1(norm.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------- reading


def read_documents(paths: str | Path | Iterable[str | Path], *, per_line: bool = False,
                   max_bytes: int = MAX_DOC_BYTES) -> list[Document]:
    """Every document of the files and folders in `paths` (module docstring)."""
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    docs: list[Document] = []
    for item in items:
        root = Path(resolve_source(item) if isinstance(item, str) else item)
        if not root.exists():
            raise DataError(f"{item}: no such file or folder", fix="point --docs at .txt/.md/.jsonl files or a folder")
        for f in _files(root):
            docs.extend(_read_file(f, root, per_line=per_line, max_bytes=max_bytes))
    return docs


def _files(root: Path) -> Iterator[Path]:
    if root.is_file():
        if root.suffix.lower() not in SUFFIXES:
            raise DataError(f"{root}: unsupported document type {root.suffix!r}",
                            fix=f"give {', '.join(SUFFIXES)} files (or a folder holding them)")
        yield root
        return
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root).parts
        if f.is_file() and f.suffix.lower() in SUFFIXES and not any(p.startswith(".") for p in rel):
            yield f


def _doc_name(f: Path, root: Path) -> str:
    return f.name if root.is_file() else f.relative_to(root).as_posix()


def _decode(f: Path, max_bytes: int, whole_file_is_doc: bool) -> str:
    """The file's text; a binary file, invalid UTF-8 or a document past `max_bytes` is refused."""
    if whole_file_is_doc and f.stat().st_size > max_bytes:
        raise DataError(f"{f}: {f.stat().st_size:,} bytes, over the {max_bytes:,}-byte document limit",
                        fix="split it into smaller files, use --per-line / .jsonl records, or raise max_doc_bytes")
    data = f.read_bytes()
    if b"\0" in data:
        line = data.count(b"\n", 0, data.index(b"\0")) + 1
        raise DataError(f"{f}:{line}: a binary file (NUL byte), not text", fix="give .txt/.md/.jsonl text files")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{f}:{line}: not UTF-8 text (byte {e.start})",
                        fix="convert the file to UTF-8 (iconv -t utf-8)") from None


def _check_size(where: str, text: str, max_bytes: int) -> None:
    n = len(text.encode("utf-8"))
    if n > max_bytes:
        raise DataError(f"{where}: a document of {n:,} bytes, over the {max_bytes:,}-byte limit",
                        fix="split it into smaller documents, or raise max_doc_bytes")


def _read_file(f: Path, root: Path, *, per_line: bool, max_bytes: int) -> list[Document]:
    name, suffix = _doc_name(f, root), f.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(f, name, _decode(f, max_bytes, whole_file_is_doc=False), max_bytes)
    lines = per_line and suffix == ".txt"
    text = _decode(f, max_bytes, whole_file_is_doc=not lines)
    if not lines:
        return [Document(name, text, str(f))] if text.strip() else []
    docs = []
    for n, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            _check_size(f"{f}:{n}", line, max_bytes)
            docs.append(Document(f"{name}:{n}", line.rstrip("\r"), str(f), n))
    return docs


def _read_jsonl(f: Path, name: str, text: str, max_bytes: int) -> list[Document]:
    docs = []
    for n, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError as e:
            raise DataError(f"{f}:{n}: bad JSON ({e})", fix='write one {"text": ...} object a line') from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise DataError(f"{f}:{n}: a record needs a string \"text\"", fix='write {"text": ..., "id"?: ...}')
        _check_size(f"{f}:{n}", rec["text"], max_bytes)
        doc_id = str(rec["id"]) if rec.get("id") is not None else f"{name}:{n}"
        meta = {k: v for k, v in rec.items() if k not in ("text", "id")}
        if rec["text"].strip():
            docs.append(Document(doc_id, rec["text"], str(f), n, meta))
    return docs


# ---------------------------------------------------------------------------- chunking


def check_sizes(size: int, overlap: int) -> None:
    if size < 1 or overlap < 0 or overlap >= size:
        raise ConfigError(f"chunk size {size}, overlap {overlap}: need size >= 1 and 0 <= overlap < size",
                          fix="e.g. --size 128 --overlap 16")


def windows(n_tokens: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """Token spans [a, b) covering 0..n_tokens: at most `size` long, consecutive ones sharing
    exactly `overlap` tokens (the last one is shorter when the text runs out)."""
    check_sizes(size, overlap)
    spans, start, step = [], 0, size - overlap
    while True:
        spans.append((start, min(start + size, n_tokens)))
        if start + size >= n_tokens:
            return spans
        start += step


def chunk_document(doc: Document, offsets: list[tuple[int, int]], size: int, overlap: int) -> list[Chunk]:
    """The chunks of one document, given its tokens' character offsets."""
    if not offsets:
        return []
    spans = windows(len(offsets), size, overlap)
    chunks = []
    for i, (a, b) in enumerate(spans):
        start = 0 if i == 0 else offsets[a][0]
        end = len(doc.text) if i == len(spans) - 1 else offsets[b - 1][1]
        text = doc.text[start:end]
        chunks.append(Chunk(f"{doc.id}#{i}", text, doc.source, doc.id, doc.line, start, end, (a, b),
                            text_key(text), doc.meta))
    return chunks


def chunk_documents(docs: Iterable[Document], tokenizer: PreTrainedTokenizerBase, *, size: int = 128,
                    overlap: int = 16, batch: int = 1024) -> list[Chunk]:
    """Every document's chunks, in order; documents are tokenized `batch` at a time (the fast
    tokenizer's batch call is several times quicker than one call a document)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')} is not a fast tokenizer: chunking "
                          "needs its character offsets", fix="use a model folder with a tokenizer.json")
    check_sizes(size, overlap)
    docs, chunks = list(docs), []
    for i in range(0, len(docs), batch):
        part = docs[i:i + batch]
        enc = tokenizer([d.text for d in part], add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        for doc, offsets in zip(part, enc["offset_mapping"], strict=True):
            chunks.extend(chunk_document(doc, offsets, size, overlap))
    return chunks


def dedupe(chunks: Iterable[Chunk], seen: Iterable[str] = ()) -> tuple[list[Chunk], int]:
    """Chunks whose key is neither in `seen` nor met before, and how many were dropped."""
    keys, kept, dropped = set(seen), [], 0
    for c in chunks:
        if c.key in keys:
            dropped += 1
            continue
        keys.add(c.key)
        kept.append(c)
    return kept, dropped
