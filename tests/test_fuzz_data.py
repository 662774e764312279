"""Data fuzzing: every bad record of a file is reported at its exact place with its reason class,
never crashes the run, and never reaches the training examples.

Six seeded files (JSON Lines, CSV and Parquet; instruction and chat format; over 10,000 records)
mix good records with bad ones of many classes: bad JSON, not an object, missing field, wrong type,
empty text, invalid UTF-8, an integer with thousands of digits, JSON nested thousands of levels deep,
a lone surrogate ("\\ud800"), NUL bytes, a CSV field over the csv module's field size limit, extra
CSV cells, a wrong role, a chat without an assistant turn or starting with one, over-length text.
Blank lines, CRLF line ends, a byte-order mark and multi-line CSV cells move the lines around.
Each bad record's place is known when the file is written, so the pipeline's report must match
it exactly: `file:line` (1-based, the line a CSV row starts on) or `file:row N` for Parquet.
"""

from __future__ import annotations

import csv
import io
import json
import random
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.data_fixtures import WORDS, make_tokenizer
from tunelab.config import DataConfig
from tunelab.data.formats import FORMATS
from tunelab.data.pipeline import build, load_tokenized
from tunelab.data.report import check_report
from tunelab.errors import DataError

SEED = 1729
MAX_LEN = 512  # tokens; good records stay far below it, over-length ones far above
BAD_SHARE = 0.5  # bad records cost little; good ones are tokenized
DEPTH = 20_000  # JSON nesting, far past the interpreter's recursion limit
DIGITS = 5_000  # past Python's 4,300-digit limit on int parsing
BIG_FIELD = 140_000  # characters, past csv's default field_size_limit of 131,072
EXTRA = "ZZZ"  # a word the good records never use: it marks text that must not be trained on

# The reason class (Problem.kind) the pipeline must report for each class of bad record.
KIND = {
    "bad JSON": "bad JSON",
    "not an object": "not an object",
    "missing field": "missing field",
    "wrong type": "wrong type",
    "empty text": "empty text",
    "invalid UTF-8": "invalid UTF-8",
    "huge int": "bad JSON",  # json cannot turn the literal into a value
    "deep nesting": "bad JSON",
    "lone surrogate": "invalid text",  # "\ud800" escaped in JSON: not text a tokenizer can encode
    "NUL byte": "bad JSON",  # a raw control character inside a JSON string
    "big CSV field": "over-length",  # read like any long text, then the over-length policy (raise)
    "bad CSV": "bad CSV",
    "bad role": "bad role",
    "no assistant turn": "no assistant turn",
    "bad order": "bad order",
    "over-length": "over-length",
}


def words(rng: random.Random, lo: int = 2, hi: int = 10) -> str:
    extra = ["café", "naïve", "日本", "ünï", "🙂", "O'Brien", 'say "hi"', "a,b", "tab\there"]
    pool = WORDS + extra
    return " ".join(rng.choice(pool) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def long_text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(MAX_LEN + 50))  # a token or more per word


def good_instruction(rng: random.Random) -> dict[str, Any]:
    r = {"instruction": words(rng), "output": words(rng)}
    if rng.random() < 0.5:
        r["input"] = rng.choice(["", words(rng)])
    if rng.random() < 0.2:
        r["system"] = words(rng)
    return r


def good_chat(rng: random.Random) -> dict[str, Any]:
    messages = [{"role": "system", "content": words(rng)}] if rng.random() < 0.3 else []
    for _ in range(rng.randint(1, 2)):
        messages += [{"role": "user", "content": words(rng)}, {"role": "assistant", "content": words(rng)}]
    return {"messages": messages}


