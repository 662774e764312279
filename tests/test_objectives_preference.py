"""Preference data (pairs, rankings), objectives `reward` (O04) and `dpo` (O06), the frozen reference, scoring."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import tunelab
from tests import tiny
from tunelab.config import DataConfig
from tunelab.data.collate import collate
from tunelab.data.pipeline import load_tokenized
from tunelab.data.preference import pair_examples
from tunelab.data.stream import BatchStream
from tunelab.data.templates import render, resolve_template
from tunelab.data.types import IGNORE, Example
from tunelab.errors import DataError, TunelabError
from tunelab.eval.tasks import evaluate_records
from tunelab.inference.reward import rewards_of, score_records
from tunelab.methods import METHODS
from tunelab.methods.heads import HeadConfig
from tunelab.modeling.heads import is_reward_model
from tunelab.objectives import OBJECTIVES
from tunelab.objectives.alignment_losses import sequence_logps
from tunelab.objectives.frozen import Reference
from tunelab.objectives.preference import DPORuntime, RewardRuntime
from tunelab.objectives.registry import RunContext
from tunelab.runconfig import build_config

CPU = torch.device("cpu")
PAIR_FORMATS = ("preference", "ranking")
MARKER = "number"  # the chosen reply = the rejected one + this word


def pref_records(n: int, seed: int = 0) -> list[dict]:
    """Pairs that differ only by a fixed marker word at the end of the chosen reply."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        t, c = rng.choice(tiny.THINGS), rng.choice(tiny.COLOURS)
        reply = " ".join([c] * rng.randint(1, 4))
        out.append({"prompt": f"what colour is the {t}?", "chosen": f"{reply} {MARKER}", "rejected": reply})
    return out


def pairs_of(records: list[dict], tok, fmt: str = "preference") -> list[Example]:
    template = resolve_template(None, tok)
    return [ex for i, r in enumerate(records) for ex in pair_examples(r, fmt, tok, template, f"mem:{i + 1}")]


def trained(ex: Example) -> list[int]:
    return [x for x in ex.labels if x != IGNORE]


def context(cfg: dict, model, tok, examples: list[Example] | None = None) -> RunContext:
    return RunContext(build_config(cfg), model, tok, CPU, tiny.quiet, examples or [], tok.pad_token_id)


def lora_policy(llama_dir: Path):
    base = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    return METHODS["lora"].apply(base, build_config({"method": {"name": "lora", "r": 4, "dropout": 0.0}}).method)


def full_policy(llama_dir: Path):
    base = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    return METHODS["full"].apply(base, build_config({"method": {"name": "full"}}).method)


def metrics_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- data


def test_ranking_of_four_gives_six_ordered_pairs_with_reply_only_labels(tok):
    responses = ["red", "blue blue", "green and teal", "amber"]
    record = {"prompt": "what colour is the lamp?", "responses": responses}
    exs = pairs_of([record], tok, "ranking")
    order = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert len(exs) == 6
    assert [ex.where for ex in exs] == [f"mem:1#{k}" for k in range(6)]
    template = resolve_template(None, tok)
    prompt_ids = tok(render(tok, template, [{"role": "user", "content": record["prompt"]}], gen=True),
                     add_special_tokens=False)["input_ids"]
    for ex, (i, j) in zip(exs, order, strict=True):
        assert ex.rejected is not None and ex.rejected.rejected is None
        for e, reply in ((ex, responses[i]), (ex.rejected, responses[j])):
            assert tok.decode(trained(e)).strip() == reply + "<|im_end|>"
            assert trained(e)[-1] == tok.convert_tokens_to_ids("<|im_end|>")
            first = next(k for k, x in enumerate(e.labels) if x != IGNORE)
            assert e.labels[first:first + len(trained(e))] == trained(e)  # one contiguous trained run
            assert e.input_ids[:first] == prompt_ids  # untrained: the prompt with the generation prompt
        n_prompt = len(prompt_ids)
        assert ex.input_ids[:n_prompt] == ex.rejected.input_ids[:n_prompt]
    # the preference format gives exactly one pair, `where` unchanged
    (one,) = pairs_of([{"prompt": "q?", "chosen": "red", "rejected": "blue"}], tok)
    assert one.where == "mem:1" and tok.decode(trained(one.rejected)).strip() == "blue<|im_end|>"


