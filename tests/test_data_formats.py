"""The format registry (data/formats/): one module per format, found by the package; detection by
specificity; a new format is one registration (shown here with a format made up in the test)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.data_fixtures import make_tokenizer, write_jsonl
from tunelab.config import DataConfig
from tunelab.data.formats import FORMATS, EncodeContext, detect_format, register_format, resolve_format
from tunelab.data.pipeline import load_tokenized
from tunelab.data.templates import tokenize_chat
from tunelab.data.types import IGNORE, Example
from tunelab.data.validate import Problem, first, text_field
from tunelab.errors import DataError

SRC = Path(__file__).resolve().parents[1] / "src" / "tunelab" / "data" / "formats"


def test_every_module_registers_a_format_and_every_format_is_complete():
    modules = {p.stem for p in SRC.glob("*.py")} - {"__init__", "registry"}
    assert modules == set(FORMATS)  # the file name is the format name
    assert len({s.priority for s in FORMATS.values()}) == len(FORMATS), "detection order must be total"
    for spec in FORMATS.values():
        assert callable(spec.detect) and callable(spec.validate) and callable(spec.encode) and spec.summary


@pytest.mark.parametrize("record, fmt", [
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, "preference"),
    ({"prompt": "p", "responses": ["a", "b"]}, "ranking"),
    ({"messages": [], "text": "t"}, "chat"),
    ({"conversations": []}, "chat"),
    ({"instruction": "i", "output": "o", "text": "t"}, "instruction"),
    ({"text": "t", "label": "x"}, "classification"),
    ({"text": "t"}, "text"),
    ({"prompt": "p"}, "prompt"),
    ({"question": "q"}, None),
])
def test_the_most_specific_format_wins(record, fmt):
    assert detect_format(record) == fmt


def test_an_unknown_configured_format_names_the_registered_ones():
    with pytest.raises(DataError, match="unknown format 'alpacca'; registered: auto, chat, classification"):
        resolve_format("alpacca", [], "x.jsonl")


@pytest.fixture
def qa_format():
    """A format made up here, registered the way a new file in data/formats/ would register it."""
    def validate(r: dict[str, Any]) -> Problem | None:
        return first(lambda: text_field(r, "question"), lambda: text_field(r, "answer"))

    def encode(r: dict[str, Any], where: str, ctx: EncodeContext) -> list[Example]:
        messages = [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
        ids, labels = tokenize_chat(ctx.tokenizer, ctx.template, messages, ctx.mask_prompt)
        return [Example(ids, labels, where)]

    register_format("qa", detect=lambda keys: {"question", "answer"} <= keys, priority=35, validate=validate,
                    encode=encode, chat=True, summary='{"question": "...", "answer": "..."}')
    yield
    del FORMATS["qa"]


def test_a_new_format_is_one_registration(qa_format, tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Where is the cat?", "answer": "On the mat."},
                                                {"question": "Who?", "answer": ""}])
    cfg = DataConfig(train=str(path), chat_template="chatml", on_error="skip", max_bad_fraction=0.5)
    logs: list[str] = []
    data = load_tokenized(cfg, "train", make_tokenizer(), mask_prompt=True, formats=("qa",), log=logs.append)
    (ex,) = data.examples
    assert data.stats["format"] == "qa" and ex.where.endswith(":1")
    assert any(label != IGNORE for label in ex.labels) and ex.labels[0] == IGNORE  # the answer trains, not the question
    assert any("answer is empty" in line or "empty text 1" in line for line in logs), logs
