"""`text`: `{"text": "..."}`, plain text with every token trained (continued pretraining), ending in eos."""

from __future__ import annotations

from typing import Any

from tunelab.data.batched import tokenize_texts
from tunelab.data.formats.registry import EncodeContext, register_format
from tunelab.data.templates import tokenize_text
from tunelab.data.types import Example
from tunelab.data.validate import Problem, text_field


def validate(r: dict[str, Any]) -> Problem | None:
    return text_field(r, "text")


def encode(r: dict[str, Any], where: str, ctx: EncodeContext) -> list[Example]:
    ids, labels = tokenize_text(ctx.tokenizer, r["text"])
    return [Example(ids, labels, where)]


def encode_batch(items: list[tuple[str, dict[str, Any]]], ctx: EncodeContext) -> list[list[Example]]:
    tokens = tokenize_texts(ctx.tokenizer, [r["text"] for _, r in items])
    return [[Example(ids, labels, where)] for (where, _), (ids, labels) in zip(items, tokens, strict=True)]


register_format("text", detect=lambda keys: "text" in keys, priority=60, validate=validate, encode=encode,
                encode_batch=encode_batch, rendered=True, summary='{"text": "..."}')