def test_bad_pair_records_are_all_listed_with_file_and_line(tmp_path, tok):
    ranking = tiny.write_jsonl(tmp_path / "ranking.jsonl", [
        {"prompt": "what colour is the lamp?", "responses": ["red", "blue"]},
        {"prompt": "q?", "responses": "red"},
        {"prompt": "q?", "responses": ["red"]},
        {"prompt": "q?", "responses": ["red", "blue", "red"]},
        {"responses": ["red", "blue"]},
    ])
    kw = {"mask_prompt": True, "formats": PAIR_FORMATS, "log": tiny.quiet}
    with pytest.raises(DataError) as e:
        load_tokenized(DataConfig(train=str(ranking)), "train", tok, **kw)
    text = str(e.value)
    assert "4 bad record(s) of 5" in text
    for line, reason in ((2, "responses must be a list"), (3, "a ranking needs 2 or more"),
                         (4, "repeats a response"), (5, "missing field 'prompt'")):
        assert f"{ranking}:{line}: " in text and reason in text
        assert any(p.startswith(f"{ranking}:{line}: ") and reason in p for p in e.value.problems)
    assert not any(p.startswith(f"{ranking}:1:") for p in e.value.problems)

    prefs = tiny.write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "q?", "chosen": "red", "rejected": "blue"},
        {"prompt": "q?", "chosen": "", "rejected": "blue"},
        {"chosen": "red", "rejected": "blue"},
    ])
    with pytest.raises(DataError) as e:
        load_tokenized(DataConfig(train=str(prefs)), "train", tok, **kw)
    assert [p.split(": ", 1)[0] for p in e.value.problems] == [f"{prefs}:2", f"{prefs}:3"]
    assert "chosen is empty" in e.value.problems[0] and "missing field 'prompt'" in e.value.problems[1]

    good = tiny.write_jsonl(tmp_path / "good.jsonl", pref_records(4))
    data = load_tokenized(DataConfig(train=str(good)), "train", tok, **kw)
    assert len(data.examples) == 4 and all(ex.rejected is not None for ex in data.examples)
    with pytest.raises(DataError, match="packing") as e:
        load_tokenized(DataConfig(train=str(good), packing=True), "train", tok, **kw)
    assert "packing" in e.value.fix


def test_pair_collate_puts_chosen_rows_first_and_counts_pairs(tok):
    pairs = pairs_of(pref_records(6, seed=3), tok)
    b = 3
    batch = collate([[ex] for ex in pairs[:b]], tok.pad_token_id, packed=False)
    chosen = collate([[replace(ex, rejected=None)] for ex in pairs[:b]], tok.pad_token_id, packed=False)
    rejected = collate([[ex.rejected] for ex in pairs[:b]], tok.pad_token_id, packed=False)
    width = max(chosen["input_ids"].shape[1], rejected["input_ids"].shape[1])
    assert batch["input_ids"].shape == (2 * b, width) and int(batch["n_pairs"]) == b
    assert "position_ids" not in batch
    for part, rows in ((chosen, slice(0, b)), (rejected, slice(b, 2 * b))):
        w = part["input_ids"].shape[1]
        for key, fill in (("input_ids", tok.pad_token_id), ("labels", IGNORE), ("attention_mask", 0)):
            assert torch.equal(batch[key][rows, :w], part[key])
            assert (batch[key][rows, w:] == fill).all()
    # the chosen reply carries the marker word: every chosen row is longer than its rejected row
    assert (batch["attention_mask"][:b].sum(1) > batch["attention_mask"][b:].sum(1)).all()

    stream = BatchStream(pairs, batch_size=4, packing=False, max_length=64, seed=0, pad_id=tok.pad_token_id)
    first, second = stream.next_group(2)
    assert (first.n_trained, second.n_trained) == (4, 2)  # pairs, not tokens
    assert first.tensors["input_ids"].shape[0] == 8 and int(first.tensors["n_pairs"]) == 4
    assert sorted(first.where + second.where) == sorted(ex.where for ex in pairs)


def test_pair_batch_counts_the_rejected_rows_as_real_tokens(tok):
    pairs = pairs_of(pref_records(4, seed=3), tok)
    stream = BatchStream(pairs, batch_size=4, packing=False, max_length=64, seed=0, pad_id=tok.pad_token_id)
    (mb,) = stream.next_group(1)
    assert mb.n_real == int(mb.tensors["attention_mask"].sum())


# ----------------------------------------------------------------------------- reward


