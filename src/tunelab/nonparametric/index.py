"""The on-disk RAG index: chunks, their BM25 index and (optionally) their dense vectors.

Layout of an index folder (a folder tunelab owns, `.tunelab-owned.json` of kind `rag-index`):

    manifest.json   version, tokenizer identity, chunking settings, retrievers, encoder, counts, build time
    chunks.jsonl    one chunk a line: id, text, source, doc, line, start/end (characters), tokens, key, meta
    bm25/           the bm25s index (numpy arrays + vocabulary JSON) and bm25.json
    dense/          vectors.npy (N, D) float32 unit rows, the faiss index (exact.faiss or hnsw.faiss)

A build writes into a new folder beside OUT and renames it into place (`owned.install`), so a
killed or failed `rag index` leaves the previous index whole. `add=True` builds the same way from
the previous index plus the new documents: their chunks appended after dedupe against the old
ones, BM25 rebuilt over all, only the new chunks encoded.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from tunelab import owned
from tunelab.errors import ConfigError, DataError, TunelabError
from tunelab.faults import fault_point
from tunelab.nonparametric.chunk import MAX_DOC_BYTES, check_sizes, chunk_documents, dedupe, read_documents
from tunelab.nonparametric.encode import Encoder
from tunelab.nonparametric.retrieve import BM25, DenseIndex, rrf

KIND = "rag-index"
VERSION = 1
BUILT = ("bm25", "dense")  # what an index can hold
RETRIEVERS = ("bm25", "dense", "hybrid")  # how it can be searched
AUTO_HNSW = 100_000  # `dense_index="auto"`: exact search below this many chunks, HNSW from it on
HYBRID_DEPTH = 50  # candidates each retriever gives RRF


@dataclass(frozen=True)
class Hit:
    id: str
    text: str
    score: float
    source: str
    rank: int  # from 1


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase, name: str | None = None) -> dict[str, str]:
    """Its name (`name`, else its own) and a hash of its full definition: chunks of one index must
    come from one tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else f"{type(tokenizer).__name__}:{len(tokenizer)}"
    return {"name": name or str(tokenizer.name_or_path), "fingerprint": hashlib.sha256(blob.encode()).hexdigest()[:16]}


