"""ICL and RAG applied to questions: each record's prompt gets its retrieved passages (RAG) and its
solved examples (ICL), within a token budget; what was kept, dropped and retrieved is counted.

The result is again a list of records (`messages` = the augmented prompt + the gold reply, plus the
original metadata), so evaluation, generation and training data take it unchanged.

Budget: the prompt, rendered through the chat template with the generation prompt, must fit in
`budget` tokens. Whole shots go first (the least relevant first), then whole passages (the lowest
ranked first); the question is never cut: a question that does not fit alone is an error naming
its record.

Retrieval is scored where the gold is known: a passage is relevant when it contains the record's
short answer as whole words and, where the record names its subject (`person`), that name too.
recall@k: the share of questions with a relevant passage among the k retrieved (before the budget);
MRR: the mean of 1/rank of the first relevant passage (0 when none).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab import owned
from tunelab.config import ICLConfig, RAGConfig
from tunelab.data.qa import Messages, contains_answer, prompt_and_gold, question_of
from tunelab.data.sources import read_all, resolve_source
from tunelab.errors import DataError
from tunelab.inference.generation import encode_prompt
from tunelab.nonparametric.icl import Shot, ShotSelector, arrange, shots_of, with_shots
from tunelab.nonparametric.index import Hit, RagIndex

# Keys of a question record that hold its prompt or reply; every other key is metadata and is kept.
PROMPT_KEYS = ("messages", "conversations", "instruction", "input", "output", "prompt")


@dataclass
class Technique:
    """The non-parametric techniques one evaluation applies; `active` is False when neither is on."""

    icl: ICLConfig
    rag: RAGConfig
    selector: ShotSelector | None = None
    index: RagIndex | None = None

    @property
    def active(self) -> bool:
        return self.selector is not None or self.index is not None

    def budget(self, model: Any, reply_tokens: int) -> int:
        """The prompt's token budget: the smallest `max_length` set, else the model's context, less
        the tokens kept for the reply."""
        limits = [c.max_length for c in (self.icl, self.rag) if c.max_length]
        context = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 1024
        return min(limits or [context]) - reply_tokens

    @property
    def name(self) -> str:
        parts = ([f"rag({self.rag.retriever}, k={self.rag.k})"] if self.index else []) + (
            [f"icl({self.icl.select}, k={self.icl.k})"] if self.selector else [])
        return " + ".join(parts) or "none"


def technique(icl: ICLConfig | None = None, rag: RAGConfig | None = None, *,
              pool: list[dict[str, Any]] | None = None, pool_name: str = "the ICL pool") -> Technique:
    """The technique of these config sections. ICL needs `pool` (the solved examples) when icl.k > 0."""
    icl, rag = icl or ICLConfig(), rag or RAGConfig()
    selector = None
    if icl.k:
        if pool is None:
            raise DataError("in-context learning needs solved examples to take shots from",
                            fix="set icl.pool (a dataset file or tinyworld:<task>@train)")
        selector = ShotSelector(shots_of(pool, pool_name), icl)
    index = RagIndex.open(rag.index) if rag.index else None
    return Technique(icl, rag, selector, index)


def apply(records: list[dict[str, Any]], tokenizer: Any, tech: Technique, *, budget: int,
          where: str = "records", room_for_reply: bool = False) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """`records` with every prompt augmented, and the counts (see the module docstring).
    `room_for_reply`: the prompt and its gold reply must fit in `budget` together (training data)."""
    if not tech.active:
        return records, {}
    out, stats = [], _Stats()
    for pos, record in enumerate(records):
        messages, gold, reply = prompt_and_gold(record)
        question = question_of(messages)
        hits = _retrieve(tech, question, stats)
        if hits is not None:
            stats.score_retrieval(hits, gold, record.get("person"))
        shots = tech.selector.select(question, pos) if tech.selector else []
        room = len(tokenizer(reply)["input_ids"]) + 2 if room_for_reply else 0  # + end of turn, newline
        prompt, kept_hits, kept_shots, tokens = _fit(tokenizer, tech, messages, hits or [], shots, budget - room,
                                                     pos, where)
        stats.add(tokens, hits, kept_hits, shots, kept_shots)
        meta = {k: v for k, v in record.items() if k not in PROMPT_KEYS}
        if hits is not None:
            meta["passages"] = [h.id for h in kept_hits]
        out.append({**meta, "messages": [*prompt, {"role": "assistant", "content": reply}], "answer": gold})
    return out, stats.summary(tech)


def augment_file(source: str, out: Path, tokenizer: Any, tech: Technique, *, budget: int) -> dict[str, float]:
    """Training data with passages/shots in its prompts: `source`'s records augmented into `out`
    (JSON Lines, written atomically); returns the counts."""
    records, counts = apply(read_all(resolve_source(source)), tokenizer, tech, budget=budget, where=source,
                            room_for_reply=True)
    owned.write_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return counts


def _retrieve(tech: Technique, question: str, stats: _Stats) -> list[Hit] | None:
    if tech.index is None:
        return None
    t0 = time.perf_counter()
    (hits,) = tech.index.search([question], tech.rag.k, retriever=tech.rag.retriever, encoder=tech.rag.encoder)
    stats.latencies.append((time.perf_counter() - t0) * 1000)
    return hits


def _fit(tokenizer: Any, tech: Technique, messages: Messages, hits: list[Hit], shots: list[Shot], budget: int,
         position: int, where: str) -> tuple[Messages, list[Hit], list[Shot], int]:
    n_hits, n_shots = len(hits), len(shots)
    while True:
        prompt = _build(tech, messages, hits[:n_hits], arrange(shots[:n_shots], tech.icl.order, tech.icl.seed,
                                                                position))
        tokens = len(encode_prompt(tokenizer, prompt, chat=True))
        if tokens <= budget:
            return prompt, hits[:n_hits], shots[:n_shots], tokens
        if n_shots:
            n_shots -= 1
        elif n_hits:
            n_hits -= 1
        else:
            raise DataError(f"{where}: record {position + 1}: the question alone is {tokens} tokens, over the "
                            f"prompt budget of {budget}",
                            fix="shorten the question, raise icl.max_length / rag.max_length, or use a model "
                                "with a longer context")


def _build(tech: Technique, messages: Messages, hits: list[Hit], shots: list[Shot]) -> Messages:
    if tech.index is not None:
        passages = "\n".join(f"[{i}] {h.text}" for i, h in enumerate(hits, 1))
        last = max(i for i, m in enumerate(messages) if m["role"] == "user")
        content = tech.rag.template.format(passages=passages, question=messages[last]["content"])
        messages = [*messages[:last], {"role": "user", "content": content}, *messages[last + 1:]]
    return with_shots(messages, shots, tech.icl.format)


@dataclass
class _Stats:
    n: int = 0
    tokens: int = 0
    shots: int = 0
    shots_dropped: int = 0
    passages: int = 0
    passages_dropped: int = 0
    found: int = 0
    reciprocal_ranks: float = 0.0
    scored: int = 0
    latencies: list[float] = field(default_factory=list)

    def add(self, tokens: int, hits: list[Hit] | None, kept_hits: list[Hit], shots: list[Shot],
            kept_shots: list[Shot]) -> None:
        self.n += 1
        self.tokens += tokens
        self.shots += len(kept_shots)
        self.shots_dropped += len(shots) - len(kept_shots)
        self.passages += len(kept_hits)
        self.passages_dropped += len(hits or []) - len(kept_hits)

    def score_retrieval(self, hits: list[Hit], gold: str, subject: Any) -> None:
        self.scored += 1
        for rank, hit in enumerate(hits, 1):
            if contains_answer(hit.text, gold) and (not isinstance(subject, str) or subject in hit.text):
                self.found += 1
                self.reciprocal_ranks += 1 / rank
                return

    def summary(self, tech: Technique) -> dict[str, float]:
        n = max(self.n, 1)
        out: dict[str, float] = {"prompt_tokens": self.tokens / n}
        if tech.selector is not None:
            out.update(shots=self.shots / n, shots_dropped=self.shots_dropped)
        if tech.index is not None:
            lat = sorted(self.latencies)
            out.update(passages=self.passages / n, passages_dropped=self.passages_dropped,
                       retrieval_recall=self.found / max(self.scored, 1),
                       retrieval_mrr=self.reciprocal_ranks / max(self.scored, 1),
                       retrieval_ms_p50=statistics.median(lat) if lat else 0.0,
                       retrieval_ms_p95=lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else 0.0)
        return out
