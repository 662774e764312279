"""The format registry: how a record of each format is detected, checked and encoded into examples.

Detection tries the registered formats from the most specific (`priority`, lowest first): a record
is of the first format whose `detect(keys)` accepts its keys. Checks run before any tokenizer or
model is touched and return the record's first `Problem` (validate.py), or None.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tunelab.data.templates import ChatTemplate
from tunelab.data.types import Example
from tunelab.data.validate import Problem
from tunelab.errors import DataError


@dataclass(frozen=True)
class EncodeContext:
    """What encoding a record may use."""

    tokenizer: Any
    template: ChatTemplate | None  # the chat template, for formats with `chat`
    mask_prompt: bool  # train only the assistant turns (the objective's choice)
    labels: Sequence[str] = ()  # classification: the label order (class id = position)


Encode = Callable[[dict[str, Any], str, EncodeContext], list[Example]]
# validated (where, record) items -> per item its examples, or the DataError `encode` raises for it
EncodeBatch = Callable[[list[tuple[str, dict[str, Any]]], EncodeContext], list["list[Example] | DataError"]]


@dataclass(frozen=True)
class FormatSpec:
    name: str
    detect: Callable[[set[str]], bool]  # the record's keys -> is it this format
    priority: int  # detection order: lower = more specific = tried first
    validate: Callable[[dict[str, Any]], Problem | None]
    encode: Encode  # a validated record -> its examples (raises RecordError for a record it cannot use)
    summary: str
    chat: bool = False  # rendered through the chat template
    rendered: bool = False  # a plain LM example (`render_example`): text, instruction, chat
    # the label order, from the training file's records and an explicit list (classification)
    label_order: Callable[[Any, Sequence[str] | None], list[str]] | None = None
    no_packing: str | None = None  # why data.packing is refused for it, if it is
    encode_batch: EncodeBatch | None = None  # `encode` of a batch in few tokenizer calls (data/batched.py)


FORMATS: dict[str, FormatSpec] = {}


def register_format(name: str, **spec: Any) -> FormatSpec:
    if name in FORMATS:
        raise RuntimeError(f"format {name!r} registered twice")
    FORMATS[name] = FormatSpec(name, **spec)
    return FORMATS[name]


def detect_format(record: dict[str, Any]) -> str | None:
    """The format a record's keys point to, or None. The most specific format wins."""
    keys = set(record)
    for spec in sorted(FORMATS.values(), key=lambda s: s.priority):
        if spec.detect(keys):
            return spec.name
    return None


def validate_record(record: dict[str, Any], fmt: str) -> Problem | None:
    """The first problem that makes `record` unusable as `fmt`, or None."""
    return FORMATS[fmt].validate(record)


def resolve_format(configured: str, records: Iterable[tuple[str, Any]], path: str) -> str:
    """`configured` unless it is "auto"; then the one format every recognizable record agrees on."""
    names = ", ".join(sorted(FORMATS))
    fix = f"set data.format to one of {names}; records that do not fit it are then listed one by one"
    if configured != "auto":
        if configured not in FORMATS:
            raise DataError(f"data.format: unknown format {configured!r}; registered: auto, {names}")
        return configured
    seen: Counter[str] = Counter()
    first: dict[str, str] = {}
    for where, record in records:
        fmt = detect_format(record) if isinstance(record, dict) else None
        if fmt is not None:
            seen[fmt] += 1
            first.setdefault(fmt, where)
    if len(seen) > 1 and "prompt" in seen:  # a lone prompt beside other records is an incomplete pair/ranking
        del seen["prompt"]
    if not seen:
        raise DataError(f"{path}: no record has the fields of a known format", fix=fix)
    if len(seen) > 1:
        parts = ", ".join(f"{n} look like {fmt} (first at {first[fmt]})" for fmt, n in seen.most_common())
        raise DataError(f"{path}: records disagree on the format: {parts}", fix=fix)
    return next(iter(seen))
