"""Multi-task mixing (O03): several training sources, each a task, sampled by weight or temperature.

`data.train` as a list of sources (config.TaskSource): each is read, validated and tokenized on its
own (the one pipeline, with its cache and file:line errors), then the stream draws examples from the
tasks with probabilities

    p_i = w_i / sum_j w_j                      (every task has a weight)
    p_i = n_i^(1/T) / sum_j n_j^(1/T)          (none has: T = data.temperature; 1 = by size)

An epoch of the mixture is as many draws as the tasks hold examples together. Its order is fixed
by (seed, epoch): each task's share of the draws is p_i times that, rounded by largest remainder,
the task sequence is shuffled, and each task serves its draws from its own permutations (one per
pass over its examples). So an epoch is a list, like a single source's, and a cursor (epoch,
index) resumes it exactly. Packing then packs the drawn examples across tasks: rows never let two
examples see each other (data/collate.py), so packing mixes tasks without mixing their tokens.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tunelab.config import DataConfig
from tunelab.data.pipeline import Log, load_tokenized
from tunelab.data.table import ExampleTable
from tunelab.data.types import Example


@dataclass
class Mixture:
    """The tokenized tasks of a multi-task run, concatenated: `task_of[i]` is the task index of
    training example i; `eval[name]` that task's evaluation examples (tasks with `eval:` only)."""

    names: list[str]
    probs: list[float]
    examples: Sequence[Example]  # the tasks' memory-mapped tables end to end (data/table.py)
    task_of: list[int]
    eval: dict[str, Sequence[Example]] = field(default_factory=dict)
    fingerprints: list[str] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        """One digest of every task's data, its name and its probability: a resume refuses a changed mix."""
        blob = json.dumps([self.names, [round(p, 12) for p in self.probs], self.fingerprints])
        return hashlib.sha256(blob.encode()).hexdigest()

    def sizes(self) -> list[int]:
        return [self.task_of.count(i) for i in range(len(self.names))]


def mixing_probs(sizes: Sequence[int], weights: Sequence[float | None], temperature: float) -> list[float]:
    """p_i = w_i / sum w when every task has a weight, else n_i^(1/T) / sum n^(1/T)."""
    if weights and all(w is not None for w in weights):
        total = sum(w for w in weights if w is not None)
        return [float(w) / total for w in weights if w is not None]
    scaled = [n ** (1.0 / temperature) if n else 0.0 for n in sizes]
    total = sum(scaled)
    return [s / total for s in scaled]


def draw_counts(probs: Sequence[float], n: int) -> list[int]:
    """n draws shared by p, rounded by largest remainder (ties to the earlier task): sums to n exactly."""
    raw = [p * n for p in probs]
    counts = [math.floor(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))[: n - sum(counts)]:
        counts[i] += 1
    return counts


def mixture_order(task_of: Sequence[int], probs: Sequence[float], seed: int, epoch: int) -> list[int]:
    """The example indices of one epoch of the mixture, in order (see the module docstring)."""
    members: list[list[int]] = [[] for _ in probs]
    for i, t in enumerate(task_of):
        members[t].append(i)
    counts = draw_counts(probs, len(task_of))
    rng = random.Random(f"{seed}/{epoch}/mix")
    sequence = [t for t, c in enumerate(counts) for _ in range(c)]
    rng.shuffle(sequence)
    served: list[list[int]] = [[] for _ in probs]
    for t, c in enumerate(counts):
        passes = 0
        while len(served[t]) < c and members[t]:
            perm = list(members[t])
            random.Random(f"{seed}/{epoch}/task{t}/{passes}").shuffle(perm)
            served[t] += perm
            passes += 1
    cursor = [0] * len(probs)
    order = []
    for t in sequence:
        order.append(served[t][cursor[t]])
        cursor[t] += 1
    return order


def concat(parts: Sequence[Sequence[Example]]) -> Sequence[Example]:
    """The tasks' examples end to end: one table over their memory-mapped tables, or a list."""
    if parts and all(isinstance(p, ExampleTable) for p in parts):
        return ExampleTable.concat(parts)  # type: ignore[arg-type]
    return [ex for p in parts for ex in p]


def load_mixture(cfg: DataConfig, tokenizer: Any, *, mask_prompt: bool, formats: tuple[str, ...], log: Log) -> Mixture:
    """Every task of `cfg.train` (a list) through the pipeline, concatenated, with the mixing probabilities."""
    m = Mixture(names=[], probs=[], examples=[], task_of=[])
    parts = []
    for i, task in enumerate(cfg.tasks()):
        sub = cfg.for_task(task)
        data = load_tokenized(sub, "train", tokenizer, mask_prompt=mask_prompt, formats=formats, log=log)
        m.names.append(task.name())
        parts.append(data.examples)
        m.task_of += [i] * len(data.examples)
        m.fingerprints.append(data.fingerprint)
        if task.eval is not None:
            m.eval[task.name()] = load_tokenized(sub, "eval", tokenizer, mask_prompt=mask_prompt, formats=formats,
                                                 log=log).examples
    m.examples = concat(parts)
    weights = [t.weight for t in cfg.tasks()]
    m.probs = mixing_probs(m.sizes(), weights, cfg.temperature)
    how = "by weight" if all(w is not None for w in weights) else f"temperature {cfg.temperature:g}"
    log(f"data: multi-task mix ({how}): " + ", ".join(
        f"{n} {size:,} examples p={p:.3f}" for n, size, p in zip(m.names, m.sizes(), m.probs, strict=True)))
    return m
