"""`preference`: `{"prompt", "chosen", "rejected"}`, one (chosen, rejected) pair of replies, each
rendered as the conversation prompt + the reply with only the reply trained (data/preference.py)."""

from __future__ import annotations

from typing import Any

from tunelab.data.formats.registry import EncodeContext, register_format
from tunelab.data.preference import NO_PACKING, pair_examples, pair_examples_batch
from tunelab.data.types import Example
from tunelab.data.validate import Problem, check_prompt, first, text_field


def validate(r: dict[str, Any]) -> Problem | None:
    problem = first(lambda: check_prompt(r), lambda: text_field(r, "chosen"), lambda: text_field(r, "rejected"))
    if problem is None and r["chosen"] == r["rejected"]:
        return Problem("repeated response", "chosen and rejected are the same reply: the pair prefers nothing")
    return problem


def encode(r: dict[str, Any], where: str, ctx: EncodeContext) -> list[Example]:
    return pair_examples(r, "preference", ctx.tokenizer, ctx.template, where)


def encode_batch(items: list[tuple[str, dict[str, Any]]], ctx: EncodeContext) -> list[Any]:
    return pair_examples_batch(items, "preference", ctx.tokenizer, ctx.template)


register_format("preference", detect=lambda keys: {"prompt", "chosen", "rejected"} <= keys, priority=10,
                validate=validate, encode=encode, encode_batch=encode_batch, chat=True, no_packing=NO_PACKING,
                summary='{"prompt": "...", "chosen": "...", "rejected": "..."}')
