"""In-context learning and the prompt assembly of ICL / RAG (nonparametric/icl.py, augment.py):
shot selection, order, the token budget (whole shots and passages dropped, never the question),
retrieval counts against hand-computed values, the eval / generate / CLI / run wiring."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from transformers import AutoTokenizer

from tunelab.config import ICLConfig, RAGConfig
from tunelab.errors import ConfigError, DataError, TunelabError
from tunelab.nonparametric import augment
from tunelab.nonparametric.icl import Shot, ShotSelector, arrange, shots_of, with_shots
from tunelab.runconfig import build_config

PEOPLE = ["Alice Marsh", "Bruno Keller", "Chiara Neri", "Dmitri Volkov", "Elena Sousa", "Farid Haddad"]
INSTRUMENTS = ["harp", "cello", "flute", "organ", "oboe", "drums"]


def qa(question: str, answer: str, **meta) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "answer": answer, **meta}


POOL = [qa(f"Which instrument does {p} play?", i, person=p) for p, i in zip(PEOPLE, INSTRUMENTS, strict=True)]


@pytest.fixture(scope="module")
def tokenizer(llama_dir):
    return AutoTokenizer.from_pretrained(llama_dir)


def selector(**kw) -> ShotSelector:
    return ShotSelector(shots_of(POOL, "pool"), ICLConfig(**kw))


# ----------------------------------------------------------------------------- selection


def test_similar_puts_the_shot_about_the_same_person_first():
    shots = selector(k=3, select="similar").select("What does Chiara Neri play in the band?", 0)
    assert len(shots) == 3
    assert "Chiara Neri" in shots[0].question and shots[0].reply == "flute"
    assert len({s.question for s in shots}) == 3


def test_the_evaluated_question_itself_is_never_a_shot():
    for select in ("similar", "random", "fixed"):
        sel = selector(k=len(POOL), select=select)
        for pos, record in enumerate(POOL):
            question = record["messages"][0]["content"]
            shots = sel.select(question, pos)
            assert question not in [s.question for s in shots]
            assert len(shots) == len(POOL) - 1


def test_fixed_is_one_draw_random_is_seeded_per_question():
    fixed = selector(k=2, select="fixed")
    assert fixed.select("q one?", 0) == fixed.select("q two?", 5)
    rand = selector(k=2, select="random", seed=3)
    draws = [tuple(s.question for s in rand.select("anything?", pos)) for pos in range(6)]
    assert len(set(draws)) > 1, "a random selection that never changes is a fixed one"
    again = selector(k=2, select="random", seed=3)
    assert draws == [tuple(s.question for s in again.select("anything?", pos)) for pos in range(6)]


def test_k_beyond_the_pool_and_k_zero():
    assert len(selector(k=50, select="random").select("x?", 0)) == len(POOL)
    with pytest.raises(DataError, match="empty"):
        shots_of([], "pool.jsonl")
    with pytest.raises(DataError, match="pool.jsonl: record 1 is not a solved question"):
        shots_of([{"text": "no question here"}], "pool.jsonl")


def test_order_and_formats():
    shots = [Shot("q1?", "a1"), Shot("q2?", "a2"), Shot("q3?", "a3")]  # best first
    assert [s.question for s in arrange(shots, "best_last", 0, 0)] == ["q3?", "q2?", "q1?"]
    assert arrange(shots, "best_first", 0, 0) == shots
    assert sorted(arrange(shots, "random", 0, 0), key=lambda s: s.question) == shots
    question = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Q?"}]
    turns = with_shots(question, shots[:2], "turns")
    assert [m["role"] for m in turns] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert turns[1:5] == [{"role": "user", "content": "q1?"}, {"role": "assistant", "content": "a1"},
                          {"role": "user", "content": "q2?"}, {"role": "assistant", "content": "a2"}]
    assert turns[-1] == {"role": "user", "content": "Q?"}
    text = with_shots(question, shots[:2], "text")
    assert text == [question[0], {"role": "user", "content": "q1?\na1\n\nq2?\na2\n\nQ?"}]


# ----------------------------------------------------------------------------- the budget


def _tokens(tokenizer, messages) -> int:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return len(out["input_ids"])


def test_budget_drops_the_least_relevant_shots_first_and_never_the_question(tokenizer):
    tech = augment.technique(ICLConfig(k=4, select="similar"), pool=POOL)
    question = qa("Which instrument does Alice Marsh play at home?", "harp", person="Alice Marsh")
    (full,), counts = augment.apply([question], tokenizer, tech, budget=10_000)
    assert counts["shots"] == 4 and counts["shots_dropped"] == 0
    assert counts["prompt_tokens"] == _tokens(tokenizer, full["messages"][:-1])
    # a budget that holds exactly the question and two shots keeps the two most similar
    best = tech.selector.select(question["messages"][0]["content"], 0)
    two = with_shots(question["messages"][:1], arrange(best[:2], "best_last", 0, 0), "turns")
    budget = _tokens(tokenizer, two)
    (cut,), counts = augment.apply([question], tokenizer, tech, budget=budget)
    assert counts["shots"] == 2 and counts["shots_dropped"] == 2
    assert cut["messages"][:-1] == two and cut["messages"][-2]["content"] == question["messages"][0]["content"]
    assert cut["messages"][-1] == {"role": "assistant", "content": "harp"} and cut["answer"] == "harp"
    assert cut["person"] == "Alice Marsh"
    alone = _tokens(tokenizer, question["messages"][:1])
    with pytest.raises(DataError, match=f"q.jsonl: record 1: the question alone is {alone} tokens"):
        augment.apply([question], tokenizer, tech, budget=alone - 1, where="q.jsonl")


@dataclass(frozen=True)
class FakeHit:
    id: str
    text: str
    score: float
    source: str = "kb.txt"
    rank: int = 0


class FakeIndex:
    """Returns fixed passages; counts queries."""

    def __init__(self, texts: list[str]):
        self.texts, self.queries = texts, []

    def search(self, queries, k, retriever="bm25", encoder=None):
        self.queries += queries
        return [[FakeHit(f"kb.txt:{i + 1}", t, 1.0 / (i + 1), rank=i + 1) for i, t in enumerate(self.texts[:k])]
                for _ in queries]


def test_rag_passages_in_rank_order_lowest_dropped_first_and_retrieval_scored(tokenizer):
    passages = ["Bruno Keller plays the cello.", "Alice Marsh plays the harp.", "Alice Marsh likes tea."]
    tech = augment.Technique(ICLConfig(), RAGConfig(index="unused", k=3), index=FakeIndex(passages))
    records = [qa("Which instrument does Alice Marsh play?", "harp", person="Alice Marsh"),
               qa("Which instrument does Bruno Keller play?", "cello", person="Bruno Keller"),
               qa("Which instrument does Elena Sousa play?", "oboe", person="Elena Sousa")]
    out, counts = augment.apply(records, tokenizer, tech, budget=10_000)
    prompt = out[0]["messages"][0]["content"]
    assert prompt == ("[1] Bruno Keller plays the cello.\n[2] Alice Marsh plays the harp.\n[3] Alice Marsh likes "
                      "tea.\n\nWhich instrument does Alice Marsh play?")
    assert out[0]["passages"] == ["kb.txt:1", "kb.txt:2", "kb.txt:3"]
    # relevant: Alice's answer at rank 2, Bruno's at rank 1, Elena's nowhere
    assert counts["retrieval_recall"] == pytest.approx(2 / 3)
    assert counts["retrieval_mrr"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert counts["passages"] == 3 and counts["passages_dropped"] == 0
    assert counts["retrieval_ms_p95"] >= counts["retrieval_ms_p50"] >= 0
    two = [{"role": "user", "content": "[1] Bruno Keller plays the cello.\n[2] Alice Marsh plays the harp.\n\n"
            "Which instrument does Alice Marsh play?"}]
    (cut,), counts = augment.apply(records[:1], tokenizer, tech, budget=_tokens(tokenizer, two))
    assert cut["messages"][:-1] == two and counts["passages_dropped"] == 1
    # with ICL as well, shots go before passages when the budget is short
    both = augment.Technique(ICLConfig(k=2, select="similar"), RAGConfig(index="unused", k=3),
                             selector=ShotSelector(shots_of(POOL, "pool"), ICLConfig(k=2, select="similar")),
                             index=FakeIndex(passages))
    full_rag = [{"role": "user", "content": prompt}]
    (only_rag,), counts = augment.apply(records[:1], tokenizer, both, budget=_tokens(tokenizer, full_rag))
    assert only_rag["messages"][:-1] == full_rag and counts["shots_dropped"] == 2 and counts["passages"] == 3


def test_room_for_the_reply_in_training_data(tokenizer):
    tech = augment.Technique(ICLConfig(), RAGConfig(index="unused", k=2),
                             index=FakeIndex(["Alice Marsh plays the harp.", "Bruno Keller plays the cello."]))
    record = qa("Which instrument does Alice Marsh play?", "the harp")
    (free,), _ = augment.apply([record], tokenizer, tech, budget=10_000)
    budget = _tokens(tokenizer, free["messages"][:-1])
    (_, c1) = augment.apply([record], tokenizer, tech, budget=budget)
    (_, c2) = augment.apply([record], tokenizer, tech, budget=budget, room_for_reply=True)
    assert c1["passages_dropped"] == 0 and c2["passages_dropped"] >= 1


# ----------------------------------------------------------------------------- config


def test_config_sections_are_checked():
    cfg = build_config({"icl": {"k": 4, "select": "similar"}, "rag": {"index": "idx", "k": 5}})
    assert cfg.icl.k == 4 and cfg.rag.retriever == "bm25"
    with pytest.raises(ConfigError, match=r"icl.select"):
        build_config({"icl": {"select": "nearest"}})
    with pytest.raises(ConfigError, match=r"rag.*set rag.index"):
        build_config({"rag": {"train": True}})
    with pytest.raises(ConfigError, match=r"rag.template.*\{question\}"):
        build_config({"rag": {"index": "i", "template": "{passages} only"}})
    with pytest.raises(ConfigError, match=r"rag.template.*placeholders"):
        build_config({"rag": {"index": "i", "template": "{passages} {question} {other}"}})
    with pytest.raises(ConfigError, match=r"icl.kk.*did you mean 'k'"):
        build_config({"icl": {"kk": 3}})


def test_icl_needs_a_pool():
    with pytest.raises(DataError, match="needs solved examples"):
        augment.technique(ICLConfig(k=2))
    assert not augment.technique(ICLConfig(k=0)).active


# ----------------------------------------------------------------------------- wiring


def test_evaluate_with_icl_on_a_tinyworld_task(llama_dir):
    from tunelab import api

    plain = api.evaluate(str(llama_dir), tasks=["tinyworld:new-facts@paraphrases"], limit=3)
    m = api.evaluate(str(llama_dir), tasks=["tinyworld:new-facts@paraphrases"], limit=3,
                     icl={"k": 2, "select": "similar"})["tinyworld:new-facts@paraphrases"]
    assert m["shots"] == 2 and m["technique"] == "icl(similar, k=2)" and m["n"] == 3
    assert m["prompt_tokens"] > 0 and "exact_match" in m
    assert "shots" not in plain["tinyworld:new-facts@paraphrases"]
    with pytest.raises(TunelabError, match="answer questions; this is a classification task"):
        api.evaluate(str(llama_dir), tasks=["tinyworld:sentiment"], limit=2, icl={"k": 2})
    with pytest.raises(ConfigError, match="icl.k"):
        api.evaluate(str(llama_dir), tasks=["tinyworld:qa"], icl={"k": -1})


def test_generate_with_a_pool_file(llama_dir, tmp_path):
    from tunelab import api

    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in POOL))
    reply = api.generate(str(llama_dir), "Which instrument does Alice Marsh play?", max_new_tokens=4,
                         icl={"k": 3, "pool": str(pool), "select": "similar"})
    assert isinstance(reply, str)
    with pytest.raises(TunelabError, match="the prompt: in-context learning needs a pool of solved examples"):
        api.generate(str(llama_dir), "hi", icl={"k": 3})


def test_cli_eval_with_icl(llama_dir, capsys):
    from tunelab.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", str(llama_dir), "--task", "tinyworld:new-facts@paraphrases", "--limit", "2", "--icl-k", "1",
              "--icl", "select=fixed", "--json"])
    assert e.value.code in (0, None)
    out = json.loads(capsys.readouterr().out)
    assert out["tinyworld:new-facts@paraphrases"]["shots"] == 1
    with pytest.raises(SystemExit) as e:
        main(["eval", str(llama_dir), "--task", "tinyworld:qa", "--icl", "select"])
    assert e.value.code == 2
    assert "key=value" in capsys.readouterr().err


# ----------------------------------------------------------------------------- RAG wiring (a real index)


@pytest.fixture(scope="module")
def kb_index(llama_dir, tmp_path_factory):
    from tunelab.nonparametric.index import build_index

    root = tmp_path_factory.mktemp("kb")
    kb = root / "kb.txt"
    kb.write_text("".join(f"{p} plays the {i}.\n" for p, i in zip(PEOPLE, INSTRUMENTS, strict=True)))
    build_index(kb, root / "index", tokenizer=AutoTokenizer.from_pretrained(llama_dir), size=32, overlap=0,
                per_line=True, log=lambda s: None)
    return root / "index"


def test_evaluate_with_rag_scores_retrieval(llama_dir, kb_index, tmp_path):
    from tunelab import api

    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in POOL))
    m = api.evaluate(str(llama_dir), tasks=[str(data)], rag={"index": str(kb_index), "k": 2})[str(data)]
    # BM25 returns only passages that share a word with the question: here just the person's own line
    assert m["technique"] == "rag(bm25, k=2)" and m["passages"] == 1 and m["passages_dropped"] == 0
    assert m["retrieval_recall"] == 1.0 and m["retrieval_mrr"] == 1.0  # each question names its person
    with pytest.raises(TunelabError, match="no such|not an index|index"):
        api.evaluate(str(llama_dir), tasks=[str(data)], rag={"index": str(tmp_path / "missing")})


@pytest.mark.slow
def test_a_run_trained_on_passages_is_evaluated_with_them(llama_dir, kb_index, tmp_path):
    from tunelab import api

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in POOL))
    run = tmp_path / "run"
    api.train({"model": {"name_or_path": str(llama_dir)}, "data": {"train": str(data), "max_length": 128},
               "method": {"name": "lora"}, "train": {"max_steps": 2, "batch_size": 2},
               "rag": {"index": str(kb_index), "k": 2, "train": True}, "output": {"dir": str(run)}}, quiet=True)
    trained = [json.loads(line) for line in (run / "rag-data" / "train.jsonl").read_text().splitlines()]
    assert len(trained) == len(POOL)
    first = trained[0]["messages"][0]["content"]
    assert first.startswith("[1] Alice Marsh plays the harp.\n") and first.endswith(
        "\n\nWhich instrument does Alice Marsh play?")
    assert trained[0]["messages"][-1] == {"role": "assistant", "content": "harp"}
    m = api.evaluate(str(run), tasks=[str(data)], limit=2)[str(data)]
    assert m["technique"] == "rag(bm25, k=2)"  # the run's own retrieval, without being asked
