"""In-memory retrievers: BM25 over words, dense vectors in faiss, and reciprocal rank fusion.

The building blocks of RAG (N02; `index.py` puts them on disk) and of in-context example selection
(N01). Each answers `search(queries, k)` with, per query, `(position, score)` pairs best first.

- `BM25`: Okapi BM25 (Robertson & Zaragoza 2009) in the Lucene variant bm25s implements
  (Kamphuis et al., ECIR 2020): score(q, d) = sum over the query's words t (repeats count) of
  idf(t) * tf / (tf + k1 * (1 - b + b * |d| / avgdl)), idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5)).
  Words: the text lowercased, then every run of Unicode letters, digits and `_` (`\\w+`); no
  stopword removal and no stemming, because names and short words carry the facts ("Noor", "Li").
- `rrf`: reciprocal rank fusion (Cormack et al., SIGIR 2009): score(d) = sum over rankings of
  1 / (k + rank(d)), ranks from 1.
- `DenseIndex`: cosine similarity of L2-normalised float32 vectors. `exact` is faiss's
  `IndexFlatIP` (every vector compared). `hnsw` is approximate: a navigable small-world graph
  (Malkov & Yashunin, arXiv:1603.09320; faiss `IndexHNSWFlat`, M=32, efConstruction=80), chosen
  over IVF because it needs no training (an incremental add keeps its
  quality; IVF's centroids would go stale) and keeps high recall from 1k to 1M vectors at
  ~1 ms a query. The graph is built on L2 distance, whose order equals cosine's on unit vectors
  (cos = 1 - d^2 / 2), since HNSW's greedy search assumes a metric. efSearch (the candidates a
  query visits) grows with the index unless set: 128 below 100k vectors, 512 below 500k, 2048 from
  500k — measured on TinyWorld lines + distractors (docs/results/nonparametric.md#scale): at 1M,
  128 finds 0.93 of what exact search finds (recall@10), 512 0.95, 2048 0.97 at p95 9 ms.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bm25s
import faiss
import numpy as np

from tunelab.errors import TunelabError

WORD = re.compile(r"\w+")
Ranked = list[tuple[int, float]]


def words(text: str) -> list[str]:
    """The BM25 terms of a text (module docstring: lowercased `\\w+` runs, nothing removed)."""
    return WORD.findall(text.lower())


def top_k(scores: np.ndarray, k: int) -> Ranked:
    """The `k` best positions of `scores`, best first; ties go to the lower position."""
    k = min(k, len(scores))
    if k <= 0:
        return []
    part = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    order = part[np.lexsort((part, -scores[part]))]
    return [(int(i), float(scores[i])) for i in order]


class BM25:
    """BM25 over `texts` (module docstring: the formula and the words)."""

    def __init__(self, texts: list[str], *, k1: float = 1.5, b: float = 0.75):
        self.k1, self.b, self.n = k1, b, len(texts)
        self._index = bm25s.BM25(k1=k1, b=b, method="lucene")
        if texts:
            self._index.index([words(t) for t in texts], show_progress=False)

    def search(self, queries: list[str], k: int) -> list[Ranked]:
        """Per query, at most `k` texts that share a word with it, best first; a query with no word
        of the texts (empty, punctuation) gets an empty list."""
        return [self._search_one(q, k) for q in queries]

    def _search_one(self, query: str, k: int) -> Ranked:
        if self.n == 0 or k <= 0:
            return []
        ids = self._index.get_tokens_ids(words(query))
        if not ids:
            return []
        hits = top_k(self.scores(ids), k)
        return [(i, s) for i, s in hits if s > 0]

    def scores(self, term_ids: list[int]) -> np.ndarray:
        """Every text's score for the query's term ids: the precomputed per-term columns of the
        index summed with one bincount (bm25s's own loop of `np.add.at` is ~10x slower at 1M texts)."""
        sc = self._index.scores
        data, indices, indptr = sc["data"], sc["indices"], sc["indptr"]
        spans = [(indptr[t], indptr[t + 1]) for t in term_ids]
        docs = np.concatenate([indices[a:b] for a, b in spans])
        weights = np.concatenate([data[a:b] for a, b in spans]).astype(np.float64)
        return np.bincount(docs, weights=weights, minlength=self.n)

    def save(self, out: str | Path) -> None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bm25.json").write_text(json.dumps({"k1": self.k1, "b": self.b, "n": self.n, "words": WORD.pattern,
                                                   "lowercase": True, "variant": "lucene"}), encoding="utf-8")
        if self.n:
            self._index.save(str(out), show_progress=False)

    @classmethod
    def load(cls, path: str | Path) -> BM25:
        """A saved index; its arrays are memory-mapped (a large index opens at once)."""
        path = Path(path)
        meta = _read_json(path / "bm25.json", "a BM25 index")
        self = cls([], k1=meta["k1"], b=meta["b"])
        self.n = meta["n"]
        if self.n:
            self._index = bm25s.BM25.load(str(path), mmap=True, show_progress=False)
        return self


