"""`text`: `{"text": "..."}`, plain text with every token trained (continued pretraining), ending in eos."""

from __future__ import annotations

from typing import Any

from tunelab.data.formats.registry import EncodeContext, register_format
from tunelab.data.templates import tokenize_text
from tunelab.data.types import Example
from tunelab.data.validate import Problem, text_field


def validate(r: dict[str, Any]) -> Problem | None:
    return text_field(r, "text")


def encode(r: dict[str, Any], where: str, ctx: EncodeContext) -> list[Example]:
    ids, labels = tokenize_text(ctx.tokenizer, r["text"])
    return [Example(ids, labels, where)]


register_format("text", detect=lambda keys: "text" in keys, priority=60, validate=validate, encode=encode,
                rendered=True, summary='{"text": "..."}')
