"""O12 beside DPO: `simpo` and `orpo` (objectives/preference_free.py), `kto` (objectives/kto.py).

Their pure losses (objectives/preference_losses.py) against naive float64 references written here
(loops over examples, explicit sigmoid / log / odds formulas; values and gradients); their runtimes
against log-probs summed by python loops; the `unpaired` format; short runs on a tiny model.
"""

from __future__ import annotations

import math
from dataclasses import replace
from decimal import Decimal, localcontext

import pytest
import torch

import tunelab
from tests import tiny
from tests.test_alignment_losses import assert_same, randn
from tests.test_objectives_preference import (
    context,
    full_policy,
    lora_policy,
    metrics_lines,
    naive_logps,
    pairs_of,
    pref_records,
)
from tunelab.config import DataConfig
from tunelab.data.collate import collate
from tunelab.data.pipeline import load_tokenized
from tunelab.data.preference import reply_example
from tunelab.data.templates import resolve_template
from tunelab.data.types import IGNORE, Example
from tunelab.errors import ConfigError, DataError, TunelabError
from tunelab.objectives import OBJECTIVES
from tunelab.objectives.kto import KTORuntime, mismatched_batch
from tunelab.objectives.preference_losses import kto_loss, kto_reference_point, log1mexp, orpo_loss, simpo_loss
from tunelab.runconfig import build_config

F64 = torch.float64


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + torch.exp(-x))


def mean_logps(n: int, seed: int) -> torch.Tensor:
    """(n,) per-token mean log-probs: negative, some near 0 (P near 1), none at it."""
    return -(randn(n, seed=seed).abs() * 2 + 0.01)


# ----------------------------------------------------------------------------- pure losses


@pytest.mark.parametrize("beta, ratio", [(2.0, 0.5), (2.5, 0.0), (0.7, 1.3)])
def test_simpo_loss_matches_a_loop_over_pairs(beta, ratio):
    def ref(chosen, rejected):
        gamma = ratio * beta
        return torch.stack([-torch.log(sigmoid(beta * c - beta * r - gamma))
                            for c, r in zip(chosen, rejected, strict=True)])

    chosen, rejected = mean_logps(7, seed=1), mean_logps(7, seed=2)
    assert_same(lambda c, r: simpo_loss(c, r, beta=beta, gamma_beta_ratio=ratio)[0], ref, chosen, rejected)
    c = chosen.clone().requires_grad_()
    _, r_chosen, r_rejected = simpo_loss(c, rejected, beta=beta, gamma_beta_ratio=ratio)
    torch.testing.assert_close(r_chosen, beta * chosen)
    torch.testing.assert_close(r_rejected, beta * rejected)
    assert not r_chosen.requires_grad


@pytest.mark.parametrize("weight", [0.1, 1.0, 0.0])
def test_orpo_loss_matches_a_loop_over_pairs(weight):
    def odds(m: torch.Tensor) -> torch.Tensor:
        p = torch.exp(m)
        return p / (1 - p)

    def ref(chosen, rejected):
        rows = []
        for c, r in zip(chosen, rejected, strict=True):
            ratio = torch.log(odds(c)) - torch.log(odds(r))
            rows.append(-c - weight * torch.log(sigmoid(ratio)))
        return torch.stack(rows)

    chosen, rejected = mean_logps(7, seed=3), mean_logps(7, seed=4)
    assert_same(lambda c, r: orpo_loss(c, r, weight=weight)[0], ref, chosen, rejected)
    _, nll, ratio = orpo_loss(chosen.clone().requires_grad_(), rejected, weight=weight)
    torch.testing.assert_close(nll, -chosen)
    torch.testing.assert_close(ratio, torch.log(odds(chosen)) - torch.log(odds(rejected)))
    assert not nll.requires_grad and not ratio.requires_grad


def log1mexp_exact(x: float) -> float:
    """log(1 - e^x) in 200-digit decimal arithmetic: no cancellation to worry about (e^-200 ~ 1e-87)."""
    with localcontext() as ctx:
        ctx.prec = 200
        return float((1 - Decimal(x).exp()).ln())


