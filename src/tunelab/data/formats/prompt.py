"""`prompt`: `{"prompt": "..." | [messages]}`, what PPO samples replies to: rendered with the
generation prompt, nothing trained on it."""

from __future__ import annotations

from typing import Any

from tunelab.data.formats.registry import EncodeContext, register_format
from tunelab.data.preference import prompt_example, prompt_examples_batch
from tunelab.data.types import Example
from tunelab.data.validate import Problem, check_prompt


def encode(r: dict[str, Any], where: str, ctx: EncodeContext) -> list[Example]:
    return [prompt_example(r, ctx.tokenizer, ctx.template, where)]


def validate(r: dict[str, Any]) -> Problem | None:
    return check_prompt(r)


def encode_batch(items: list[tuple[str, dict[str, Any]]], ctx: EncodeContext) -> list[Any]:
    return prompt_examples_batch(items, ctx.tokenizer, ctx.template)


register_format("prompt", detect=lambda keys: "prompt" in keys, priority=70, validate=validate, encode=encode,
                encode_batch=encode_batch, chat=True, summary='{"prompt": "..."} (what PPO samples replies to)')
