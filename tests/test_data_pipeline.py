"""load_tokenized end to end: over-length policies, stats, fingerprint, refusals, `data check`."""

from __future__ import annotations

import pytest

from tests.data_fixtures import chat, make_tokenizer, sentences, write_jsonl
from tunelab.config import DataConfig
from tunelab.data.pipeline import load_tokenized
from tunelab.data.report import check_report, format_check_report
from tunelab.data.types import IGNORE
from tunelab.errors import DataError

LIMIT = 16


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def texts() -> list[str]:
    short = ["The cat sat.", "A dog ran fast.", "Anna lives in Paris.", "Bob is a baker."]
    long = [" ".join(sentences(4, seed=s)) for s in (2, 3)]
    return [short[0], long[0], *short[1:4], long[1]]


def token_counts(tok, texts: list[str]) -> list[int]:
    return [len(tok(t)["input_ids"]) + 1 for t in texts]  # + the appended eos


def load(path, tok, **kw):
    logs: list[str] = []
    cfg = DataConfig(train=str(path), **kw)
    return load_tokenized(cfg, "train", tok, mask_prompt=True, log=logs.append), logs


def test_truncate_counts_and_token_share_lost(tmp_path, tok, texts):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    counts = token_counts(tok, texts)
    over = [n for n in counts if n > LIMIT]
    assert len(over) == 2
    data, logs = load(path, tok, max_length=LIMIT, overlength="truncate", max_truncated_share=1.0)
    s = data.stats
    assert s["n_examples"] == len(texts) and s["n_truncated"] == 2 and s["n_overlength"] == 2
    assert s["truncated_token_share"] == pytest.approx(sum(n - LIMIT for n in over) / sum(counts))
    assert s["n_tokens"] == sum(min(n, LIMIT) for n in counts) == s["n_trainable_tokens"]
    assert max(len(ex.input_ids) for ex in data.examples) == LIMIT
    assert any("2 truncated" in m and "of tokens lost" in m for m in logs)


def test_drop_counts(tmp_path, tok, texts):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    data, logs = load(path, tok, max_length=LIMIT, overlength="drop")
    assert data.stats["n_dropped_overlength"] == 2 and data.stats["n_examples"] == len(texts) - 2
    assert data.stats["truncated_token_share"] == 0.0
    assert [ex.where for ex in data.examples] == [f"{path}:{i}" for i in (1, 3, 4, 5)]
    assert any("2 dropped" in m for m in logs)


def test_raise_lists_each_overlength_example(tmp_path, tok, texts):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    counts = token_counts(tok, texts)
    with pytest.raises(DataError) as e:
        load(path, tok, max_length=LIMIT, overlength="raise")
    assert e.value.problems == [
        f"{path}:2: {counts[1]} tokens > max_length {LIMIT}",
        f"{path}:6: {counts[5]} tokens > max_length {LIMIT}",
    ]


def test_stats_and_fingerprint(tmp_path, tok):
    records = [chat("Hello.", "Hi there."), chat("Where does Anna live?", "In Paris.", system="Be brief.")]
    path = write_jsonl(tmp_path / "c.jsonl", records)
    a, _ = load(path, tok, chat_template="chatml")
    b, _ = load(path, tok, chat_template="chatml")
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    c, _ = load(path, tok, chat_template="llama3")
    assert c.fingerprint != a.fingerprint
    s = a.stats
    assert s["format"] == "chat" and s["n_records"] == 2 and s["n_bad"] == 0
    assert s["n_tokens"] == sum(len(ex.input_ids) for ex in a.examples)
    assert s["n_trainable_tokens"] == sum(sum(lab != IGNORE for lab in ex.labels) for ex in a.examples)
    assert 0 < s["n_trainable_tokens"] < s["n_tokens"]


def test_format_not_accepted_by_the_objective(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q?", "chosen": "A.", "rejected": "B."}])
    with pytest.raises(DataError) as e:
        load(path, tok)
    assert str(path) in e.value.message and "'preference'" in e.value.message
    assert "accepted: text, instruction, chat" in e.value.message


def test_configured_format_overrides_detection(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "A cat.", "label": 1}])
    data, _ = load(path, tok, format="text")
    assert data.stats["format"] == "text"


def test_nothing_left_is_an_error(tmp_path, tok, texts):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": texts[1]}])
    with pytest.raises(DataError, match="no examples left"):
        load(path, tok, max_length=LIMIT, overlength="drop")


def test_unset_split_is_an_error(tmp_path, tok):
    with pytest.raises(DataError, match="data.eval is not set"):
        load_tokenized(DataConfig(train="x.jsonl"), "eval", tok, mask_prompt=True)


