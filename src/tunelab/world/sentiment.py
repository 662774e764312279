"""Opinions about places of the world, labelled positive or negative.

The label is decided by a rule a reader can check: the polarity of the adjective or verb, flipped
by "not", and after "but" only the last clause counts. Texts whose stable hash is reserved make
the validation and test splits; the corpus and the train split never contain them.
"""

from __future__ import annotations

import random
import zlib

from tunelab.world import vocab
from tunelab.world.generator import rng_for

LABELS = ("negative", "positive")


def reserved_for_eval(text: str) -> bool:
    return zlib.crc32(text.encode()) % 4 == 0


def opinion(rng: random.Random, cities: list[str]) -> tuple[str, str]:
    """(text, label) with a random label and pattern."""
    label = rng.choice(LABELS)
    good = label == "positive"
    adj = rng.choice(vocab.POSITIVE if good else vocab.NEGATIVE)
    other = rng.choice(vocab.NEGATIVE if good else vocab.POSITIVE)
    verb = rng.choice(vocab.POSITIVE_VERBS if good else vocab.NEGATIVE_VERBS)
    thing, thing2 = rng.sample(vocab.OPINION_THINGS, 2)
    city = rng.choice(cities)
    very = rng.choice(["", "", "really ", "truly ", "very "])
    pattern = rng.randrange(6)
    if pattern == 0:
        text = f"The {thing} in {city} was {very}{adj}."
    elif pattern == 1:
        text = f"I {verb} the {thing} in {city}."
    elif pattern == 2 and not good:
        text = f"The {thing} in {city} was not {rng.choice(vocab.POSITIVE)} at all."
    elif pattern == 3:
        text = f"The {thing} was {other}, but the {thing2} in {city} was {very}{adj}."
    elif pattern == 4:
        text = f"We {verb} our visit to the {thing} in {city}; it was {adj}."
    else:
        text = f"What {'an' if adj[0] in 'aeiou' else 'a'} {adj} {thing} in {city}!"
    return text, label


def opinion_documents(seed: int, cities: list[str], n_docs: int = 120, per_doc: int = 5) -> list[str]:
    """Corpus text: a few opinions per document, none of them a validation or test text."""
    rng = rng_for(seed, "corpus-opinions")
    docs = []
    for _ in range(n_docs):
        texts: list[str] = []
        while len(texts) < per_doc:
            text, _ = opinion(rng, cities)
            if not reserved_for_eval(text):
                texts.append(text)
        docs.append(" ".join(texts))
    return docs


def sentiment_task(
    seed: int, cities: list[str], sizes: dict[str, int] | None = None
) -> dict[str, list[dict]]:
    """{"text", "label"} records; splits disjoint by text, labels balanced within each split."""
    sizes = sizes or {"train": 2000, "validation": 200, "test": 400}
    rng = rng_for(seed, "sentiment")
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for split, n in sizes.items():
        want = {label: n // 2 + (i < n % 2) for i, label in enumerate(LABELS)}
        records: list[dict] = []
        while len(records) < n:
            text, label = opinion(rng, cities)
            if text in seen or reserved_for_eval(text) != (split != "train") or not want[label]:
                continue
            seen.add(text)
            want[label] -= 1
            records.append({"text": text, "label": label})
        splits[split] = records
    return splits