def reward_model(llama_dir: Path, seed: int = 0):
    torch.manual_seed(seed)
    model = METHODS["head"].apply(AutoModelForCausalLM.from_pretrained(str(llama_dir)), HeadConfig(num_labels=1))
    with torch.no_grad():
        model.head.weight.normal_(0, 1.0)  # rewards of order 1, not ~0
        model.head.bias.fill_(0.3)
    return model.eval()


@pytest.mark.parametrize("center", [0.0, 0.25])
def test_reward_loss_is_bradley_terry_of_the_heads_own_scores(llama_dir, tok, center):
    model = reward_model(llama_dir)
    pairs = pairs_of(pref_records(5, seed=4), tok)
    batch = collate([[ex] for ex in pairs], tok.pad_token_id, packed=False)
    with torch.no_grad():
        alone = [collate([[e] for e in part], tok.pad_token_id, packed=False)
                 for part in ([replace(ex, rejected=None) for ex in pairs], [ex.rejected for ex in pairs])]
        r_c, r_r = (model(b["input_ids"], b["attention_mask"]).logits[:, 0].double() for b in alone)
    expected = (-F.logsigmoid(r_c - r_r)).sum() + center * ((r_c + r_r) ** 2).sum()
    cfg = {"method": {"name": "head", "num_labels": 1}, "objective": {"name": "reward", "center_rewards": center}}
    runtime = RewardRuntime(context(cfg, model, tok))
    with torch.no_grad():
        loss, n = runtime.loss(model, batch)
        plain, n_plain = OBJECTIVES["reward"].loss(model, batch, runtime.cfg)
    assert int(n) == int(n_plain) == 5
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, loss)
    assert r_c.sub(r_r).abs().min() > 1e-3  # the accuracy below is not decided by noise
    stats = runtime.stats()
    assert stats["accuracy"] == pytest.approx(float((r_c > r_r).double().mean()))
    assert stats["margin"] == pytest.approx(float((r_c - r_r).mean()), abs=1e-5)
    assert runtime.stats() == {}  # taken and reset
    # rewards_of scores the same conversations the same way
    got = rewards_of(model, tok, [(r["prompt"], r["chosen"]) for r in pref_records(5, seed=4)])
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), r_c, rtol=1e-5, atol=1e-5)


def test_reward_refuses_a_model_without_a_scalar_head_and_data_without_pairs(llama_dir, tok):
    pairs = pairs_of(pref_records(2), tok)
    batch = collate([[ex] for ex in pairs], tok.pad_token_id, packed=False)
    lm = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    cfg = build_config({"objective": {"name": "reward"}}).objective
    with pytest.raises(TunelabError, match="scalar head"):
        OBJECTIVES["reward"].loss(lm, batch, cfg)
    single = collate([[replace(ex, rejected=None)] for ex in pairs], tok.pad_token_id, packed=False)
    with pytest.raises(TunelabError, match="preference data"):
        OBJECTIVES["reward"].loss(reward_model(llama_dir), single, cfg)


