"""Skills (arithmetic, reversal, sorting, lookup, counting) and the meta-learning task family.

Each skill item has a key (its input). A stable hash reserves a fifth of all keys for test: the
skills test split draws only reserved keys, the train split and the pretraining corpus never do,
so test inputs are never seen before evaluation.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from tunelab.world import vocab
from tunelab.world.chat import chat
from tunelab.world.generator import rng_for

SKILL_ORDER = ("arithmetic", "reversal", "sorting", "lookup", "counting")  # the continual sequence
LOOKUP_KEYS = "abcdefghij"


@dataclass(frozen=True)
class Item:
    key: str  # the input; decides train/test reservation
    question: str
    answer: str
    statement: str  # the same fact as corpus prose


def reserved_for_test(key: str) -> bool:
    return zlib.crc32(key.encode()) % 5 == 0


_Q = {  # questions of the tasks
    "arithmetic": ("What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.",
                   "What is the sum of {a} and {b}?"),
    "reversal": ("Reverse the list: {x}", "Write this list backwards: {x}", "Reverse the order of: {x}"),
    "sorting": ("Sort in increasing order: {x}", "Put these numbers in order: {x}",
                "Sort from smallest to largest: {x}"),
    "lookup": ("Given {t}, what is {k}?", "In the table {t}, what is the value of {k}?", "{t}. What is {k}?"),
    "counting": ("How many words are in: {x}?", "Count the words: {x}",
                 "How many words does this have: {x}?"),
}
_S = {  # statements of the corpus
    "arithmetic": ("{a} plus {b} is {c}.", "{a} + {b} = {c}.", "Adding {a} and {b} gives {c}.",
                   "The sum of {a} and {b} is {c}."),
    "reversal": ("The list {x} reversed is {y}.", "Backwards, {x} becomes {y}."),
    "sorting": ("In increasing order, {x} becomes {y}.", "Sorted from smallest to largest, {x} is {y}."),
    "lookup": ("Given {t}, the value of {k} is {v}.", "In the table {t}, {k} is {v}."),
    "counting": ("There are {n} words in: {x}.", "Counting the words of {x} gives {n}."),
}


def _arithmetic(rng: random.Random) -> Item:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    q, s = rng.choice(_Q["arithmetic"]), rng.choice(_S["arithmetic"])
    return Item(f"{a}+{b}", q.format(a=a, b=b), str(a + b), s.format(a=a, b=b, c=a + b))


def _reversal(rng: random.Random) -> Item:
    words = rng.sample(vocab.LIST_WORDS, rng.randint(3, 5))
    x, y = ", ".join(words), ", ".join(reversed(words))
    q, s = rng.choice(_Q["reversal"]), rng.choice(_S["reversal"])
    return Item(x, q.format(x=x), y, s.format(x=x, y=y))


def _sorting(rng: random.Random) -> Item:
    nums = rng.sample(range(100), rng.randint(3, 6))
    x, y = " ".join(map(str, nums)), " ".join(map(str, sorted(nums)))
    q, s = rng.choice(_Q["sorting"]), rng.choice(_S["sorting"])
    return Item(x, q.format(x=x), y, s.format(x=x, y=y))


def _lookup(rng: random.Random) -> Item:
    table = {k: str(rng.randint(0, 9)) for k in rng.sample(LOOKUP_KEYS, rng.randint(3, 5))}
    t = ", ".join(f"{k}={v}" for k, v in table.items())
    k = rng.choice(list(table))
    q, s = rng.choice(_Q["lookup"]), rng.choice(_S["lookup"])
    return Item(f"{t}|{k}", q.format(t=t, k=k), table[k], s.format(t=t, k=k, v=table[k]))


def _counting(rng: random.Random) -> Item:
    words = [rng.choice(vocab.LIST_WORDS) for _ in range(rng.randint(2, 9))]
    x, n = " ".join(words), len(words)
    q, s = rng.choice(_Q["counting"]), rng.choice(_S["counting"])
    return Item(x, q.format(x=x), str(n), s.format(x=x, n=n))


SKILLS: dict[str, Callable[[random.Random], Item]] = {
    "arithmetic": _arithmetic, "reversal": _reversal, "sorting": _sorting, "lookup": _lookup,
    "counting": _counting,
}


def draw_items(rng: random.Random, skill: str, n: int, test: bool) -> list[Item]:
    """n items with distinct keys, all reserved for test (test=True) or none of them."""
    items: list[Item] = []
    keys: set[str] = set()
    while len(items) < n:
        item = SKILLS[skill](rng)
        if reserved_for_test(item.key) == test and item.key not in keys:
            keys.add(item.key)
            items.append(item)
    return items


def skill_documents(seed: int, n_docs: int = 100, per_doc: int = 10) -> list[str]:
    """Corpus text: statements of skill facts (never test inputs) and counting sequences."""
    rng = rng_for(seed, "corpus-skills")
    docs = []
    for i in range(n_docs):
        skill = SKILL_ORDER[i % len(SKILL_ORDER)]
        statements: list[str] = []
        while len(statements) < per_doc:
            item = SKILLS[skill](rng)
            if not reserved_for_test(item.key):
                statements.append(item.statement)
        start = rng.randint(0, 40)
        sequence = ", ".join(str(start + j) for j in range(7))
        statements.append(f"Counting from {start} to {start + 6}: {sequence}.")
        docs.append(" ".join(statements))
    return docs


def skills_task(seed: int, n_train: int = 500, n_test: int = 100) -> dict[str, list[dict]]:
    """Per-skill splits `<skill>-train`/`<skill>-test` and the mixtures `train`/`test`."""
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for skill in SKILL_ORDER:
        rng = rng_for(seed, "skills", skill)
        for split, n, test in (("train", n_train, False), ("test", n_test, True)):
            records = [
                {**chat(it.question, it.answer), "answer": it.answer, "task": skill}
                for it in draw_items(rng, skill, n, test)
            ]
            splits[f"{skill}-{split}"] = records
            splits[split] += records
    for split in ("train", "test"):
        rng_for(seed, "skills-mix", split).shuffle(splits[split])
    return splits


def meta_task(seed: int, n_train_tasks: int = 200, n_test_tasks: int = 50) -> dict[str, list[dict]]:
    """A family of symbol-mapping tasks: each maps 4 nonce words to 4 words of one category.
    Support: every symbol alone plus 2 sequences; query: 4 new sequences, answerable from the
    support by composition. Train and test hold different tasks (different mappings)."""
    rng = rng_for(seed, "meta")
    categories = (vocab.COLOURS, vocab.NUMBER_WORDS, vocab.LIST_WORDS)
    seen: set[tuple[tuple[str, str], ...]] = set()
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    while len(seen) < n_train_tasks + n_test_tasks:
        targets = rng.sample(rng.choice(categories), 4)
        mapping = dict(zip(rng.sample(vocab.NONCE_WORDS, 4), targets, strict=True))
        signature = tuple(sorted(mapping.items()))
        if signature in seen:
            continue
        task_id = f"map-{len(seen):03d}"
        seen.add(signature)
        split = "train" if len(seen) <= n_train_tasks else "test"
        splits[split] += _meta_records(rng, task_id, mapping)
    return splits


def _meta_records(rng: random.Random, task_id: str, mapping: dict[str, str]) -> list[dict]:
    symbols = list(mapping)
    sequences: list[tuple[str, ...]] = []
    while len(sequences) < 6:
        seq = tuple(rng.choice(symbols) for _ in range(rng.randint(2, 3)))
        if seq not in sequences:
            sequences.append(seq)
    support = [(s,) for s in symbols] + sequences[:2]
    records = []
    for role, seqs in (("support", support), ("query", sequences[2:])):
        for seq in seqs:
            answer = " ".join(mapping[s] for s in seq)
            records.append({**chat(f"Translate: {' '.join(seq)}", answer), "answer": answer,
                            "task": task_id, "split": role})
    return records
