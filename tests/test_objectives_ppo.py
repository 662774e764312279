"""Objective `ppo` (O05): rollouts, KL-penalised rewards, GAE, the clipped losses, a run end to end."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import tunelab
from tests import tiny
from tunelab.artifacts import save_artifact
from tunelab.config import ModelConfig
from tunelab.data.pipeline import load_tokenized
from tunelab.data.stream import BatchStream
from tunelab.data.types import IGNORE
from tunelab.errors import ConfigError, DataError, TunelabError
from tunelab.inference.generation import drop_lead, greedy, reply_lead
from tunelab.inference.reward import rewards_of
from tunelab.methods import METHODS
from tunelab.methods.heads import HeadConfig
from tunelab.objectives import OBJECTIVES
from tunelab.objectives.alignment_losses import entropy_from_logits, gae, masked_mean, masked_whiten
from tunelab.objectives.ppo import VALUE_HEAD, PPORuntime, RolloutStream, right_pad
from tunelab.objectives.registry import RunContext
from tunelab.objectives.rewards import REWARDS, exact_match, register_reward
from tunelab.runconfig import build_config

CPU = torch.device("cpu")
PNG = b"\x89PNG\r\n\x1a\n"
STOP_BOOST = 4.5  # added to the <|im_end|> logit: replies of the random model end at different lengths


def prompt_records(n: int, offset: int = 0) -> list[dict]:
    """Prompts of three different lengths."""
    things = tiny.THINGS
    return [{"prompt": f"what colour is the {things[(i + offset) % len(things)]}?" + " and the stone?" * (i % 3)}
            for i in range(n)]


@pytest.fixture(scope="module")
def files(tmp_path_factory, llama_dir, tok) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ppo")
    # a scalar-head reward model, saved as tunelab saves a `head` run's final model (a delta artifact)
    torch.manual_seed(0)
    rm = METHODS["head"].apply(AutoModelForCausalLM.from_pretrained(str(llama_dir)), HeadConfig(num_labels=1))
    with torch.no_grad():
        rm.head.weight.normal_(0, 1.0)  # rewards of order 1, not ~0
        rm.head.bias.fill_(0.3)
    save_artifact(rm, tok, HeadConfig(num_labels=1), ModelConfig(name_or_path=str(llama_dir)), d / "rm")
    return {
        "rm": d / "rm",
        "train": tiny.write_jsonl(d / "prompts.jsonl", prompt_records(16)),
        "eval": tiny.write_jsonl(d / "eval_prompts.jsonl", prompt_records(4, offset=3)),
        "prefs": tiny.write_jsonl(d / "prefs.jsonl", [{"prompt": "q?", "chosen": "red", "rejected": "blue"}] * 4),
    }


@pytest.fixture(scope="module")
def reward_model(files):
    model, rm_tok = tunelab.load(files["rm"])
    return model.eval(), rm_tok


def prompt_of(path: Path) -> dict[str, str]:
    return {f"{path}:{i}": json.loads(line)["prompt"]
            for i, line in enumerate(path.read_text().splitlines(), start=1)}


def lora_policy(llama_dir: Path, tok):
    base = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    boost = torch.zeros(len(tok))
    boost[tok.convert_tokens_to_ids("<|im_end|>")] = STOP_BOOST
    # on the base's head: the policy and its adapter-disabled reference both see it
    base.lm_head.register_forward_hook(lambda mod, args, out: out + boost)
    return METHODS["lora"].apply(base, build_config({"method": {"name": "lora", "r": 4, "dropout": 0.0}}).method)


def make_runtime(llama_dir, tok, files, policy=None, batch_size: int = 4, **objective):
    cfg = build_config({
        "model": {"name_or_path": str(llama_dir)},
        "data": {"train": str(files["train"]), "max_length": 64},
        "method": {"name": "lora", "r": 4, "dropout": 0.0},
        "objective": {"name": "ppo", "rollout_prompts": 6, "max_new_tokens": 6,
                      **({} if "reward" in objective else {"reward_model": str(files["rm"])}), **objective},
        "train": {"batch_size": batch_size, "seed": 3},
    })
    policy = policy if policy is not None else lora_policy(llama_dir, tok)
    data = load_tokenized(cfg.data, "train", tok, mask_prompt=True, formats=("prompt",), log=tiny.quiet)
    runtime = OBJECTIVES["ppo"].make_runtime(RunContext(cfg, policy, tok, CPU, tiny.quiet, data.examples,
                                                        tok.pad_token_id))
    stream = runtime.stream(BatchStream(data.examples, batch_size=batch_size, packing=False, max_length=64,
                                        seed=3, pad_id=tok.pad_token_id))
    return runtime, stream, policy


def reply_ids(mb, row: int) -> list[int]:
    t = mb.tensors
    return [int(x) for x in t["labels"][row] if int(x) != IGNORE]


def metrics_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- right_pad


def test_right_pad_lays_out_rows_with_a_mask_and_reply_only_labels():
    rows = [[5, 6, 7, 8, 9], [11, 12], [21, 22, 23, 24]]
    n_query = [3, 1, 4]  # the last row has an empty reply
    out = right_pad(rows, n_query, pad=0)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    assert all(v.dtype == torch.long and v.shape == (3, 5) for v in out.values())
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9], [11, 12, 0, 0, 0], [21, 22, 23, 24, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]]
    i = IGNORE
    assert out["labels"].tolist() == [[i, i, i, 8, 9], [i, 12, i, i, i], [i, i, i, i, i]]
    # the pad id is what fills, never a label
    assert right_pad([[1], [2, 3]], [0, 1], pad=7)["input_ids"].tolist() == [[1, 7], [2, 3]]


# ----------------------------------------------------------------------------- rollouts


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.8, 0.9)])
def test_rollout_at_init_has_zero_kl_and_the_score_at_the_last_reply_token(llama_dir, tok, files, reward_model,
                                                                           gamma, lam):
    runtime, stream, policy = make_runtime(llama_dir, tok, files, gamma=gamma, lam=lam, kl_coef=0.0,
                                           kl_target=None)
    assert isinstance(runtime, PPORuntime) and isinstance(stream, RolloutStream)
    assert runtime.reference.kind == "adapter-disabled policy"
    head = getattr(policy, VALUE_HEAD)
    assert not head.proj.weight.detach().any() and not head.proj.bias.detach().any()  # zero-initialised
    assert stream.micro_batches_per_epoch() == 2 * math.ceil(6 / 4)
    mbs = stream.next_group(4)  # one rollout: 2 epochs x (4 + 2) replies
    assert runtime.pending is None and runtime.n_rollouts == 1  # the rollout is used up
    assert [len(mb.where) for mb in mbs] == [4, 2, 4, 2]
    first, second = mbs[:2], mbs[2:]
    where = [w for mb in first for w in mb.where]
    assert sorted(where) == sorted(w for mb in second for w in mb.where) and len(set(where)) == 6

    prompts = prompt_of(files["train"])
    rm, rm_tok = reward_model
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    lengths, scores, all_adv, all_ret, all_mask = [], [], [], [], []
    for mb in first:
        t = mb.tensors
        mask = t["reply_mask"]
        assert mask.dtype == torch.bool and mask.shape == t["advantages"].shape == t["returns"].shape
        assert t["input_ids"].shape[1] == mask.shape[1] + 1
        assert torch.equal(mask, t["labels"][:, 1:] != IGNORE)
        assert mb.n_trained == int(mask.sum()) and mb.n_real == int(t["attention_mask"].sum())
        assert int(t["attention_mask"][:, -1].max()) == 1  # no all-padding column
        replies = [reply_ids(mb, r) for r in range(len(mb.where))]
        for r, ids in enumerate(replies):
            n = len(ids)
            assert 1 <= n <= 6 and (n == 6 or ids[-1] == im_end)  # cut just after the stop token
            first_reply = int(t["attention_mask"][r].sum()) - n  # reply follows the prompt, then padding
            assert t["input_ids"][r, first_reply:first_reply + n].tolist() == ids
            assert bool(mask[r, first_reply - 1]) and not bool(mask[r, :first_reply - 1].any())
        texts = [drop_lead(tok.decode(ids, skip_special_tokens=True), reply_lead(tok)) for ids in replies]
        score = torch.tensor(rewards_of(rm, rm_tok, [(prompts[w], x) for w, x in zip(mb.where, texts, strict=True)]))
        # rewards: 0 per token (no KL at init, kl_coef 0), the score at the last reply token; values 0
        rewards = torch.zeros_like(t["returns"])
        last = torch.tensor([int(torch.nonzero(m)[-1]) for m in mask])
        rewards[torch.arange(len(last)), last] = score
        adv, ret = gae(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=lam)
        torch.testing.assert_close(t["returns"], ret, rtol=1e-5, atol=1e-5)
        assert torch.equal(t["old_values"], torch.zeros_like(t["old_values"]))
        if gamma == lam == 1.0:  # every reply token's return is the score
            first_tok = mask.long().argmax(-1)
            torch.testing.assert_close(t["returns"][torch.arange(len(last)), first_tok], score, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(t["returns"][mask], score.repeat_interleave(mask.sum(-1)), rtol=1e-5,
                                       atol=1e-5)
        lengths += [len(ids) for ids in replies]
        scores.append(score)
        all_adv.append(t["advantages"][mask])
        all_ret.append(adv[mask])
        all_mask.append(mask)
    assert len(set(lengths)) > 1, "the stop boost should give replies of different lengths"
    # advantages: GAE whitened over every reply token of the rollout
    adv_flat, raw_flat = torch.cat(all_adv), torch.cat(all_ret)
    assert abs(float(adv_flat.mean())) < 1e-5 and float(adv_flat.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    torch.testing.assert_close(adv_flat, masked_whiten(raw_flat, torch.ones_like(raw_flat, dtype=torch.bool)),
                               rtol=1e-4, atol=1e-5)
    # the second epoch holds the same replies and numbers, in another order
    by_where = {w: (reply_ids(mb, r), float(mb.tensors["returns"][r].sum()))
                for mb in first for r, w in enumerate(mb.where)}
    for mb in second:
        for r, w in enumerate(mb.where):
            assert reply_ids(mb, r) == by_where[w][0]
            assert float(mb.tensors["returns"][r].sum()) == pytest.approx(by_where[w][1], abs=1e-5)

    stats = runtime.stats()
    assert stats["kl"] == 0.0 and stats["kl_coef"] == 0.0 and stats["rollout"] == 0.0
    assert stats["reward"] == pytest.approx(float(torch.cat(scores).mean()), abs=1e-5)
    assert stats["response_length"] == pytest.approx(sum(lengths) / 6)
    assert 0 < stats["entropy"] <= math.log(len(tok)) + 1e-4
    # every per-token KL is exactly 0: the LoRA policy at init is its reference
    t = first[0].tensors
    batch = {k: t[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        logits = policy(**batch).logits
        with policy.disable_adapter():
            ref = policy(**batch).logits
    assert torch.equal(logits, ref)
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, t["input_ids"][:, 1:, None]).squeeze(-1)
    mask = t["reply_mask"]
    torch.testing.assert_close(t["old_logp"][mask], logp[mask], rtol=1e-5, atol=1e-5)
    state = runtime.state_dict()  # kl_target None: coef fixed; the rollout history survives a resume
    assert {k: state[k] for k in ("kl", "n_rollouts", "history")} == {"kl": {"coef": 0.0}, "n_rollouts": 1, "history": [
        {"rollout": 0, "reward": stats["reward"], "kl": 0.0}]}
    assert state["pending"] is None  # the rollout's 4 minibatches were all taken


def test_rollout_of_a_moved_policy_penalises_kl_and_adds_values(llama_dir, tok, files, reward_model):
    torch.manual_seed(5)
    policy = lora_policy(llama_dir, tok)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    kl_coef, penalty, target, horizon = 0.3, -0.7, 2.0, 12
    runtime, stream, _ = make_runtime(llama_dir, tok, files, policy=policy, kl_coef=kl_coef, lam=0.9,
                                      missing_stop_penalty=penalty, kl_target=target, kl_horizon=horizon,
                                      rollout_prompts=8, max_new_tokens=4)
    with torch.no_grad():
        getattr(policy, VALUE_HEAD).proj.weight.normal_(0, 0.2)
        getattr(policy, VALUE_HEAD).proj.bias.fill_(0.1)
    mbs = stream.next_group(2)  # the first epoch: every reply once
    assert [len(mb.where) for mb in mbs] == [4, 4] and len({w for mb in mbs for w in mb.where}) == 8
    prompts = prompt_of(files["train"])
    rm, rm_tok = reward_model
    stops = {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id}
    raw_adv, whitened, kl_sums, scores = [], [], [], []
    policy.eval()
    for mb in mbs:
        t = mb.tensors
        mask = t["reply_mask"]
        batch = {k: t[k] for k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            out = policy(**batch, output_hidden_states=True)
            with policy.disable_adapter():
                ref = policy(**batch).logits
            values = getattr(policy, VALUE_HEAD)(out.hidden_states[-1])[:, :-1] * mask
        nxt = t["input_ids"][:, 1:, None]
        logp = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, nxt).squeeze(-1)
        ref_logp = torch.log_softmax(ref[:, :-1].float(), -1).gather(-1, nxt).squeeze(-1)
        kl = (logp - ref_logp) * mask  # k1
        assert float(kl.abs().sum()) > 1e-3, "the moved adapter should change the log-probs"
        replies = [reply_ids(mb, r) for r in range(len(mb.where))]
        texts = [drop_lead(tok.decode(ids, skip_special_tokens=True), reply_lead(tok)) for ids in replies]
        score = torch.tensor(rewards_of(rm, rm_tok, [(prompts[w], x) for w, x in zip(mb.where, texts, strict=True)]))
        score = score + torch.tensor([0.0 if ids[-1] in stops else penalty for ids in replies])
        rewards = -kl_coef * kl
        last = torch.tensor([int(torch.nonzero(m)[-1]) for m in mask])
        rewards[torch.arange(len(last)), last] += score
        adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.9)
        torch.testing.assert_close(t["old_logp"][mask], logp[mask], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(t["old_values"], values, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(t["returns"], ret, rtol=1e-4, atol=1e-4)
        # returns = advantages before whitening + values, on reply tokens; 0 elsewhere
        torch.testing.assert_close(t["returns"][mask], (adv + values)[mask], rtol=1e-4, atol=1e-4)
        assert float(t["returns"][~mask].abs().sum()) == 0.0
        raw_adv.append(adv[mask])
        whitened.append(t["advantages"][mask])
        kl_sums.append(kl.sum(-1))
        scores.append(score)
    assert any(ids[-1] not in stops for mb in mbs for ids in (reply_ids(mb, r) for r in range(len(mb.where))))
    raw, white = torch.cat(raw_adv), torch.cat(whitened)
    torch.testing.assert_close(white, (raw - raw.mean()) / torch.sqrt(raw.var(unbiased=False) + 1e-8),
                               rtol=1e-4, atol=1e-4)
    stats = runtime.stats()
    kl_per_reply = float(torch.cat(kl_sums).mean())
    assert stats["kl"] == pytest.approx(kl_per_reply, abs=1e-4) and stats["kl_coef"] == kl_coef
    assert stats["reward"] == pytest.approx(float(torch.cat(scores).mean()), abs=1e-5)  # the penalty included
    # the adaptive controller moves the coefficient after the rollout
    err = min(max(stats["kl"] / target - 1, -0.2), 0.2)
    assert runtime.kl.coef == pytest.approx(kl_coef * (1 + err * 8 / horizon))
    state = runtime.state_dict()
    runtime.load_state_dict({"kl": {"coef": 0.123}, "n_rollouts": 7, "history": [{"rollout": 6}]})  # before #19
    assert runtime.state_dict() == {"kl": {"coef": 0.123}, "n_rollouts": 7, "history": [{"rollout": 6}],
                                    "rollout_stats": {}, "pending": None}
    assert state["n_rollouts"] == 1


@pytest.mark.parametrize("entropy_coef", [0.0, 0.05])
def test_loss_on_the_first_minibatch_has_ratio_one(llama_dir, tok, files, entropy_coef):
    runtime, stream, policy = make_runtime(llama_dir, tok, files, vf_coef=0.3, entropy_coef=entropy_coef)
    (mb,) = stream.next_group(1)
    runtime.stats()  # drop the rollout's sums (none yet)
    t = mb.tensors
    mask = t["reply_mask"]
    policy.train()
    loss, n = runtime.loss(policy, t)
    assert int(n) == mb.n_trained == int(mask.sum())
    stats = runtime.stats()
    adv, ret = t["advantages"], t["returns"]
    assert stats["clip_fraction"] == 0.0 and stats["value_clip_fraction"] == 0.0
    assert stats["approx_kl"] < 1e-10
    assert stats["policy_loss"] == pytest.approx(-float(masked_mean(adv, mask)), abs=1e-5)
    # the value head is zero-initialised: V = 0, so the loss is 0.5 * E[R^2]
    assert stats["value_loss"] == pytest.approx(0.5 * float(masked_mean(ret**2, mask)), rel=1e-5)
    expected = stats["policy_loss"] + 0.3 * stats["value_loss"]
    if entropy_coef:
        with torch.no_grad():
            logits = policy(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
        expected -= entropy_coef * float(masked_mean(entropy_from_logits(logits[:, :-1]), mask))
    assert float(loss.detach()) == pytest.approx(expected * int(n), rel=1e-4, abs=1e-4)
    loss.backward()
    head = getattr(policy, VALUE_HEAD).proj
    assert head.weight.grad is not None and float(head.weight.grad.abs().sum()) > 0
    lora_grads = [p.grad for name, p in policy.named_parameters() if "lora_" in name]
    assert lora_grads and any(g is not None and float(g.abs().sum()) > 0 for g in lora_grads)
    # a batch that is not a rollout is refused with a fix, as is the plain loss function
    with pytest.raises(TunelabError, match="rollouts") as e:
        runtime.loss(policy, {k: t[k] for k in ("input_ids", "attention_mask", "labels")})
    assert e.value.fix
    with pytest.raises(TunelabError, match="runtime"):
        OBJECTIVES["ppo"].loss(policy, t, runtime.cfg)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_rollout_log_probs_are_of_the_sampling_distribution_one_reply_at_a_time(llama_dir, tok, files,
                                                                                temperature):
    """old_logp is log softmax(logits / T) of each reply token (T: the rollout's sampling temperature),
    recomputed naively with the reply alone; the first inner step has ratio exactly 1."""
    from tests.test_objectives_grpo import naive_reply_logps

    runtime, stream, policy = make_runtime(llama_dir, tok, files, temperature=temperature)
    torch.manual_seed(0)
    with torch.no_grad():  # a trained adapter: the policy is no longer its reference
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    (mb,) = stream.next_group(1)
    t = mb.tensors
    policy.eval()
    for r in range(len(mb.where)):
        reply = reply_ids(mb, r)
        row = t["input_ids"][r][t["attention_mask"][r].bool()].tolist()
        query = row[: len(row) - len(reply)]
        mask = t["reply_mask"][r]
        torch.testing.assert_close(t["old_logp"][r][mask].double(), naive_reply_logps(policy, query, reply,
                                                                                      temperature), rtol=0, atol=2e-5)
    runtime.stats()
    policy.train()
    runtime.loss(policy, t)
    assert runtime.stats()["approx_kl"] < 1e-10


# ----------------------------------------------------------------------------- end to end


def test_ppo_lora_run_logs_rollouts_evals_and_saves_the_policy_without_its_value_head(llama_dir, tok, files,
                                                                                       reward_model, tmp_path):
    run = tmp_path / "run"
    horizon, target = 100, 6.0
    cfg = {
        "model": {"name_or_path": str(llama_dir)},
        "data": {"train": str(files["train"]), "eval": str(files["eval"]), "max_length": 64},
        "method": {"name": "lora", "r": 4, "dropout": 0.0},
        "objective": {"name": "ppo", "reward_model": str(files["rm"]), "rollout_prompts": 8, "ppo_epochs": 2,
                      "max_new_tokens": 6, "kl_target": target, "kl_horizon": horizon},
        # 8 prompts / batch 4 x 2 epochs = 4 minibatches (steps) per rollout: 8 steps = 2 rollouts
        "train": {"max_steps": 8, "batch_size": 4, "lr": 1e-2, "scheduler": "constant", "eval_every": 4,
                  "tensorboard": False, "precision": "fp32"},
        "output": {"dir": str(run)},
    }
    result = tunelab.train(cfg, quiet=True)
    assert result.status == "completed" and result.steps == 8
    lines = metrics_lines(run)
    steps = [m for m in lines if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 9))
    keys = {"reward", "kl", "kl_coef", "entropy", "response_length", "clip_fraction", "approx_kl", "value_loss",
            "policy_loss"}
    for m in steps:
        assert keys <= set(m), keys - set(m)
        assert all(math.isfinite(m[k]) for k in keys)
        assert 1 <= m["response_length"] <= 6 and 0 <= m["clip_fraction"] <= 1
    # the rollout's numbers repeat until the next rollout
    assert [m["rollout"] for m in steps] == [0.0] * 4 + [1.0] * 4
    for block in (steps[:4], steps[4:]):
        assert len({(m["reward"], m["kl"], m["kl_coef"], m["entropy"]) for m in block}) == 1
    first, second = steps[0], steps[4]
    assert first["kl"] == 0.0 and first["kl_coef"] == 0.05  # the LoRA policy at init is its reference
    assert first["approx_kl"] == 0.0 and first["clip_fraction"] == 0.0
    assert second["approx_kl"] < 1e-8  # each rollout's first minibatch: the policy that sampled it
    err = min(max(first["kl"] / target - 1, -0.2), 0.2)
    assert second["kl_coef"] == pytest.approx(0.05 * (1 + err * 8 / horizon))
    # evaluation: at step 4 and at the end, greedy replies of the policy and of its reference
    evals = [m for m in lines if "eval_reward" in m]
    assert [m["step"] for m in evals] == [4, 8] and "loss" not in evals[-1]
    rm, rm_tok = reward_model
    prompts = [r["prompt"] for r in prompt_records(4, offset=3)]
    base = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    ref_replies = greedy(base, tok, prompts, max_new_tokens=6, chat=True)
    expected_ref = sum(rewards_of(rm, rm_tok, list(zip(prompts, ref_replies, strict=True)))) / 4
    for m in evals:
        assert {"eval_reward", "eval_reward_reference", "eval_win_rate"} <= set(m)
        assert m["eval_reward_reference"] == pytest.approx(expected_ref, abs=1e-4)
        assert m["eval_win_rate"] in {k / 8 for k in range(9)}  # ties count half
    # run artifacts
    rollouts = [json.loads(x) for x in (run / "rollouts.jsonl").read_text().splitlines()]
    assert [r["rollout"] for r in rollouts] == [0, 1]
    assert [r["reward"] for r in rollouts] == pytest.approx([first["reward"], second["reward"]])
    assert [r["kl"] for r in rollouts] == pytest.approx([first["kl"], second["kl"]])
    png = (run / "reward_curve.png").read_bytes()
    assert png[:8] == PNG and len(png) > 1000
    (ckpt,) = (run / "checkpoints").glob("step-8")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    err2 = min(max(second["kl"] / target - 1, -0.2), 0.2)
    assert state["objective_state"]["n_rollouts"] == 2 and len(state["objective_state"]["history"]) == 2
    assert state["objective_state"]["kl"]["coef"] == pytest.approx(second["kl_coef"] * (1 + err2 * 8 / horizon))
    assert any(k.startswith(VALUE_HEAD) for k in load_file(str(ckpt / "trainable.safetensors")))  # checkpointed
    saved = load_file(str(run / "final" / "adapter_model.safetensors"))
    assert saved and not any("value_head" in k for k in saved)  # ... but not exported
    model, _ = tunelab.load(run)
    assert not hasattr(model, VALUE_HEAD)
    assert not any(VALUE_HEAD in name for name, _ in model.named_parameters())
    assert any("lora_B" in k and float(v.abs().sum()) > 0 for k, v in saved.items())  # the policy trained


# ----------------------------------------------------------------------------- errors


def test_ppo_refuses_preference_data_and_a_reward_model_without_a_scalar_head(llama_dir, tok, files, tmp_path):
    cfg = {
        "model": {"name_or_path": str(llama_dir)},
        "data": {"train": str(files["prefs"]), "max_length": 64},
        "method": {"name": "lora", "r": 4},
        "objective": {"name": "ppo", "reward_model": str(files["rm"])},
        "train": {"max_steps": 1, "batch_size": 2, "tensorboard": False},
        "output": {"dir": str(tmp_path / "a")},
    }
    with pytest.raises(DataError) as e:
        tunelab.train(cfg, quiet=True)
    assert "'preference'" in e.value.message and "accepted: prompt" in e.value.message and e.value.fix
    assert str(files["prefs"]) in e.value.message

    cfg["data"]["train"] = str(files["train"])
    cfg["objective"]["reward_model"] = str(llama_dir)  # a plain causal LM
    cfg["output"]["dir"] = str(tmp_path / "b")
    with pytest.raises(TunelabError, match="reward model") as e:
        tunelab.train(cfg, quiet=True)
    assert str(llama_dir) in e.value.message and "head" in e.value.fix
    with pytest.raises(TunelabError, match="reward model"):
        make_runtime(llama_dir, tok, {**files, "rm": llama_dir})
    with pytest.raises(TunelabError, match="cannot load the reward model"):
        make_runtime(llama_dir, tok, {**files, "rm": tmp_path / "missing"})


def test_a_resumed_run_continues_the_rollout_it_stopped_in(llama_dir, files, tmp_path):
    """A checkpoint in the middle of a rollout keeps its rest (replies, log-probs, values, advantages, the
    minibatches still to run): the resumed run trains on exactly what the uninterrupted one did (#19)."""
    def cfg(name: str) -> dict:
        return {
            "model": {"name_or_path": str(llama_dir)},
            "data": {"train": str(files["train"]), "max_length": 64},
            "method": {"name": "lora", "r": 4, "dropout": 0.0},
            "objective": {"name": "ppo", "reward_model": str(files["rm"]), "rollout_prompts": 8, "ppo_epochs": 2,
                          "max_new_tokens": 6},
            # 4 minibatches (steps) per rollout; a checkpoint at step 2 falls in the middle of the first
            "train": {"max_steps": 6, "batch_size": 4, "lr": 1e-2, "scheduler": "constant", "save_every": 2,
                      "tensorboard": False, "precision": "fp32"},
            "output": {"dir": str(tmp_path / name)},
        }

    assert tunelab.train(cfg("ref"), quiet=True).status == "completed"

    class Stop(Exception):
        pass

    def stop_after_3(event):
        if event.kind == "step" and event.step == 3:
            raise Stop

    with pytest.raises(Stop):
        tunelab.train(cfg("run"), quiet=True, on_event=stop_after_3)
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert len(state["objective_state"]["pending"]["todo"]) == 2  # half the rollout still to train on
    assert tunelab.train(cfg("run"), resume=True, quiet=True).status == "completed"
    want = load_file(str(tmp_path / "ref" / "final" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "run" / "final" / "adapter_model.safetensors"))
    assert all(torch.equal(want[k], got[k]) for k in want)
    ref, run = metrics_lines(tmp_path / "ref"), metrics_lines(tmp_path / "run")
    for a in [m for m in ref if "loss" in m and m["step"] >= 3]:
        b = next(m for m in run if m.get("step") == a["step"] and "loss" in m)
        assert (b["loss"], b["reward"], b["rollout"], b["batch"]) == (a["loss"], a["reward"], a["rollout"], a["batch"])


def test_a_separate_value_model_trains_beside_the_policy_and_is_not_exported(llama_dir, tok, files, tmp_path):
    """objective.value_model: the reward model's body under the value head, trained with the policy; the
    policy's own forward no longer feeds the values (#19)."""
    run = tmp_path / "run"
    cfg = {
        "model": {"name_or_path": str(llama_dir)},
        "data": {"train": str(files["train"]), "max_length": 64},
        "method": {"name": "lora", "r": 4, "dropout": 0.0},
        "objective": {"name": "ppo", "reward_model": str(files["rm"]), "value_model": str(files["rm"]),
                      "rollout_prompts": 8, "ppo_epochs": 1, "max_new_tokens": 6, "vf_coef": 1.0},
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "scheduler": "constant", "tensorboard": False,
                  "precision": "fp32", "save_every": 4},
        "output": {"dir": str(run)},
    }
    assert tunelab.train(cfg, quiet=True).status == "completed"
    state = load_file(str(run / "checkpoints" / "step-4" / "trainable.safetensors"))
    body = {k: v for k, v in state.items() if k.startswith(f"{VALUE_HEAD}.body.")}
    assert body and any(k.startswith(f"{VALUE_HEAD}.proj.") for k in state)  # checkpointed: a resume trains on
    rm, _ = tunelab.load(files["rm"])
    start = {f"{VALUE_HEAD}.body.{k}": v for k, v in rm.body.state_dict().items()}
    moved = [k for k, v in body.items() if k in start and not torch.equal(v, start[k])]
    assert moved, "the value model's body did not train"
    saved = load_file(str(run / "final" / "adapter_model.safetensors"))
    assert not any("value" in k for k in saved)  # the exported policy holds neither head nor body
    lines = [m for m in metrics_lines(run) if "value_loss" in m]
    assert lines and all(math.isfinite(m["value_loss"]) for m in lines)


def test_a_value_model_with_another_tokenizer_is_refused(llama_dir, tok, files, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(llama_dir, other)
    changed = AutoTokenizer.from_pretrained(str(other))
    changed.add_tokens(["<|extra|>"])
    changed.save_pretrained(str(other))
    with pytest.raises(TunelabError, match="value model .* different tokenizer"):
        make_runtime(llama_dir, tok, files, value_model=str(other))


# ----------------------------------------------------------------------------- a verifiable reward (#19)


def with_answers(path: Path, prompts: list[dict], answers: list[str]) -> Path:
    return tiny.write_jsonl(path, [{**r, "answer": a} for r, a in zip(prompts, answers, strict=True)])


def test_a_verifiable_reward_is_the_functions_value_at_each_replys_last_token(llama_dir, tok, files, tmp_path):
    """objective.reward: exact_match against each record's answer, placed where the reward model's score goes:
    with kl_coef 0 and the zero value head, the returns are the score discounted back from the last token."""
    prompts, gamma = prompt_records(6), 0.5
    # the rollout is seeded: a first run shows the replies; the second's records hold half of them as answers
    first = {**files, "train": with_answers(tmp_path / "a.jsonl", prompts, ["zzz"] * 6)}
    runtime, stream, _ = make_runtime(llama_dir, tok, first, reward="exact_match")
    replies = {w.rsplit(":", 1)[1]: tok.decode(reply_ids(mb, r), skip_special_tokens=True)
               for mb in stream.next_group(2) for r, w in enumerate(mb.where)}
    assert runtime.stats()["reward"] == 0.0 and runtime.scorer.model is None
    answers = [replies[str(i)] if i % 2 else "zzz" for i in range(1, 7)]  # lines 2, 4, 6: a wrong answer
    records = [{**r, "answer": a} for r, a in zip(prompts, answers, strict=True)]
    second = {**files, "train": with_answers(tmp_path / "b.jsonl", prompts, answers)}
    runtime, stream, _ = make_runtime(llama_dir, tok, second, reward="exact_match", kl_coef=0.0, kl_target=None,
                                      gamma=gamma, lam=1.0)
    scores = []
    for mb in stream.next_group(2):  # the first epoch: every reply once
        t = mb.tensors
        for r, w in enumerate(mb.where):
            record = records[int(w.rsplit(":", 1)[1]) - 1]
            text = tok.decode(reply_ids(mb, r), skip_special_tokens=True)
            assert text == replies[w.rsplit(":", 1)[1]]  # the same seeded replies
            score = exact_match(text, record)
            n = len(reply_ids(mb, r))
            want = torch.tensor([score * gamma ** (n - 1 - j) for j in range(n)])  # sum_k gamma^k r_{t+k}
            torch.testing.assert_close(t["returns"][r][t["reply_mask"][r]], want, rtol=0, atol=1e-6)
            scores.append(score)
    assert sorted(scores) == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert runtime.stats()["reward"] == pytest.approx(0.5) and runtime.history[0]["reward"] == pytest.approx(0.5)


def test_a_verifiable_reward_needs_its_fields_and_exactly_one_reward_option(llama_dir, tok, files, tmp_path):
    bad = tiny.write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a?", "answer": "1"}, {"prompt": "b?"},
                                                    {"prompt": "c?", "answer": "2"}, {"prompt": "d?"}])
    with pytest.raises(DataError) as e:
        make_runtime(llama_dir, tok, {**files, "train": bad}, reward="numeric")
    assert "2 record(s)" in e.value.message and "numeric" in e.value.message and "answer" in e.value.fix
    assert [p.split(": ", 1)[0] for p in e.value.problems] == [f"{bad}:2", f"{bad}:4"]
    # data.eval too, before any training
    good = with_answers(tmp_path / "good.jsonl", prompt_records(4), ["1"] * 4)
    run = {"model": {"name_or_path": str(llama_dir)}, "data": {"train": str(good), "eval": str(bad), "max_length": 64},
           "method": {"name": "lora", "r": 4}, "objective": {"name": "ppo", "reward": "exact_match"},
           "train": {"max_steps": 1, "batch_size": 2, "tensorboard": False}, "output": {"dir": str(tmp_path / "r")}}
    with pytest.raises(DataError) as e:
        tunelab.train(run, quiet=True)
    assert [p.split(": ", 1)[0] for p in e.value.problems] == [f"{bad}:2", f"{bad}:4"]
    assert not (tmp_path / "r" / "final").exists()
    # a reward model needs no answer
    runtime, *_ = make_runtime(llama_dir, tok, files)
    assert runtime.scorer.model is not None and runtime.scorer.name is None
    for objective, words in (({"reward": "exact_match", "reward_model": "runs/rm"}, "not both"),
                             ({}, "reward_model (a reward model run dir)"),
                             ({"reward": "os:system"}, "unknown reward 'os:system'")):
        with pytest.raises(ConfigError) as e:
            build_config({"objective": {"name": "ppo", **objective}})
        assert len(e.value.message.splitlines()) == 1 and words in e.value.message


