"""The pretraining corpus of tunelab-tiny ("mixed corpus") and held-out text.

Documents, in shuffled order:
- biographies: `bios_per_person` per person, ALL people; one sentence per relation, each with a
  random prose template, in random order, the full name in every sentence;
- QA conversations about TRAIN people only, rendered with the chat template (short answers,
  exactly as the qa task asks), each fact asked `qa_repeats` times: about 30 % of the tokens.
  Validation and test people appear only in biographies, so answering about them is extraction;
- geography (city -> country), skill statements (never skills test inputs) and opinions (never
  sentiment validation/test texts).
New facts (instrument, hobby) are never stated. Join documents with `EOS_TOKEN` when packing.
"""

from __future__ import annotations

import random

from tunelab.world.chat import chat, render_chat
from tunelab.world.generator import RELATION_NAMES, Person, World, rng_for
from tunelab.world.sentiment import opinion_documents
from tunelab.world.skills import skill_documents
from tunelab.world.templates import GEOGRAPHY, GEOGRAPHY_HELDOUT, RELATIONS, fill


def make_corpus(
    world: World, seed: int | None = None, bios_per_person: int = 5, qa_repeats: int = 2, qa_per_doc: int = 6
) -> list[str]:
    """Pretraining documents; `seed` defaults to the world's seed."""
    seed = world.seed if seed is None else seed
    rng = rng_for(seed, "corpus")
    docs = [biography(rng, p, "prose") for p in world.people for _ in range(bios_per_person)]
    docs += qa_documents(rng, world.by_split("train"), qa_repeats, qa_per_doc)
    docs += geography_documents(rng, world, GEOGRAPHY, repeats=6)
    docs += skill_documents(seed)
    docs += opinion_documents(seed, list(world.cities))
    rng.shuffle(docs)
    return docs


def held_out_text(world: World, seed: int | None = None, n_people: int = 120) -> list[str]:
    """Corpus-like documents that are not in the corpus: known facts stated with the held-out
    templates (no sentence of them occurs in the corpus), for held-out perplexity."""
    seed = world.seed if seed is None else seed
    rng = rng_for(seed, "heldout")
    people = rng.sample(list(world.people), min(n_people, len(world.people)))
    docs = [biography(rng, p, "heldout") for p in people]
    docs += geography_documents(rng, world, GEOGRAPHY_HELDOUT, repeats=1)
    return docs


def biography(rng: random.Random, person: Person, kind: str) -> str:
    """One sentence per relation from the `kind` ("prose" or "heldout") templates, shuffled."""
    facts = person.facts()
    sentences = [
        fill(rng.choice(getattr(RELATIONS[rel], kind)), person.name, facts[rel]) for rel in RELATION_NAMES
    ]
    rng.shuffle(sentences)
    return " ".join(sentences)


def qa_question(rng: random.Random, person: Person, relation: str) -> str:
    return rng.choice(RELATIONS[relation].questions).format(name=person.name)


def qa_documents(rng: random.Random, people: list[Person], repeats: int, per_doc: int) -> list[str]:
    """Chat-rendered conversations of `per_doc` short-answer exchanges each."""
    asks = [(p, rel) for p in people for rel in RELATION_NAMES for _ in range(repeats)]
    rng.shuffle(asks)
    docs = []
    for i in range(0, len(asks), per_doc):
        messages = []
        for person, rel in asks[i : i + per_doc]:
            messages += chat(qa_question(rng, person, rel), person.facts()[rel])["messages"]
        docs.append(render_chat(messages))
    return docs


def geography_documents(
    rng: random.Random, world: World, templates: tuple[str, ...], repeats: int
) -> list[str]:
    docs = []
    for country in world.countries:
        cities = [c for c, k in world.cities.items() if k == country]
        for _ in range(repeats):
            order = rng.sample(cities, len(cities))
            sentences = [rng.choice(templates).format(city=c, country=country) for c in order]
            docs.append(" ".join(sentences))
    return docs