def user_then(rng: random.Random, *rest: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": words(rng)}, *rest]


def reply(rng: random.Random, content: Any = None) -> dict[str, Any]:
    return {"role": "assistant", "content": words(rng) if content is None else content}


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode("utf-8")


# ----------------------------------------------------------------------------- bad records
# Each maker returns one bad record in its container's shape: a JSON Lines line (bytes), CSV
# cells (strings; INVALID marks bytes that are not UTF-8) or a Parquet row (a dict).

INVALID = "\x01INVALID\x01"
INVALID_BYTES = [b"\xff", b"\x80", b"\xc3", b"\xed\xa0\x80", b"\xfe\xfe"]  # \xed\xa0\x80: U+D800 as bytes
BIG_INT = "1" + "0" * DIGITS
DEEP = "[" * DEPTH + "]" * DEPTH


def _splice(record: dict[str, Any], key: str, literal: str) -> bytes:
    """`record` as JSON with `key`'s value replaced by a raw JSON literal."""
    return dumps({**record, key: "@@"}).replace(b'"@@"', literal.encode("utf-8"))


def _without(record: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != key}


def _instruction_line(rng: random.Random, cls: str) -> bytes:
    r = good_instruction(rng)
    makers: dict[str, Callable[[], bytes]] = {
        "bad JSON": lambda: rng.choice([dumps(r)[:-1], dumps(r)[:-1] + b",}", b"{'instruction': 'x'}", b"{"]),
        "not an object": lambda: rng.choice([b"[1, 2]", b'"text"', b"42", b"null", b"true"]),
        "missing field": lambda: dumps(_without(r, rng.choice(["instruction", "output"]))),
        "wrong type": lambda: rng.choice([_splice(r, "output", lit) for lit in ("5", "1.5", "true", "null", "NaN",
                                                                                  '["a"]', '{"a": 1}')]),
        "empty text": lambda: dumps({**r, rng.choice(["instruction", "output"]): rng.choice(["", "   ", "\n\t"])}),
        "invalid UTF-8": lambda: dumps(r).replace(b'"output": "', b'"output": "' + rng.choice(INVALID_BYTES)),
        "huge int": lambda: _splice(r, rng.choice(["output", "instruction"]), BIG_INT),
        "deep nesting": lambda: _splice(r, "output", DEEP),
        "lone surrogate": lambda: dumps({**r, "output": r["output"] + rng.choice(["\ud800", "\udfff", "\udbff"])}),
        "NUL byte": lambda: dumps(r).replace(b'"output": "', b'"output": "\x00'),
        "over-length": lambda: dumps({**r, "output": long_text(rng)}),
    }
    return makers[cls]()


def _chat_line(rng: random.Random, cls: str) -> bytes:
    r = good_chat(rng)
    makers: dict[str, Callable[[], bytes]] = {
        "bad JSON": lambda: rng.choice([dumps(r)[:-2], b'{"messages": [}', b'{"messages": [{"role": "user"']),
        "not an object": lambda: rng.choice([dumps(r["messages"]), b"3.5", b'"hi"']),
        "missing field": lambda: rng.choice([dumps({"msgs": r["messages"]}),
                                             dumps({"messages": user_then(rng, {"role": "assistant"})})]),
        "wrong type": lambda: rng.choice([dumps({"messages": "hi"}), dumps({"messages": user_then(rng, reply(rng, 5))}),
                                          dumps({"messages": [words(rng)]})]),
        "empty text": lambda: rng.choice([dumps({"messages": []}),
                                          dumps({"messages": [{"role": "user", "content": " "}, reply(rng)]})]),
        "invalid UTF-8": lambda: dumps(r).replace(b'"content": "', b'"content": "' + rng.choice(INVALID_BYTES), 1),
        "huge int": lambda: dumps({"messages": user_then(rng, reply(rng, "@@"))}).replace(b'"@@"', BIG_INT.encode()),
        "deep nesting": lambda: _splice(r, "messages", DEEP),
        "lone surrogate": lambda: dumps({"messages": user_then(rng, reply(rng, "ok \ud800"))}),
        "NUL byte": lambda: dumps(r).replace(b'"content": "', b'"content": "\x00', 1),
        "bad role": lambda: dumps({"messages": user_then(rng, {"role": rng.choice(["bot", "tool", "User", ""]),
                                                               "content": words(rng)})}),
        "no assistant turn": lambda: rng.choice([dumps({"messages": user_then(rng)}),
                                                 dumps({"messages": user_then(rng, reply(rng, "  "))})]),
        "bad order": lambda: dumps({"messages": [reply(rng), {"role": "user", "content": words(rng)}]}),
        "over-length": lambda: dumps({"messages": user_then(rng, reply(rng, long_text(rng)))}),
    }
    return makers[cls]()


def _instruction_cells(rng: random.Random, cls: str) -> list[str]:
    r = good_instruction(rng)
    cells = [r["instruction"], r.get("input", ""), r["output"]]
    makers: dict[str, Callable[[], list[str]]] = {
        "bad CSV": lambda: [*cells, EXTRA],
        "missing field": lambda: cells[:1],
        "empty text": lambda: rng.choice([["", *cells[1:]], [*cells[:2], "  "]]),
        "invalid UTF-8": lambda: [*cells[:2], INVALID + cells[2]],
        "big CSV field": lambda: [*cells[:2], (EXTRA + " ") * (BIG_FIELD // 4)],
        "over-length": lambda: [*cells[:2], long_text(rng)],
    }
    return makers[cls]()


def _chat_cells(rng: random.Random, cls: str) -> list[str]:
    r = good_chat(rng)
    text = json.dumps(r["messages"])
    makers: dict[str, Callable[[], list[str]]] = {
        "bad CSV": lambda: [text, EXTRA],
        "bad JSON": lambda: [text[:-2]],
        "wrong type": lambda: rng.choice([[words(rng)], [json.dumps([words(rng)])],
                                          [json.dumps(user_then(rng, reply(rng, 5)))]]),
        "missing field": lambda: [json.dumps(user_then(rng, {"role": "assistant"}))],
        "empty text": lambda: [rng.choice(["[]", json.dumps([{"role": "user", "content": ""}, reply(rng)])])],
        "invalid UTF-8": lambda: [text.replace('"content": "', '"content": "' + INVALID, 1)],
        "huge int": lambda: [json.dumps(user_then(rng, reply(rng, "@@"))).replace('"@@"', BIG_INT)],
        "deep nesting": lambda: [DEEP],
        "lone surrogate": lambda: [json.dumps(user_then(rng, reply(rng, "ok \ud800")))],
        "bad role": lambda: [json.dumps(user_then(rng, {"role": "bot", "content": words(rng)}))],
        "no assistant turn": lambda: [json.dumps(user_then(rng))],
        "bad order": lambda: [json.dumps([reply(rng), {"role": "user", "content": words(rng)}])],
        "big CSV field": lambda: [json.dumps(user_then(rng, reply(rng, (EXTRA + " ") * (BIG_FIELD // 4))))],
    }
    return makers[cls]()


def _instruction_row(rng: random.Random, cls: str) -> dict[str, Any]:
    r = {"input": None, "system": None, **good_instruction(rng)}
    makers: dict[str, Callable[[], dict[str, Any]]] = {
        "missing field": lambda: {**r, rng.choice(["instruction", "output"]): None},
        "empty text": lambda: {**r, rng.choice(["instruction", "output"]): rng.choice(["", "   "])},
        "over-length": lambda: {**r, "output": long_text(rng)},
    }
    return makers[cls]()


def _chat_row(rng: random.Random, cls: str) -> dict[str, Any]:
    makers: dict[str, Callable[[], dict[str, Any]]] = {
        "missing field": lambda: {"messages": None},
        "empty text": lambda: {"messages": rng.choice([[], [{"role": "user", "content": "  "}, reply(rng)]])},
        "wrong type": lambda: {"messages": user_then(rng, {"role": "assistant", "content": None})},
        "bad role": lambda: {"messages": user_then(rng, {"role": "bot", "content": words(rng)})},
        "no assistant turn": lambda: {"messages": user_then(rng)},
        "bad order": lambda: {"messages": [reply(rng), {"role": "user", "content": words(rng)}]},
        "over-length": lambda: {"messages": user_then(rng, reply(rng, long_text(rng)))},
    }
    return makers[cls]()


# The classes each (container, format) can hold, with how often each is drawn (long ones are slow to tokenize).
CLASSES: dict[tuple[str, str], dict[str, float]] = {
    ("jsonl", "instruction"): {**dict.fromkeys(["bad JSON", "not an object", "missing field", "wrong type",
                                                "empty text", "invalid UTF-8", "huge int", "deep nesting",
                                                "lone surrogate", "NUL byte"], 1.0), "over-length": 0.3},
    ("jsonl", "chat"): {**dict.fromkeys(["bad JSON", "not an object", "missing field", "wrong type", "empty text",
                                         "invalid UTF-8", "huge int", "deep nesting", "lone surrogate", "NUL byte",
                                         "bad role", "no assistant turn", "bad order"], 1.0), "over-length": 0.3},
    ("csv", "instruction"): {"bad CSV": 1, "missing field": 1, "empty text": 1, "invalid UTF-8": 1,
                             "big CSV field": 0.05, "over-length": 0.3},
    ("csv", "chat"): {**dict.fromkeys(["bad CSV", "bad JSON", "wrong type", "missing field", "empty text",
                                       "invalid UTF-8", "huge int", "deep nesting", "lone surrogate", "bad role",
                                       "no assistant turn", "bad order"], 1.0), "big CSV field": 0.05},
    ("parquet", "instruction"): {"missing field": 1, "empty text": 1, "over-length": 0.3},
    ("parquet", "chat"): {**dict.fromkeys(["missing field", "empty text", "wrong type", "bad role",
                                           "no assistant turn", "bad order"], 1.0), "over-length": 0.3},
}  # fmt: skip


# ----------------------------------------------------------------------------- writing the files


@dataclass
class FuzzFile:
    path: Path
    fmt: str
    records: list[tuple[str, str | None]] = field(default_factory=list)  # (where, fuzz class or None if good)

    @property
    def bad(self) -> list[tuple[str, str]]:
        return [(where, KIND[cls]) for where, cls in self.records if cls is not None]

    @property
    def good(self) -> list[str]:
        return [where for where, cls in self.records if cls is None]


def _draw(rng: random.Random, container: str, fmt: str) -> str | None:
    if rng.random() >= BAD_SHARE:
        return None
    classes = CLASSES[(container, fmt)]
    return rng.choices(sorted(classes), weights=[classes[c] for c in sorted(classes)])[0]


def write_jsonl(path: Path, fmt: str, plan: list[str | None], rng: random.Random, blanks: float) -> FuzzFile:
    out, lines = FuzzFile(path, fmt), [b"\xef\xbb\xbf"]  # a byte-order mark opens line 1
    for cls in plan:
        if rng.random() < blanks:
            lines.append(rng.choice([b"", b"   ", b"\t", b"\r"]))  # blank lines: not records, but counted
        if cls is None:
            line = dumps(good_instruction(rng) if fmt == "instruction" else good_chat(rng))
            line += b"\r" if rng.random() < 0.1 else b""
        else:
            line = _instruction_line(rng, cls) if fmt == "instruction" else _chat_line(rng, cls)
        lines.append(line)
        out.records.append((f"{path}:{len(lines) - 1}", cls))
    path.write_bytes(lines[0] + b"\n".join(lines[1:]) + b"\n")
    return out


def write_csv(path: Path, fmt: str, plan: list[str | None], rng: random.Random, blanks: float) -> FuzzFile:
    out, parts = FuzzFile(path, fmt), []
    line = 1  # the line the next row starts on

    def row(cells: list[str]) -> None:
        nonlocal line
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(cells)
        parts.append(buf.getvalue())
        line += parts[-1].count("\n")

    row(["instruction", "input", "output"] if fmt == "instruction" else ["messages"])
    for cls in plan:
        if rng.random() < blanks:
            parts.append("\n")  # a blank line: csv skips it; the next row starts below it
            line += 1
        if cls is None:
            r = good_instruction(rng) if fmt == "instruction" else good_chat(rng)
            cells = [r["instruction"], r.get("input", ""), r["output"]] if fmt == "instruction" else [
                json.dumps(r["messages"], ensure_ascii=rng.random() < 0.5)]
            if fmt == "instruction" and rng.random() < 0.1:
                cells[2] = cells[2] + "\nsecond line, \"quoted\""  # a cell over several lines
        else:
            cells = _instruction_cells(rng, cls) if fmt == "instruction" else _chat_cells(rng, cls)
        out.records.append((f"{path}:{line}", cls))
        row(cells)
    data = "".join(parts).encode("utf-8")
    for i in range(data.count(INVALID.encode())):
        data = data.replace(INVALID.encode(), INVALID_BYTES[i % len(INVALID_BYTES)], 1)
    path.write_bytes(b"\xef\xbb\xbf" + data)
    return out


def write_parquet(path: Path, fmt: str, plan: list[str | None], rng: random.Random, blanks: float) -> FuzzFile:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out, rows = FuzzFile(path, fmt), []
    for i, cls in enumerate(plan):  # Parquet has no lines: `blanks` does not apply
        if cls is None:
            row = {"input": None, "system": None, **good_instruction(rng)} if fmt == "instruction" else good_chat(rng)
        else:
            row = _instruction_row(rng, cls) if fmt == "instruction" else _chat_row(rng, cls)
        rows.append(row)
        out.records.append((f"{path}:row {i}", cls))
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema([(k, pa.string()) for k in ("instruction", "input", "output", "system")]) \
        if fmt == "instruction" else pa.schema([("messages", pa.list_(message))])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return out


WRITERS = {"jsonl": write_jsonl, "csv": write_csv, "parquet": write_parquet}
FILES = {  # name -> (container, format, records)
    "jsonl-instruction": ("jsonl", "instruction", 2000),
    "jsonl-chat": ("jsonl", "chat", 2000),
    "csv-instruction": ("csv", "instruction", 1800),
    "csv-chat": ("csv", "chat", 1800),
    "parquet-instruction": ("parquet", "instruction", 1500),
    "parquet-chat": ("parquet", "chat", 1500),
}
ALONE = [(container, fmt, cls) for (container, fmt), classes in CLASSES.items() for cls in sorted(classes)]


def write(folder: Path, name: str, container: str, fmt: str, plan: list[str | None], rng: random.Random,
          blanks: float = 0.0) -> FuzzFile:
    return WRITERS[container](folder / f"{name}.{container}", fmt, plan, rng, blanks)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, FuzzFile]:
    folder = tmp_path_factory.mktemp("fuzz-data")
    out = {}
    for i, (name, (container, fmt, n)) in enumerate(FILES.items()):
        rng = random.Random(SEED + i)
        plan = [_draw(rng, container, fmt) for _ in range(n)]
        out[name] = write(folder, name, container, fmt, plan, rng, blanks=0.03)
    return out


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def cfg(f: FuzzFile, **kw: Any) -> DataConfig:
    kw = {"format": f.fmt, "max_length": MAX_LEN, "chat_template": "chatml", "overlength": "raise", **kw}
    return DataConfig(train=str(f.path), **kw)


def no_crash(call: Callable[[], Any]) -> Any:
    """The call's result or the DataError it raised; any other exception fails the test, named."""
    try:
        return call()
    except DataError as e:
        return e
    except Exception as e:  # a user's file must never crash tunelab
        frame = traceback.extract_tb(e.__traceback__)[-1]
        pytest.fail(f"{type(e).__name__} escaped ({e!s:.200}) at {Path(frame.filename).name}:{frame.lineno}",
                    pytrace=False)


def _short(items: list[tuple[str, str]]) -> str:
    shown = [f"{Path(where).name} {kind}" for where, kind in items[:6]]
    return f"{len(items)}: " + ", ".join(shown) + (", ..." if len(items) > 6 else "")


# ----------------------------------------------------------------------------- the tests


def test_the_fuzz_is_big_and_varied(files):
    records = [r for f in files.values() for r in f.records]
    assert len(records) >= 10_000
    classes = Counter(cls for _, cls in records if cls is not None)
    assert len(classes) >= 12 and set(classes) == set(KIND), classes
    assert min(classes.values()) >= 3, classes


@pytest.mark.parametrize("name", FILES)
def test_every_bad_record_at_its_place_with_its_reason(files, tok, name):
    f = files[name]
    built = no_crash(lambda: build(str(f.path), cfg(f), tok, True, FORMATS, log=lambda _m: None))
    assert not isinstance(built, DataError), str(built)[:500]
    got = [(where, kind) for where, kind, _ in built.bad]
    missed = [b for b in f.bad if b not in set(got)]
    extra = [g for g in got if g not in set(f.bad)]
    assert got == f.bad, f"{len(got)} reported, {len(f.bad)} bad; not reported (or wrong reason): " \
        f"{_short(missed)}; reported but not expected: {_short(extra)}"
    assert built.n_records == len(f.records)
    assert [ex.where for ex in built.kept] == f.good


@pytest.mark.parametrize("name", FILES)
def test_on_error_raise_lists_every_bad_record(files, tok, name):
    f = files[name]
    e = no_crash(lambda: load_tokenized(cfg(f), "train", tok, mask_prompt=True, log=lambda _m: None))
    assert isinstance(e, DataError), "a file with bad records was accepted under on_error=raise"
    assert f"{len(f.bad)} bad record(s) of {len(f.records)}" in e.message
    assert [p.split(": ", 1)[0] for p in e.problems] == [where for where, _ in f.bad]
    assert "Traceback" not in str(e) and str(e).count("\n") <= 53  # 50 listed, then "... and N more", fix


@pytest.mark.parametrize("name", FILES)
def test_on_error_skip_drops_and_counts_every_bad_record(files, tok, name):
    f = files[name]
    logs: list[str] = []
    data = no_crash(lambda: load_tokenized(cfg(f, on_error="skip", max_bad_fraction=1.0), "train", tok,
                                           mask_prompt=True, log=logs.append))
    assert not isinstance(data, DataError), str(data)[:500]
    assert data.stats["bad_by_reason"] == dict(Counter(kind for _, kind in f.bad))
    assert [ex.where for ex in data.examples] == f.good
    assert not any(EXTRA in tok.decode(ex.input_ids) for ex in data.examples)
    assert any(f"skipped {len(f.bad)} bad record(s) of {len(f.records)}" in m for m in logs)


@pytest.mark.parametrize("name", ["jsonl-chat", "parquet-chat"])
def test_on_error_skip_still_stops_above_max_bad_fraction(files, tok, name):
    f = files[name]
    share = len(f.bad) / len(f.records)
    e = no_crash(lambda: load_tokenized(cfg(f, on_error="skip", max_bad_fraction=round(share / 2, 3)), "train", tok,
                                        mask_prompt=True, log=lambda _m: None))
    assert isinstance(e, DataError) and "above data.max_bad_fraction" in e.message


@pytest.mark.parametrize("name", ["jsonl-chat", "csv-chat"])
def test_data_check_report_matches(files, tok, name):
    """`tunelab data check`'s report, with the format auto-detected despite the bad records."""
    f = files[name]
    report = no_crash(lambda: check_report(cfg(f, format="auto"), tok, mask_prompt=True))
    assert not isinstance(report, DataError), str(report)[:500]
    v = report["train"]["validation"]
    assert report["train"]["format"] == f.fmt
    assert v["records"] == len(f.records) and v["bad"] == len(f.bad)
    assert v["by_reason"] == dict(Counter(kind for _, kind in f.bad))
    assert [p.split(": ", 1)[0] for p in v["problems"]] == [where for where, _ in f.bad]
    assert v["run_would_stop"] is True
    assert report["train"]["tokens"]["examples"] == len(f.good)


@pytest.mark.parametrize(("container", "fmt", "cls"), ALONE, ids=["-".join(c).replace(" ", "_") for c in ALONE])
def test_each_class_alone(tmp_path, tok, container, fmt, cls):
    """One bad record between two good ones: each class's own verdict, whatever the others do."""
    f = write(tmp_path, "one", container, fmt, [None, cls, None], random.Random(SEED))
    built = no_crash(lambda: build(str(f.path), cfg(f), tok, True, FORMATS, log=lambda _m: None))
    assert not isinstance(built, DataError), str(built)[:500]
    assert [(where, kind) for where, kind, _ in built.bad] == f.bad, [r for _, _, r in built.bad]
    assert [ex.where for ex in built.kept] == f.good


@pytest.mark.parametrize("container", ["jsonl", "csv"])
def test_blank_lines_do_not_move_locations(tmp_path, tok, container):
    """A blank line before every record: each is still reported at the line it is on."""
    f = write(tmp_path, "blanks", container, "instruction", [None, "empty text", None, "missing field", None],
              random.Random(SEED), blanks=1.0)
    built = no_crash(lambda: build(str(f.path), cfg(f), tok, True, FORMATS, log=lambda _m: None))
    assert not isinstance(built, DataError), str(built)[:500]
    assert [(where, kind) for where, kind, _ in built.bad] == f.bad
    assert [ex.where for ex in built.kept] == f.good


JSON_ITEMS = [  # an item of a .json list -> the reason class, or None where the list cannot be read on
    ("[1, 2]", "not an object"),
    ('{"instruction": "Hi."}', "missing field"),
    ('{"instruction": "Hi.", "output": 5}', "wrong type"),
    ('{"instruction": " ", "output": "Yo."}', "empty text"),
    ('{"instruction": "Hi.", "output": "Yo \\ud800"}', "invalid text"),
    ('{"instruction": "Hi.", "output": "Yo @@FF@@"}', "invalid UTF-8"),  # @@FF@@: the byte 0xff
    ('{"instruction": "Hi.", "output": ' + BIG_INT + "}", None),
    ('{"instruction": "Hi.", "output": ' + DEEP + "}", None),
    ('{"instruction": "Hi.", "output": "a\x00b"}', None),
    ('{"instruction": "Hi." "output": "Yo."}', None),
]


@pytest.mark.parametrize(("item", "kind"), JSON_ITEMS, ids=[f"{i}-{k}" for i, (_, k) in enumerate(JSON_ITEMS)])
def test_json_list_item(tmp_path, tok, item, kind):
    """In a .json list a bad record is listed at its line; an item json cannot read stops the file
    with one DataError naming that line (the list cannot be resynchronised), never a crash."""
    good = json.dumps(good_instruction(random.Random(SEED)))
    path = tmp_path / "list.json"
    path.write_bytes(f"[\n{good},\n{item},\n{good}\n]\n".encode().replace(b"@@FF@@", b"\xff"))
    f = FuzzFile(path, "instruction")
    built = no_crash(lambda: build(str(path), cfg(f), tok, True, FORMATS, log=lambda _m: None))
    if kind is None:
        assert isinstance(built, DataError) and built.message.startswith(f"{path}:3: bad JSON"), built
    else:
        assert not isinstance(built, DataError), str(built)[:500]
        assert [(where, k) for where, k, _ in built.bad] == [(f"{path}:3", kind)]
        assert [ex.where for ex in built.kept] == [f"{path}:2", f"{path}:4"]
