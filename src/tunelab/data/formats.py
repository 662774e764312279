"""Turn a validated record of any chat-like format into the one shape templates render: messages.

- instruction (Alpaca): `{"instruction", "input"?, "output", "system"?}` ->
  `[system?, user: instruction (+ "\\n\\n" + input), assistant: output]`
- chat: `{"messages": [{"role", "content"}]}` as is (only role and content are kept), or ShareGPT
  `{"conversations": [{"from": "human"|"gpt"|"system", "value"}]}` mapped to roles.
"""

from __future__ import annotations

from typing import Any

from tunelab.data.validate import message_content, message_role

Message = dict[str, str]

RENDERED = ("text", "instruction", "chat")  # formats that `render_example` turns into tokens


def to_messages(record: dict[str, Any], fmt: str) -> list[Message]:
    """The chat messages of a validated `instruction` or `chat` record."""
    if fmt == "instruction":
        return instruction_messages(record)
    if fmt == "chat":
        return chat_messages(record)
    raise ValueError(f"format {fmt!r} has no messages")


def instruction_messages(record: dict[str, Any]) -> list[Message]:
    user = record["instruction"]
    if record.get("input", "").strip():
        user = f"{user}\n\n{record['input']}"
    messages = [{"role": "system", "content": record["system"]}] if record.get("system", "").strip() else []
    return [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def chat_messages(record: dict[str, Any]) -> list[Message]:
    sharegpt = "messages" not in record
    raw = record["conversations"] if sharegpt else record["messages"]
    # Extra keys (name, tool calls, weights) are dropped: templates differ in what they accept.
    return [{"role": message_role(m, sharegpt), "content": message_content(m, sharegpt)} for m in raw]