XS = [-1e-6, -1e-4, -0.01, -0.5, -math.log(2) + 1e-9, -math.log(2), -0.7, -3.0, -30.0, -200.0]


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_log1mexp_is_accurate_from_p_near_1_to_p_near_0(dtype, rtol):
    x = torch.tensor(XS, dtype=dtype)
    exact = torch.tensor([log1mexp_exact(float(v)) for v in x], dtype=F64)  # of the inputs as rounded to dtype
    rounded = exact.to(dtype).double()  # e^-200 is below float32's range: its nearest float32 is 0
    torch.testing.assert_close(log1mexp(x).double(), rounded, rtol=rtol, atol=0)
    if dtype == torch.float32:  # the naive formula loses the digits log1mexp keeps, at both ends
        naive = torch.log(1 - torch.exp(x)).double()
        assert (naive - exact).abs()[0] > 1e-3 > 1e-5 > (log1mexp(x).double() - exact).abs()[0]
        assert XS[8] == -30.0 and naive[8] == 0 and exact[8] < -1e-14
    x64 = torch.tensor(XS, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(log1mexp(x64).sum(), x64)
    torch.testing.assert_close(g, torch.tensor([-1 / math.expm1(-v) for v in XS], dtype=F64), rtol=1e-9, atol=0)  # d/dx


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orpo_is_finite_when_a_reply_is_certain(dtype):
    """P = 1 (mean log-prob 0, e.g. a reply the model cannot miss) and P within rounding of 1: log(1 - P) is clamped
    at the dtype's epsilon, the loss stays finite, and the chosen reply still gets its NLL gradient."""
    eps = torch.finfo(dtype).eps
    chosen = torch.tensor([0.0, -eps / 4, -1e-3, -2.0], dtype=dtype, requires_grad=True)
    rejected = torch.tensor([-1.0, 0.0, -eps / 4, -3.0], dtype=dtype, requires_grad=True)
    losses, _, ratio = orpo_loss(chosen, rejected, weight=0.1)
    assert torch.isfinite(losses).all() and torch.isfinite(ratio).all()
    clamped = log1mexp(torch.tensor(-eps, dtype=dtype))
    assert torch.equal(log1mexp(chosen[:2].detach()), clamped.expand(2)) and math.isfinite(float(clamped))
    gc, gr = torch.autograd.grad(losses.sum(), [chosen, rejected])
    assert torch.isfinite(gc).all() and torch.isfinite(gr).all()
    assert (gc < 0).all()  # raising any chosen log-prob lowers the loss, the certain ones too (their NLL)
    assert gr[1] > 0  # a certain rejected reply is still pushed down, through log P in its log odds


def test_kto_loss_matches_a_loop_over_examples_and_its_reference_point_is_a_floored_constant():
    desirable = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    beta, w_d, w_u = 0.2, 1.0, 1.33
    z0 = torch.tensor(0.3, dtype=F64)

    def ref(policy, reference):
        rows = []
        for p, q, good in zip(policy, reference, desirable.tolist(), strict=True):
            r = p - q
            rows.append(w_d * (1 - sigmoid(beta * (r - z0))) if good else w_u * (1 - sigmoid(beta * (z0 - r))))
        return torch.stack(rows)

    def fn(policy, reference):
        return kto_loss(policy, reference, desirable, z0, beta=beta, desirable_weight=w_d,
                        undesirable_weight=w_u)[0]

    policy, reference = randn(8, seed=5, scale=4), randn(8, seed=6, scale=4)
    assert_same(fn, ref, policy, reference)
    _, rewards = kto_loss(policy, reference, desirable, z0, beta=beta)
    torch.testing.assert_close(rewards, beta * (policy - reference))

    z = z0.clone().requires_grad_()
    kto_loss(policy.clone().requires_grad_(), reference, desirable, z, beta=beta)[0].sum().backward()
    assert z.grad is None  # z0 is a constant of the loss
    ratios = torch.tensor([1.0, 2.5, -0.5], dtype=F64, requires_grad=True)
    assert float(kto_reference_point(ratios)) == pytest.approx(1.0) and not kto_reference_point(ratios).requires_grad
    assert float(kto_reference_point(torch.tensor([1.0, -3.0]))) == 0.0  # the KL estimate is floored at 0


# ----------------------------------------------------------------------------- simpo and orpo on a model


def simpo_expected(chosen, rejected, cfg) -> torch.Tensor:
    gamma = cfg.gamma_beta_ratio * cfg.beta
    return torch.stack([-torch.log(sigmoid(cfg.beta * c - cfg.beta * r - gamma))
                        for c, r in zip(chosen, rejected, strict=True)])


def orpo_expected(chosen, rejected, cfg) -> torch.Tensor:
    def log_odds(m):
        return torch.log(torch.exp(m) / (1 - torch.exp(m)))

    return torch.stack([-c - cfg.odds_ratio_weight * torch.log(sigmoid(log_odds(c) - log_odds(r)))
                        for c, r in zip(chosen, rejected, strict=True)])


def one_token_reply(ex: Example) -> Example:
    """The example with only its first trained token trained: a reply of one token."""
    first = next(i for i, x in enumerate(ex.labels) if x != IGNORE)
    return replace(ex, labels=[IGNORE] * first + [ex.labels[first]] + [IGNORE] * (len(ex.labels) - first - 1))


@pytest.mark.parametrize("name, objective, expected", [
    ("simpo", {"beta": 2.0, "gamma_beta_ratio": 0.5}, simpo_expected),
    ("simpo", {"beta": 0.5, "gamma_beta_ratio": 0.0}, simpo_expected),
    ("orpo", {"odds_ratio_weight": 0.1}, orpo_expected),
    ("orpo", {"odds_ratio_weight": 2.0}, orpo_expected),
])
def test_reference_free_losses_read_the_policys_mean_reply_logps(llama_dir, tok, name, objective, expected):
    pairs = pairs_of(pref_records(4, seed=5), tok)
    pairs[0] = replace(one_token_reply(pairs[0]), rejected=pairs[0].rejected)  # a chosen reply of one token
    pairs[1] = replace(pairs[1], rejected=one_token_reply(pairs[1].rejected))  # a rejected one
    batch = collate([[ex] for ex in pairs], tok.pad_token_id, packed=False)
    model = full_policy(llama_dir)
    cfg = {"method": {"name": "full"}, "objective": {"name": name, **objective}}
    said = []
    runtime = OBJECTIVES[name].make_runtime(replace(context(cfg, model, tok, pairs), say=said.append))
    assert said and "no reference model" in said[0]
    with torch.no_grad():
        loss, n = runtime.loss(model, batch)
        plain, n_plain = OBJECTIVES[name].loss(model, batch, runtime.cfg)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    sums, counts = naive_logps(logits, batch["labels"])
    assert counts[0] == 1 and counts[5] == 1
    means = sums / counts
    b = len(pairs)
    chosen, rejected = means[:b], means[b:]
    assert int(n) == int(n_plain) == b
    torch.testing.assert_close(loss.double(), expected(chosen, rejected, runtime.cfg).sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, loss)
    stats = runtime.stats()
    if name == "simpo":
        beta = runtime.cfg.beta
        assert stats["accuracy"] == pytest.approx(float((chosen > rejected).double().mean()))
        assert stats["margin"] == pytest.approx(float((beta * (chosen - rejected)).mean()), abs=1e-5)
        assert stats["reward_chosen"] == pytest.approx(float(beta * chosen.mean()), abs=1e-5)
    else:
        assert stats["nll"] == pytest.approx(float(-chosen.mean()), abs=1e-5)
        assert stats["accuracy"] == pytest.approx(float((chosen > rejected).double().mean()))  # log odds is monotone
    assert runtime.stats() == {}


@pytest.mark.parametrize("name", ["simpo", "orpo"])
def test_reference_free_objectives_hold_no_reference_and_refuse_unpaired_batches(llama_dir, tok, name):
    policy = full_policy(llama_dir)
    n_params = sum(p.numel() for p in policy.parameters())
    runtime = OBJECTIVES[name].make_runtime(context({"method": {"name": "full"}, "objective": {"name": name}},
                                                    policy, tok))
    assert not any(isinstance(v, torch.nn.Module) for v in vars(runtime).values())
    assert sum(p.numel() for p in policy.parameters()) == n_params
    single = collate([[replace(ex, rejected=None)] for ex in pairs_of(pref_records(2), tok)], tok.pad_token_id,
                     packed=False)
    with pytest.raises(TunelabError, match="preference data"):
        runtime.loss(policy, single)


# ----------------------------------------------------------------------------- unpaired data


def unpaired_records(n: int, seed: int = 0) -> list[dict]:
    """The replies of pref_records rated one by one (the chosen one, with the marker word, desirable),
    interleaved so that neighbours never share a prompt."""
    pairs = pref_records(n, seed)
    return [{"prompt": p["prompt"], "completion": p[key], "label": key == "chosen"}
            for first in (True, False) for i, p in enumerate(pairs)
            for key in ["chosen" if (i % 2 == 0) == first else "rejected"]]


def load_unpaired(path, tok, **data):
    return load_tokenized(DataConfig(train=str(path), **data), "train", tok, mask_prompt=True,
                          formats=("unpaired",), log=tiny.quiet)


def trained(ex: Example) -> list[int]:
    return [x for x in ex.labels if x != IGNORE]


def test_unpaired_records_train_the_completion_only_and_carry_their_rating(tmp_path, tok):
    records = unpaired_records(3, seed=1)
    data = load_unpaired(tiny.write_jsonl(tmp_path / "u.jsonl", records), tok)
    assert data.stats["format"] == "unpaired" and len(data.examples) == 6
    template = resolve_template(None, tok)
    for ex, r in zip(data.examples, records, strict=True):
        assert ex.label == int(r["label"]) and ex.rejected is None
        assert tok.decode(trained(ex)).strip() == r["completion"] + "<|im_end|>"
        assert ex.input_ids == reply_example(r["prompt"], r["completion"], tok, template, "").input_ids
    ratings = collate([[ex] for ex in data.examples], tok.pad_token_id, packed=False)["label"]  # (B,)
    assert ratings.tolist() == [int(r["label"]) for r in records]


def test_bad_unpaired_records_are_listed_and_packing_is_refused(tmp_path, tok):
    path = tiny.write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "what colour is the lamp?", "completion": "red", "label": True},
        {"prompt": "q?", "completion": "red", "label": "yes"},
        {"prompt": "q?", "completion": "red", "label": 1},
        {"prompt": "q?", "completion": "", "label": False},
        {"prompt": "q?", "label": False, "completion": 3},
        {"prompt": "q?", "completion": "red"},
    ])
    with pytest.raises(DataError) as e:
        load_unpaired(path, tok, format="unpaired")
    assert "5 bad record(s) of 6" in str(e.value)
    for line, reason in ((2, "label must be true (desirable) or false (undesirable), got string 'yes'"),
                         (3, "got int 1"), (4, "completion is empty"), (5, "completion must be a string"),
                         (6, "missing field 'label'")):
        assert any(p.startswith(f"{path}:{line}: ") and reason in p for p in e.value.problems), (line, e.value.problems)
    good = tiny.write_jsonl(tmp_path / "good.jsonl", unpaired_records(2))
    with pytest.raises(DataError, match="packing"):
        load_unpaired(good, tok, packing=True)


