"""data.streaming: the training file read a window at a time (data/streamed.py).

The same examples as the first pass, every one once an epoch, an order shuffled within windows that
depends on the seed alone, an exact cursor (restored anywhere, the stream goes on as it would have), bad
records met by file:line, the config's refusals, and a `tunelab train` run killed and resumed that ends
bit-identical to one that was not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests import tiny
from tests.test_resume import assert_same_as_reference, tunelab
from tunelab.config import DataConfig
from tunelab.data.pipeline import load_tokenized
from tunelab.data.streamed import StreamedBatchStream, open_streamed
from tunelab.errors import ConfigError, DataError, TunelabError
from tunelab.runconfig import build_config

FORMATS = ("chat", "instruction", "text")


def source(path: Path, tok, window: int, log=tiny.quiet, **data):
    cfg = DataConfig(train=str(path), streaming=True, stream_window=window, max_length=64, **data)
    return open_streamed(cfg, tok, mask_prompt=True, formats=FORMATS, log=log)


def stream(src, *, batch_size: int = 2, packing: bool = False, seed: int = 0, rank: int = 0, world: int = 1):
    return StreamedBatchStream(src, batch_size=batch_size, packing=packing, max_length=64, seed=seed, pad_id=0,
                               rank=rank, world=world)


def take(s, n: int) -> list[list[str]]:
    return [s.next_group(1)[0].where for _ in range(n)]


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    return tiny.write_jsonl(tmp_path_factory.mktemp("streamed") / "train.jsonl", tiny.chat_records(23, seed=1))


@pytest.mark.parametrize("window", [1, 5, 23, 1000])
def test_an_epoch_is_the_first_pass_examples_each_once(chats, tok, window):
    full = load_tokenized(DataConfig(train=str(chats), max_length=64), "train", tok, mask_prompt=True,
                          log=tiny.quiet).examples
    s = stream(source(chats, tok, window), batch_size=3)
    got = []
    while len(got) < len(full):
        mb = s.next_group(1)[0]
        ids = mb.tensors["input_ids"]
        for row, where in zip(ids, mb.where, strict=True):
            got.append((where, row[row != 0].tolist()))
    assert len(got) == len(full)
    expected = {ex.where: ex.input_ids for ex in full}
    assert {w for w, _ in got} == set(expected)  # every example once
    for where, ids in got:  # padding (id 0) stripped: the tiny tokenizer has no token 0 inside a chat
        assert ids == [t for t in expected[where] if t != 0]
    assert s.state()["epoch"] == 0
    s.next_group(1)
    assert s.state()["epoch"] == 1


def test_order_is_shuffled_within_windows_by_the_seed(chats, tok):
    src = source(chats, tok, 5)
    a, b, c = take(stream(src, seed=0), 12), take(stream(src, seed=0), 12), take(stream(src, seed=7), 12)
    assert a == b and a != c
    lines = [int(w.rsplit(":", 1)[1]) for batch in a for w in batch]
    for k, start in enumerate(range(0, 20, 5)):  # 5 records a window, 3 micro-batches of <= 2 each
        assert sorted(lines[start:start + 5]) == list(range(start + 1, start + 6)), f"window {k}"
    assert lines[:5] != sorted(lines[:5]) or lines[5:10] != sorted(lines[5:10])  # shuffled, not file order


@pytest.mark.parametrize("packing", [False, True])
def test_restored_anywhere_the_stream_goes_on_as_it_would_have(chats, tok, packing):
    src = source(chats, tok, 4)
    s = stream(src, packing=packing)
    states, groups = [], []
    for _ in range(30):  # several windows and an epoch boundary
        states.append(s.state())
        groups.append(s.next_group(1)[0].where)
    json.dumps(states)  # the cursor goes into a checkpoint's JSON
    for i in (0, 1, 2, 7, 13, 29):
        again = stream(src, packing=packing)
        again.restore(states[i])
        assert take(again, len(groups) - i) == groups[i:], f"restored at micro-batch {i}"


def test_processes_share_the_micro_batches(chats, tok):
    src = source(chats, tok, 5)
    one = take(stream(src), 12)
    r0 = [g.where for g in stream(src, world=2, rank=0).next_group(6)]
    r1 = [g.where for g in stream(src, world=2, rank=1).next_group(6)]
    assert r0 == one[0::2] and r1 == one[1::2]


def test_a_bad_record_stops_the_run_where_it_is_met(tmp_path, tok):
    records = tiny.chat_records(12, seed=3)
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r in records]
    lines[8] = '{"messages": [oops'
    path.write_text("\n".join(lines) + "\n")
    said: list[str] = []
    s = stream(source(path, tok, 5, log=said.append))
    take(s, 3)  # the first window (lines 1-5) is clean
    with pytest.raises(DataError) as e:
        take(s, 3)
    assert "lines 6-10, streamed" in e.value.message and "1 bad record(s) of 5" in e.value.message
    assert any(f"{path}:9: bad JSON" in p for p in e.value.problems)
    skipping = stream(source(path, tok, 5, log=said.append, on_error="skip", max_bad_fraction=0.5))
    got = [w for batch in take(skipping, 9) for w in batch]
    assert f"{path}:9" not in got and len(set(got)) == 11
    assert any("skipped 1 bad record(s) of 5" in line for line in said)


def test_files_that_cannot_be_streamed_are_refused(tmp_path, tok, chats):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no record has the fields"):
        source(empty, tok, 5)
    as_json = tmp_path / "train.json"
    as_json.write_text(json.dumps(tiny.chat_records(3)))
    with pytest.raises(DataError, match=r"reads a JSON Lines \(.jsonl\) file .* this is a .json file") as e:
        source(as_json, tok, 5)
    assert "data.streaming=false" in e.value.fix
    with pytest.raises(DataError, match="no such file"):
        source(tmp_path / "missing.jsonl", tok, 5)
    long = tmp_path / "long.jsonl"
    tiny.write_jsonl(long, [{"messages": [{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": " ".join(tiny.THINGS * 20)}]}])
    with pytest.raises(DataError, match="cuts the end of 1 reply"):
        stream(source(long, tok, 5))
    with pytest.raises(TunelabError, match="not known before it is read"):
        stream(source(chats, tok, 5)).micro_batches_per_epoch()


@pytest.mark.parametrize(("extra", "message"), [
    ({"train": {"max_steps": None, "epochs": 2}}, "set train.max_steps instead of train.epochs"),
    ({"objective": {"name": "dpo"}}, "objective dpo reads its whole data first"),
    ({"data": {"train": [{"source": "a.jsonl"}, {"source": "b.jsonl"}]}}, "a multi-task list"),
    ({"data": {"stream_window": 0}}, "stream_window: Input should be greater than or equal to 1"),
])
def test_configs_streaming_cannot_serve_are_refused(extra, message):
    raw = {"data": {"train": "x.jsonl", "streaming": True}, "train": {"max_steps": 5}}
    for k, v in extra.items():
        raw[k] = {**raw.get(k, {}), **v}
    with pytest.raises(ConfigError, match=message):
        build_config(raw)


@pytest.mark.slow
def test_a_streamed_run_killed_and_resumed_ends_bit_identical(llama_dir, tmp_path):
    # 64 records, 10 a window, batch 4: windows end mid-run and the 20 steps cross an epoch (the kill lands
    # in the second window)
    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.chat_records(64, seed=1))

    def cfg(name: str) -> Path:
        raw = {"model": {"name_or_path": str(llama_dir)},
               "data": {"train": str(data), "max_length": 64, "streaming": True, "stream_window": 10},
               "method": {"name": "lora", "r": 4, "dropout": 0.1},
               "train": {"max_steps": 20, "batch_size": 4, "lr": 5e-3, "save_every": 2, "precision": "fp32",
                         "tensorboard": False, "warmup": 3},
               "output": {"dir": str(tmp_path / name)}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    ref = tunelab("train", str(cfg("ref")))
    assert ref.returncode == 0, ref.stderr
    assert "training examples streamed" in ref.stderr and "data: streamed lines 61-64" in ref.stderr
    killed = tunelab("train", str(cfg("run")), "-q", fault="kill@step:5")
    assert killed.returncode != 0
    original = data.read_bytes()
    data.write_bytes(original.replace(b"red", b"tan", 1))  # one record of a window not yet read changed
    refused = tunelab("train", str(cfg("run")), "--resume")
    assert refused.returncode != 0 and "the training data changed" in refused.stderr
    data.write_bytes(original)
    resumed = tunelab("train", str(cfg("run")), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    assert_same_as_reference(tmp_path / "run", tmp_path / "ref")
