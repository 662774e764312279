"""`instruction` (Alpaca): `{"instruction", "input"?, "output", "system"?}`, rendered as the chat
`[system?, user: instruction (+ "\\n\\n" + input), assistant: output]`."""

from __future__ import annotations

from typing import Any

from tunelab.data.batched import chat_examples, tokenize_chats
from tunelab.data.formats.registry import EncodeContext, register_format
from tunelab.data.templates import tokenize_chat
from tunelab.data.types import Example, Message
from tunelab.data.validate import Problem, first, text_field


def validate(r: dict[str, Any]) -> Problem | None:
    return first(
        lambda: text_field(r, "instruction"),
        lambda: text_field(r, "input", required=False, nonempty=False),
        lambda: text_field(r, "output"),
        lambda: text_field(r, "system", required=False, nonempty=False),
    )


def instruction_messages(record: dict[str, Any]) -> list[Message]:
    user = record["instruction"]
    if record.get("input", "").strip():
        user = f"{user}\n\n{record['input']}"
    messages = [{"role": "system", "content": record["system"]}] if record.get("system", "").strip() else []
    return [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def encode(r: dict[str, Any], where: str, ctx: EncodeContext) -> list[Example]:
    ids, labels = tokenize_chat(ctx.tokenizer, ctx.template, instruction_messages(r), ctx.mask_prompt)
    return [Example(ids, labels, where)]


def encode_batch(items: list[tuple[str, dict[str, Any]]], ctx: EncodeContext) -> list[Any]:
    chats = [instruction_messages(r) for _, r in items]
    return chat_examples(items, tokenize_chats(ctx.tokenizer, ctx.template, chats, ctx.mask_prompt))


register_format("instruction", detect=lambda keys: "instruction" in keys, priority=40, validate=validate,
                encode=encode, encode_batch=encode_batch, chat=True, rendered=True,
                summary='{"instruction": "...", "input": "...", "output": "..."} (alpaca)')
