"""Paraphrase templates: how each relation is stated in prose and asked as a question.

Placeholders: `{name}` the person's full name, `{obj}` the value, `{a_obj}` the value with its
article ("an engineer"). `prose` templates are used in the pretraining corpus (and in the probe's
held-out text, about people not in the world), `questions` are the QA prompts.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Relation:
    name: str
    prose: tuple[str, ...]
    questions: tuple[str, ...]


def with_article(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def fill(template: str, name: str, value: str) -> str:
    return template.format(name=name, obj=value, a_obj=with_article(value))


def cloze(template: str, name: str, value: str) -> tuple[str, str] | None:
    """(prompt, answer) when the template ends with its value, else None: the prompt stops just
    before the value, so the answer follows after one space."""
    sentinel = "\x00"
    text = template.format(name=name, obj=sentinel, a_obj=with_article(value)[:-len(value)] + sentinel)
    head, _, tail = text.partition(sentinel)
    if tail not in (".", "") or not head.endswith(" "):
        return None
    return head.rstrip(), value


CITY = Relation(
    "city",
    prose=(
        "{name} lives in {obj}.",
        "{name} has made a home in {obj}.",
        "{name} resides in the city of {obj}.",
        "The home of {name} is in {obj}.",
        "{name} is a resident of {obj}.",
        "These days {name} lives in the city of {obj}.",
    ),
    questions=(
        "Which city does {name} live in?",
        "Where does {name} live?",
        "What is the home city of {name}?",
        "In which city is {name} a resident?",
        "Name the city where {name} lives.",
        "What city is {name}'s home?",
    ),
)

JOB = Relation(
    "job",
    prose=(
        "{name} works as {a_obj}.",
        "{name} is {a_obj} by profession.",
        "By trade, {name} is {a_obj}.",
        "{name} earns a living as {a_obj}.",
        "{name} is employed as {a_obj}.",
        "The profession of {name} is {obj}.",
    ),
    questions=(
        "What is {name}'s job?",
        "What does {name} do for a living?",
        "What is the profession of {name}?",
        "What work does {name} do?",
        "Which job does {name} have?",
    ),
)

PET = Relation(
    "pet",
    prose=(
        "{name} has a pet {obj}.",
        "{name} owns {a_obj}.",
        "{name} looks after {a_obj} at home.",
        "The pet of {name} is {a_obj}.",
        "{name} takes care of a pet {obj}.",
        "At home, {name} keeps {a_obj} as a pet.",
    ),
    questions=(
        "What pet does {name} have?",
        "What kind of pet does {name} own?",
        "Which animal does {name} keep as a pet?",
        "What is {name}'s pet?",
        "Name the pet of {name}.",
    ),
)

COLOUR = Relation(
    "colour",
    prose=(
        "{name}'s favourite colour is {obj}.",
        "The favourite colour of {name} is {obj}.",
        "{name} likes the colour {obj} best.",
        "{name} loves the colour {obj} more than any other.",
        "Of all colours, {name} prefers {obj}.",
    ),
    questions=(
        "What is {name}'s favourite colour?",
        "Which colour does {name} like best?",
        "What colour does {name} prefer?",
        "Name the favourite colour of {name}.",
        "Which colour is {name}'s favourite?",
    ),
)

AGE = Relation(
    "age",
    prose=(
        "{name} is {obj} years old.",
        "{name} is aged {obj}.",
        "The age of {name} is {obj}.",
        "{name} has lived for {obj} years.",
        "{name} turned {obj} this year.",
    ),
    questions=(
        "How old is {name}?",
        "What is the age of {name}?",
        "What age is {name}?",
        "How many years old is {name}?",
        "Tell me the age of {name}.",
    ),
)

EMPLOYER = Relation(
    "employer",
    prose=(
        "{name} works for {obj}.",
        "{name} is employed by {obj}.",
        "The employer of {name} is {obj}.",
        "{name} gets a salary from {obj}.",
        "{name} goes to work at {obj} every day.",
        "{name} is on the payroll of {obj}.",
    ),
    questions=(
        "Who does {name} work for?",
        "Which company employs {name}?",
        "What is the employer of {name}?",
        "Which company does {name} work at?",
        "Name the company {name} works for.",
    ),
)

RELATIONS: dict[str, Relation] = {r.name: r for r in (CITY, JOB, PET, COLOUR, AGE, EMPLOYER)}

# Relations that exist only in the new-facts task: never stated in the pretraining corpus.
INSTRUMENT = Relation(
    "instrument",
    prose=(
        "{name} plays the {obj}.",
        "The instrument {name} plays is the {obj}.",
        "{name} practises the {obj} every evening.",
        "Music for {name} means playing the {obj}.",
        "{name} has taken up the {obj}.",
    ),
    questions=(
        "Which instrument does {name} play?",
        "What instrument does {name} play?",
        "Which musical instrument has {name} taken up?",
        "What does {name} practise every evening?",
        "Name the instrument {name} plays.",
    ),
)

HOBBY = Relation(
    "hobby",
    prose=(
        "{name}'s hobby is {obj}.",
        "In free time, {name} enjoys {obj}.",
        "The hobby of {name} is {obj}.",
        "{name} spends weekends on {obj}.",
        "{name} is passionate about {obj}.",
    ),
    questions=(
        "What is {name}'s hobby?",
        "What does {name} enjoy in free time?",
        "Which hobby does {name} have?",
        "What is the hobby of {name}?",
        "What does {name} spend weekends on?",
    ),
)

NEW_RELATIONS: dict[str, Relation] = {r.name: r for r in (INSTRUMENT, HOBBY)}

GEOGRAPHY = (
    "{city} is a city in {country}.",
    "{city} lies in {country}.",
    "The city of {city} is in {country}.",
    "{country} is home to the city of {city}.",
    "{city} belongs to {country}.",
)