def test_a_message_list_prompt_trains_only_the_final_reply(tok):
    """Assistant turns inside a prompt are context: the mean log-probs of simpo / orpo and kto's sums read the
    reply alone."""
    prompt = [{"role": "user", "content": "what colour is the lamp?"}, {"role": "assistant", "content": "blue"},
              {"role": "user", "content": "and the stone?"}]
    ex = reply_example(prompt, "red number", tok, resolve_template(None, tok), "")
    assert tok.decode(trained(ex)).strip() == "red number<|im_end|>"


# ----------------------------------------------------------------------------- kto on a model


def kto_cfg(**objective) -> dict:
    return {"method": {"name": "full"}, "objective": {"name": "kto", **objective}, "data": {"max_length": 64}}


def split(ex: Example) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of an unpaired example, from the example itself."""
    first = next(i for i, x in enumerate(ex.labels) if x != IGNORE)
    last = max(i for i, x in enumerate(ex.labels) if x != IGNORE)
    return ex.input_ids[:first], ex.input_ids[first:last + 1]


def logp_of(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log p(completion | prompt), one sequence, summed by naive_logps' loop."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits
    return naive_logps(logits, torch.tensor([[IGNORE] * len(prompt) + completion]))[0][0]


@pytest.fixture(scope="module")
def unpaired_batch(tmp_path_factory, tok):
    path = tiny.write_jsonl(tmp_path_factory.mktemp("kto") / "u.jsonl", unpaired_records(3, seed=4))
    examples = load_unpaired(path, tok).examples
    return examples, collate([[ex] for ex in examples], tok.pad_token_id, packed=False)


def test_mismatched_rows_are_each_prompt_with_the_previous_rows_completion(unpaired_batch, tok):
    examples, batch = unpaired_batch
    parts = [split(ex) for ex in examples]
    for max_length in (64, 20):
        rows = mismatched_batch(batch, tok.pad_token_id, max_length)
        for i, (prompt, _) in enumerate(parts):
            completion = parts[i - 1][1]  # row 0 takes the last row's
            n = int(rows["attention_mask"][i].sum())
            assert rows["input_ids"][i, :n].tolist() == (prompt + completion)[:max_length]
            assert rows["labels"][i, 1:n].tolist() == ([IGNORE] * len(prompt) + completion)[1:max_length]
        assert rows["input_ids"].shape[1] <= max_length


@pytest.mark.parametrize("beta, w_d, w_u", [(0.1, 1.0, 1.0), (0.5, 0.8, 1.3)])
def test_kto_loss_is_the_formula_over_loop_computed_log_ratios(llama_dir, tok, unpaired_batch, beta, w_d, w_u):
    examples, batch = unpaired_batch
    policy = full_policy(llama_dir)
    runtime = KTORuntime(context(kto_cfg(beta=beta, desirable_weight=w_d, undesirable_weight=w_u), policy, tok))
    assert runtime.reference.kind == "frozen copy of the initial policy"
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy away from its reference
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    policy.eval()
    with torch.no_grad():
        loss, n = runtime.loss(policy, batch)
    stats = runtime.stats()
    ref = runtime.reference.model
    parts = [split(ex) for ex in examples]
    r = torch.stack([logp_of(policy, p, c) - logp_of(ref, p, c) for p, c in parts])
    mismatched = [(p, parts[i - 1][1]) for i, (p, _) in enumerate(parts)]
    kl = torch.stack([logp_of(policy, p, c) - logp_of(ref, p, c) for p, c in mismatched]).mean()
    z0 = max(float(kl), 0.0)
    expected = sum(w_d * (1 - 1 / (1 + math.exp(-beta * (float(ri) - z0)))) if ex.label == 1 else
                   w_u * (1 - 1 / (1 + math.exp(-beta * (z0 - float(ri)))))
                   for ri, ex in zip(r, examples, strict=True))
    assert r.abs().min() > 1e-3, "the policy should differ from its reference"
    assert int(n) == len(examples)
    assert float(loss) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert stats["kl"] == pytest.approx(z0, abs=1e-6)
    good = [float(beta * ri) for ri, ex in zip(r, examples, strict=True) if ex.label == 1]
    assert stats["reward_desirable"] == pytest.approx(sum(good) / len(good), abs=1e-5)


def test_kto_refuses_accumulation_a_batch_of_one_and_pair_data(llama_dir, tok):
    for train, why in (({"grad_accum": 2}, "gradient accumulation"), ({"batch_size": 1}, "batch_size >= 2")):
        with pytest.raises(ConfigError, match=why):
            build_config({**kto_cfg(), "train": train})
    policy = lora_policy(llama_dir)
    runtime = KTORuntime(context(kto_cfg(), policy, tok))
    assert runtime.reference.model is None  # peft: the adapter-disabled policy
    pairs = collate([[ex] for ex in pairs_of(pref_records(2), tok)], tok.pad_token_id, packed=False)
    with pytest.raises(TunelabError, match="unpaired data"):
        runtime.loss(policy, pairs)


# ----------------------------------------------------------------------------- short runs


def short_run(llama_dir, tmp_path, name: str, records: list[dict], evals: list[dict] | None, **objective) -> list[dict]:
    run = tmp_path / name
    cfg = {
        "model": {"name_or_path": str(llama_dir)},
        "data": {"train": str(tiny.write_jsonl(tmp_path / f"{name}-train.jsonl", records)), "max_length": 64,
                 "eval": str(tiny.write_jsonl(tmp_path / f"{name}-eval.jsonl", evals)) if evals else None},
        "method": {"name": "lora", "r": 4, "dropout": 0.0},
        "objective": {"name": name, **objective},
        "train": {"max_steps": 16, "batch_size": 8, "lr": 5e-3, "scheduler": "constant", "eval_every": 8,
                  "tensorboard": False, "precision": "fp32"},
        "output": {"dir": str(run)},
    }
    assert tunelab.train(cfg, quiet=True).status == "completed"
    return metrics_lines(run)


def mean(lines: list[dict], key: str) -> float:
    return sum(m[key] for m in lines) / len(lines)


@pytest.mark.parametrize("name, key", [("simpo", "margin"), ("orpo", "log_odds_ratio")])
def test_reference_free_runs_widen_the_preference_margin(llama_dir, tmp_path, name, key):
    lines = short_run(llama_dir, tmp_path, name, pref_records(32, seed=11), pref_records(8, seed=12))
    steps = [m for m in lines if "loss" in m]
    evals = [m for m in lines if "eval_loss" in m]
    assert len(steps) == 16 and steps[0]["trained_tokens"] == 8  # pairs
    assert mean(steps[-4:], key) > steps[0][key] + 0.1, [m[key] for m in steps]
    assert mean(steps[-4:], "loss") < steps[0]["loss"]
    assert [m["step"] for m in evals] == [8, 16] and evals[-1][f"eval_{key}"] > evals[0][f"eval_{key}"]
    assert evals[-1]["eval_accuracy"] > 0.5 and evals[0]["eval_tokens"] == 8
    if name == "orpo":  # the SFT term trains the chosen replies too
        assert mean(steps[-4:], "nll") < steps[0]["nll"]


def test_kto_run_raises_the_desirable_reward_above_the_undesirable(llama_dir, tmp_path):
    lines = short_run(llama_dir, tmp_path, "kto", unpaired_records(32, seed=11), unpaired_records(8, seed=12))
    steps = [m for m in lines if "loss" in m]
    assert len(steps) == 16 and steps[0]["trained_tokens"] == 8  # examples, not tokens
    # step 1 runs before any update: the LoRA policy is its own reference, every log-ratio 0
    assert steps[0]["reward_desirable"] == steps[0]["kl"] == 0.0 and steps[0]["loss"] == pytest.approx(0.5)
    late = steps[-4:]
    assert mean(late, "reward_desirable") > 0.05 and mean(late, "reward_desirable") > mean(late, "reward_undesirable")
    assert mean(late, "loss") < 0.5
    evals = [m for m in lines if "eval_loss" in m]
    assert evals[-1]["eval_reward_desirable"] > evals[-1]["eval_reward_undesirable"] and evals[0]["eval_tokens"] == 16

