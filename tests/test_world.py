"""TinyWorld: determinism, counts, disjoint splits, and what the corpus does and does not contain."""

from __future__ import annotations

import json
import random
import re
from itertools import pairwise
from pathlib import Path

import pytest

from tunelab.errors import TunelabError
from tunelab.world import (
    CHAT_TEMPLATE,
    IM_START,
    SPLITS,
    held_out_text,
    make_corpus,
    make_world,
    render_chat,
    score_response,
    vocab,
    write_tasks,
)
from tunelab.world.resolve import resolve_task
from tunelab.world.templates import NEW_RELATIONS, RELATIONS


@pytest.fixture(scope="module")
def world():
    return make_world(0)


@pytest.fixture(scope="module")
def corpus(world):
    return make_corpus(world)


@pytest.fixture(scope="module")
def prose_sentences(corpus):
    """Sentences of the non-chat documents."""
    return [s for d in corpus if not d.startswith(IM_START) for s in re.split(r"(?<=[.!]) ", d)]


@pytest.fixture(scope="module")
def suites(tmp_path_factory):
    dirs = {}
    for key, seed in (("a", 0), ("b", 0), ("c", 1)):
        dirs[key] = tmp_path_factory.mktemp(f"tasks-{key}")
        write_tasks(dirs[key], seed=seed)
    return dirs