@pytest.fixture
def length_reward(request):
    """A reward registered from Python, as a user's script does: the reply's length in characters / 10."""
    register_reward("test_ppo_length", lambda reply, record: len(reply) / 10)
    request.addfinalizer(lambda: REWARDS.pop("test_ppo_length", None))
    return "test_ppo_length"


def test_ppo_run_with_a_python_reward_trains_evaluates_saves_and_reloads(llama_dir, tok, files, length_reward,
                                                                         tmp_path):
    """A reward registered from the user's script (exact_match gives the random tiny model no signal)."""
    from tunelab.objectives import grpo

    assert grpo.register_reward is register_reward and grpo.REWARDS is REWARDS  # the import path docs used first
    run = tmp_path / "run"
    eval_prompts = [r["prompt"] for r in prompt_records(4, offset=3)]
    cfg = {
        "model": {"name_or_path": str(llama_dir)},
        "data": {"train": str(files["train"]), "eval": str(files["eval"]), "max_length": 64},
        "method": {"name": "lora", "r": 4, "dropout": 0.0},
        "objective": {"name": "ppo", "reward": length_reward, "rollout_prompts": 8, "ppo_epochs": 1,
                      "max_new_tokens": 6},
        # 8 prompts / batch 4 = 2 minibatches (steps) per rollout: 4 steps = 2 rollouts
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "scheduler": "constant", "eval_every": 4,
                  "tensorboard": False, "precision": "fp32", "save_every": 4},
        "output": {"dir": str(run)},
    }
    result = tunelab.train(cfg, quiet=True)
    assert result.status == "completed" and result.steps == 4
    lines = metrics_lines(run)
    steps = [m for m in lines if "loss" in m]
    assert [m["rollout"] for m in steps] == [0.0, 0.0, 1.0, 1.0]
    for m in steps:
        assert 0 < m["reward"] <= 2.5  # replies of 1-6 tokens: some characters each
        assert all(math.isfinite(m[k]) for k in ("kl", "value_loss", "policy_loss", "approx_kl"))
    assert json.loads((run / "checkpoints" / "step-4" / "trainer_state.json").read_text())[
        "objective_state"]["n_rollouts"] == 2
    saved = load_file(str(run / "final" / "adapter_model.safetensors"))
    assert not any("value_head" in k for k in saved)
    assert any("lora_B" in k and float(v.abs().sum()) > 0 for k, v in saved.items())  # the policy trained
    model, _ = tunelab.load(run)
    assert not hasattr(model, VALUE_HEAD)
    # evaluation: greedy replies of the policy (the reloaded one) and of the base, by the same reward
    base = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    mine, ref = ([len(x) / 10 for x in greedy(m, tok, eval_prompts, max_new_tokens=6, chat=True)]
                 for m in (model, base))
    (final_eval,) = [m for m in lines if "eval_reward" in m]
    assert final_eval["eval_reward"] == pytest.approx(sum(mine) / 4)
    assert final_eval["eval_reward_reference"] == pytest.approx(sum(ref) / 4)
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(mine, ref, strict=True))
    assert final_eval["eval_win_rate"] == pytest.approx(wins / 4)
