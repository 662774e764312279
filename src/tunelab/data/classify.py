"""Classification records (`{"text", "label"}`) -> examples for a classification head.

An example is the text's tokens plus eos (the last non-padding token is the one a causal model
pools: it has seen the whole text) and the class id on `Example.label`.

Class ids are positions in one label order, the same for every split: an explicit list (the
objective's `labels`), else the sorted distinct labels of the *training* file (labels that are
decimal integers first, numerically, then the others as strings). Labels are compared as strings,
so `1` in a .jsonl and `"1"` in a .csv are the same class. An eval record whose label is not in
the order is a bad record (`file:line: unknown label`).

`Example.labels` holds a single non-IGNORE entry, the class id at position 1: everything that counts
trained positions (the loop's loss normaliser `(labels[:, 1:] != IGNORE).sum()`, the pipeline's
drop of examples with nothing to train, `data check`) then counts the example once, and the data
fingerprint, which hashes `labels`, changes when a class changes. Truncation keeps position 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from tunelab.data.batched import tokenize_texts
from tunelab.data.templates import tokenize_text
from tunelab.data.types import IGNORE, Example
from tunelab.data.validate import Problem, RecordError, text_field, type_name
from tunelab.errors import DataError


def sort_labels(names: Iterable[str]) -> list[str]:
    """Distinct names, decimal integers first (numerically), then the rest (as strings)."""
    def key(name: str) -> tuple[int, int, str]:
        stripped = name.strip()
        if stripped.lstrip("-").isdecimal():
            return 0, int(stripped), name
        return 1, 0, name

    return sorted(set(names), key=key)


def check_record(r: dict[str, Any]) -> Problem | None:
    """The first problem of a `{"text", "label"}` record, or None."""
    problem = text_field(r, "text")
    if problem is not None:
        return problem
    if "label" not in r:
        return Problem("missing field", "missing field 'label'")
    label = r["label"]
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        return Problem("wrong type", f"label must be an int or a string, got {type_name(label)}")
    if isinstance(label, str) and not label.strip():
        return Problem("empty text", "label is empty")
    return None


def label_order(train_records: Iterable[tuple[str, Any]], explicit: Sequence[str] | None = None) -> list[str]:
    """The label order: `explicit` (checked for duplicates) or the sorted labels of the training
    records (`(where, record)` pairs as `read_records` yields them; bad records are skipped here,
    the pipeline reports them)."""
    if explicit is not None:
        names = [str(x) for x in explicit]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes or len(names) < 2:
            raise DataError(f"objective.labels {names}: " + (f"repeats {dupes}" if dupes else "needs 2 or more labels"),
                            fix="list every class once, in the order of the head's outputs")
        return names
    names = sort_labels(
        str(r["label"]) for _, r in train_records
        if isinstance(r, dict) and check_record(r) is None
    )
    if len(names) < 2:
        raise DataError(f"the training data has {len(names)} distinct label(s) {names}; classification needs 2 or more",
                        fix="check data.train, or list the classes in objective.labels")
    return names


NO_PACKING = "classification: a head pools one example per row"


def classification_example(record: dict[str, Any], where: str, tokenizer: Any, labels: Sequence[str]) -> Example:
    """The example of one validated record; RecordError when its label is not in `labels`."""
    name = str(record["label"])
    if name not in labels:
        raise _unknown(name, labels)
    ids, _ = tokenize_text(tokenizer, record["text"])
    return _labelled(ids, where, labels.index(name))


def classification_examples(items: Sequence[tuple[str, dict[str, Any]]], tokenizer: Any,
                            labels: Sequence[str]) -> list[list[Example] | RecordError]:
    """`classification_example` of every validated `(where, record)`, tokenized in one batch."""
    names = [str(r["label"]) for _, r in items]
    texts = [r["text"] for (_, r), name in zip(items, names, strict=True) if name in labels]
    tokens = iter(tokenize_texts(tokenizer, texts))
    return [[_labelled(next(tokens)[0], where, labels.index(name))] if name in labels else _unknown(name, labels)
            for (where, _), name in zip(items, names, strict=True)]


def _unknown(name: str, labels: Sequence[str]) -> RecordError:
    shown = ", ".join(labels[:10]) + (", ..." if len(labels) > 10 else "")
    return RecordError("unknown label", f"unknown label {name!r}; the training labels are: {shown}")


def _labelled(ids: list[int], where: str, label: int) -> Example:
    marks = [IGNORE] * len(ids)
    marks[min(1, len(ids) - 1)] = label
    return Example(ids, marks, where, label=label)


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[Example]:
    """Label-less examples for prediction: tokens + eos, truncated to `max_length`."""
    return [Example(ids[:max_length], [IGNORE] * len(ids[:max_length]))
            for ids, _ in (tokenize_text(tokenizer, t) for t in texts)]