def read(directory: Path, task: str, split: str) -> list[dict]:
    lines = (directory / task / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def files(directory: Path) -> dict[str, bytes]:
    paths = sorted(p for p in directory.rglob("*") if p.is_file())
    return {str(p.relative_to(directory)): p.read_bytes() for p in paths}


def test_same_seed_gives_identical_bytes_and_another_seed_differs(suites):
    a, b, c = files(suites["a"]), files(suites["b"]), files(suites["c"])
    assert a == b
    assert a.keys() == c.keys()
    for name in ("qa/train.jsonl", "corpus/train.jsonl", "sentiment/test.jsonl", "meta/train.jsonl"):
        assert a[name] != c[name], name
    for name, data in a.items():
        assert b"\r" not in data and data.endswith(b"\n"), name


def test_no_global_random_state_is_used(world):
    random.seed(123)
    state = random.getstate()
    make_corpus(make_world(0, n_people=40))
    assert random.getstate() == state
    assert make_world(0) == world


def test_manifest_lists_every_task_split_and_count(suites):
    manifest = json.loads((suites["a"] / "manifest.json").read_text())
    assert manifest["seed"] == 0
    assert set(manifest["tasks"]) == set(SPLITS)
    for task, splits in SPLITS.items():
        assert tuple(manifest["tasks"][task]["splits"]) == tuple(sorted(splits))
        for split in splits:
            assert manifest["tasks"][task]["splits"][split] == len(read(suites["a"], task, split)) > 0


def test_world_counts(world):
    assert len(world.people) >= 300
    assert len(world.cities) >= 40 and len(world.countries) >= 10
    names = [p.name for p in world.people]
    assert len(set(names)) == len(names)
    firsts = [p.first for p in world.people]
    assert len(set(firsts)) == len(firsts)  # a shared first name makes the model answer for the other person
    words = {w.lower() for w in [*world.cities, *world.countries, *world.jobs, *world.pets, *world.colours]}
    assert not {n.lower() for n in vocab.FIRST_NAMES + vocab.LAST_NAMES} & words


def test_every_relation_has_five_paraphrases():
    for rel in [*RELATIONS.values(), *NEW_RELATIONS.values()]:
        assert len(set(rel.prose)) >= 5 and len(set(rel.questions)) >= 5, rel.name
        for template in rel.prose:
            assert "{name}" in template and ("{obj}" in template or "{a_obj}" in template)


def test_qa_people_disjoint_and_answers_short(world, suites):
    people = {s: {r["person"] for r in read(suites["a"], "qa", s)} for s in SPLITS["qa"]}
    assert not people["train"] & people["test"]
    assert not people["train"] & people["validation"] and not people["validation"] & people["test"]
    for split, names in people.items():
        assert names == {p.name for p in world.by_split(split)}
    for record in read(suites["a"], "qa", "test"):
        answer = record["messages"][1]["content"]
        assert answer == record["answer"] == world.person(record["person"]).facts()[record["relation"]]
        assert len(answer.split()) <= 3 and not answer.endswith(".")


def test_held_out_people_appear_only_as_prose(world, corpus, prose_sentences):
    chat_text = "\n".join(d for d in corpus if d.startswith(IM_START))
    for person in world.by_split("test") + world.by_split("validation"):
        mine = [s for s in prose_sentences if person.name in s]
        for value in person.facts().values():
            assert any(re.search(rf"\b{re.escape(value)}\b", s) for s in mine), (person.name, value)
        assert person.name not in chat_text
    for person in world.by_split("train"):
        assert f"{person.name}" in chat_text


def test_qa_test_questions_are_not_in_corpus(corpus, suites):
    text = "\n".join(corpus)
    for split in ("test", "validation"):
        for record in read(suites["a"], "qa", split):
            assert record["messages"][0]["content"] not in text


def test_new_facts_are_absent_from_corpus(world, corpus, suites):
    text = "\n".join(corpus).lower()
    for word in vocab.INSTRUMENTS + vocab.HOBBIES:
        assert not re.search(rf"\b{word}\b", text), word
    knowledge = (suites["a"] / "new-facts" / "knowledge.txt").read_text()
    for name, facts in world.new_facts.items():
        assert all(f"{name} " in knowledge and value in knowledge for value in facts.values())
    train, test = ({r["person"] for r in read(suites["a"], "new-facts", s)} for s in ("train", "test"))
    assert train and test and not train & test


def test_new_facts_validation_asks_trained_facts_of_people_the_score_never_asks(suites):
    """Settings are chosen on `validation` and scored on `paraphrases`: both ask facts `train`
    teaches, in wordings train never uses, about disjoint people."""
    train, val, para = (read(suites["a"], "new-facts", s) for s in ("train", "validation", "paraphrases"))
    taught = {(r["person"], r["relation"]): r["answer"] for r in train}
    asked = {(r["person"], r["messages"][0]["content"]) for r in train}
    people = {s: {r["person"] for r in rs} for s, rs in (("validation", val), ("paraphrases", para))}
    assert people["validation"] and people["paraphrases"] and not people["validation"] & people["paraphrases"]
    assert people["validation"] | people["paraphrases"] == {r["person"] for r in train}
    assert len(people["validation"]) == len({r["person"] for r in train}) // 5
    for r in val + para:
        assert taught[(r["person"], r["relation"])] == r["answer"]
        assert (r["person"], r["messages"][0]["content"]) not in asked
    assert len(val) == 3 * 2 * len(people["validation"])  # every unused wording of both facts


def test_held_out_text_is_corpus_prose_about_people_not_in_the_world(world, corpus):
    """Same distribution as the corpus (its prose templates, its values), nothing memorised: no
    sentence of it is in the corpus and none of its people is in the world."""
    text = "\n".join(corpus)
    names = {p.name for p in world.people}
    templates = [re.escape(t).replace(r"\{name\}", "(?P<name>.+?)").replace(r"\{obj\}", ".+").replace(
        r"\{a_obj\}", ".+") for rel in RELATIONS.values() for t in rel.prose]
    docs = held_out_text(world)
    assert len(docs) == 120
    for doc in docs:
        for sentence in re.split(r"(?<=\.) ", doc):
            assert sentence not in text, sentence
            match = next((m for t in templates if (m := re.fullmatch(t, sentence))), None)
            assert match is not None, sentence
            assert match["name"] not in names, sentence


def test_probe_cloze_asks_true_facts(world, suites):
    for record in read(suites["a"], "probe", "facts"):
        assert record["answer"] == world.person(record["person"]).facts()[record["relation"]]
        assert record["person"] in record["prompt"] and record["answer"] not in record["prompt"]


def _user_texts(directory: Path, task: str, split: str) -> set[str]:
    return {r["messages"][0]["content"] for r in read(directory, task, split)}


def test_other_splits_are_disjoint(suites):
    d = suites["a"]
    texts = {s: {r["text"] for r in read(d, "sentiment", s)} for s in SPLITS["sentiment"]}
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["validation"]
    for skill in ("arithmetic", "reversal", "sorting", "lookup", "counting"):
        assert not _user_texts(d, "skills", f"{skill}-train") & _user_texts(d, "skills", f"{skill}-test")
    train_tasks, test_tasks = ({r["task"] for r in read(d, "meta", s)} for s in ("train", "test"))
    assert not train_tasks & test_tasks
    shared = ("sft", "rm-train", "unpaired")  # train's prompts again
    prompts = [r["prompt"] for s in SPLITS["prefs"] if s not in shared for r in read(d, "prefs", s)]
    assert len(set(prompts)) == len(prompts)
    # sft demonstrates answers to the prompts of the train pairs only, with every kind of response
    sft = read(d, "prefs", "sft")
    assert [r["messages"][0]["content"] for r in sft] == [r["prompt"] for r in read(d, "prefs", "train")]
    assert {score_response(r["messages"][1]["content"], r["answer"]) for r in sft} == {2.5, 1.0, 0.0, -0.5, -2.0}


def test_skills_test_inputs_are_not_in_corpus(corpus, suites):
    text = "\n".join(corpus)
    for record in read(suites["a"], "skills", "arithmetic-test"):
        a, b = re.findall(r"\d+", record["messages"][0]["content"])
        forms = (f"{a} plus {b} is", f"{a} + {b} =", f"Adding {a} and {b} gives", f"sum of {a} and {b} is")
        assert not any(form in text for form in forms)
    for skill, forms in (("reversal", ("list {x} reversed", "Backwards, {x} becomes")),
                         ("sorting", ("order, {x} becomes", "largest, {x} is"))):
        for record in read(suites["a"], "skills", f"{skill}-test"):
            x = record["messages"][0]["content"].split(": ", 1)[1]
            assert not any(form.format(x=x) in text for form in forms)


def test_meta_query_answerable_from_support(suites):
    records = read(suites["a"], "meta", "test")
    for task in {r["task"] for r in records}:
        mine = [r for r in records if r["task"] == task]
        mapping = {}
        for r in mine:
            symbols = r["messages"][0]["content"].removeprefix("Translate: ").split()
            if r["split"] == "support" and len(symbols) == 1:
                mapping[symbols[0]] = r["answer"]
        for r in mine:
            symbols = r["messages"][0]["content"].removeprefix("Translate: ").split()
            assert " ".join(mapping[s] for s in symbols) == r["answer"]


def test_preferences_follow_the_reward(suites):
    for record in read(suites["a"], "prefs", "rankings-test"):
        scores = [score_response(r, record["answer"]) for r in record["responses"]]
        assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)
    for record in read(suites["a"], "prefs", "train"):
        chosen, rejected = (score_response(record[k], record["answer"]) for k in ("chosen", "rejected"))
        assert chosen > rejected


