"""The batched first pass (data/firstpass.py) against the plain record-by-record pass it replaced
(`pipeline.build_per_record`, the reference): on every shipped format, with bad rows, over-length rows
under each policy, templates that need an eos added or reject a record, and in worker processes, both
give the same examples, token ids and labels, bad-record messages with file:line, counts, logged
messages, statistics and fingerprint, or stop with the same error."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from tests.data_fixtures import chat, make_tokenizer, sentences
from tunelab.config import DataConfig
from tunelab.data import batched, firstpass
from tunelab.data.formats import FORMATS
from tunelab.data.pipeline import Built, build, build_per_record, fingerprint, stats
from tunelab.errors import DataError

LIMIT = 40
LONG = " ".join(sentences(12, seed=7))  # well over LIMIT tokens
PLAIN = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}" \
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"  # no end-of-turn token: eos is added
RAISING = "{% for m in messages %}{% if 'BOOM' in m['content'] %}{{ raise_exception('no BOOM here') }}{% endif %}" \
          "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}" \
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
UNSTABLE = "{{ messages | length }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + " \
           "'<|im_end|>\\n' }}{% endfor %}"  # the count changes as turns are added: assistant turns cannot be found
BAD_LINES = ["{not json", "[1, 2]", ""]  # unreadable, not an object, blank

S = sentences(20, seed=3)
RECORDS: dict[str, list] = {
    "text": [{"text": S[0]}, {"text": LONG}, {"text": 5}, {"text": " "}, {"txt": S[1]}, {"text": S[2]}],
    "instruction": [
        {"instruction": S[0], "output": S[1]}, {"instruction": S[2], "input": S[3], "output": "BOOM " + S[4]},
        {"instruction": S[5], "output": LONG, "system": "Be brief."}, {"instruction": LONG, "output": S[6]},
        {"instruction": S[7]}, {"instruction": S[8], "output": 3}, {"instruction": S[9], "output": S[10]},
    ],
    "chat": [
        chat(S[0], S[1], S[2], S[3]), chat(S[4], LONG), chat(S[5], S[6], system="Be brief."),
        {"conversations": [{"from": "human", "value": S[7]}, {"from": "gpt", "value": S[8]}]},
        {"messages": [{"role": "assistant", "content": S[9]}]}, {"messages": "oops"},
        chat(S[10], "BOOM"), chat(LONG, S[11]), chat(S[12], ""),
    ],
    "preference": [
        {"prompt": S[0], "chosen": S[1], "rejected": S[2]}, {"prompt": S[3], "chosen": S[4], "rejected": S[4]},
        {"prompt": [{"role": "user", "content": S[5]}, {"role": "assistant", "content": S[6]},
                    {"role": "user", "content": S[7]}], "chosen": S[8], "rejected": LONG},
        {"prompt": S[9], "chosen": "BOOM", "rejected": S[10]}, {"prompt": S[11], "chosen": S[12]},
    ],
    "ranking": [
        {"prompt": S[0], "responses": [S[1], S[2], S[3]]}, {"prompt": S[4], "responses": [S[5]]},
        {"prompt": S[6], "responses": [S[7], S[7]]}, {"prompt": S[8], "responses": [LONG, S[9]]},
        {"prompt": S[10], "responses": [S[11], "BOOM"]},
    ],
    "unpaired": [
        {"prompt": S[0], "completion": S[1], "label": True}, {"prompt": S[2], "completion": LONG, "label": False},
        {"prompt": S[3], "completion": S[4], "label": "yes"}, {"prompt": S[5], "completion": "BOOM", "label": True},
    ],
    "prompt": [{"prompt": S[0]}, {"prompt": [{"role": "user", "content": S[1]}]}, {"prompt": ""}, {"prompt": LONG},
               {"prompt": "BOOM"}],
    "classification": [
        {"text": S[0], "label": "pos"}, {"text": S[1], "label": "neg"}, {"text": LONG, "label": 1},
        {"text": S[2], "label": [1]}, {"text": "", "label": "pos"}, {"text": S[3], "label": "neg"},
    ],
    "retrieval": [{"query": S[0], "positive": S[1]}, {"query": S[2], "positive": S[2]},
                  {"query": LONG, "positive": S[3]}, {"query": S[4]}],
}


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(autouse=True)
def _small_batches(monkeypatch):
    """Batches of a few records: every file spans several, with a short last one."""
    monkeypatch.setattr(firstpass, "BATCH", 4)
    monkeypatch.setattr(batched, "RENDER_BATCH", 3)


def write(path: Path, records: list) -> Path:
    lines = [json.dumps(r) for r in records]
    for i, bad in enumerate(BAD_LINES):
        lines.insert(2 + 2 * i, bad)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def outcome(run):
    try:
        return run()
    except DataError as e:
        return e


def assert_same(path: Path, fmt: str, tok, mask_prompt: bool = True, **settings) -> Built | DataError:
    cfg = DataConfig(train=str(path), format=fmt, max_length=LIMIT, **settings)
    said_ref: list[str] = []
    said: list[str] = []
    ref = outcome(lambda: build_per_record(str(path), cfg, tok, mask_prompt, FORMATS, said_ref.append))
    got = outcome(lambda: build(str(path), cfg, tok, mask_prompt, FORMATS, said.append))
    if isinstance(ref, DataError):
        assert isinstance(got, DataError) and type(got) is type(ref), got
        assert (got.message, got.fix, got.problems) == (ref.message, ref.fix, ref.problems)
        return got
    assert not isinstance(got, DataError), got
    assert said == said_ref
    for f in fields(Built):
        if f.name not in ("kept", "fingerprint"):
            assert getattr(got, f.name) == getattr(ref, f.name), f.name
    assert list(got.kept) == ref.kept
    assert got.fingerprint == fingerprint(ref.kept)
    assert stats(got, cfg) == stats(ref, cfg)
    return got


@pytest.mark.parametrize("overlength", ["truncate", "drop", "raise"])
@pytest.mark.parametrize("fmt", sorted(RECORDS))
def test_every_format_gives_what_the_record_by_record_pass_gives(tmp_path, tok, fmt, overlength):
    assert set(RECORDS) == set(FORMATS), "a shipped format without records here"
    path = write(tmp_path / f"{fmt}.jsonl", RECORDS[fmt])
    got = assert_same(path, fmt, tok, overlength=overlength)
    assert isinstance(got, Built) and got.kept and got.bad  # the comparison saw examples and bad records
    assert any(where.endswith(":3") and kind == "bad JSON" for where, kind, _ in got.bad)
    if overlength == "raise":
        assert any(kind == "over-length" for _, kind, _ in got.bad)


@pytest.mark.parametrize("template", ["llama3", PLAIN, RAISING, UNSTABLE], ids=["llama3", "plain", "raising",
                                                                               "unstable"])
@pytest.mark.parametrize("fmt", ["instruction", "chat", "preference", "ranking", "unpaired", "prompt"])
def test_chat_templates_eos_added_rejected_records_and_fatal_errors(tmp_path, tok, fmt, template):
    path = write(tmp_path / f"{fmt}.jsonl", RECORDS[fmt])
    got = assert_same(path, fmt, tok, chat_template=template)
    if template == RAISING:
        assert isinstance(got, Built) and any(kind == "template error" for _, kind, _ in got.bad)
    if template == UNSTABLE and fmt != "prompt":
        assert isinstance(got, DataError) and "renders earlier turns differently" in got.message


@pytest.mark.parametrize("fmt", ["instruction", "chat"])
def test_without_prompt_masking(tmp_path, tok, fmt):
    assert_same(write(tmp_path / "d.jsonl", RECORDS[fmt]), fmt, tok, mask_prompt=False)


def test_format_detection_and_validation_without_a_tokenizer(tmp_path, tok):
    path = write(tmp_path / "d.jsonl", RECORDS["instruction"])
    assert_same(path, "auto", tok)
    assert_same(path, "auto", None)
    mixed = write(tmp_path / "mixed.jsonl", RECORDS["instruction"] + RECORDS["text"])
    assert "records disagree on the format" in assert_same(mixed, "auto", tok).message


def test_an_unknown_label_in_the_eval_file(tmp_path, tok):
    train = write(tmp_path / "train.jsonl", RECORDS["classification"])
    held = write(tmp_path / "eval.jsonl", [{"text": S[5], "label": "pos"}, {"text": S[6], "label": "maybe"}])
    cfg = DataConfig(train=str(train), eval=str(held), format="classification", max_length=LIMIT)
    ref = build_per_record(str(held), cfg, tok, True, FORMATS, print)
    got = build(str(held), cfg, tok, True, FORMATS, print)
    assert got.bad == ref.bad and any(kind == "unknown label" for _, kind, _ in got.bad)
    assert list(got.kept) == ref.kept and got.labels == ref.labels == ["1", "neg", "pos"]


def test_worker_processes_give_the_same(tmp_path, tok):
    records = [r for fmt in ("instruction", "chat") for r in RECORDS[fmt]] * 3
    path = write(tmp_path / "d.jsonl", [r for r in records if "instruction" in r] * 2)
    got = assert_same(path, "instruction", tok, num_proc=2)
    assert isinstance(got, Built) and len(got.kept) > 8
    stop = write(tmp_path / "stop.jsonl", RECORDS["chat"] * 3)  # a fatal error in a worker reaches this process
    err = assert_same(stop, "chat", tok, num_proc=2, chat_template=UNSTABLE)
    assert isinstance(err, DataError)


def test_num_proc_is_checked_and_chosen_by_size(tmp_path, tok, monkeypatch):
    for bad in (0, -2, 257):
        with pytest.raises(ValueError, match=rf"{bad} processes: give 1 to 256"):
            DataConfig(num_proc=bad)
    path = write(tmp_path / "d.jsonl", RECORDS["text"])
    cfg = DataConfig(train=str(path))
    assert firstpass.num_procs(cfg, str(path), tok) == 1  # a small file
    assert firstpass.num_procs(cfg.model_copy(update={"num_proc": 3}), str(path), tok) == 3
    monkeypatch.setattr(firstpass, "AUTO_PROC_BYTES", 1)
    assert 1 <= firstpass.num_procs(cfg, str(path), tok) <= firstpass.MAX_AUTO_PROCS
    assert firstpass.num_procs(cfg, str(path), None) == 1  # validation only
