"""In-context learning (N01): which solved examples ("shots") stand before a question.

Brown et al. 2020 (arXiv 2005.14165) showed that a frozen model answers better after k solved
examples; Liu et al. 2021 (arXiv 2101.06804) that shots similar to the question beat random ones,
and that the most similar works best next to the question. Selection here:

- `random`: k shots drawn per question (seeded by the config's seed and the question's position);
- `fixed`: the same k shots for every question (one seeded draw);
- `similar`: the k shots whose questions score highest against the question under BM25.

A shot whose question is the evaluated question itself is never used (it would give the answer
away). `select` returns shots best first (for random/fixed: in draw order); `order` then decides
where the best one stands. Nothing trains; the prompt assembly and the token budget are in
augment.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from tunelab.config import ICLConfig
from tunelab.data.qa import Messages, prompt_and_gold, question_of
from tunelab.errors import DataError
from tunelab.nonparametric.retrieve import BM25


@dataclass(frozen=True)
class Shot:
    question: str  # the solved example's last user turn
    reply: str


def shots_of(records: list[dict[str, Any]], where: str) -> list[Shot]:
    """Every record that asks something (a chat/instruction/prompt+answer record) as a shot."""
    shots = []
    for i, record in enumerate(records):
        try:
            messages, _, reply = prompt_and_gold(record)
        except (KeyError, ValueError, TypeError) as e:
            raise DataError(f"{where}: record {i + 1} is not a solved question ({type(e).__name__}: {e})",
                            fix="give the ICL pool chat (messages), instruction or prompt+answer records") from e
        shots.append(Shot(question_of(messages), reply))
    if not shots:
        raise DataError(f"{where}: the ICL pool is empty", fix="point icl.pool at a file of solved examples")
    return shots


class ShotSelector:
    """Chooses the shots of each question from a pool (see the module docstring)."""

    def __init__(self, pool: list[Shot], cfg: ICLConfig):
        self.pool, self.cfg = pool, cfg
        self._bm25 = BM25([s.question for s in pool]) if cfg.select == "similar" and cfg.k else None
        self._fixed = random.Random(cfg.seed).sample(range(len(pool)), len(pool)) if cfg.select == "fixed" else []

    def select(self, question: str, position: int) -> list[Shot]:
        """Up to k shots for `question` (the `position`-th question evaluated), best first."""
        k = min(self.cfg.k, len(self.pool))
        if k == 0:
            return []
        if self._bm25 is not None:
            ranked = [i for i, _ in self._bm25.search([question], k + 1)[0]]
            # A question BM25 cannot match (only unknown words) still gets k shots: the pool's first.
            ranked += [i for i in range(len(self.pool)) if i not in ranked][: k + 1]
        elif self.cfg.select == "fixed":
            ranked = self._fixed[: k + 1]
        else:
            ranked = random.Random(f"{self.cfg.seed}:{position}").sample(range(len(self.pool)), min(k + 1,
                                                                                                    len(self.pool)))
        return [self.pool[i] for i in ranked if self.pool[i].question != question][:k]


def arrange(shots: list[Shot], order: str, seed: int, position: int) -> list[Shot]:
    """Shots (best first) in prompt order: `best_last` puts the best next to the question."""
    if order == "best_first":
        return list(shots)
    if order == "random":
        return random.Random(f"{seed}:order:{position}").sample(shots, len(shots))
    return list(reversed(shots))


def with_shots(messages: Messages, shots: list[Shot], fmt: str) -> Messages:
    """`messages` (a question) with `shots` before it: as user/assistant turns after any system
    turn, or (`text`) written into the question's own user turn."""
    if not shots:
        return list(messages)
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(system):]
    if fmt == "turns":
        turns = [t for s in shots for t in ({"role": "user", "content": s.question},
                                             {"role": "assistant", "content": s.reply})]
        return [*system, *turns, *rest]
    solved = "\n\n".join(f"{s.question}\n{s.reply}" for s in shots)
    last = max(i for i, m in enumerate(rest) if m["role"] == "user")
    rest = [*rest[:last], {"role": "user", "content": f"{solved}\n\n{rest[last]['content']}"}, *rest[last + 1:]]
    return [*system, *rest]
