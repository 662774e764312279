"""RAG retrieval at scale: BM25 (bm25s), exact faiss and HNSW from 1k to 1M chunks.

    python bench/rag_scale.py [--sizes 1000,10000,100000] [--base-max 10000] [--json docs/results/rag-scale.json]

The knowledge base: TinyWorld's knowledge.txt (one line per person with new facts, 120 lines) plus
generated distractor lines in the same two templates about generated people who do not exist
(syllable names; half of them borrow a real TinyWorld first name), up to each size. Corpora are
nested (each size extends the smaller one), so one encoding serves every size. The questions: the
120 new-facts test questions; the gold chunk of a question is its person's line.

Per size and retriever: build time, query latency p50/p95 (one query a call, the retriever alone,
after 5 warm-up calls, one thread; the query's embedding is made beforehand and timed apart), recall@10 of the
gold line, and for HNSW (at each `--ef-search`) the overlap of its top 10 with the exact top 10
(recall relative to exact; near-ties at the 10th place, common among distractors that share an
instrument, a hobby and a first name, keep it below 1 even where the gold line is always found).

Encoders. `base`: the embedded base model, mean-pooled (what `tunelab rag index --dense` uses);
it is slow on a CPU (~75 chunks/s on 2 busy cores), so it encodes only sizes up to `--base-max`.
`random-projection`: a cheap stand-in for every size: the tf-idf vector of the words (the words
BM25 sees) projected to the base's 256 dimensions with a fixed Gaussian matrix (Johnson-
Lindenstrauss: cosines are kept approximately). Its recall is tf-idf's, not a neural encoder's;
it is here for the latency and the approximate-vs-exact recall, which depend on the size and the
dimension, not on what the vectors mean.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path

import faiss
import numpy as np
import scipy.sparse as sp
import torch

from tunelab.nonparametric.encode import Encoder
from tunelab.nonparametric.retrieve import BM25, DenseIndex, words
from tunelab.world import vocab
from tunelab.world.generator import make_world
from tunelab.world.tasks import knowledge_text, new_facts
from tunelab.world.templates import NEW_RELATIONS, fill

ROOT = Path(__file__).resolve().parents[1]
SYLLABLES = ("ka ren do mi sa lo ve tor an el is ul ber gan fi nor pa qu ri sto van wel xa yor zen hal mar "
             "bri cel dun fen gor hin jas kel lum mok nev orn pel rus sil tam ust vor wyn").split()
DIM = 256
K = 10


def person_name(rng: random.Random, taken: set[str]) -> str:
    while True:
        first = rng.choice(vocab.FIRST_NAMES) if rng.random() < 0.5 else _word(rng, 2)
        name = f"{first} {_word(rng, rng.randint(2, 3))}"
        if name not in taken:
            taken.add(name)
            return name


def _word(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(n)).capitalize()


def knowledge_base(n: int) -> tuple[list[str], list[str], list[int]]:
    """(lines, questions, gold line of each question): the real lines first, then distractors."""
    world = make_world(0, 300)
    lines = knowledge_text(world).splitlines()
    people = list(world.new_facts)
    test = new_facts(world, 0)["test"]
    questions = [r["messages"][0]["content"] for r in test]
    gold = [people.index(r["person"]) for r in test]
    rng, taken = random.Random(0), {p.name for p in world.people}
    instrument, hobby = NEW_RELATIONS["instrument"].prose[0], NEW_RELATIONS["hobby"].prose[0]
    while len(lines) < n:
        name = person_name(rng, taken)
        lines.append(f"{fill(instrument, name, rng.choice(vocab.INSTRUMENTS))} "
                     f"{fill(hobby, name, rng.choice(vocab.HOBBIES))}")
    return lines, questions, gold


class RandomProjection:
    """tf-idf of the words, projected to DIM dimensions by a fixed Gaussian matrix (module docstring)."""

    name = "random-projection"

    def __init__(self, corpus: list[str]):
        self.vocab: dict[str, int] = {}
        rows = [self._ids(t, grow=True) for t in corpus]
        df = np.bincount(np.concatenate([np.unique(r) for r in rows]), minlength=len(self.vocab))
        self.idf = np.log((1 + len(corpus)) / (1 + df)) + 1.0
        self.proj = np.random.default_rng(0).standard_normal((len(self.vocab), DIM)).astype(np.float32)
        self.corpus_rows = rows

    def _ids(self, text: str, grow: bool = False) -> np.ndarray:
        out = []
        for w in words(text):
            if w not in self.vocab and grow:
                self.vocab[w] = len(self.vocab)
            if w in self.vocab:
                out.append(self.vocab[w])
        return np.asarray(out, dtype=np.int64)

    def _encode_ids(self, rows: list[np.ndarray]) -> np.ndarray:
        indptr = np.cumsum([0] + [len(r) for r in rows])
        cols = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        tf = sp.csr_matrix((np.ones(len(cols), dtype=np.float32), cols, indptr), shape=(len(rows), len(self.vocab)))
        tf.sum_duplicates()
        tf.data = (1.0 + np.log(tf.data)) * self.idf[tf.indices]
        return np.asarray(tf @ self.proj, dtype=np.float32)

    def encode_corpus(self, n: int) -> np.ndarray:
        return self._encode_ids(self.corpus_rows[:n])

    def encode(self, texts: list[str]) -> np.ndarray:
        return self._encode_ids([self._ids(t) for t in texts])


def latencies(fn, n: int) -> tuple[float, float]:
    """p50, p95 in ms of `fn(i)` for i in range(n), one call each, after 5 warm-up calls, on one
    thread: a single query gains nothing from a second, and on a loaded machine an OpenMP team
    waits for its slowest thread's time slice (faiss exact search at 100k: 4 ms on 1 thread, 32 ms
    on 2 while another job holds a core)."""
    threads = faiss.omp_get_max_threads(), torch.get_num_threads()
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    try:
        return _timed(fn, n)
    finally:
        faiss.omp_set_num_threads(threads[0])
        torch.set_num_threads(threads[1])


def _timed(fn, n: int) -> tuple[float, float]:
    for i in range(min(5, n)):
        fn(i)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


def recall_gold(ranked: list[list[tuple[int, float]]], gold: list[int]) -> float:
    return float(np.mean([g in {i for i, _ in row[:K]} for row, g in zip(ranked, gold, strict=True)]))


def bm25_row(lines: list[str], questions: list[str], gold: list[int]) -> dict:
    t0 = time.perf_counter()
    bm = BM25(lines)
    build = time.perf_counter() - t0
    p50, p95 = latencies(lambda i: bm.search([questions[i]], K), len(questions))
    return {"retriever": "bm25", "encoder": "-", "build_s": build, "p50_ms": p50, "p95_ms": p95,
            "recall10": recall_gold(bm.search(questions, K), gold), "vs_exact": None}


def dense_rows(vectors: np.ndarray, queries: np.ndarray, gold: list[int], encoder: str,
               ef_search: list[int]) -> list[dict]:
    """The exact index, then the HNSW index (built once) at each efSearch."""
    exact = DenseIndex(vectors.shape[1], "exact")
    t0 = time.perf_counter()
    exact.add(vectors)
    rows = [_dense_row(exact, time.perf_counter() - t0, queries, gold, encoder, None)]
    exact_top = [{i for i, _ in r} for r in exact.search(queries, K)]
    hnsw = DenseIndex(vectors.shape[1], "hnsw")
    t0 = time.perf_counter()
    hnsw.add(vectors)
    build = time.perf_counter() - t0
    for ef in ef_search:
        hnsw.ef_search = ef
        rows.append(_dense_row(hnsw, build, queries, gold, encoder, exact_top))
    return rows


def _dense_row(index: DenseIndex, build: float, queries: np.ndarray, gold: list[int], encoder: str,
               exact_top: list[set[int]] | None) -> dict:
    p50, p95 = latencies(lambda i: index.search(queries[i:i + 1], K), len(queries))
    ranked = index.search(queries, K)
    vs = None if exact_top is None else float(np.mean([len({i for i, _ in r} & t) / K
                                                       for r, t in zip(ranked, exact_top, strict=True)]))
    return {"retriever": index.kind, "ef_search": index.ef_search, "encoder": encoder, "build_s": build,
            "p50_ms": p50, "p95_ms": p95, "recall10": recall_gold(ranked, gold), "vs_exact": vs}


def encode_base(lines: list[str], questions: list[str]) -> tuple[np.ndarray, np.ndarray, dict]:
    enc = Encoder.load("tunelab-tiny", batch_size=128)
    t0 = time.perf_counter()
    vectors = enc.encode(lines)
    seconds = time.perf_counter() - t0
    q50, q95 = latencies(lambda i: enc.encode([questions[i]]), len(questions))
    info = {"chunks": len(lines), "seconds": seconds, "chunks_per_s": len(lines) / seconds,
            "query_encode_p50_ms": q50, "query_encode_p95_ms": q95, "fingerprint": enc.fingerprint}
    return vectors, enc.encode(questions), info


def run(sizes: list[int], base_max: int, ef_search: list[int]) -> dict:
    lines, questions, gold = knowledge_base(max(sizes))
    rp = RandomProjection(lines)
    rp_queries = rp.encode(questions)
    base_n = max([s for s in sizes if s <= base_max], default=0)
    base = encode_base(lines[:base_n], questions) if base_n else None
    if base:
        info = base[2]
        print(f"base encoder: {info['chunks_per_s']:.0f} chunks/s, query p50 {info['query_encode_p50_ms']:.1f} ms")
    rows = []
    for n in sizes:
        size_rows = [bm25_row(lines[:n], questions, gold)]
        if base and n <= base_n:
            size_rows += dense_rows(base[0][:n], base[1], gold, "base", ef_search)
        size_rows += dense_rows(rp.encode_corpus(n), rp_queries, gold, rp.name, ef_search)
        for r in size_rows:
            rows.append({"chunks": n, **r})
            print(fmt(rows[-1]), flush=True)
    return {"rows": rows, "base_encoder": base[2] if base else None}


HEADER = f"{'chunks':>9} {'retriever':<9} {'encoder':<17} {'build s':>8} {'p50 ms':>7} {'p95 ms':>7} " \
         f"{'R@10':>5} {'R@10/exact':>10}"


def fmt(r: dict) -> str:
    vs = "-" if r["vs_exact"] is None else f"{r['vs_exact']:.3f}"
    name = r["retriever"] + (f" {r['ef_search']}" if r.get("ef_search") else "")
    return (f"{r['chunks']:>9,} {name:<9} {r['encoder']:<17} {r['build_s']:>8.2f} {r['p50_ms']:>7.2f} "
            f"{r['p95_ms']:>7.2f} {r['recall10']:>5.2f} {vs:>10}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000,10000,100000", help="comma-separated chunk counts")
    ap.add_argument("--base-max", type=int, default=10_000, help="largest size the base model encodes")
    ap.add_argument("--threads", type=int, default=2, help="torch and faiss threads for encoding and building")
    ap.add_argument("--ef-search", default="128", help="HNSW efSearch values to measure (comma-separated)")
    ap.add_argument("--json", default="docs/results/rag-scale.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    print(HEADER)
    t0 = time.perf_counter()
    result = run(sizes, args.base_max, [int(e) for e in args.ef_search.split(",")])
    result.update({"command": "python bench/rag_scale.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                                     vars(args).items() if k != "json"),
                   "seconds": time.perf_counter() - t0, "k": K, "dim": DIM,
                   "machine": {"cpu_count": os.cpu_count(), "threads": args.threads, "platform": platform.platform(),
                               "processor": platform.processor() or platform.machine()}})
    if args.json:
        (ROOT / args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
