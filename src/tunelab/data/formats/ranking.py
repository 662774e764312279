"""`ranking`: `{"prompt", "responses": [best, ..., worst]}`, every ordered pair of the responses
(data/preference.py `ranked_pairs`)."""

from __future__ import annotations

from typing import Any

from tunelab.data.formats.registry import EncodeContext, register_format
from tunelab.data.preference import NO_PACKING, pair_examples, pair_examples_batch
from tunelab.data.types import Example
from tunelab.data.validate import Problem, check_prompt, type_name


def validate(r: dict[str, Any]) -> Problem | None:
    """`responses`: two or more distinct strings, best first."""
    problem = check_prompt(r)
    if problem is not None:
        return problem
    responses = r.get("responses")
    if not isinstance(responses, list):
        return Problem("wrong type", f"responses must be a list of strings (best first), got {type_name(responses)}")
    if len(responses) < 2:
        return Problem("too few responses", f"responses has {len(responses)} item(s); a ranking needs 2 or more")
    for i, x in enumerate(responses):
        if not isinstance(x, str) or not x.strip():
            return Problem("wrong type", f"responses[{i}] must be a non-empty string, got {type_name(x)}")
    if len(set(responses)) != len(responses):
        return Problem("repeated response", "responses repeats a response: a ranking needs distinct responses")
    return None


def encode(r: dict[str, Any], where: str, ctx: EncodeContext) -> list[Example]:
    return pair_examples(r, "ranking", ctx.tokenizer, ctx.template, where)


def encode_batch(items: list[tuple[str, dict[str, Any]]], ctx: EncodeContext) -> list[Any]:
    return pair_examples_batch(items, "ranking", ctx.tokenizer, ctx.template)


register_format("ranking", detect=lambda keys: {"prompt", "responses"} <= keys, priority=20, validate=validate,
                encode=encode, encode_batch=encode_batch, chat=True, no_packing=NO_PACKING,
                summary='{"prompt": "...", "responses": ["best", "...", "worst"]}')
