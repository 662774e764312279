"""The deterministic stream of micro-batches: order from (seed, epoch), a cursor for exact resume.

Each epoch shuffles the examples with its own seed; with packing, the shuffled examples are
packed into rows of at most `max_length` tokens and the rows shuffled again. Micro-batches of
`batch_size` rows follow in order; in a multi-process run, process r takes every W-th one.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tunelab.data.collate import collate, pack
from tunelab.data.mixture import mixture_order
from tunelab.data.table import lengths_of
from tunelab.data.types import IGNORE, Example


@dataclass
class MicroBatch:
    tensors: dict[str, torch.Tensor]
    where: list[str]  # file:line of every example in it
    n_trained: int  # the units the loss is normalised by: trained tokens, or pairs / labelled examples
    n_real: int  # tokens that are not padding


def epoch_rows(lengths: Sequence[int] | np.ndarray, seed: int, epoch: int | str, packing: bool, max_length: int,
               order: list[int] | None = None) -> Sequence[list[int]]:
    """One epoch's rows of example indices: `order` (default: a shuffle of all), packed when `packing`.
    (`epoch` names the shuffle: a streamed run's is "epoch/window", data/streamed.py.)"""
    rng = random.Random(f"{seed}/{epoch}")
    if order is None:
        order = list(range(len(lengths)))
        rng.shuffle(order)
    if not packing:
        return _Singles(order)
    bins = pack(np.asarray(lengths, dtype=np.int64)[order].tolist() if order else [], max_length)
    rows = [[order[j] for j in b] for b in bins]
    rng.shuffle(rows)
    return rows


class _Singles(Sequence[list[int]]):
    """One example per row, `[[i] for i in order]` made a row at a time (a million-example epoch is one
    list of ints, not a million lists)."""

    def __init__(self, order: list[int]):
        self.order = order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [[j] for j in self.order[i]]
        return [self.order[i]]


def units(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the loop normalises an unpaired batch by: its labelled rows where it has per-row `label`s,
    else its trained tokens (shifted labels != IGNORE)."""
    if "label" in batch:
        return (batch["label"] != IGNORE).sum()
    return (batch["labels"][:, 1:] != IGNORE).sum()


class BatchStream:
    def __init__(
        self, examples: Sequence[Example], *, batch_size: int, packing: bool, max_length: int, seed: int,
        pad_id: int, rank: int = 0, world: int = 1,
    ):
        self.examples = examples  # indexed one micro-batch at a time: a memory-mapped ExampleTable stays on disk
        self.lengths = lengths_of(examples)  # (n,) numpy: what packing and the epoch order need
        self.batch_size, self.packing, self.max_length = batch_size, packing, max_length
        self.seed, self.pad_id, self.rank, self.world = seed, pad_id, rank, world
        self.epoch, self.index, self.samples = 0, 0, 0
        self._rows = self._epoch(0)

    def _epoch(self, epoch: int) -> Sequence[list[int]]:
        return epoch_rows(self.lengths, self.seed, epoch, self.packing, self.max_length)

    def micro_batches_per_epoch(self) -> int:
        return math.ceil(len(self._rows) / self.batch_size)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "samples": self.samples, "seed": self.seed}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.index, self.samples = state["epoch"], state["index"], state["samples"]
        self._rows = self._epoch(self.epoch)

    def _next_rows(self, count: int | None = None) -> list[list[int]]:
        if self.index >= len(self._rows):
            self._advance()
        rows = self._rows[self.index : self.index + (count or self.batch_size)]
        self.index += len(rows)
        self.samples += sum(len(r) for r in rows)
        return rows

    def _advance(self) -> None:
        """The rows are used up: the next epoch's (a streamed run's next window, data/streamed.py)."""
        self.epoch, self.index = self.epoch + 1, 0
        self._rows = self._epoch(self.epoch)

    def next_examples(self, n: int) -> list[Example]:
        """The next `n` examples in stream order (unpacked rows), for recipes that sample from prompts (PPO)."""
        out: list[Example] = []
        while len(out) < n:
            out += [self.examples[i] for row in self._next_rows(n - len(out)) for i in row]
        return out

    def next_group(self, n: int) -> list[MicroBatch]:
        """The next `n` micro-batches of this process (the others' are consumed and dropped)."""
        out = []
        for _ in range(n):
            for r in range(self.world):
                rows = self._next_rows()
                if r == self.rank:
                    out.append(self._collate(rows))
        return out

    def _collate(self, rows: list[list[int]]) -> MicroBatch:
        exs = [[self.examples[i] for i in row] for row in rows]
        tensors = collate(exs, pad_id=self.pad_id, packed=self.packing)
        # preference pairs count once each (data/preference.py), so do labelled examples (a class, an
        # unpaired reply's rating; for classes the same count as their one trained token each);
        # everything else by trained tokens
        n_pairs = tensors.get("n_pairs")
        n_trained = int(n_pairs) if n_pairs is not None else int(units(tensors))
        n_real = int(tensors["attention_mask"].sum()) if n_pairs is not None else sum(
            len(e.input_ids) for row in exs for e in row)
        return MicroBatch(tensors, [e.where for row in exs for e in row], n_trained, n_real)


class MixtureStream(BatchStream):
    """A BatchStream over a multi-task mixture (data/mixture.py): each epoch's order is the mixture's,
    and every batch carries `task_ids` (B, T), the task index of each token (-1 on padding)."""

    def __init__(self, examples: Sequence[Example], *, task_of: list[int], probs: list[float], **kw: Any):
        self.task_of, self.probs = task_of, probs
        super().__init__(examples, **kw)

    def _epoch(self, epoch: int) -> Sequence[list[int]]:
        order = mixture_order(self.task_of, self.probs, self.seed, epoch)
        return epoch_rows(self.lengths, self.seed, epoch, self.packing, self.max_length, order)

    def _collate(self, rows: list[list[int]]) -> MicroBatch:
        mb = super()._collate(rows)
        ids = mb.tensors["input_ids"]
        task_ids = torch.full(ids.shape, -1, dtype=torch.long)  # (B, T)
        for b, row in enumerate(rows):
            t = 0
            for i in row:
                n = int(self.lengths[i])
                task_ids[b, t:t + n] = self.task_of[i]
                t += n
        mb.tensors["task_ids"] = task_ids
        return mb
