"""`chat`: `{"messages": [{"role", "content"}]}` (only role and content are kept), or ShareGPT
`{"conversations": [{"from": "human"|"gpt"|"system", "value"}]}` mapped to roles."""

from __future__ import annotations

from typing import Any

from tunelab.data.batched import chat_examples, tokenize_chats
from tunelab.data.formats.registry import EncodeContext, register_format
from tunelab.data.templates import tokenize_chat
from tunelab.data.types import Example, Message
from tunelab.data.validate import Problem, check_messages, message_content, message_role


def validate(r: dict[str, Any]) -> Problem | None:
    key = "messages" if "messages" in r or "conversations" not in r else "conversations"
    if key not in r:
        return Problem("missing field", "missing field 'messages'")
    return check_messages(r[key], key, need_assistant=True)


def chat_messages(record: dict[str, Any]) -> list[Message]:
    sharegpt = "messages" not in record
    raw = record["conversations"] if sharegpt else record["messages"]
    # Extra keys (name, tool calls, weights) are dropped: templates differ in what they accept.
    return [{"role": message_role(m, sharegpt), "content": message_content(m, sharegpt)} for m in raw]


def encode(r: dict[str, Any], where: str, ctx: EncodeContext) -> list[Example]:
    ids, labels = tokenize_chat(ctx.tokenizer, ctx.template, chat_messages(r), ctx.mask_prompt)
    return [Example(ids, labels, where)]


def encode_batch(items: list[tuple[str, dict[str, Any]]], ctx: EncodeContext) -> list[Any]:
    chats = [chat_messages(r) for _, r in items]
    return chat_examples(items, tokenize_chats(ctx.tokenizer, ctx.template, chats, ctx.mask_prompt))


register_format("chat", detect=lambda keys: bool(keys & {"messages", "conversations"}), priority=30,
                validate=validate, encode=encode, encode_batch=encode_batch, chat=True, rendered=True,
                summary='{"messages": [{"role": "user", "content": "..."}, ...]} or ShareGPT "conversations"')
