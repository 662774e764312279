"""The tokenized-data cache (data/cache.py): a second load of the same bytes with the same settings and
tokenizer reads the stored result (the pass itself does not run), gives the same examples, statistics,
fingerprint, messages and refusals; any change of bytes, path, setting or tokenizer misses; a damaged
entry is rebuilt; `data.cache: false` stores nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.data_fixtures import chat, make_tokenizer, write_jsonl
from tunelab.config import DataConfig
from tunelab.data import cache, pipeline
from tunelab.data.pipeline import load_tokenized
from tunelab.errors import DataError


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def records(n: int = 12) -> list[dict]:
    return [chat(f"Where does person {i} live?", f"In town {i}, near the river.") for i in range(n)]


def load(cfg: DataConfig, tok, fmts=("text", "instruction", "chat")):
    logs: list[str] = []
    return load_tokenized(cfg, "train", tok, mask_prompt=True, formats=fmts, log=logs.append), logs


def entries() -> list[Path]:
    root = cache.data_cache_dir()
    return [p for p in root.iterdir() if not p.name.startswith(".")] if root.is_dir() else []


@pytest.fixture
def no_pass(monkeypatch):
    """After this, the pass over the file may not run: only the cache can answer."""
    def refuse(*a, **k):
        raise AssertionError("the data was tokenized again")
    return lambda: monkeypatch.setattr(pipeline, "build", refuse)


def test_a_second_load_reads_the_cache_and_gives_the_same_data(tmp_path, tok, no_pass):
    path = write_jsonl(tmp_path / "d.jsonl", records())
    cfg = DataConfig(train=str(path), max_length=64)
    first, logs1 = load(cfg, tok)
    assert len(entries()) == 1
    no_pass()
    second, logs2 = load(cfg, tok)
    assert second.examples == first.examples and second.fingerprint == first.fingerprint
    assert second.stats == first.stats and logs2 == logs1
    assert first.examples[0].where == f"{path}:1"


def test_any_change_of_bytes_path_setting_or_tokenizer_misses(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", records())
    load(DataConfig(train=str(path), max_length=64), tok)
    load(DataConfig(train=str(path), max_length=96), tok)  # a setting
    load(DataConfig(train=str(path), max_length=64, overlength="drop"), tok)
    other = tmp_path / "e.jsonl"
    other.write_bytes(path.read_bytes())  # the same bytes elsewhere: messages name the other file
    data, _ = load(DataConfig(train=str(other), max_length=64), tok)
    assert data.examples[0].where == f"{other}:1"
    write_jsonl(path, records(13))  # the bytes
    data, _ = load(DataConfig(train=str(path), max_length=64), tok)
    assert len(data.examples) == 13
    tok2 = make_tokenizer()
    tok2.add_tokens(["zzqx"])  # the tokenizer
    load(DataConfig(train=str(path), max_length=64), tok2)
    assert len(entries()) == 6


def test_bad_records_are_refused_from_the_cache_too_with_file_and_line(tmp_path, tok, no_pass):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r in records(6)]
    lines[3] = "{not json"
    path.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(train=str(path), max_length=64)
    with pytest.raises(DataError, match=rf"{path.name}:4: bad JSON"):
        load(cfg, tok)
    no_pass()
    with pytest.raises(DataError, match=rf"{path.name}:4: bad JSON"):
        load(cfg, tok)
    data, _ = load(DataConfig(train=str(path), max_length=64, on_error="skip", max_bad_fraction=0.5), tok)
    assert len(data.examples) == 5


def test_preference_pairs_and_class_labels_round_trip(tmp_path, tok, no_pass):
    pairs = [{"prompt": f"Q{i}?", "chosen": f"good {i}", "rejected": f"bad answer {i}"} for i in range(5)]
    pref = DataConfig(train=str(write_jsonl(tmp_path / "p.jsonl", pairs)), max_length=64)
    texts = [{"text": f"text number {i}", "label": "pos" if i % 2 else "neg"} for i in range(6)]
    cls = DataConfig(train=str(write_jsonl(tmp_path / "c.jsonl", texts)), format="classification", max_length=64)
    first = [load(pref, tok, ("preference",))[0], load(cls, tok, ("classification",))[0]]
    no_pass()
    again = [load(pref, tok, ("preference",))[0], load(cls, tok, ("classification",))[0]]
    assert [d.examples for d in again] == [d.examples for d in first]
    assert first[0].examples[0].rejected is not None and first[1].examples[1].label is not None
    assert again[1].stats["labels"] == first[1].stats["labels"]


def test_a_damaged_entry_is_rebuilt_and_cache_false_stores_nothing(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", records())
    cfg = DataConfig(train=str(path), max_length=64)
    first, _ = load(cfg, tok)
    expected = list(first.examples)  # `first` maps the file this test truncates in place (tunelab never does)
    (entry,) = entries()
    arrow = entry / "examples.arrow"
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    again, _ = load(cfg, tok)
    assert list(again.examples) == expected and (entry / "examples.arrow").stat().st_size > 0
    assert cache.load(entries()[0].name) is not None
    os.environ["TUNELAB_DATA_CACHE"] = str(tmp_path / "off")
    load(DataConfig(train=str(path), max_length=64, cache=False), tok)
    assert not (tmp_path / "off").exists()


def test_a_cache_that_cannot_take_the_entry_is_no_cache(tmp_path, tok, monkeypatch):
    """A full disk under the cache folder: the run goes on, its examples written elsewhere, nothing stored."""
    from tunelab.data import firstpass

    real = firstpass.ExampleWriter

    class FullDisk(real):
        def __init__(self, path: Path):
            if cache.data_cache_dir() in path.parents:
                raise OSError(28, "No space left on device")
            super().__init__(path)

    monkeypatch.setattr(firstpass, "ExampleWriter", FullDisk)
    path = write_jsonl(tmp_path / "d.jsonl", records())
    data, logs = load(DataConfig(train=str(path), max_length=64), tok)
    assert len(data.examples) == 12 and entries() == []
    monkeypatch.setattr(firstpass, "ExampleWriter", real)
    again, logs2 = load(DataConfig(train=str(path), max_length=64), tok)
    assert again.examples == data.examples and again.fingerprint == data.fingerprint and logs2 == logs