def rrf(rankings: Sequence[Sequence[int]], k: int = 60) -> Ranked:
    """Reciprocal rank fusion: (item, sum of 1 / (k + rank)) best first, ranks from 1. Ties go to
    the item met first (the earlier ranking's)."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda kv: -kv[1])


DENSE_KINDS = ("exact", "hnsw")
HNSW_M, HNSW_EF_CONSTRUCTION = 32, 80
EF_BY_SIZE = ((100_000, 128), (500_000, 512))  # (below this many vectors, efSearch); beyond: EF_LARGE
EF_LARGE = 2048


def ef_for(n: int) -> int:
    """The efSearch an HNSW index of `n` vectors searches with unless told otherwise."""
    return next((ef for limit, ef in EF_BY_SIZE if n < limit), EF_LARGE)


def normalized(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, as contiguous float32 (what faiss takes); zero rows stay zero."""
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    if v.ndim != 2:
        raise ValueError(f"vectors must be 2-D (N, D), got shape {v.shape}")
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return np.ascontiguousarray(v / np.maximum(norms, 1e-12), dtype=np.float32)


class DenseIndex:
    """Cosine search over unit vectors: `exact` (flat inner product) or `hnsw` (approximate)."""

    def __init__(self, dim: int, kind: str = "exact", *, ef_search: int | None = None):
        if kind not in DENSE_KINDS:
            raise TunelabError(f"unknown dense index {kind!r}", fix=f"use one of: {', '.join(DENSE_KINDS)}")
        self.dim, self.kind = dim, kind
        if kind == "exact":
            self._index = faiss.IndexFlatIP(dim)
        else:
            self._index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_L2)
            self._index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        self._ef_fixed = ef_search  # None: by size (ef_for)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    @property
    def ef_search(self) -> int | None:
        """HNSW's candidate list per query (recall for time): the value set, else ef_for(size); None
        for exact."""
        if self.kind != "hnsw":
            return None
        return self._ef_fixed if self._ef_fixed is not None else ef_for(len(self))

    @ef_search.setter
    def ef_search(self, value: int | None) -> None:
        self._ef_fixed = value

    @property
    def _hnsw(self) -> Any:  # faiss's HNSW struct (SWIG)
        return faiss.downcast_index(self._index).hnsw

    def add(self, vectors: np.ndarray) -> None:
        """Append vectors (normalised here); their positions continue from `len(self)`."""
        v = normalized(vectors)
        if v.shape[1] != self.dim:
            raise ValueError(f"vectors of dimension {v.shape[1]} added to a {self.dim}-dimensional index")
        self._index.add(v)

    def search(self, vectors: np.ndarray, k: int) -> list[Ranked]:
        """Per query vector, the `k` nearest (position, cosine) best first (k capped at the size)."""
        k = min(k, len(self))
        q = normalized(vectors)
        if k <= 0 or not len(q):
            return [[] for _ in range(len(q))]
        if self.kind == "hnsw":
            self._hnsw.efSearch = self.ef_search
        dist, ids = self._index.search(q, k)  # (Q, k) each
        sims = dist if self.kind == "exact" else 1.0 - dist / 2.0
        return [[(int(i), float(s)) for i, s in zip(row_ids, row, strict=True) if i >= 0]
                for row_ids, row in zip(ids, sims, strict=True)]

    def save(self, out: str | Path) -> None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self._index, str(out / f"{self.kind}.faiss"))
        (out / "faiss.json").write_text(json.dumps({"dim": self.dim, "kind": self.kind, "n": len(self)}),
                                        encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> DenseIndex:
        path = Path(path)
        meta = _read_json(path / "faiss.json", "a dense index")
        self = cls(meta["dim"], meta["kind"])
        self._index = faiss.read_index(str(path / f"{self.kind}.faiss"))
        return self


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TunelabError(f"{path.parent}: not {what} ({path.name}: {e})",
                           fix="point at a folder written by save(), or build it again") from None
