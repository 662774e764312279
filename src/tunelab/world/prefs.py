"""Preferences over answers to questions about people: correct and polite beats rude, evasive, wrong.

A response is built from an answer (correct, or wrong: half the time a plausible value of the same
relation, half an off-topic value of another relation, see `wrong_answer`) and a frame (polite,
rude) or is evasive. `score_response` is the rule-based reward these preferences
follow; its order on the five kinds is the order of every ranking:
correct+polite (2.5) > correct+rude (1.0) > evasive (0.0) > wrong+polite (-0.5) > wrong+rude (-2.0).
"""

from __future__ import annotations

import random
import re

from tunelab.world.corpus import qa_question
from tunelab.world.generator import RELATION_NAMES, Person, World, rng_for

# Every framed reply starts with the answer, exactly where the base model's short-answer QA puts it
# (right after the assistant turn opens): measured, replies that bury the answer mid-sentence ("It
# is {a}.") make an SFT model emit garbage for people whose QA it never saw, and leave a reward
# model no way to check the fact.
POLITE = (
    "{a}. Happy to help!",
    "{a}. I hope that helps!",
    "{a}. Thanks for asking!",
    "{a}. Good question!",
    "{a}. Sure! Ask me anything.",
)
RUDE = (
    "{a}, obviously. Stop wasting my time.",
    "{a}. Look it up yourself next time.",
    "{a}, you fool.",
    "{a}. Do not bother me again.",
    "{a}. Whatever.",
)
EVASIVE = (
    "I would rather not say.",
    "That is hard to tell.",
    "I cannot answer that question.",
    "Who knows? Maybe ask someone else.",
    "It is not my place to say.",
)
POLITE_MARKERS = ("sure!", "happy to help", "good question", "i hope that helps", "thanks for asking")
RUDE_MARKERS = ("obviously", "wasting my time", "look it up yourself", "you fool", "bother me", "whatever")
RANKED_KINDS = ("correct-polite", "correct-rude", "evasive", "wrong-polite", "wrong-rude")  # best first
# how often each kind answers an `sft` demonstration: mostly right, often rude or evasive, sometimes
# wrong (a demonstrator whose facts are mostly right keeps the model's knowledge usable)
SFT_KIND_WEIGHTS = (0.3, 0.3, 0.2, 0.1, 0.1)


def score_response(response: str, answer: str, distractors: list[str] | tuple[str, ...] = ()) -> float:
    """Reward of a response: +2 correct, 0 evasive, -1 otherwise (wrong, or naming a distractor
    beside the answer); +0.5 polite, -1 rude."""
    low = response.lower()

    def says(value: str) -> bool:
        return re.search(rf"\b{re.escape(value.lower())}\b", low) is not None

    correct = says(answer) and not any(says(d) for d in distractors if d != answer)
    evasive = any(e.lower() in low for e in EVASIVE)
    score = 2.0 if correct else (0.0 if evasive else -1.0)
    rude = any(m in low for m in RUDE_MARKERS)
    polite = any(m in low for m in POLITE_MARKERS)
    return score + (-1.0 if rude else 0.5 if polite else 0.0)


def response(rng: random.Random, kind: str, answer: str, wrong: str, frames: dict[str, str] | None = None) -> str:
    """A reply of `kind`; `frames` (tone -> frame) fixes the frame of each tone, so that replies
    of one tone differ only in the answer (minimal pairs)."""
    if kind == "evasive":
        return rng.choice(EVASIVE)
    correctness, tone = kind.split("-")
    frame = frames[tone] if frames else rng.choice(POLITE if tone == "polite" else RUDE)
    return frame.format(a=answer if correctness == "correct" else wrong)  # the answer as QA writes it


