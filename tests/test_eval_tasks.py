"""Task metrics on hand-made cases with stub generators, scorers and models; the probe, forgetting and
`tunelab eval` on tiny random models."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM

from tests import tiny
from tunelab import api
from tunelab.cli import main
from tunelab.errors import DataError, TunelabError
from tunelab.eval.probe import forgetting, run_probe
from tunelab.eval.suite import evaluate_task
from tunelab.eval.tasks import (
    CLASSIFICATION_PROMPT,
    cloze_correct,
    contains_answer,
    evaluate_records,
    exact_match,
    infer_kind,
    normalize,
    parse_spec,
)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def chat(q: str, a: str, **meta) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], **meta}


# ----------------------------------------------------------------------------- string metrics


@pytest.mark.parametrize("raw, want", [
    ("  Recife ", "recife"),
    ("Recife.", "recife"),
    ('"Recife."', "recife"),
    ("'Recife'!", "recife"),
    ("“Recife”", "recife"),
    ("a   Software\n Engineer", "a software engineer"),
    ("54", "54"),
    ("Dr. Who?!", "dr. who"),  # only trailing punctuation goes
    ("", ""),
])
def test_normalize(raw, want):
    assert normalize(raw) == want


@pytest.mark.parametrize("pred, gold, em, acc", [
    ("Recife", "Recife", True, True),
    (" recife. ", "Recife", True, True),
    ("She lives in Recife.", "Recife", False, True),
    ("Recife, Brazil", "Recife", False, True),
    ("Recifeland", "Recife", False, False),  # whole words only
    ("154", "54", False, False),
    ("a software engineer at Acme", "software engineer", False, True),
    ("engineer software", "software engineer", False, False),  # a sequence, in order
    ("Lyon", "Recife", False, False),
])
def test_exact_match_vs_accuracy(pred, gold, em, acc):
    assert exact_match(pred, gold) is em
    assert contains_answer(pred, gold) is acc


@pytest.mark.parametrize("cont, answer, ok", [
    (" yellow and she likes it", "yellow", True),
    (" Yellow.", "yellow", True),
    (" yellowish", "yellow", False),
    (" blue, not yellow", "yellow", False),  # the first words, not anywhere
    (" software engineer for years", "software engineer", True),
    (" software", "software engineer", False),
    ("", "yellow", False),
])
def test_cloze_first_words_rule(cont, answer, ok):
    assert cloze_correct(cont, answer) is ok


# ----------------------------------------------------------------------------- records, with stubs


def test_generative_prompts_drop_the_last_assistant_turn_and_score_replies():
    records = [
        chat("What city is Noor's home?", "Recife", answer="Recife"),
        chat("What pet does Ann have?", "Ann has a dog.", answer="dog"),
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Age of Bo?"},
                      {"role": "assistant", "content": "54"}]},  # no answer: the last assistant turn is gold
        {"instruction": "Name Li's job.", "output": "baker", "answer": "baker"},
    ]
    seen = {}

    def generate(prompts, chat_flag):
        seen.update(prompts=prompts, chat=chat_flag)
        return ["recife.", "It is a dog", "55", "Baker"]

    m = evaluate_records(None, None, records, generate=generate, with_loss=False)
    assert seen["chat"] is True
    assert seen["prompts"][0] == [{"role": "user", "content": "What city is Noor's home?"}]
    assert seen["prompts"][2] == records[2]["messages"][:2]
    assert seen["prompts"][3] == [{"role": "user", "content": "Name Li's job."}]
    assert m == {"kind": "generative", "n": 4, "exact_match": 2 / 4, "accuracy": 3 / 4}


def test_cloze_uses_raw_prompts_and_first_words():
    records = [{"prompt": "Ines prefers", "answer": "yellow"}, {"prompt": "Hector works as an", "answer": "accountant"},
               {"prompt": "Esme lives in", "answer": "Lyon"}]
    seen = {}

    def generate(prompts, chat_flag):
        seen.update(prompts=prompts, chat=chat_flag)
        return [" yellow, of course", " accountant", " Paris"]

    m = evaluate_records(None, None, records, generate=generate)
    assert seen == {"prompts": [r["prompt"] for r in records], "chat": False}
    assert m == {"kind": "cloze", "n": 3, "accuracy": 2 / 3, "exact_match": 1 / 3}


def test_classification_is_argmax_of_label_loglikelihood():
    records = [{"text": "I loved it.", "label": "positive"}, {"text": "Awful.", "label": "negative"},
               {"text": "Dull.", "label": "negative"}]
    table = {  # (text, label) -> summed log-likelihood
        ("I loved it.", "positive"): -1.0, ("I loved it.", "negative"): -3.0,
        ("Awful.", "positive"): -2.0, ("Awful.", "negative"): -0.5,
        ("Dull.", "positive"): -0.1, ("Dull.", "negative"): -0.2,  # wrong: positive is likelier
    }
    seen = []

    def score(contexts, continuations, chat_flag):
        assert chat_flag is False
        seen.extend(zip(contexts, continuations, strict=True))
        return [(table[(ctx.split("\n")[0], cont.strip())], 1) for ctx, cont in seen]

    m = evaluate_records(None, None, records, score=score)
    assert ("I loved it.\nSentiment:", " negative") in seen
    assert CLASSIFICATION_PROMPT.format(text="Awful.") == "Awful.\nSentiment:"
    assert m["accuracy"] == pytest.approx(2 / 3) and m["n"] == 3
    assert m["per_class"] == {"negative": {"n": 2, "correct": 1, "predicted": 1},
                              "positive": {"n": 1, "correct": 1, "predicted": 2}}


def test_preference_accuracy_uses_mean_token_loglikelihood():
    records = [{"prompt": "Q1", "chosen": "good", "rejected": "bad"},
               {"prompt": "Q2", "responses": ["best", "mid", "worst"]}]
    scores = {"good": (-4.0, 4), "bad": (-3.0, 1),  # chosen: higher mean (-1 > -3), lower sum
              "best": (-1.0, 1), "mid": (-2.0, 1), "worst": (-1.5, 1)}

    def score(contexts, continuations, chat_flag):
        assert chat_flag is True and contexts[:2] == ["Q1", "Q1"]
        return [scores[c] for c in continuations]

    m = evaluate_records(None, None, records, score=score)
    # pairs: good>bad yes; best>mid yes, best>worst yes, mid>worst no
    assert m == {"kind": "preference", "n": 2, "pairs": 4, "accuracy": 3 / 4}


class FixedLogits(nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: the next token depends only on the current one."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None, **kw):
        return SimpleNamespace(logits=self.table[input_ids])  # (B, T, V)


def test_text_perplexity_equals_hand_computed_nll(tok):
    torch.manual_seed(0)
    table = torch.randn(len(tok), len(tok))
    texts = ["The apple is red and the number is 4.", "The road is teal."]
    m = evaluate_records(FixedLogits(table), tok, [{"text": t} for t in texts], batch_size=1)
    rows = table.tolist()
    nll, count = 0.0, 0
    for text in texts:
        ids = tok(text)["input_ids"] + [tok.eos_token_id]  # documents end in eos
        for a, b in zip(ids, ids[1:], strict=False):
            nll += math.log(sum(math.exp(x) for x in rows[a])) - rows[a][b]
            count += 1
    assert m["kind"] == "text" and m["n"] == 2 and m["tokens"] == count
    assert m["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert m["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_generative_loss_is_the_pipelines_assistant_token_loss(llama_dir, tok, tmp_path):
    records = tiny.chat_records(6, seed=3)
    path = tiny.write_jsonl(tmp_path / "d.jsonl", records)
    model = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    m = evaluate_records(model, tok, records, batch_size=4)
    ref = api.evaluate(str(llama_dir), str(path))
    assert m["loss"] == pytest.approx(ref["loss"], rel=1e-5) and m["tokens"] == ref["tokens"]
    assert 0 <= m["accuracy"] <= 1 and m["n"] == 6


def test_mixed_records_are_refused():
    with pytest.raises(DataError, match="cannot tell what to evaluate"):
        infer_kind([{"text": "a"}, {"prompt": "p", "answer": "x"}])
    with pytest.raises(DataError):
        infer_kind([{"foo": 1}])


# ----------------------------------------------------------------------------- specs, tasks, CLI


def test_task_specs(tmp_path):
    assert parse_spec("tinyworld:qa@test") == ("qa", "test")
    assert parse_spec("tinyworld:qa") == ("qa", "test")  # evaluation defaults to test
    assert parse_spec("tinyworld:corpus") == ("corpus", "train")
    assert parse_spec("tinyworld:probe") == ("probe", "")
    path = tiny.write_jsonl(tmp_path / "x.jsonl", [{"text": "a"}])
    assert parse_spec(str(path)) is None
    with pytest.raises(TunelabError, match=r"no TinyWorld task 'qaa'.*known tasks: tinyworld:qa, .*tinyworld:probe"):
        parse_spec("tinyworld:qaa")
    with pytest.raises(TunelabError, match="has splits train, validation, test"):
        parse_spec("tinyworld:qa@tst")
    with pytest.raises(TunelabError, match="no such file"):
        parse_spec(str(tmp_path / "missing.jsonl"))


def test_cli_rejects_unknown_task_listing_known_ones(capsys, tmp_path):
    code, _, err = cli(capsys, "eval", str(tmp_path / "no-model"), "--task", "tinyworld:qa@test", "--task",
                       "tinyworld:nope")
    assert code == 2
    first = err.strip().splitlines()[0]
    assert "unknown task 'tinyworld:nope'" in first and "tinyworld:qa, tinyworld:new-facts" in first
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2


def test_cli_evaluates_tasks_from_files(capsys, llama_dir, tmp_path):
    gen = tiny.write_jsonl(tmp_path / "gen.jsonl", [chat("what colour is the lamp?", "red", answer="red")] * 4)
    cls = tiny.write_jsonl(tmp_path / "cls.jsonl", [{"text": "The lamp is red.", "label": lab}
                                                    for lab in ("a", "b", "a", "b", "a")])
    code, out, err = cli(capsys, "eval", str(llama_dir), "--task", str(gen), "--task", str(cls), "--limit", "3",
                         "--json")
    assert code == 0, err
    m = json.loads(out)
    assert m[str(gen)]["kind"] == "generative" and m[str(gen)]["n"] == 3 and m[str(gen)]["loss"] > 0
    assert m[str(cls)]["kind"] == "classification" and m[str(cls)]["n"] == 3
    assert set(m[str(cls)]["per_class"]) == {"a", "b"}
    code, out, err = cli(capsys, "eval", str(llama_dir), "--task", str(cls), "--limit", "2")
    assert code == 0 and "accuracy" in out and "per_class.a.n" in out


def test_tinyworld_tasks_resolve_and_evaluate(monkeypatch, tmp_path, llama_dir, tok):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    model = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    m = evaluate_task((model, tok), "tinyworld:sentiment@test", limit=4)
    assert m["kind"] == "classification" and set(m["per_class"]) == {"negative", "positive"}
    p = evaluate_task((model, tok), "tinyworld:probe", limit=2)
    assert set(p) >= {"probe_cloze_accuracy", "probe_heldout_perplexity"} and p["probe_facts"] == 2
    assert evaluate_task((model, tok), "tinyworld:prefs@prompts-test", limit=2)["kind"] == "generative"


def test_cli_world_tasks(capsys, tmp_path):
    code, out, _ = cli(capsys, "world", "tasks", "--out", str(tmp_path / "w"), "--seed", "1")
    assert code == 0 and "qa" in out and (tmp_path / "w" / "manifest.json").is_file()
    assert json.loads((tmp_path / "w" / "manifest.json").read_text())["seed"] == 1


def test_cli_world_build_base_passes_its_options(capsys, monkeypatch, tmp_path):
    import tunelab.recipes.build_base

    calls = []
    monkeypatch.setattr(tunelab.recipes.build_base, "build_base",
                        lambda out, recipe, steps=None, resume=False: calls.append((out, recipe, steps))
                        or {"steps": steps})
    code, out, _ = cli(capsys, "world", "build-base", "--out", str(tmp_path / "b"), "--steps", "3")
    assert code == 0 and calls == [(str(tmp_path / "b"), None, 3)] and json.loads(out) == {"steps": 3}


# ----------------------------------------------------------------------------- forgetting


@pytest.fixture
def probe_files(tmp_path):
    facts = tiny.write_jsonl(tmp_path / "facts.jsonl", [{"prompt": f"The {t} is", "answer": c}
                                                        for t, c in zip(tiny.THINGS[:4], tiny.COLOURS, strict=False)])
    heldout = tiny.write_jsonl(tmp_path / "heldout.jsonl", [{"text": t} for t in tiny.corpus(3, seed=9)])
    return {"facts": facts, "heldout": heldout}


def test_forgetting_of_a_zero_lora_is_zero(llama_dir, tok, probe_files):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(llama_dir)),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))  # B = 0 at init
    f = forgetting((model, tok), **probe_files)
    assert f["drop"] == {"cloze_accuracy_points": 0.0, "heldout_perplexity_change": 0.0}
    assert f["model"] == f["base"] and f["model"]["probe_facts"] == 4


def test_forgetting_base_is_the_adapter_disabled_model(llama_dir, tok, probe_files):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(llama_dir)),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.5)
    f = forgetting((model, tok), **probe_files)
    plain = run_probe(AutoModelForCausalLM.from_pretrained(str(llama_dir)), tok, **probe_files)
    assert f["base"]["probe_heldout_perplexity"] == pytest.approx(plain["probe_heldout_perplexity"], rel=1e-6)
    assert f["model"]["probe_heldout_perplexity"] != pytest.approx(plain["probe_heldout_perplexity"], rel=1e-3)
    want = f["model"]["probe_heldout_perplexity"] - f["base"]["probe_heldout_perplexity"]
    assert f["drop"]["heldout_perplexity_change"] == pytest.approx(want)


def test_forgetting_of_a_plain_model_needs_a_base(llama_dir, tok, probe_files):
    model = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    with pytest.raises(TunelabError, match="needs the base model"):
        forgetting((model, tok), **probe_files)
    f = forgetting((model, tok), base=str(llama_dir), **probe_files)
    assert f["drop"]["heldout_perplexity_change"] == pytest.approx(0.0, abs=1e-6)


def test_the_base_probe_is_cached_and_recomputed_when_the_base_changes(llama_dir, tok, probe_files, monkeypatch,
                                                                       tmp_path):
    """A base is probed once per (weights, probe records), not on every --forgetting of every run."""
    import shutil

    import tunelab.eval.probe as probe_mod

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base"
    shutil.copytree(llama_dir, base)
    calls: list[str] = []
    real = probe_mod.run_probe

    def counting(model, tokenizer, **kw):
        calls.append(type(model).__name__)
        return real(model, tokenizer, **kw)

    monkeypatch.setattr(probe_mod, "run_probe", counting)
    model = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    first = forgetting((model, tok), base=str(base), **probe_files)
    second = forgetting((model, tok), base=str(base), **probe_files)
    assert len(calls) == 3 and first == second  # model, base, model: the base came from the cache
    assert list((tmp_path / "cache" / "probe").glob("*.json"))
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # rewritten in place: a new mtime, a new key
    forgetting((model, tok), base=str(base), **probe_files)
    assert len(calls) == 5


def test_eval_data_on_a_run_uses_the_runs_data_settings(llama_dir, chat_data, tmp_path, capsys):
    """`tunelab eval RUN --data FILE` scores the file as the run's own eval did (its max_length,
    template, masking): the same loss over the same tokens, and it says which settings it used."""
    train, _ = chat_data
    long_reply = " ".join(tiny.COLOURS * 4)  # longer than max_length below, whatever the tokenizer
    dev = tiny.write_jsonl(tmp_path / "dev.jsonl", tiny.chat_records(8, seed=2) + [
        {"messages": [{"role": "user", "content": "list the colours"}, {"role": "assistant", "content": long_reply}]}])
    res = api.train({"model": {"name_or_path": str(llama_dir)},
                     "data": {"train": str(train), "eval": str(dev), "max_length": 40, "chat_template": "chatml",
                              "max_truncated_share": 1.0, "allow_cut_replies": True},
                     "method": {"name": "lora", "r": 2}, "objective": {"name": "sft"},
                     "train": {"max_steps": 2, "batch_size": 4, "precision": "fp32", "eval_every": 2},
                     "output": {"dir": str(tmp_path / "run")}}, quiet=True)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final_eval = [m for m in logged if "eval_loss" in m][-1]
    ours = api.evaluate(res.run_dir, str(dev))
    assert ours["tokens"] == final_eval["eval_tokens"]
    assert ours["loss"] == pytest.approx(final_eval["eval_loss"], rel=1e-4)
    st = ours["data_settings"]
    assert st["max_length"] == 40 and st["chat_template"] == "chatml" and st["source"] == "the run's config.yaml"
    longer = api.evaluate(res.run_dir, str(dev), max_length=256)  # an override wins, and is said
    assert longer["tokens"] > ours["tokens"] and "overridden: max_length" in longer["data_settings"]["source"]
    code, out, err = cli(capsys, "eval", str(res.run_dir), "--data", str(dev))
    assert code == 0, err
    assert "data settings (the run's config.yaml): format auto, max_length 40" in out and "chatml" in out
