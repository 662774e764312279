"""Structural checks of records, one reason per bad record, and detection of a dataset's format.

Each check returns `None` for a good record or a `Problem(kind, reason)`: `kind` groups problems
for the counts printed under `on_error: skip`, `reason` is the text after `file:line: `.
Checks run before any tokenizer or model is touched, so a broken file fails in seconds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tunelab.errors import DataError

FORMATS = ("text", "instruction", "chat", "preference", "ranking", "prompt", "classification")
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


def detect_format(record: dict[str, Any]) -> str | None:
    """The format a record's keys point to, or None. The most specific key set wins."""
    keys = set(record)
    if {"prompt", "chosen", "rejected"} <= keys:
        return "preference"
    if {"prompt", "responses"} <= keys:
        return "ranking"
    if "messages" in keys or "conversations" in keys:
        return "chat"
    if "instruction" in keys:
        return "instruction"
    if {"text", "label"} <= keys:
        return "classification"
    if "text" in keys:
        return "text"
    if "prompt" in keys:
        return "prompt"
    return None


def resolve_format(configured: str, records: Sequence[tuple[str, Any]], path: str) -> str:
    """`configured` unless it is "auto"; then the one format every recognizable record agrees on."""
    if configured != "auto":
        return configured
    seen: Counter[str] = Counter()
    first: dict[str, str] = {}
    for where, record in records:
        fmt = detect_format(record) if isinstance(record, dict) else None
        if fmt is not None:
            seen[fmt] += 1
            first.setdefault(fmt, where)
    if len(seen) > 1 and "prompt" in seen:  # a lone prompt beside other records is an incomplete pair/ranking
        del seen["prompt"]
    fix = f"set data.format to one of {', '.join(FORMATS)}; records that do not fit it are then listed one by one"
    if not seen:
        raise DataError(f"{path}: no record has the fields of a known format", fix=fix)
    if len(seen) > 1:
        parts = ", ".join(f"{n} look like {fmt} (first at {first[fmt]})" for fmt, n in seen.most_common())
        raise DataError(f"{path}: records disagree on the format: {parts}", fix=fix)
    return next(iter(seen))


def validate_record(record: dict[str, Any], fmt: str) -> Problem | None:
    """The first problem that makes `record` unusable as `fmt`, or None."""
    return _CHECKS[fmt](record)


# ----------------------------------------------------------------------------- field helpers


def type_name(value: object) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "bool", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _text_field(record: dict[str, Any], key: str, *, required: bool = True, nonempty: bool = True) -> Problem | None:
    if key not in record:
        return Problem("missing field", f"missing field {key!r}") if required else None
    value = record[key]
    if not isinstance(value, str):
        return Problem("wrong type", f"{key} must be a string, got {type_name(value)}")
    if nonempty and not value.strip():
        return Problem("empty text", f"{key} is empty")
    return None


def _first(*checks: Callable[[], Problem | None]) -> Problem | None:
    for check in checks:
        problem = check()
        if problem is not None:
            return problem
    return None


# ----------------------------------------------------------------------------- per format


def _check_text(r: dict[str, Any]) -> Problem | None:
    return _text_field(r, "text")


def _check_instruction(r: dict[str, Any]) -> Problem | None:
    return _first(
        lambda: _text_field(r, "instruction"),
        lambda: _text_field(r, "input", required=False, nonempty=False),
        lambda: _text_field(r, "output"),
        lambda: _text_field(r, "system", required=False, nonempty=False),
    )


def _check_chat(r: dict[str, Any]) -> Problem | None:
    key = "messages" if "messages" in r or "conversations" not in r else "conversations"
    if key not in r:
        return Problem("missing field", "missing field 'messages'")
    return check_messages(r[key], key, need_assistant=True)


def _check_prompt(r: dict[str, Any]) -> Problem | None:
    """A prompt: a string (one user turn) or a list of messages ending before the reply."""
    if "prompt" not in r:
        return Problem("missing field", "missing field 'prompt'")
    if isinstance(r["prompt"], list):
        return check_messages(r["prompt"], "prompt", need_assistant=False)
    return _text_field(r, "prompt")


def _check_preference(r: dict[str, Any]) -> Problem | None:
    problem = _first(lambda: _check_prompt(r), lambda: _text_field(r, "chosen"), lambda: _text_field(r, "rejected"))
    if problem is None and r["chosen"] == r["rejected"]:
        return Problem("repeated response", "chosen and rejected are the same reply: the pair prefers nothing")
    return problem


def _check_ranking(r: dict[str, Any]) -> Problem | None:
    """`responses`: two or more distinct strings, best first."""
    problem = _check_prompt(r)
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


def _check_classification(r: dict[str, Any]) -> Problem | None:
    problem = _text_field(r, "text")
    if problem is not None:
        return problem
    if "label" not in r:
        return Problem("missing field", "missing field 'label'")
    label = r["label"]
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        return Problem("wrong type", f"label must be an int or a string, got {type_name(label)}")
    if isinstance(label, str) and not label.strip():
        return Problem("empty text", "label is empty")
    return None


_CHECKS: dict[str, Callable[[dict[str, Any]], Problem | None]] = {
    "text": _check_text,
    "instruction": _check_instruction,
    "chat": _check_chat,
    "preference": _check_preference,
    "ranking": _check_ranking,
    "prompt": _check_prompt,
    "classification": _check_classification,
}


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