def test_check_report(tmp_path, tok):
    records = [chat("Where does Anna live?", "In Paris.", system="Be brief."), {"messages": "oops"}]
    path = write_jsonl(tmp_path / "c.jsonl", records)
    cfg = DataConfig(train=str(path), eval=str(path), chat_template="chatml")
    report = check_report(cfg, tok, mask_prompt=True)
    v = report["train"]["validation"]
    assert v["records"] == 2 and v["bad"] == 1 and v["run_would_stop"]
    assert v["problems"] == [f"{path}:2: messages must be a list of messages, got string"]
    t = report["train"]["tokens"]
    assert t["examples"] == 1 and t["max_length"] == t["p50_length"] == t["p95_length"] == t["tokens"]
    ex = report["train"]["example"]
    trained = "".join(s for s, keep in ex["tokens"] if keep)
    assert trained == "In Paris.<|im_end|>"
    assert "eval" in report and "example" not in report["eval"]
    text = format_check_report(report)
    assert "[[In Paris.<|im_end|>]]" in text
    assert f"{path}:2: messages must be a list" in text and "a run would STOP" in text


def test_check_report_validates_and_tokenizes_preference_pairs(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q?", "chosen": "A.", "rejected": "B."}, {"prompt": "Q?"}])
    report = check_report(DataConfig(train=str(path)), tok, mask_prompt=True)
    assert report["train"]["format"] == "preference"
    assert report["train"]["validation"]["problems"] == [f"{path}:2: missing field 'chosen'"]
    assert report["train"]["tokens"]["examples"] == 1  # one (chosen, rejected) pair
    assert "format preference" in format_check_report(report)


# ----------------------------------------------------------------------------- truncation that spoils a run


def _replies(n_long: int, n_short: int = 20) -> list[dict]:
    long = " ".join(sentences(6, seed=9))
    return [chat("Tell me about the city.", long) for _ in range(n_long)] + [
        chat("Where does Anna live?", "In Paris.") for _ in range(n_short)]


def test_cut_reply_ends_stop_a_run_with_the_fixes(tmp_path, tok):
    """The end-of-turn token of a reply cut by truncation: the model would learn not to stop."""
    path = write_jsonl(tmp_path / "c.jsonl", _replies(n_long=1, n_short=200))
    with pytest.raises(DataError, match=r"cuts the end of 1 reply \(their end-of-turn token") as e:
        load(path, tok, max_length=40, chat_template="chatml")
    assert "data.max_length (now 40)" in e.value.fix and "data.overlength: drop" in e.value.fix
    assert "allow_cut_replies: true" in e.value.fix
    assert e.value.problems[0].startswith(f"{path}:1: ")
    # The user's explicit choice, in the config, lets it train; drop skips the long reply instead.
    data, _ = load(path, tok, max_length=40, chat_template="chatml", allow_cut_replies=True)
    assert data.stats["n_cut_replies"] == 1 and data.stats["n_examples"] == 201
    data, _ = load(path, tok, max_length=40, chat_template="chatml", overlength="drop")
    assert data.stats["n_examples"] == 200


def test_share_of_trained_tokens_lost_above_the_threshold_stops(tmp_path, tok, texts):
    """Text (every token trained): 2 long of 6 documents cut at 16 tokens loses far more than 5 %."""
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    with pytest.raises(DataError, match=r"cuts \d+\.\d% of the trained tokens .* above data.max_truncated_share=0.05"):
        load(path, tok, max_length=LIMIT)
    counts = token_counts(tok, texts)
    share = sum(n - LIMIT for n in counts if n > LIMIT) / sum(counts)
    data, _ = load(path, tok, max_length=LIMIT, max_truncated_share=round(share + 0.01, 2))
    assert data.stats["truncated_trained_share"] == pytest.approx(share)


def test_prompt_only_truncation_is_not_a_cut_reply(tmp_path, tok):
    """Truncation that cuts only masked tokens (a long last user turn) loses no trained token."""
    long_user = " ".join(sentences(6, seed=4))
    path = write_jsonl(tmp_path / "c.jsonl", [chat("Hi", "Hello.", long_user)] + _replies(0, 50))
    data, _ = load(path, tok, max_length=40, chat_template="chatml")
    assert data.stats["n_cut_replies"] == 0 and data.stats["n_truncated"] == 1


def test_check_report_says_a_truncating_run_would_stop(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", _replies(n_long=2))
    report = check_report(DataConfig(train=str(path), max_length=40, chat_template="chatml"), tok, mask_prompt=True)
    v = report["train"]["validation"]
    assert v["run_would_stop"] and v["bad"] == 0 and "cuts the end of 2 replies" in v["truncation"]["message"]
    assert report["train"]["tokens"]["cut_replies"] == 2
    text = format_check_report(report)
    assert "a run would STOP here" in text and "STOP: " in text and "fix: raise data.max_length" in text