def test_reward_model_trains_and_scores_preference_data(llama_dir, tok, tmp_path):
    train = tiny.write_jsonl(tmp_path / "train.jsonl", pref_records(48, seed=1))
    records = pref_records(12, seed=2)
    evals = tiny.write_jsonl(tmp_path / "eval.jsonl", records)
    run = tmp_path / "run"
    cfg = {
        "model": {"name_or_path": str(llama_dir)},
        "data": {"train": str(train), "eval": str(evals), "max_length": 64},
        "method": {"name": "head", "num_labels": 1},
        "objective": {"name": "reward"},
        "train": {"max_steps": 24, "batch_size": 8, "lr": 3e-3, "scheduler": "constant", "eval_every": 2,
                  "tensorboard": False, "precision": "fp32"},
        "output": {"dir": str(run)},
    }
    result = tunelab.train(cfg, quiet=True)
    assert result.status == "completed" and result.steps == 24
    lines = metrics_lines(run)
    evals_seen = [m for m in lines if "eval_loss" in m]
    assert evals_seen[0]["step"] == 2 and evals_seen[-1]["step"] == 24
    assert all("eval_accuracy" in m and "eval_margin" in m for m in evals_seen)
    assert evals_seen[0]["eval_tokens"] == 12  # units are pairs
    assert evals_seen[-1]["eval_loss"] < min(evals_seen[0]["eval_loss"], math.log(2)) - 0.05, evals_seen
    assert evals_seen[-1]["eval_accuracy"] >= 0.8

    model, tok2 = tunelab.load(run)
    assert is_reward_model(model)
    m = tunelab.api.evaluate_task((model, tok2), str(evals))
    assert m["kind"] == "preference" and m["scored_by"] == "reward head"
    assert m["n"] == 12 and m["pairs"] == 12
    assert m["accuracy"] == pytest.approx(evals_seen[-1]["eval_accuracy"])  # the same pairs, the same head
    assert tunelab.api.evaluate_task(run, str(evals)) == m  # the run dir reloads as a reward model

    ranking = {"prompt": "what colour is the seed?", "responses": [f"teal {MARKER}", "teal", "olive"]}
    mixed = [*records, ranking]
    scored = score_records(model, tok2, [(f"e:{i}", r) for i, r in enumerate(mixed)])
    assert scored["pairs"] == 15 and len(scored["records"]) == 13
    wins = 0
    for r, s in zip(mixed, scored["records"], strict=True):
        if "responses" in r:
            rs = s["responses"]
            assert rs == pytest.approx(rewards_of(model, tok2, [(r["prompt"], x) for x in r["responses"]]),
                                       abs=1e-5)
            wins += sum(rs[i] > rs[j] for i in range(3) for j in range(i + 1, 3))
        else:
            expected = rewards_of(model, tok2, [(r["prompt"], r["chosen"]), (r["prompt"], r["rejected"])])
            assert [s["chosen"], s["rejected"]] == pytest.approx(expected, abs=1e-5)
            wins += s["chosen"] > s["rejected"]
    assert scored["accuracy"] == pytest.approx(wins / 15)
    pref_only = score_records(model, tok2, [(f"e:{i}", r) for i, r in enumerate(records)])
    assert pref_only["accuracy"] == pytest.approx(m["accuracy"])
    by_rank = evaluate_records(model, tok2, [ranking])
    assert by_rank["scored_by"] == "reward head" and by_rank["pairs"] == 3
    assert by_rank["accuracy"] == pytest.approx(sum(
        a > b for i, a in enumerate(scored["records"][-1]["responses"])
        for b in scored["records"][-1]["responses"][i + 1:]) / 3)
    single = score_records(model, tok2, [("x:1", {"prompt": "what colour is the lamp?", "response": "red"})])
    assert single["pairs"] == 0 and single["accuracy"] is None
    assert single["records"][0]["reward"] == pytest.approx(
        rewards_of(model, tok2, [("what colour is the lamp?", "red")])[0], abs=1e-6)


# ----------------------------------------------------------------------------- dpo


def naive_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sum over t >= 1 with labels[t] trained of log softmax(logits[t-1])[labels[t]], and the count; python loops."""
    sums, counts = [], []
    for z, y in zip(logits.double(), labels, strict=True):
        total, n = torch.zeros((), dtype=torch.float64), 0
        for t in range(1, len(y)):
            if int(y[t]) != IGNORE:
                total = total + torch.log_softmax(z[t - 1], -1)[int(y[t])]
                n += 1
        sums.append(total)
        counts.append(n)
    return torch.stack(sums), torch.tensor(counts, dtype=torch.float64)


def dpo_cfg(**objective) -> dict:
    return {"method": {"name": "lora", "r": 4, "dropout": 0.0}, "objective": {"name": "dpo", **objective}}


def test_dpo_at_init_is_log2_per_pair_and_references_hold_no_needless_copy(llama_dir, tok):
    policy = lora_policy(llama_dir)
    pairs = pairs_of(pref_records(4, seed=5), tok)
    batch = collate([[ex] for ex in pairs], tok.pad_token_id, packed=False)
    runtime = DPORuntime(context(dpo_cfg(beta=0.1), policy, tok, pairs))
    assert runtime.reference.model is None and runtime.reference.kind == "adapter-disabled policy"
    policy.train()
    loss, n = runtime.loss(policy, batch)
    assert int(n) == 4 and loss.requires_grad
    assert float(loss.detach()) / 4 == pytest.approx(math.log(2), abs=1e-5)
    assert runtime.stats() == {"accuracy": 0.0, "margin": 0.0, "reward_chosen": 0.0, "reward_rejected": 0.0}
    assert policy.training  # the reference pass put the policy back in training mode

    full = full_policy(llama_dir)
    ref = Reference(full, None, CPU)
    assert ref.model is not None and ref.model is not full and ref.kind == "frozen copy of the initial policy"
    assert not any(p.requires_grad for p in ref.model.parameters()) and not ref.model.training
    assert all(p.requires_grad for p in full.parameters())  # the policy itself is untouched
    for (name, p), (name2, q) in zip(full.named_parameters(), ref.model.named_parameters(), strict=True):
        assert name == name2 and torch.equal(p, q) and p.data_ptr() != q.data_ptr()
    with torch.no_grad():
        full.model.embed_tokens.weight.add_(1.0)  # a policy update does not reach the reference
    assert not torch.equal(full.model.embed_tokens.weight, ref.model.model.embed_tokens.weight)


def step_policy(policy, batch: dict, seed: int = 0) -> None:
    """One AdamW step on the SFT loss of the chosen rows: the policy now differs from its reference."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=5e-2)
    policy.train()
    logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    b = batch["input_ids"].shape[0] // 2
    labels = batch["labels"][:b, 1:].reshape(-1)
    F.cross_entropy(logits[:b, :-1].reshape(-1, logits.shape[-1]), labels, ignore_index=IGNORE).backward()
    opt.step()
    opt.zero_grad()