def prefs_task(world: World, seed: int) -> dict[str, list[dict]]:
    """Pairs (`train`, `test`), K-wise rankings (`rankings-train`, `rankings-test`), prompts for
    RL (`prompts-train`, `prompts-test`) and `sft`: chat demonstrations of mixed quality (the
    prompts of `train`, each answered by a response of a kind drawn with SFT_KIND_WEIGHTS), the starting
    point that reward modelling + PPO or DPO then improve; and `rm-train`: a 5-way ranking for
    every prompt of `train` and `rankings-train` (4 relations of every train person), where replies
    of one tone share their frame and differ only in the answer (minimal pairs): what a reward model
    needs to learn to check facts, not only tone; and `unpaired`: `train`'s replies rated one by one
    for KTO (`unpaired_records`). `prompt` is the user message (apply the chat template). Each
    (person, relation) is used by one split only (`sft` and `unpaired` share `train`'s);
    *-train splits ask about qa-train people, *-test splits about qa-test people."""
    rng = rng_for(seed, "prefs")
    splits: dict[str, list[dict]] = {s: [] for s in _SHARES["train"]} | {s: [] for s in _SHARES["test"]}
    for people_split, shares in _SHARES.items():
        for person in world.by_split(people_split):
            relations = rng.sample(RELATION_NAMES, len(RELATION_NAMES))
            for split, k in shares.items():
                for rel in relations[:k]:
                    splits[split].append(_record(rng, world, person, rel, split))
                relations = relations[k:]
    sft_rng = rng_for(seed, "prefs-sft")
    people = {p.name: p for p in world.people}
    splits["rm-train"] = []
    for r in splits["train"] + splits["rankings-train"]:
        wrong = _wrong(sft_rng, world, r)
        frames = {"polite": sft_rng.choice(POLITE), "rude": sft_rng.choice(RUDE)}
        splits["rm-train"].append({k: r[k] for k in ("prompt", "answer", "relation", "person")} | {
            "responses": [response(sft_rng, kind, r["answer"], wrong, frames) for kind in RANKED_KINDS]})
    splits["sft"] = []
    for r in splits["train"]:
        person = people[r["person"]]
        kind = sft_rng.choices(RANKED_KINDS, weights=SFT_KIND_WEIGHTS)[0]
        reply = response(sft_rng, kind, r["answer"], _wrong(sft_rng, world, r))
        splits["sft"].append({"messages": [{"role": "user", "content": r["prompt"]},
                                           {"role": "assistant", "content": reply}], "answer": r["answer"],
                              "person": person.name, "relation": r["relation"]})
    splits["unpaired"] = unpaired_records(splits["train"])
    return splits


def unpaired_records(pairs: list[dict]) -> list[dict]:
    """Each pair's chosen reply (`label` true) and rejected reply (false) as two `unpaired` records.
    Two passes over the pairs with alternating ratings (the chosen replies of even pairs and the
    rejected of odd ones, then the others): neighbours never share a prompt, since KTO pairs each
    prompt with its neighbour's completion to estimate its reference point."""
    out = []
    for first in (True, False):
        for i, r in enumerate(pairs):
            desirable = (i % 2 == 0) == first
            out.append({"prompt": r["prompt"], "completion": r["chosen" if desirable else "rejected"],
                        "label": desirable, **{k: r[k] for k in ("answer", "relation", "person")}})
    return out


_SHARES = {  # relations per person given to each split
    "train": {"train": 3, "rankings-train": 1, "prompts-train": 2},
    "test": {"test": 2, "rankings-test": 1, "prompts-test": 3},
}


def wrong_answer(rng: random.Random, world: World, relation: str, answer: object) -> tuple[str, str]:
    """A wrong answer and its type: half "plausible" (another value of the same relation: checking it
    needs the person's fact) and half "off-topic" (a value of another relation: checkable without it)."""
    if rng.random() < 0.5:
        return str(rng.choice([v for v in world.values(relation) if v != answer])), "plausible"
    other = rng.choice([r for r in RELATION_NAMES if r != relation])
    return str(rng.choice([v for v in world.values(other) if str(v) != str(answer)])), "off-topic"


def _wrong(rng: random.Random, world: World, record: dict) -> str:
    return wrong_answer(rng, world, record["relation"], record["answer"])[0]


def _record(rng: random.Random, world: World, person: Person, relation: str, split: str) -> dict:
    answer = person.facts()[relation]
    wrong, wrong_type = wrong_answer(rng, world, relation, answer)
    record = {"prompt": qa_question(rng, person, relation), "answer": answer, "relation": relation,
              "person": person.name}
    if split.startswith("prompts"):
        return record
    if split.startswith("rankings"):
        return record | {"responses": [response(rng, kind, answer, wrong) for kind in RANKED_KINDS],
                         "wrong_type": wrong_type}
    kind = rng.choice(RANKED_KINDS[1:])
    return record | {"chosen": response(rng, "correct-polite", answer, wrong),
                     "rejected": response(rng, kind, answer, wrong), "rejected_kind": kind,
                     **({"wrong_type": wrong_type} if kind.startswith("wrong") else {})}
