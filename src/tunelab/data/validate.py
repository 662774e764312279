"""The pieces every format's check is made of (formats/): problems, fields, prompts, chats.

Each check returns `None` for a good record or a `Problem(kind, reason)`: `kind` groups problems
for the counts printed under `on_error: skip`, `reason` is the text after `file:line: `.
Checks run before any tokenizer or model is touched, so a broken file fails in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tunelab.errors import DataError

ROLES = ("system", "user", "assistant")
# ShareGPT speaker names -> roles; "user"/"assistant" are accepted there too.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass(frozen=True)
class Problem:
    kind: str  # e.g. "bad JSON", "missing field", "wrong type": the key of per-reason counts
    reason: str  # e.g. "missing field 'output'"


class RecordError(DataError):
    """One record cannot be used; the pipeline reports it as `file:line: reason` and goes on."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # to and from the first pass's worker processes
        return RecordError, (self.kind, self.reason)


# ----------------------------------------------------------------------------- field helpers


def type_name(value: object) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "bool", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def text_field(record: dict[str, Any], key: str, *, required: bool = True, nonempty: bool = True) -> Problem | None:
    if key not in record:
        return Problem("missing field", f"missing field {key!r}") if required else None
    value = record[key]
    if not isinstance(value, str):
        return Problem("wrong type", f"{key} must be a string, got {type_name(value)}")
    if nonempty and not value.strip():
        return Problem("empty text", f"{key} is empty")
    return None


def first(*checks: Callable[[], Problem | None]) -> Problem | None:
    for check in checks:
        problem = check()
        if problem is not None:
            return problem
    return None


# ----------------------------------------------------------------------------- prompts


def check_prompt(r: dict[str, Any]) -> Problem | None:
    """A prompt: a string (one user turn) or a list of messages ending before the reply."""
    if "prompt" not in r:
        return Problem("missing field", "missing field 'prompt'")
    if isinstance(r["prompt"], list):
        return check_messages(r["prompt"], "prompt", need_assistant=False)
    return text_field(r, "prompt")


# ----------------------------------------------------------------------------- chats


def check_messages(messages: object, key: str, *, need_assistant: bool) -> Problem | None:
    """Check an OpenAI-style (`role`/`content`) or ShareGPT-style (`from`/`value`) message list."""
    if not isinstance(messages, list):
        return Problem("wrong type", f"{key} must be a list of messages, got {type_name(messages)}")
    if not messages:
        return Problem("empty text", f"{key} is empty")
    sharegpt = key == "conversations"
    for i, message in enumerate(messages, start=1):
        problem = _check_message(i, message, sharegpt)
        if problem is not None:
            return problem
    roles = [message_role(m, sharegpt) for m in messages]
    if roles[0] == "assistant":
        return Problem("bad order", "message 1 is an assistant turn; a chat starts with a system or user message")
    if need_assistant and not any(
        role == "assistant" and message_content(m, sharegpt).strip() for role, m in zip(roles, messages, strict=True)
    ):
        return Problem("no assistant turn", "no assistant turn with non-empty content (nothing to train on)")
    return None


def _check_message(i: int, message: object, sharegpt: bool) -> Problem | None:
    if not isinstance(message, dict):
        return Problem("wrong type", f"message {i} must be an object, got {type_name(message)}")
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    for k in (role_key, content_key):
        if k not in message:
            return Problem("missing field", f"message {i} has no {k!r}")
        if not isinstance(message[k], str):
            return Problem("wrong type", f"message {i} {k} must be a string, got {type_name(message[k])}")
    allowed = SHAREGPT_ROLES if sharegpt else ROLES
    if message[role_key] not in allowed:
        return Problem("bad role", f"message {i} has {role_key} {message[role_key]!r}; allowed: {', '.join(allowed)}")
    if message_role(message, sharegpt) == "user" and not message[content_key].strip():
        return Problem("empty text", f"message {i} (user) is empty")
    return None


def message_role(message: dict[str, Any], sharegpt: bool) -> str:
    return SHAREGPT_ROLES[message["from"]] if sharegpt else message["role"]


def message_content(message: dict[str, Any], sharegpt: bool) -> str:
    return message["value"] if sharegpt else message["content"]
