"""RAG retrieval building blocks (tunelab.nonparametric): BM25 against its formula, RRF against hand
values, dense search against brute-force cosine, HNSW recall, chunk boundaries, dedupe, document
reading and its errors, the encoder."""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np
import pytest
import torch

from tests import tiny
from tunelab.errors import ConfigError, DataError, TunelabError
from tunelab.nonparametric.chunk import (
    Document,
    chunk_documents,
    dedupe,
    read_documents,
    text_key,
    windows,
)
from tunelab.nonparametric.encode import Encoder
from tunelab.nonparametric.retrieve import BM25, DenseIndex, rrf

CORPUS = [
    "Noor Mendez plays the violin.",
    "Noor Mendez's hobby is origami, and origami is hard.",
    "Boris Castillo plays the harp. The harp is large.",
    "The violin and the harp and the violin again.",
    "Lotte Bakshi enjoys stargazing in free time.",
    "!!!",
]


def lucene_bm25(corpus: list[str], query: str, k1: float = 1.5, b: float = 0.75) -> list[float]:
    """The Lucene variant of BM25 written out: idf = ln(1 + (N - df + 0.5) / (df + 0.5)),
    tf part = tf / (tf + k1 (1 - b + b |d| / avgdl)), summed over the query's words (repeats count)."""
    docs = [re.findall(r"\w+", d.lower()) for d in corpus]
    n, avgdl = len(docs), sum(map(len, docs)) / len(docs)
    out = []
    for d in docs:
        tf, score = Counter(d), 0.0
        for t in re.findall(r"\w+", query.lower()):
            df = sum(t in doc for doc in docs)
            if df == 0:
                continue
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            score += idf * tf[t] / (tf[t] + k1 * (1 - b + b * len(d) / avgdl))
        out.append(score)
    return out


@pytest.mark.parametrize("query", ["violin", "Noor Mendez violin", "the harp harp", "ORIGAMI hobby"])
@pytest.mark.parametrize("k1, b", [(1.5, 0.75), (0.9, 0.4)])
def test_bm25_scores_match_the_formula(query, k1, b):
    ref = lucene_bm25(CORPUS, query, k1, b)
    got = BM25(CORPUS, k1=k1, b=b).search([query], k=len(CORPUS))[0]
    expect = sorted(((i, s) for i, s in enumerate(ref) if s > 0), key=lambda x: (-x[1], x[0]))
    assert [i for i, _ in got] == [i for i, _ in expect]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in expect], rtol=1e-5)


def test_bm25_edges_and_round_trip(tmp_path):
    bm = BM25(CORPUS)
    assert bm.search(["", "?!", "zebra", "violin"], k=2)[:3] == [[], [], []]
    assert len(bm.search(["the"], k=100)[0]) == 3  # k capped at the texts that match (0, 2, 3)
    assert bm.search(["violin"], k=0) == [[]]
    assert BM25([]).search(["violin"], 3) == [[]]
    bm.save(tmp_path / "bm")
    assert BM25.load(tmp_path / "bm").search(["noor harp"], 3) == bm.search(["noor harp"], 3)
    BM25([]).save(tmp_path / "empty")
    assert BM25.load(tmp_path / "empty").search(["a"], 1) == [[]]


def test_rrf_hand_values():
    fused = rrf([[7, 3, 5], [3, 9]], k=60)
    expect = {3: 1 / 62 + 1 / 61, 7: 1 / 61, 9: 1 / 62, 5: 1 / 63}
    assert [i for i, _ in fused] == [3, 7, 9, 5]  # 7 and 9 differ; ties would keep the first ranking's
    for i, s in fused:
        assert s == pytest.approx(expect[i])
    assert rrf([[1], [2]], k=1) == [(1, 0.5), (2, 0.5)]
    assert rrf([]) == []


def test_dense_exact_is_brute_force_cosine(tmp_path):
    rng = np.random.default_rng(0)
    base, queries = rng.normal(size=(400, 24)) * 3, rng.normal(size=(7, 24))
    index = DenseIndex(24, "exact")
    index.add(base)
    got = index.search(queries, 5)
    cos = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
        base / np.linalg.norm(base, axis=1, keepdims=True)).T
    for row, sims in zip(got, cos, strict=True):
        assert [i for i, _ in row] == list(np.argsort(-sims)[:5])
        np.testing.assert_allclose([s for _, s in row], np.sort(sims)[::-1][:5], rtol=1e-5, atol=1e-6)
    index.save(tmp_path / "d")
    assert DenseIndex.load(tmp_path / "d").search(queries, 5) == got
    assert DenseIndex(24, "exact").search(queries, 3) == [[]] * 7
    assert len(index.search(queries[:1], 1000)[0]) == 400


