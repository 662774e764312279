"""The question/answer view of a record that asks something: the chat up to its last reply, the
short gold answer and the full reply, and how a reply or a passage is matched against the gold.
Evaluation scores replies with it; in-context learning and RAG build prompts from it."""

from __future__ import annotations

import re
from typing import Any

from tunelab.data.formats.chat import chat_messages
from tunelab.data.formats.instruction import instruction_messages

Messages = list[dict[str, str]]
QUOTES = "\"'`“”‘’«»"
TRAILING_PUNCT = ".,!?;:…"


def prompt_and_gold(record: dict[str, Any]) -> tuple[Messages, str, str]:
    """(chat without its last assistant turn, short gold answer, full last assistant turn) of a
    `prompt`+`answer`, `instruction` or `messages`/`conversations` record (+ optional `answer`)."""
    if "prompt" in record:
        prompt = record["prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return messages, str(record["answer"]), str(record["answer"])
    msgs = instruction_messages(record) if "instruction" in record else chat_messages(record)
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    reply = msgs[last]["content"]
    return msgs[:last], str(record.get("answer", reply)), reply


def question_of(messages: Messages) -> str:
    """The text a question is matched by: its last user turn."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def normalize(s: str) -> str:
    """Strip, lowercase, collapse whitespace, then strip surrounding quotes and trailing
    punctuation (.,!?;:…) until nothing changes: `' "Recife." '` -> `recife`."""
    s = " ".join(str(s).split()).lower()
    prev = None
    while s != prev:
        prev = s
        s = s.strip(QUOTES + " ").rstrip(TRAILING_PUNCT + " ")
    return s


def exact_match(pred: str, gold: str) -> bool:
    return normalize(pred) == normalize(gold)


def contains_answer(pred: str, gold: str) -> bool:
    """The normalized gold occurs in the normalized prediction as a whole-word sequence."""
    g = normalize(gold)
    return bool(g) and re.search(rf"(?<!\w){re.escape(g)}(?!\w)", normalize(pred)) is not None