@pytest.fixture(scope="module")
def stepped(llama_dir, tok):
    policy = lora_policy(llama_dir)
    pairs = pairs_of(pref_records(6, seed=6), tok)
    batch = collate([[ex] for ex in pairs], tok.pad_token_id, packed=False)
    step_policy(policy, batch)
    return policy, pairs, batch


@pytest.mark.parametrize("loss_type,beta,eps", [("sigmoid", 0.1, 0.0), ("ipo", 0.5, 0.0), ("hinge", 0.1, 0.0),
                                                ("conservative", 0.2, 0.2), ("sigmoid", 0.3, 0.1)])
def test_dpo_loss_matches_the_formula_from_policy_and_reference_logps(stepped, tok, loss_type, beta, eps):
    policy, pairs, batch = stepped
    runtime = DPORuntime(context(dpo_cfg(beta=beta, loss_type=loss_type, label_smoothing=eps), policy, tok, pairs))
    with torch.no_grad():
        loss, n = runtime.loss(policy, batch)
        stats = runtime.stats()
        logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with policy.disable_adapter():
            ref_logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    pi, count = naive_logps(logits, batch["labels"])
    ref, _ = naive_logps(ref_logits, batch["labels"])
    # the library's sequence log-probs agree with the loop
    torch.testing.assert_close(sequence_logps(logits, batch["labels"])[0].double(), pi, rtol=1e-5, atol=1e-5)
    if loss_type == "ipo":  # per-token means
        pi, ref = pi / count, ref / count
    b = len(pairs)
    chosen, rejected = pi[:b] - ref[:b], pi[b:] - ref[b:]
    h = chosen - rejected
    assert h.abs().min() > 1e-4, "the policy step should move the log-ratios"
    if loss_type in ("sigmoid", "conservative"):
        expected = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        expected = (h - 1 / (2 * beta)) ** 2
    else:
        expected = torch.clamp(1 - beta * h, min=0)
    assert int(n) == b
    torch.testing.assert_close(loss.double(), expected.sum(), rtol=1e-4, atol=1e-5)
    assert stats["accuracy"] == pytest.approx(float((h > 0).double().mean()))
    assert stats["margin"] == pytest.approx(float((beta * h).mean()), abs=1e-5)
    assert stats["reward_chosen"] == pytest.approx(float((beta * chosen).mean()), abs=1e-5)
    assert stats["reward_rejected"] == pytest.approx(float((beta * rejected).mean()), abs=1e-5)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_precomputed_reference_gives_the_live_references_loss(llama_dir, tok, method):
    pairs = pairs_of(pref_records(10, seed=7), tok)
    policy = lora_policy(llama_dir) if method == "lora" else full_policy(llama_dir)
    cfg = dpo_cfg(beta=0.2)
    cfg["method"] = {"name": method} if method == "full" else cfg["method"]
    live = DPORuntime(context(cfg, policy, tok, pairs))
    cfg["objective"]["precompute_reference"] = True
    cached = DPORuntime(context(cfg, policy, tok, pairs))
    assert cached.cache is not None and len(cached.cache) == 10 and cached.reference.model is None
    # train batches in another order and size than the precompute's
    batch = collate([[pairs[i]] for i in (7, 2, 9, 0)], tok.pad_token_id, packed=False)
    step_policy(policy, batch)
    with torch.no_grad():
        a, n_a = live.loss(policy, batch)
        b, n_b = cached.loss(policy, batch)
    assert int(n_a) == int(n_b) == 4
    assert abs(float(a) / 4 - math.log(2)) > 1e-4  # the policy moved away from the reference
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert cached.stats() == pytest.approx(live.stats(), abs=1e-6)
    other = collate([[ex] for ex in pairs_of(pref_records(2, seed=99), tok)], tok.pad_token_id, packed=False)
    if method == "lora":  # a pair outside the training set: the adapter-disabled policy is still there
        with torch.no_grad():
            torch.testing.assert_close(cached.loss(policy, other)[0], live.loss(policy, other)[0])
    else:  # the held copy was dropped: a clear error, not a wrong reference
        with pytest.raises(TunelabError, match="precompute_reference"):
            cached.loss(policy, other)