def test_hnsw_recall_on_random_vectors(tmp_path):
    rng = np.random.default_rng(1)
    base, queries = rng.normal(size=(5000, 32)), rng.normal(size=(100, 32))
    exact, approx = DenseIndex(32, "exact"), DenseIndex(32, "hnsw")
    for ix in (exact, approx):
        ix.add(base)
    truth = [{i for i, _ in row} for row in exact.search(queries, 10)]
    found = approx.search(queries, 10)
    recall = np.mean([len(t & {i for i, _ in f}) / 10 for t, f in zip(truth, found, strict=True)])
    assert recall >= 0.95, recall
    exact_scores = {i: s for row in exact.search(queries[:1], 10) for i, s in row}
    for i, s in found[0]:  # cosines reported from L2 distances
        if i in exact_scores:
            assert s == pytest.approx(exact_scores[i], abs=1e-4)
    approx.save(tmp_path / "h")
    assert DenseIndex.load(tmp_path / "h").search(queries[:5], 10) == approx.search(queries[:5], 10)
    with pytest.raises(TunelabError, match="unknown dense index"):
        DenseIndex(4, "ivf")


def test_hnsw_search_widens_with_the_index_unless_set():
    from tunelab.nonparametric.retrieve import ef_for

    assert [ef_for(n) for n in (0, 99_999, 100_000, 499_999, 500_000, 10**7)] == [128, 128, 512, 512, 2048, 2048]
    ix = DenseIndex(8, "hnsw")
    ix.add(np.random.default_rng(2).normal(size=(50, 8)))
    assert ix.ef_search == 128
    ix.search(np.ones((1, 8)), 3)
    assert ix._hnsw.efSearch == 128  # what the search used
    ix.ef_search = 700
    ix.search(np.ones((1, 8)), 3)
    assert ix.ef_search == 700 and ix._hnsw.efSearch == 700
    assert DenseIndex(8, "exact").ef_search is None


# ---------------------------------------------------------------------------- chunking


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.tokenizer()


def test_windows_overlap_exactly():
    assert windows(5, 4, 1) == [(0, 4), (3, 5)]
    assert windows(4, 4, 1) == [(0, 4)]
    assert windows(10, 4, 2) == [(0, 4), (2, 6), (4, 8), (6, 10)]
    assert windows(1, 3, 0) == [(0, 1)]
    for size, overlap in [(4, 4), (3, 5), (0, 0)]:
        with pytest.raises(ConfigError, match="overlap"):
            windows(10, size, overlap)


@pytest.mark.parametrize("size, overlap", [(8, 0), (8, 3), (16, 15), (5, 1)])
def test_chunks_are_exact_spans_with_exact_overlap(tokenizer, size, overlap):
    text = "  " + " ".join(tiny.corpus(30, seed=3)) + " Ünïcode 東京 café\n\nlast line.  "
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    chunks = chunk_documents([Document("d", text, "d.txt")], tokenizer, size=size, overlap=overlap)
    assert len(chunks) > 3
    assert chunks[0].start == 0 and chunks[-1].end == len(text)
    for c in chunks:
        assert text[c.start:c.end] == c.text and c.tokens[1] - c.tokens[0] <= size
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert b.tokens[0] == a.tokens[1] - overlap  # exactly `overlap` tokens shared
        assert b.start == offsets[b.tokens[0]][0] and a.end == offsets[a.tokens[1] - 1][1]
    assert chunks[-1].tokens[1] == len(offsets)
    assert [c.id for c in chunks] == [f"d#{i}" for i in range(len(chunks))]


def test_dedupe_by_normalised_text():
    assert text_key("Noor  plays\tthe VIOLIN ") == text_key("noor plays the violin")
    assert text_key("ﬁne") == text_key("fine")  # NFKC
    assert text_key("noor plays the violin.") != text_key("noor plays the violin")
    docs = [Document(str(i), t, "x") for i, t in enumerate(["A b", "a  B", "c", "A B", "d"])]
    chunks = chunk_documents(docs, tiny.tokenizer(), size=50, overlap=0)
    kept, dropped = dedupe(chunks)
    assert [c.text for c in kept] == ["A b", "c", "d"] and dropped == 2
    kept, dropped = dedupe(chunks, seen=[text_key("c")])
    assert [c.text for c in kept] == ["A b", "d"] and dropped == 3