class RagIndex:
    """An index folder opened for search; its BM25 and dense parts load on first use."""

    def __init__(self, path: Path, manifest: dict[str, Any], chunks: list[dict[str, Any]]):
        self.path, self.manifest, self.chunks = path, manifest, chunks
        self._encoders: dict[str, Encoder] = {}

    @classmethod
    def open(cls, path: str | Path) -> RagIndex:
        path = Path(path)
        try:
            manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
            with open(path / "chunks.jsonl", encoding="utf-8") as f:
                chunks = [json.loads(line) for line in f]
        except (OSError, ValueError) as e:
            raise TunelabError(f"{path}: not a RAG index ({e.__class__.__name__}: {e})",
                               fix="build one with: tunelab rag index --docs PATH --out INDEX") from None
        if manifest.get("version") != VERSION:
            raise TunelabError(f"{path}: a RAG index of version {manifest.get('version')}, this tunelab reads "
                               f"version {VERSION}", fix="build the index again with this tunelab")
        return cls(path, manifest, chunks)

    @cached_property
    def bm25(self) -> BM25:
        self._require("bm25")
        return BM25.load(self.path / "bm25")

    @cached_property
    def dense(self) -> DenseIndex:
        self._require("dense")
        return DenseIndex.load(self.path / "dense")

    def vectors(self) -> np.ndarray:
        self._require("dense")
        return np.load(self.path / "dense" / "vectors.npy", allow_pickle=False)

    def _require(self, part: str) -> None:
        if part not in self.manifest["retrievers"]:
            flag = " --dense" if part == "dense" else ""
            raise ConfigError(f"{self.path}: the index has no {part} part (it holds: "
                              f"{', '.join(self.manifest['retrievers'])})",
                              fix=f"use --retriever {self.manifest['retrievers'][0]}, or rebuild it with"
                                  f" tunelab rag index{flag}")

    def encoder(self, name: str | None = None, *, trust_remote_code: bool = False,
                allow_pickle: bool = False) -> Encoder:
        """The encoder called `name` (default: the one the index was built with; `base`: the
        tokenizer's model), loaded once per index, checked against the index's fingerprint."""
        built = self.manifest.get("encoder") or {}
        name = self.manifest["tokenizer"]["name"] if name == "base" else name or built.get("name")
        if name not in self._encoders:
            self._require("dense")
            self._encoders[name] = Encoder.load(name, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        return self.check_encoder(self._encoders[name])

    def check_encoder(self, encoder: Encoder) -> Encoder:
        """The encoder, if it is the one the index's vectors came from; else a one-line error."""
        built = self.manifest.get("encoder") or {}
        if encoder.fingerprint != built.get("fingerprint"):
            raise ConfigError(f"{self.path}: built with encoder {built.get('name')} ({built.get('fingerprint')}), "
                              f"queried with {encoder.name} ({encoder.fingerprint}): their vectors do not compare",
                              fix=f"query with {built.get('name')}, or rebuild the index with --encoder {encoder.name}")
        return encoder

    def search(self, queries: Sequence[str], k: int = 5, retriever: str = "bm25",
               encoder: Encoder | str | None = None) -> list[list[Hit]]:
        """Per query, the `k` best chunks. `hybrid`: RRF of the BM25 and dense rankings (their
        top HYBRID_DEPTH each); its scores are RRF scores. Dense and hybrid embed the queries with
        `encoder`: an Encoder, or a name for `self.encoder` (None: the index's own)."""
        if retriever not in RETRIEVERS:
            raise ConfigError(f"unknown retriever {retriever!r}", fix=f"use one of: {', '.join(RETRIEVERS)}")
        queries = list(queries)
        if retriever == "bm25":
            return self._hits(self.bm25.search(queries, k))
        if retriever == "hybrid":
            self._require("bm25")
        self._require("dense")
        enc = self.check_encoder(encoder) if isinstance(encoder, Encoder) else self.encoder(encoder)
        vectors = enc.encode(queries)
        if retriever == "dense":
            return self._hits(self.dense.search(vectors, k))
        depth = max(k, HYBRID_DEPTH)
        lexical, dense = self.bm25.search(queries, depth), self.dense.search(vectors, depth)
        fused = [rrf([[i for i, _ in a], [i for i, _ in b]])[:k] for a, b in zip(lexical, dense, strict=True)]
        return self._hits(fused)

    def _hits(self, ranked: list[list[tuple[int, float]]]) -> list[list[Hit]]:
        return [[Hit(self.chunks[i]["id"], self.chunks[i]["text"], score, self.chunks[i]["source"], rank)
                 for rank, (i, score) in enumerate(row, start=1)] for row in ranked]


# ---------------------------------------------------------------------------- building


@dataclass(frozen=True)
class Settings:
    """What must agree between an index and what is added to it."""

    tokenizer: dict[str, str]
    size: int
    overlap: int
    retrievers: tuple[str, ...]
    encoder: dict[str, Any] | None  # name, fingerprint, dim, index kind


def _settings(tokenizer: dict[str, str], size: int, overlap: int, retrievers: Iterable[str],
              encoder: Encoder | None, dense_index: str) -> Settings:
    check_sizes(size, overlap)
    retrievers = tuple(retrievers)
    unknown = [r for r in retrievers if r not in BUILT]
    if not retrievers or unknown:
        raise ConfigError(f"retrievers {list(retrievers)}: an index holds some of {', '.join(BUILT)}",
                          fix='e.g. retrievers=("bm25", "dense")')
    enc = None
    if "dense" in retrievers:
        if encoder is None:
            raise ConfigError("a dense index needs an encoder", fix="pass --encoder MODEL (or base)")
        enc = {"name": encoder.name, "fingerprint": encoder.fingerprint, "dim": encoder.dim, "index": dense_index}
    return Settings(tokenizer, size, overlap, retrievers, enc)


def _check_same(old: Settings, new: Settings, path: Path) -> None:
    """An add must chunk, tokenize and encode as the index did."""
    was_enc, now_enc = old.encoder or {}, new.encoder or {}
    pairs = [("tokenizer", old.tokenizer["fingerprint"], new.tokenizer["fingerprint"],
              f"{new.tokenizer['name']} ({new.tokenizer['fingerprint']})",
              f"{old.tokenizer['name']} ({old.tokenizer['fingerprint']})", "--tokenizer " + old.tokenizer["name"]),
             ("chunk size", old.size, new.size, new.size, old.size, f"--size {old.size}"),
             ("overlap", old.overlap, new.overlap, new.overlap, old.overlap, f"--overlap {old.overlap}"),
             ("encoder", was_enc.get("fingerprint"), now_enc.get("fingerprint") if was_enc else None,
              f"{now_enc.get('name')} ({now_enc.get('fingerprint')})",
              f"{was_enc.get('name')} ({was_enc.get('fingerprint')})", f"--encoder {was_enc.get('name')}")]
    for what, was, now, now_text, was_text, flag in pairs:
        if was != now:
            raise ConfigError(f"{path}: --add with {what} {now_text}, but the index was built with {was_text}",
                              fix=f"add with {flag}, or build a new index")


def _previous(out: Path, add: bool) -> RagIndex | None:
    """The index an add extends; without `add`, refuses early a folder install would refuse."""
    if not add:
        owned.preflight(out, KIND, what="--out", force=False)
        return None
    if owned.state(out, KIND) != "owned":
        raise TunelabError(f"--add: {out} is not a RAG index tunelab built", fix="build it first, without --add")
    return RagIndex.open(out)


def _unique_ids(records: list[dict[str, Any]], taken: set[str]) -> list[dict[str, Any]]:
    """Chunk ids made unique (`~2`, `~3`, ...) where two documents share an id (same file name)."""
    for r in records:
        base, n = r["id"], 1
        while r["id"] in taken:
            n += 1
            r["id"] = f"{base}~{n}"
        taken.add(r["id"])
    return records


def build_index(docs: str | Path | Iterable[str | Path], out: str | Path, *, tokenizer: PreTrainedTokenizerBase,
                size: int = 128, overlap: int = 16, retrievers: Iterable[str] = ("bm25",),
                encoder: Encoder | None = None, add: bool = False, per_line: bool = False,
                max_doc_bytes: int = MAX_DOC_BYTES, dense_index: str = "auto", tokenizer_name: str | None = None,
                log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Chunk `docs` and write the index to `out` (module docstring); returns its build stats.
    `tokenizer_name`: the name the manifest records (default: the tokenizer's own `name_or_path`)."""
    t0, out = time.perf_counter(), Path(out)
    old = _previous(out, add)
    identity = tokenizer_identity(tokenizer, tokenizer_name)
    if old is None:
        settings = _settings(identity, size, overlap, retrievers, encoder, dense_index)
    else:  # what the index holds, and how it was built
        was = _manifest_settings(old.manifest)
        settings = _settings(identity, size, overlap, was.retrievers, encoder, (was.encoder or {}).get("index", ""))
        _check_same(was, settings, out)
    documents = read_documents(docs, per_line=per_line, max_bytes=max_doc_bytes)
    chunks = chunk_documents(documents, tokenizer, size=size, overlap=overlap)
    old_records = old.chunks if old else []
    new, dropped = dedupe(chunks, seen=(r["key"] for r in old_records))
    if not old_records and not new:
        where = ", ".join(map(str, docs)) if isinstance(docs, (list, tuple)) else str(docs)
        raise DataError(f"{where}: no text to index (no non-blank .txt/.md/.jsonl document found)",
                        fix="point --docs at text files, or a folder holding them")
    records = old_records + _unique_ids([c.record() for c in new], {r["id"] for r in old_records})
    log(f"{len(documents)} documents -> {len(chunks)} chunks, {dropped} duplicates dropped, {len(new)} new")
    counts = {"documents": len(documents) + (old.manifest["counts"]["documents"] if old else 0),
              "chunks": len(records), "duplicates_dropped": dropped + (old.manifest["counts"]["duplicates_dropped"]
                                                                        if old else 0)}
    tmp = owned.staging(out)
    try:
        kind = _write_parts(tmp, records, len(new), settings, old, encoder, log)
        manifest = _manifest(settings, counts, kind, time.perf_counter() - t0)
        owned.write_atomic(tmp / "manifest.json", json.dumps(manifest, indent=1))
        fault_point("rag-install", 0)
    except BaseException:
        owned.remove(tmp)
        raise
    owned.install(tmp, out, KIND, what="--out", force=False)
    log(f"wrote {out}")
    return {"index": str(out), **counts, "new_chunks": len(new), "retrievers": list(settings.retrievers),
            "dense_index": kind, "seconds": round(time.perf_counter() - t0, 3)}


def _write_parts(tmp: Path, records: list[dict[str, Any]], n_new: int, settings: Settings, old: RagIndex | None,
                 encoder: Encoder | None, log: Callable[[str], Any]) -> str | None:
    """chunks.jsonl, bm25/ and dense/ into `tmp`; returns the dense index kind (None without one)."""
    with open(tmp / "chunks.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if "bm25" in settings.retrievers:
        BM25([r["text"] for r in records]).save(tmp / "bm25")
    if "dense" not in settings.retrievers:
        return None
    assert encoder is not None and settings.encoder is not None
    log(f"encoding {n_new} chunks with {encoder.name}")
    fresh = encoder.encode([r["text"] for r in records[len(records) - n_new:]])
    if old is not None:
        dense, vectors = old.dense, np.concatenate([old.vectors(), fresh])
    else:
        kind = settings.encoder["index"]
        kind = ("exact" if len(records) < AUTO_HNSW else "hnsw") if kind == "auto" else kind
        dense, vectors = DenseIndex(encoder.dim, kind), fresh
    dense.add(fresh)
    (tmp / "dense").mkdir()
    np.save(tmp / "dense" / "vectors.npy", vectors, allow_pickle=False)
    dense.save(tmp / "dense")
    return dense.kind


def _manifest(settings: Settings, counts: dict[str, int], kind: str | None, seconds: float) -> dict[str, Any]:
    encoder = None if settings.encoder is None else {**settings.encoder, "index": kind}
    return {"version": VERSION, "kind": KIND, "tokenizer": settings.tokenizer,
            "chunking": {"size": settings.size, "overlap": settings.overlap}, "retrievers": list(settings.retrievers),
            "encoder": encoder, "counts": counts, "build_seconds": round(seconds, 3),
            "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _manifest_settings(m: dict[str, Any]) -> Settings:
    return Settings(m["tokenizer"], m["chunking"]["size"], m["chunking"]["overlap"], tuple(m["retrievers"]),
                    m.get("encoder"))