def test_precomputed_explicit_reference_refuses_pairs_outside_the_training_set(llama_dir, tok):
    pairs = pairs_of(pref_records(4, seed=8), tok)
    policy = full_policy(llama_dir)
    cfg = {"method": {"name": "full"},
           "objective": {"name": "dpo", "reference": str(llama_dir), "precompute_reference": True}}
    cached = DPORuntime(context(cfg, policy, tok, pairs))
    assert cached.reference.kind == f"model {llama_dir}"
    step_policy(policy, collate([[ex] for ex in pairs], tok.pad_token_id, packed=False))
    cfg["objective"]["precompute_reference"] = False
    live = DPORuntime(context(cfg, policy, tok, pairs))
    other = collate([[ex] for ex in pairs_of(pref_records(2, seed=98), tok)], tok.pad_token_id, packed=False)
    with torch.no_grad():
        live.loss(policy, other)  # the live reference scores any pair
        with pytest.raises(TunelabError, match="precompute_reference"):  # the dropped one refuses, never guesses
            cached.loss(policy, other)


def test_dpo_refuses_a_reference_with_another_tokenizer(llama_dir, tok, tmp_path):
    from tunelab.modeling.bpe import train_bpe

    other_tok = train_bpe([f"completely different {w} words" for w in tiny.THINGS] * 5, vocab_size=300)
    other = tmp_path / "other"
    AutoModelForCausalLM.from_config(tiny.config("llama", len(other_tok))).save_pretrained(str(other))
    other_tok.save_pretrained(str(other))
    cfg = {"method": {"name": "full"}, "objective": {"name": "dpo", "reference": str(other)}}
    with pytest.raises(TunelabError, match="tokenizer"):
        DPORuntime(context(cfg, full_policy(llama_dir), tok, pairs_of(pref_records(2), tok)))


def test_dpo_lora_run_moves_the_margin_and_logs_eval_accuracy(llama_dir, tmp_path):
    train = tiny.write_jsonl(tmp_path / "train.jsonl", pref_records(32, seed=11))
    evals = tiny.write_jsonl(tmp_path / "eval.jsonl", pref_records(8, seed=12))
    run = tmp_path / "run"
    cfg = {
        "model": {"name_or_path": str(llama_dir)},
        "data": {"train": str(train), "eval": str(evals), "max_length": 64},
        "method": {"name": "lora", "r": 4, "dropout": 0.0},
        "objective": {"name": "dpo", "beta": 0.1},
        "train": {"max_steps": 16, "batch_size": 8, "lr": 5e-3, "scheduler": "constant", "eval_every": 8,
                  "tensorboard": False, "precision": "fp32"},
        "output": {"dir": str(run)},
    }
    result = tunelab.train(cfg, quiet=True)
    assert result.status == "completed"
    lines = metrics_lines(run)
    steps = [m for m in lines if "loss" in m]
    assert len(steps) == 16
    # step 1 is computed before any update: the LoRA policy is its reference
    assert steps[0]["margin"] == 0.0 and steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[0]["trained_tokens"] == 8  # pairs
    late = steps[-4:]
    assert sum(m["margin"] for m in late) / 4 > 0.05 and all(m["loss"] < math.log(2) for m in late), late
    assert sum(m["accuracy"] for m in late) / 4 > 0.5
    evals_seen = [m for m in lines if "eval_loss" in m]
    assert [m["step"] for m in evals_seen] == [8, 16]
    for m in evals_seen:
        assert {"eval_accuracy", "eval_margin", "eval_reward_chosen", "eval_reward_rejected"} <= set(m)
        assert m["eval_tokens"] == 8
        assert m["eval_margin"] == pytest.approx(m["eval_reward_chosen"] - m["eval_reward_rejected"], abs=1e-6)
    assert evals_seen[-1]["eval_margin"] > 0.05 and evals_seen[-1]["eval_accuracy"] > 0.5
    assert evals_seen[-1]["eval_loss"] < math.log(2)