def test_read_documents(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "a.md").write_text("# Title\n\nSome notes.\n")
    (d / "sub" / "facts.txt").write_text("line one\n\n  \nline four\r\n")
    (d / "r.jsonl").write_text('{"text": "first", "id": 7, "topic": "x"}\n\n{"text": "second"}\n{"text": " "}\n')
    (d / "skip.png").write_bytes(b"\x89PNG\0")
    (d / ".hidden.txt").write_text("secret")
    whole = read_documents(d)
    assert [(x.id, x.line) for x in whole] == [("a.md", None), ("7", 1), ("r.jsonl:3", 3), ("sub/facts.txt", None)]
    assert whole[1].meta == {"topic": "x"} and whole[0].text == "# Title\n\nSome notes.\n"
    lines = read_documents([d / "sub" / "facts.txt"], per_line=True)
    assert [(x.id, x.text, x.line) for x in lines] == [("facts.txt:1", "line one", 1),
                                                       ("facts.txt:4", "line four", 4)]


def test_tinyworld_names_read_their_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    docs = read_documents("tinyworld:new-facts@knowledge")
    assert len(docs) == 600 and docs[0].id == "knowledge.jsonl:1" and " plays the " in docs[0].text


@pytest.mark.parametrize("name, content, match", [
    ("bin.txt", b"text\nmore\0binary", r"bin.txt:2: a binary file"),
    ("latin.txt", b"ok\ncaf\xe9\n", r"latin.txt:2: not UTF-8"),
    ("bad.jsonl", b'{"text": "a"}\n{"text": 3}\n', r"bad.jsonl:2: a record needs a string \"text\""),
    ("broken.jsonl", b'{"text": "a"}\n{"text\n', r"broken.jsonl:2: bad JSON"),
    ("big.txt", b"x" * 200, r"big.txt: 200 bytes, over the 100-byte document limit"),
    ("big.jsonl", b'{"text": "' + b"y" * 150 + b'"}\n', r"big.jsonl:1: a document of 150 bytes"),
    ("doc.pdf", b"%PDF", r"unsupported document type '.pdf'"),
])
def test_bad_documents_are_one_line_errors_naming_the_file(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=match) as e:
        read_documents(tmp_path / name, max_bytes=100)
    assert e.value.fix and len(str(e.value).splitlines()) == 2
    with pytest.raises(DataError, match="no such file"):
        read_documents(tmp_path / "missing")


# ---------------------------------------------------------------------------- encoder


def test_encoder_mean_pools_the_last_hidden_states(llama_dir):
    enc = Encoder.load(str(llama_dir), batch_size=3)
    texts = ["the apple is red", "a", "the river is blue and the number is 7", "stone", "lamp lamp lamp"]
    v = enc.encode(texts)
    assert v.shape == (5, 32) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(llama_dir)).eval()
    for text, row in zip(texts, v, strict=True):  # one text alone: no padding, a plain mean
        ids = enc.tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            h = model(ids, output_hidden_states=True).hidden_states[-1][0]  # (T, H)
        ref = torch.nn.functional.normalize(h.mean(0), dim=0).numpy()
        np.testing.assert_allclose(row, ref, atol=1e-5)


def test_encoder_fingerprint_is_a_stable_identity(llama_dir, tmp_path):
    import shutil

    a = Encoder.load(str(llama_dir))
    shutil.copytree(llama_dir, tmp_path / "copy")
    assert Encoder.load(str(tmp_path / "copy")).fingerprint == a.fingerprint
    other = tiny.save_model(tmp_path / "other", "llama", seed=1)  # same architecture, other weights
    assert Encoder.load(str(other)).fingerprint != a.fingerprint


def test_an_encoder_folder_loads_with_automodel(tmp_path):
    from transformers import BertConfig, BertModel

    tok = tiny.tokenizer()
    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         vocab_size=len(tok))).save_pretrained(str(tmp_path / "bert"))
    tok.save_pretrained(str(tmp_path / "bert"))
    enc = Encoder.load(str(tmp_path / "bert"))
    texts = ["the apple is red", "the river is blue", "a stone"]
    index = DenseIndex(enc.dim)
    index.add(enc.encode(texts))
    assert enc.dim == 16 and [row[0][0] for row in index.search(enc.encode(texts), 1)] == [0, 1, 2]


def test_a_peft_adapter_loads_through_artifacts(llama_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(llama_dir)),
                           LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(str(tmp_path / "adapter"))
    tiny.tokenizer().save_pretrained(str(tmp_path / "adapter"))
    adapted, base = Encoder.load(str(tmp_path / "adapter")), Encoder.load(str(llama_dir))
    assert adapted.fingerprint != base.fingerprint
    a, b = adapted.encode(["the apple is red"]), base.encode(["the apple is red"])
    assert a.shape == b.shape == (1, 32) and not np.allclose(a, b, atol=1e-4)
