"""The record the data pipeline hands to the training loop."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

IGNORE = -100  # label of a token that is not trained
Message = dict[str, str]  # one chat turn: {"role", "content"}


@dataclass(frozen=True)
class Example:
    """One tokenized example. `labels[i]` is `input_ids[i]` where trained, IGNORE elsewhere
    (unshifted: the loss shifts). `where` is `file:line` for messages about this example."""

    input_ids: list[int]
    labels: list[int]
    where: str = ""
    # --- one label per example: a class id (data/classify.py; `labels` then holds it once, at position
    # 1), or an unpaired reply's rating, 1 desirable / 0 undesirable (data/preference.py, objective kto)
    label: int | None = None
    # ---
    # --- preference pairs (data/preference.py): this example is the chosen reply, `rejected` the other
    rejected: Example | None = None
    # ---


@dataclass
class TokenizedData:
    examples: Sequence[Example]  # a memory-mapped ExampleTable (data/table.py) from the pipeline
    fingerprint: str  # sha256 over every example's ids and labels: refuses resume on changed data
    stats: dict[str, object] = field(default_factory=dict)
