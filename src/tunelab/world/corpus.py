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

from tunelab.world import vocab
from tunelab.world.chat import chat, render_chat
from tunelab.world.generator import RELATION_NAMES, Person, World, rng_for
from tunelab.world.sentiment import opinion_documents
from tunelab.world.skills import skill_documents
from tunelab.world.templates import GEOGRAPHY, RELATIONS, fill


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
    """Corpus-like documents no model has read: biographies in the corpus's own templates of people
    who are not in the world (new name pairs, random facts). Same distribution as the corpus,
    nothing memorised, so a model's perplexity on it says how well it still models corpus text.
    Names and facts cannot be predicted (about log(number of values) nats each), so it stays well
    above 1: compare a model with its base, not across bases."""
    seed = world.seed if seed is None else seed
    rng = rng_for(seed, "heldout-people")
    taken = {(p.first, p.last) for p in world.people}
    docs = []
    while len(docs) < n_people:
        first, last = rng.choice(vocab.FIRST_NAMES), rng.choice(vocab.LAST_NAMES)
        if (first, last) in taken:
            continue
        taken.add((first, last))
        person = Person(
            name=f"{first} {last}", first=first, last=last, city=rng.choice(world.values("city")),
            job=rng.choice(world.jobs), pet=rng.choice(world.pets), colour=rng.choice(world.colours),
            age=rng.randint(*vocab.AGE_RANGE), employer=rng.choice(world.employers), split="none",
        )
        docs.append(biography(rng, person, "prose"))
    return docs


def biography(rng: random.Random, person: Person, kind: str) -> str:
    """One sentence per relation from the `kind` templates ("prose"), shuffled."""
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
