"""`retrieval`: `{"query", "positive"}`, a question and a passage that answers it, for training a
dense retriever (objective `contrastive`). Both are plain text (no chat template), every token
counted: the encoder mean-pools over all of them. The pair is one example, the passage on
`Example.rejected` (the slot a pair's second sequence takes; see data/preference.py)."""

from __future__ import annotations

from typing import Any

from tunelab.data.batched import token_ids
from tunelab.data.formats.registry import EncodeContext, register_format
from tunelab.data.types import Example
from tunelab.data.validate import Problem, first, text_field


def validate(r: dict[str, Any]) -> Problem | None:
    problem = first(lambda: text_field(r, "query"), lambda: text_field(r, "positive"))
    if problem is None and r["query"].strip() == r["positive"].strip():
        return Problem("repeated text", "query and positive are the same text: the pair teaches nothing")
    return problem


def _plain(tokenizer: Any, text: str, where: str) -> Example:
    ids = list(tokenizer(text)["input_ids"])
    return Example(ids, list(ids), where)


def encode(r: dict[str, Any], where: str, ctx: EncodeContext) -> list[Example]:
    query = _plain(ctx.tokenizer, r["query"], where)
    return [Example(query.input_ids, query.labels, where, rejected=_plain(ctx.tokenizer, r["positive"], where))]


def encode_batch(items: list[tuple[str, dict[str, Any]]], ctx: EncodeContext) -> list[list[Example]]:
    queries = token_ids(ctx.tokenizer, [r["query"] for _, r in items])
    passages = token_ids(ctx.tokenizer, [r["positive"] for _, r in items])
    return [[Example(q, list(q), where, rejected=Example(p, list(p), where))]
            for (where, _), q, p in zip(items, queries, passages, strict=True)]


register_format("retrieval", detect=lambda keys: {"query", "positive"} <= keys, priority=12, validate=validate,
                encode=encode, encode_batch=encode_batch,
                no_packing="retrieval pairs: each query and passage is embedded on its own row",
                summary='{"query": "...", "positive": "..."}')