def test_reward_lm_weight_adds_the_chosen_replies_next_token_loss(llama_dir, tok):
    """objective.lm_weight: BT loss + w * (mean token NLL of each chosen reply), the NLL scored through the tied
    embeddings, i.e. exactly what the original causal LM gives; an untied model is refused."""
    from tunelab.objectives.preference import RewardConfig, reward_terms

    lm = AutoModelForCausalLM.from_pretrained(str(llama_dir), tie_word_embeddings=True)
    lm.tie_weights()
    batch = collate([[ex] for ex in pairs_of(pref_records(3, seed=5), tok)], tok.pad_token_id, packed=False)
    with torch.no_grad():
        logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp, n = sequence_logps(logits, batch["labels"])
    reference_nll = -(logp / n)[:3]  # chosen rows come first
    torch.manual_seed(0)
    model = METHODS["head"].apply(lm, HeadConfig(num_labels=1)).eval()
    with torch.no_grad():
        plain, rc, rr = reward_terms(model, batch, RewardConfig(lm_weight=0.0))
        mixed, _, _ = reward_terms(model, batch, RewardConfig(lm_weight=0.5))
    torch.testing.assert_close(plain, -F.logsigmoid(rc - rr))
    torch.testing.assert_close(mixed, plain + 0.5 * reference_nll, rtol=1e-5, atol=1e-5)
    untied = METHODS["head"].apply(AutoModelForCausalLM.from_pretrained(str(llama_dir), tie_word_embeddings=False),
                                   HeadConfig(num_labels=1))
    if not untied.config.tie_word_embeddings:
        with pytest.raises(TunelabError, match="tied"):
            reward_terms(untied, batch, RewardConfig(lm_weight=0.5))


@pytest.mark.parametrize("tied", [True, False])
def test_likelihood_reward_is_the_head_plus_a_scaled_reply_loglik_of_the_causal_lm(llama_dir, tok, tied):
    """method.likelihood=reply: r = w . h_last + b + a * sum over reply tokens of log p(token | before), the
    log-probs exactly the original causal LM's (tied embeddings or its own LM head), written as python loops."""
    lm = AutoModelForCausalLM.from_pretrained(str(llama_dir), tie_word_embeddings=tied)
    lm.tie_weights()
    assert (lm.get_output_embeddings().weight is lm.get_input_embeddings().weight) == tied
    batch = collate([[ex] for ex in pairs_of(pref_records(3, seed=6), tok)], tok.pad_token_id, packed=False)
    with torch.no_grad():
        logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        hidden = lm.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    loglik, _ = naive_logps(logits, batch["labels"])
    last = [max(i for i, m in enumerate(row) if m) for row in batch["attention_mask"].tolist()]
    torch.manual_seed(0)
    model = METHODS["head"].apply(lm, HeadConfig(num_labels=1, likelihood="reply")).eval()
    assert (model.lm_head is None) == tied
    assert float(model.likelihood_scale.detach()) == 1.0 and model.likelihood_scale.requires_grad
    with torch.no_grad():
        model.likelihood_scale.fill_(0.7)
        model.head.bias.fill_(0.3)
        head = torch.stack([model.head(hidden[i, t]).double()[0] for i, t in enumerate(last)])
        got = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).logits[:, 0]
    torch.testing.assert_close(got.double(), head + 0.7 * loglik, rtol=1e-5, atol=1e-4)
    # the same prompt's chosen and rejected replies differ by their likelihood, as the LM judges them
    assert loglik[:3].sub(loglik[3:]).abs().min() > 1e-3
    with pytest.raises(TunelabError, match="reply span"):
        model(batch["input_ids"], batch["attention_mask"])


def test_likelihood_reward_head_options_follow_the_body(llama_dir):
    with pytest.raises(ValueError, match="scalar reward head"):
        HeadConfig(num_labels=2, likelihood="pmi")
    assert HeadConfig(num_labels=1, likelihood=False).likelihood == "off"  # YAML's bare `off`
    for body, trains in (("full", True), ("frozen", False), ("lora", False)):
        lm = AutoModelForCausalLM.from_pretrained(str(llama_dir), tie_word_embeddings=False)
        model = METHODS["head"].apply(lm, HeadConfig(num_labels=1, likelihood="pmi", body=body))
        assert model.lm_head is not None
        assert all(p.requires_grad == trains for p in model.lm_head.parameters()), body
        assert model.likelihood_scale.requires_grad  # the mix always learns


