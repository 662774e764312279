"""`unpaired`: `{"prompt", "completion", "label": true | false}`, one reply rated on its own,
desirable (true) or undesirable (false), for `kto` (Ethayarajh et al. 2024, arXiv:2402.01306):
the prompt + completion with only the completion trained, the rating on `Example.label`
(data/preference.py `unpaired_example`)."""

from __future__ import annotations

from typing import Any

from tunelab.data.formats.registry import EncodeContext, register_format
from tunelab.data.preference import NO_PACKING_UNPAIRED, unpaired_example, unpaired_examples_batch
from tunelab.data.types import Example
from tunelab.data.validate import Problem, check_prompt, first, text_field, type_name


def check_label(r: dict[str, Any]) -> Problem | None:
    if "label" not in r:
        return Problem("missing field", "missing field 'label'")
    if not isinstance(r["label"], bool):
        return Problem("wrong type", f"label must be true (desirable) or false (undesirable), got "
                                     f"{type_name(r['label'])} {r['label']!r}")
    return None


def validate(r: dict[str, Any]) -> Problem | None:
    return first(lambda: check_prompt(r), lambda: text_field(r, "completion"), lambda: check_label(r))


def encode(r: dict[str, Any], where: str, ctx: EncodeContext) -> list[Example]:
    return [unpaired_example(r, ctx.tokenizer, ctx.template, where)]


def encode_batch(items: list[tuple[str, dict[str, Any]]], ctx: EncodeContext) -> list[Any]:
    return unpaired_examples_batch(items, ctx.tokenizer, ctx.template)


register_format("unpaired", detect=lambda keys: {"prompt", "completion", "label"} <= keys, priority=15,
                validate=validate, encode=encode, encode_batch=encode_batch, chat=True, no_packing=NO_PACKING_UNPAIRED,
                summary='{"prompt": "...", "completion": "...", "label": true} (true: desirable, false: undesirable)')
