"""`classification`: `{"text", "label"}`, for a classification head (methods head / features):
the text's tokens and its class id in the training file's label order (data/classify.py)."""

from __future__ import annotations

from typing import Any

from tunelab.data.classify import (
    NO_PACKING,
    check_record,
    classification_example,
    classification_examples,
    label_order,
)
from tunelab.data.formats.registry import EncodeContext, register_format
from tunelab.data.types import Example


def encode(r: dict[str, Any], where: str, ctx: EncodeContext) -> list[Example]:
    return [classification_example(r, where, ctx.tokenizer, ctx.labels)]


def encode_batch(items: list[tuple[str, dict[str, Any]]], ctx: EncodeContext) -> list[Any]:
    return classification_examples(items, ctx.tokenizer, ctx.labels)


register_format("classification", detect=lambda keys: {"text", "label"} <= keys, priority=50,
                validate=check_record, encode=encode, encode_batch=encode_batch, label_order=label_order,
                no_packing=NO_PACKING,
                summary='{"text": "...", "label": "..."}')
