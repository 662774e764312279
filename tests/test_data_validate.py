"""Every class of bad record is reported as `file:line: reason`, under each error policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.data_fixtures import chat, make_tokenizer, write_jsonl
from tunelab.config import DataConfig
from tunelab.data.formats import validate_record
from tunelab.data.formats.chat import chat_messages
from tunelab.data.formats.instruction import instruction_messages
from tunelab.data.pipeline import detect_format, load_tokenized
from tunelab.data.templates import BUILTIN_TEMPLATES
from tunelab.errors import DataError

MAX_LEN = 48
LONG_ANSWER = " ".join(["The cat sat on the mat."] * 12)
LONG_PROMPT = " ".join(["Tell me about the big red house."] * 12)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def n_tokens(tok, record) -> int:
    """Token count of a chat rendered with chatml, computed straight from transformers."""
    text = tok.apply_chat_template(record["messages"], tokenize=False, chat_template=BUILTIN_TEMPLATES["chatml"])
    return len(tok(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def bad_file(tmp_path_factory, tok) -> tuple[Path, dict[int, str]]:
    """A chat file with one record of every bad class; returns it and {line: expected reason}."""
    long_answer = chat("Hello.", LONG_ANSWER)
    long_prompt = chat(LONG_PROMPT, "Yes.")
    lines: list[bytes] = [
        json.dumps(chat("Hello.", "Hi there.")).encode(),  # 1 good
        b'{"messages": [}',  # 2
        b"[1, 2]",  # 3
        json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(),  # 4
        json.dumps({"msgs": []}).encode(),  # 5
        json.dumps(chat("  ", "Hi.")).encode(),  # 6
        json.dumps({"messages": [{"role": "user", "content": "Hi."}, {"role": "bot", "content": "Yo."}]}).encode(),
        json.dumps(chat("Hello.")).encode(),  # 8
        json.dumps(long_answer).encode(),  # 9
        json.dumps(long_prompt).encode(),  # 10
        b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "ok"}]}',  # 11
        b"",  # 12: blank lines are skipped, not counted
        json.dumps(chat("What is a cat?", "A small animal.")).encode(),  # 13 good
    ]
    path = tmp_path_factory.mktemp("bad") / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    reasons = {
        2: "bad JSON: Expecting value (column 15)",
        3: "not a JSON object (got list)",
        4: "message 1 content must be a string, got int",
        5: "missing field 'messages'",
        6: "message 1 (user) is empty",
        7: "message 2 has role 'bot'; allowed: system, user, assistant",
        8: "no assistant turn with non-empty content (nothing to train on)",
        9: f"{n_tokens(tok, long_answer)} tokens > max_length {MAX_LEN}",
        10: f"{n_tokens(tok, long_prompt)} tokens > max_length {MAX_LEN}",
        11: f"invalid UTF-8 (byte {lines[10].index(bytes([0xE9])) + 1} of the line)",
    }
    return path, reasons


def cfg(path: Path, **kw) -> DataConfig:
    kw = {"max_truncated_share": 1.0, "allow_cut_replies": True, **kw}  # these tests truncate on purpose
    return DataConfig(train=str(path), format="chat", max_length=MAX_LEN, chat_template="chatml", **kw)


def test_raise_lists_every_bad_record_with_its_line(bad_file, tok):
    path, reasons = bad_file
    with pytest.raises(DataError) as e:
        load_tokenized(cfg(path, overlength="raise"), "train", tok, mask_prompt=True, log=lambda m: None)
    assert e.value.problems == [f"{path}:{line}: {reason}" for line, reason in reasons.items()]
    assert "10 bad record(s) of 12" in e.value.message
    assert "data.on_error=skip" in e.value.fix


def test_zero_trainable_after_truncation_is_listed_but_not_bad(bad_file, tok):
    path, reasons = bad_file
    with pytest.raises(DataError) as e:
        load_tokenized(cfg(path, overlength="truncate"), "train", tok, mask_prompt=True, log=lambda m: None)
    expected = [f"{path}:{line}: {reasons[line]}" for line in (2, 3, 4, 5, 6, 7, 8, 11)]
    expected.append(f"{path}:10: no trainable tokens left after truncation to {MAX_LEN} tokens")
    assert e.value.problems == expected
    assert "8 bad record(s) of 12" in e.value.message


def test_skip_counts_per_reason(bad_file, tok):
    path, _ = bad_file
    logs: list[str] = []
    skip = cfg(path, overlength="raise", on_error="skip", max_bad_fraction=1.0)
    data = load_tokenized(skip, "train", tok, mask_prompt=True, log=logs.append)
    assert data.stats["bad_by_reason"] == {
        "bad JSON": 1, "not an object": 1, "wrong type": 1, "missing field": 1, "empty text": 1,
        "bad role": 1, "no assistant turn": 1, "over-length": 2, "invalid UTF-8": 1,
    }  # fmt: skip
    assert [ex.where for ex in data.examples] == [f"{path}:1", f"{path}:13"]
    assert any("skipped 10 bad record(s) of 12" in m and "over-length 2" in m for m in logs)


def test_skip_with_truncation_counts_zero_trainable_drops(bad_file, tok):
    path, _ = bad_file
    logs: list[str] = []
    data = load_tokenized(
        cfg(path, on_error="skip", max_bad_fraction=1.0), "train", tok, mask_prompt=True, log=logs.append
    )
    assert data.stats["n_bad"] == 8
    assert data.stats["n_dropped_zero_trainable"] == 1
    assert data.stats["n_truncated"] == 2  # the long answer (kept, cut) and the long prompt (then dropped)
    assert [ex.where for ex in data.examples] == [f"{path}:1", f"{path}:9", f"{path}:13"]
    assert any("no trainable tokens" in m and f"{path}:10" in m for m in logs)


def test_skip_still_stops_above_max_bad_fraction(bad_file, tok):
    path, reasons = bad_file
    with pytest.raises(DataError) as e:
        load_tokenized(
            cfg(path, overlength="raise", on_error="skip", max_bad_fraction=0.5), "train", tok, mask_prompt=True,
            log=lambda m: None,
        )
    assert "10 of 12 records are bad" in e.value.message and "max_bad_fraction=0.5" in e.value.message
    assert len(e.value.problems) == len(reasons)


@pytest.mark.parametrize(
    ("fmt", "record", "reason"),
    [
        ("text", {"text": ""}, "text is empty"),
        ("text", {"text": 3}, "text must be a string, got int"),
        ("text", {"body": "x"}, "missing field 'text'"),
        ("instruction", {"instruction": "Do it."}, "missing field 'output'"),
        ("instruction", {"instruction": "Do it.", "output": 5}, "output must be a string, got int"),
        ("instruction", {"instruction": "Do it.", "input": None, "output": "ok"}, "input must be a string, got null"),
        ("chat", {"messages": "hi"}, "messages must be a list of messages, got string"),
        ("chat", {"messages": [{"role": "user", "content": "Hi."}, "x"]}, "message 2 must be an object, got string"),
        ("chat", {"messages": [{"role": "user"}]}, "message 1 has no 'content'"),
        ("chat", chat("Hi.", ""), "no assistant turn with non-empty content (nothing to train on)"),
        ("chat", {"messages": [{"role": "assistant", "content": "Hi."}]}, "message 1 is an assistant turn; "
         "a chat starts with a system or user message"),
        ("chat", {"conversations": [{"from": "human", "value": "Hi."}, {"from": "bot", "value": "Yo."}]},
         "message 2 has from 'bot'; allowed: system, human, user, gpt, assistant"),
        ("preference", {"prompt": "Q?", "chosen": "A.", "rejected": 1}, "rejected must be a string, got int"),
        ("preference", {"prompt": [{"role": "user", "content": 1}], "chosen": "A.", "rejected": "B."},
         "message 1 content must be a string, got int"),
        ("classification", {"text": "Nice.", "label": True}, "label must be an int or a string, got bool"),
        ("classification", {"text": "Nice."}, "missing field 'label'"),
    ],
)
def test_reasons(fmt, record, reason):
    problem = validate_record(record, fmt)
    assert problem is not None and problem.reason == reason


@pytest.mark.parametrize(
    "record",
    [
        {"text": "x"},
        {"instruction": "Do.", "output": "Done.", "input": "", "system": "Be brief."},
        chat("Hi.", "Hello."),
        {"conversations": [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Hello."}]},
        {"prompt": "Q?", "chosen": "A.", "rejected": "B."},
        {"text": "Nice.", "label": 1},
        {"text": "Nice.", "label": "positive"},
    ],
)
def test_good_records_pass(record):
    assert validate_record(record, detect_format(record)) is None


def test_detect_format():
    assert detect_format({"text": "x"}) == "text"
    assert detect_format({"instruction": "x", "output": "y"}) == "instruction"
    assert detect_format({"messages": []}) == "chat"
    assert detect_format({"conversations": []}) == "chat"
    assert detect_format({"prompt": "p", "chosen": "c", "rejected": "r"}) == "preference"
    assert detect_format({"text": "x", "label": 0}) == "classification"
    assert detect_format({"foo": 1}) is None


def test_auto_refuses_disagreeing_records(tmp_path, tok):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "a"}, {"text": "b"}, chat("Hi.", "Yo.")])
    with pytest.raises(DataError) as e:
        load_tokenized(DataConfig(train=str(path)), "train", tok, mask_prompt=True, log=lambda m: None)
    assert "disagree" in e.value.message and f"{path}:3" in e.value.message and "data.format" in e.value.fix


def test_auto_refuses_unknown_records(tmp_path, tok):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1}])
    with pytest.raises(DataError, match="no record has the fields of a known format"):
        load_tokenized(DataConfig(train=str(path)), "train", tok, mask_prompt=True, log=lambda m: None)


def test_instruction_to_messages():
    record = {"instruction": "Translate.", "input": "Hello", "output": "Hallo", "system": "Be brief."}
    assert instruction_messages(record) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Translate.\n\nHello"},
        {"role": "assistant", "content": "Hallo"},
    ]
    assert instruction_messages({"instruction": "Hi.", "input": "", "output": "Yo."}) == [
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Yo."},
    ]


def test_sharegpt_to_messages():
    record = {
        "conversations": [
            {"from": "system", "value": "S."},
            {"from": "human", "value": "Q."},
            {"from": "gpt", "value": "A.", "weight": 1},
            {"from": "user", "value": "Q2."},
            {"from": "assistant", "value": "A2."},
        ]
    }
    assert chat_messages(record) == [
        {"role": "system", "content": "S."},
        {"role": "user", "content": "Q."},
        {"role": "assistant", "content": "A."},
        {"role": "user", "content": "Q2."},
        {"role": "assistant", "content": "A2."},
    ]