def test_likelihood_reward_model_trains_saves_and_reloads(llama_dir, tok, tmp_path):
    train = tiny.write_jsonl(tmp_path / "train.jsonl", pref_records(32, seed=1))
    evals = tiny.write_jsonl(tmp_path / "eval.jsonl", pref_records(8, seed=2))
    run = tmp_path / "run"
    cfg = {
        "model": {"name_or_path": str(llama_dir)},
        "data": {"train": str(train), "eval": str(evals), "max_length": 64},
        "method": {"name": "head", "num_labels": 1, "likelihood": "pmi"},
        "objective": {"name": "reward", "lm_weight": 0.5},
        "train": {"max_steps": 8, "batch_size": 8, "lr": 3e-3, "scheduler": "constant", "eval_every": 8,
                  "tensorboard": False, "precision": "fp32"},
        "output": {"dir": str(run)},
    }
    result = tunelab.train(cfg, quiet=True)
    assert result.status == "completed"
    model, tok2 = tunelab.load(run)
    assert is_reward_model(model) and model.likelihood_scale is not None
    assert float(model.likelihood_scale.detach()) != 1.0  # it learned, and the learned value came back
    template = resolve_template(None, tok2)
    assert model.null_prompt().tolist() == list(tok2(render(tok2, template, [{"role": "user", "content": ""}],
                                                             gen=True), add_special_tokens=False)["input_ids"])
    records = pref_records(8, seed=2)
    items = [(r["prompt"], r["chosen"]) for r in records] + [(r["prompt"], r["rejected"]) for r in records]
    rewards = torch.tensor(rewards_of(model, tok2, items))
    again, _ = tunelab.load(run)
    torch.testing.assert_close(torch.tensor(rewards_of(again, tok2, items)), rewards)
    m = tunelab.api.evaluate_task(run, str(evals))
    assert m["accuracy"] == pytest.approx(float((rewards[:8] > rewards[8:]).double().mean()))


def test_pmi_reward_subtracts_the_replys_likelihood_after_an_empty_user_turn(llama_dir, tok):
    """method.likelihood=pmi: r = head + a * [log p(y | x) - log p(y | x0)], x0 the chat template's empty user
    turn + assistant header; both log-probs from the causal LM on rows built by hand."""
    from tunelab.data.preference import null_prompt_ids
    from tunelab.objectives.preference import RewardRuntime

    lm = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    template = resolve_template(None, tok)
    null = list(tok(render(tok, template, [{"role": "user", "content": ""}], gen=True),
                    add_special_tokens=False)["input_ids"])
    assert null_prompt_ids(tok, template) == null
    pairs = pairs_of(pref_records(3, seed=7), tok)
    batch = collate([[ex] for ex in pairs], tok.pad_token_id, packed=False)
    expected = []
    with torch.no_grad():
        for ex in [*pairs, *(ex.rejected for ex in pairs)]:
            reply = trained(ex)
            rows = [(ex.input_ids, ex.labels), (null + reply, [IGNORE] * len(null) + reply)]
            lp = [naive_logps(lm(torch.tensor([ids])).logits, torch.tensor([lab]))[0][0] for ids, lab in rows]
            expected.append(lp[0] - lp[1])
    torch.manual_seed(0)
    model = METHODS["head"].apply(lm, HeadConfig(num_labels=1, likelihood="pmi")).eval()
    with pytest.raises(TunelabError, match="no null prompt"):
        model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
    RewardRuntime(context({"method": {"name": "head", "num_labels": 1, "likelihood": "pmi"},
                           "objective": {"name": "reward"}}, model, tok))  # sets the null prompt
    assert model.null_prompt().tolist() == null
    with torch.no_grad():
        model.likelihood_scale.fill_(0.5)
        hidden = model.body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        last = [max(i for i, m in enumerate(row) if m) for row in batch["attention_mask"].tolist()]
        head = torch.stack([model.head(hidden[i, t]).double()[0] for i, t in enumerate(last)])
        got = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).logits[:, 0]
    torch.testing.assert_close(got.double(), head + 0.5 * torch.stack(expected), rtol=1e-5, atol=1e-4)
    with pytest.raises(TunelabError, match="1 to 64"):
        model.set_null_prompt(list(range(65)))