def test_unpaired_prefs_rate_every_train_reply_and_keep_neighbours_apart(suites):
    """prefs@unpaired (KTO's data): every reply of prefs@train once, chosen rated true, rejected false; a
    record's neighbour never has its prompt (KTO's reference point pairs a prompt with the next completion)."""
    pairs, unpaired = read(suites["a"], "prefs", "train"), read(suites["a"], "prefs", "unpaired")
    rated = sorted((r["prompt"], r["completion"], r["label"]) for r in unpaired)
    assert rated == sorted([(p["prompt"], p["chosen"], True) for p in pairs] +
                           [(p["prompt"], p["rejected"], False) for p in pairs])
    assert all(a["prompt"] != b["prompt"] for a, b in pairwise(unpaired))
    assert [r["label"] for r in unpaired[:4]] == [True, False, True, False]
    for r in unpaired:
        assert (score_response(r["completion"], r["answer"]) == 2.5) == r["label"]


def test_chat_template_renders_like_the_corpus():
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [
        {"role": "user", "content": "Where does Ada Lopez live?"},
        {"role": "assistant", "content": "Lyon"},
    ]
    for msgs, gen in ((messages, False), (messages[:1], True)):
        (text,), _ = render_jinja_template([msgs], chat_template=CHAT_TEMPLATE, add_generation_prompt=gen)
        assert text == render_chat(msgs, add_generation_prompt=gen)
    assert render_chat(messages) == "<|im_start|>user\nWhere does Ada Lopez live?<|im_end|>\n" \
        "<|im_start|>assistant\n Lyon<|im_end|>\n"


def test_resolver_generates_once_and_names_known_tasks(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    path = resolve_task("tinyworld:qa")
    assert path.name == "train.jsonl" and path.parent.name == "qa" and path.is_file()
    assert resolve_task("tinyworld:qa@test").read_text() and tmp_path in path.parents
    assert resolve_task("tinyworld:probe").name == "facts.jsonl"
    with pytest.raises(TunelabError) as err:
        resolve_task("tinyworld:nope")
    assert all(task in str(err.value) for task in SPLITS)
    with pytest.raises(TunelabError) as err:
        resolve_task("tinyworld:qa@nope")
    assert all(split in str(err.value) for split in SPLITS["qa"])
    with pytest.raises(TunelabError):
        resolve_task("qa@test")
