"""Objectives `grpo` (O11) and `rloo`: advantages, the loss variants and RLOO against naive loops written
here, the verifiable rewards, the rule that a config never imports a reward, rollouts, and short runs
end to end that log, evaluate, checkpoint and resume exactly."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import tunelab
from tests import tiny
from tunelab.artifacts import save_artifact
from tunelab.config import ModelConfig
from tunelab.data.pipeline import load_tokenized
from tunelab.data.preference import prompt_example
from tunelab.data.stream import BatchStream
from tunelab.data.templates import resolve_template
from tunelab.data.types import IGNORE
from tunelab.errors import ConfigError, DataError, TunelabError
from tunelab.inference.generation import drop_lead, greedy, reply_lead
from tunelab.inference.reward import rewards_of
from tunelab.methods import METHODS
from tunelab.methods.heads import HeadConfig
from tunelab.objectives import OBJECTIVES
from tunelab.objectives.alignment_losses import (
    GRPO_LOSSES,
    group_advantages,
    grpo_token_loss,
    leave_one_out_advantages,
    rloo_loss,
)
from tunelab.objectives.grpo import (
    REWARDS,
    Rollout,
    contains_answer,
    exact_match,
    numeric,
    prompt_of,
    register_reward,
)
from tunelab.objectives.ppo import RolloutStream
from tunelab.objectives.registry import RunContext
from tunelab.runconfig import build_config, load_config

CPU = torch.device("cpu")
PNG = b"\x89PNG\r\n\x1a\n"
STOP_BOOST = 4.5  # added to the <|im_end|> logit: replies of the random model end at different lengths
TIMING = {"step_time", "tokens_per_s", "elapsed"}


# ----------------------------------------------------------------------------- advantages


def naive_advantages(rewards: list[float], g: int, *, scale: bool, leave_one_out: bool) -> list[float]:
    out = []
    for s in range(0, len(rewards), g):
        group = rewards[s : s + g]
        mean = sum(group) / g
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (g - 1))
        for x in group:
            base = (sum(group) - x) / (g - 1) if leave_one_out else mean
            out.append((x - base) / (std + 1e-4) if scale else x - base)
    return out


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("leave_one_out", [False, True])
def test_advantages_are_relative_to_each_group(scale, leave_one_out):
    g = 4
    rewards = [1.0, 0.0, 0.0, 1.0,  0.5, 0.5, 0.5, 0.5,  3.0, -1.0, 2.0, 0.25]  # the middle group: no variance
    fn = leave_one_out_advantages if leave_one_out else group_advantages
    got = fn(torch.tensor(rewards, dtype=torch.float64), g, scale=scale)
    assert got.shape == (12,) and got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor(naive_advantages(rewards, g, scale=scale,
                                                                  leave_one_out=leave_one_out), dtype=torch.float64))
    assert got[4:8].abs().max() == 0.0  # equal rewards: nothing to learn from the group
    if leave_one_out:  # RLOO is G/(G-1) times the mean-centred advantage
        torch.testing.assert_close(got, g / (g - 1) * group_advantages(torch.tensor(rewards, dtype=torch.float64),
                                                                       g, scale=scale))
    with pytest.raises(ValueError, match="groups of 4"):
        fn(torch.ones(6), 4)
    with pytest.raises(ValueError, match=">= 2"):
        fn(torch.ones(6), 1)


# ----------------------------------------------------------------------------- the loss variants


def token_case(seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows of 4, 1, 6 and 0 reply tokens; ratios across both clip edges; advantages of both signs."""
    g = torch.Generator().manual_seed(seed)
    b, t = 4, 7
    mask = torch.zeros(b, t, dtype=torch.bool)
    mask[0, 1:5] = True
    mask[1, 6] = True
    mask[2, :6] = True
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    old = logp + 0.4 * torch.randn(b, t, generator=g, dtype=torch.float64)
    ref = logp + 0.5 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.3, -0.7, -1.1, 2.0], dtype=torch.float64)
    return {"logp": logp.requires_grad_(), "old": old, "ref": ref, "adv": adv, "mask": mask}


def naive_token_losses(c: dict[str, torch.Tensor], eps: float, eps_high: float,
                       beta: float) -> list[list[torch.Tensor]]:
    """l_bt per reply token, from the formulas one scalar at a time."""
    rows = []
    for b in range(c["mask"].shape[0]):
        row = []
        for t in range(c["mask"].shape[1]):
            if not c["mask"][b, t]:
                continue
            ratio = torch.exp(c["logp"][b, t] - c["old"][b, t])
            a = c["adv"][b]
            loss = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - eps, 1 + eps_high) * a)
            x = c["ref"][b, t] - c["logp"][b, t]
            row.append(loss + beta * (torch.exp(x) - x - 1))
        rows.append(row)
    return rows


def naive_reduce(rows: list[list[torch.Tensor]], loss_type: str, max_new_tokens: int) -> torch.Tensor:
    replies = [r for r in rows if r]
    if loss_type == "grpo":
        return sum(sum(r) / len(r) for r in replies) / len(replies)
    if loss_type == "dr_grpo":
        return sum(sum(r) for r in replies) / (len(replies) * max_new_tokens)
    return sum(sum(r) for r in replies) / sum(len(r) for r in replies)  # dapo


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta,eps_high", [(0.0, 0.2), (0.1, 0.28)])
def test_each_loss_variant_normalises_as_its_paper(loss_type, beta, eps_high):
    c = token_case()
    per_token, stats = grpo_token_loss(c["logp"], c["old"], c["adv"], c["mask"], epsilon=0.2, epsilon_high=eps_high,
                                       ref_logp=c["ref"], beta=beta)
    assert per_token.shape == c["mask"].shape and not per_token[~c["mask"]].any()
    loss_sum, units = GRPO_LOSSES[loss_type](per_token, c["mask"], 8)
    assert int(units) == (11 if loss_type == "dapo" else 3)  # tokens, or the replies that have one
    got = loss_sum / units
    (grad,) = torch.autograd.grad(got, c["logp"])
    want = naive_reduce(naive_token_losses(c, 0.2, eps_high, beta), loss_type, 8)
    (want_grad,) = torch.autograd.grad(want, c["logp"])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, want_grad)
    assert not grad[~c["mask"]].any()
    # stats: the share of tokens whose gradient the clip cut, and the k3 KL when it is in the loss
    ratio = (c["logp"] - c["old"]).exp().detach()[c["mask"]]
    adv = c["adv"][:, None].expand_as(c["mask"])[c["mask"]]
    cut = ((adv > 0) & (ratio > 1 + eps_high)) | ((adv < 0) & (ratio < 0.8))
    assert 0 < int(cut.sum()) < len(cut), "the case should clip some tokens and not others"
    assert float(stats["clip_fraction"]) == pytest.approx(float(cut.double().mean()))
    x = (c["ref"] - c["logp"]).detach()[c["mask"]]
    if beta:
        assert float(stats["kl"]) == pytest.approx(float((x.exp() - x - 1).mean()))
    else:
        assert "kl" not in stats


def test_clip_higher_keeps_the_gradient_of_a_token_raised_between_the_two_edges():
    logp = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
    old = torch.full((1, 1), -math.log(1.25), dtype=torch.float64)  # ratio 1.25
    mask, adv = torch.ones(1, 1, dtype=torch.bool), torch.ones(1, dtype=torch.float64)
    grads = []
    for eps_high in (None, 0.28):
        per_token, stats = grpo_token_loss(logp, old, adv, mask, epsilon=0.2, epsilon_high=eps_high)
        (g,) = torch.autograd.grad(per_token.sum(), logp)
        grads.append(float(g))
        assert float(stats["clip_fraction"]) == (1.0 if eps_high is None else 0.0)
    assert grads[0] == 0.0 and grads[1] == pytest.approx(-1.25)


@pytest.mark.parametrize("epsilon", [None, 0.2])
def test_rloo_treats_each_reply_as_one_action(epsilon):
    c = token_case(seed=1)
    loss_sum, units, stats = rloo_loss(c["logp"], c["old"], c["adv"], c["mask"], epsilon=epsilon, epsilon_high=0.3)
    assert int(units) == 3
    want, cut = [], 0
    for b in range(4):
        m = c["mask"][b]
        if not m.any():
            continue
        ratio = torch.exp(c["logp"][b][m].sum() - c["old"][b][m].sum())
        a = c["adv"][b]
        if epsilon is None:
            want.append(-ratio * a)
        else:
            clipped = torch.clamp(ratio, 1 - epsilon, 1.3) * a
            want.append(-torch.minimum(ratio * a, clipped))
            cut += int(clipped < ratio * a)
    torch.testing.assert_close(loss_sum, sum(want))
    (g1,) = torch.autograd.grad(loss_sum, c["logp"])
    (g2,) = torch.autograd.grad(sum(want), c["logp"])
    torch.testing.assert_close(g1, g2)
    assert float(stats["clip_fraction"]) == pytest.approx(cut / 3)
    # at ratio 1 (the first pass) the gradient is REINFORCE's: -A_b on every token of reply b
    same = c["logp"].detach().clone().requires_grad_()
    loss_sum, _, _ = rloo_loss(same, same.detach(), c["adv"], c["mask"], epsilon=epsilon)
    (g,) = torch.autograd.grad(loss_sum, same)
    torch.testing.assert_close(g, torch.where(c["mask"], -c["adv"][:, None], 0).expand_as(g))


def test_a_batch_without_reply_tokens_gives_zero_and_no_gradient():
    c = token_case()
    none = torch.zeros_like(c["mask"])
    per_token, _ = grpo_token_loss(c["logp"], c["old"], c["adv"], none, ref_logp=c["ref"], beta=0.1)
    for fn in GRPO_LOSSES.values():
        loss_sum, units = fn(per_token, none, 8)
        assert float(loss_sum.detach()) == 0.0 and int(units) == 0
    loss_sum, units, _ = rloo_loss(c["logp"], c["old"], c["adv"], none)
    assert float(loss_sum.detach()) == 0.0 and int(units) == 0
    (g,) = torch.autograd.grad(loss_sum + per_token.sum(), c["logp"])
    assert torch.isfinite(g).all() and not g.any()


# ----------------------------------------------------------------------------- rewards


def test_the_verifiable_rewards():
    rec = {"answer": "32"}
    assert exact_match(" 32", rec) == exact_match("32.", rec) == exact_match("32", {"answer": 32}) == 1.0
    assert exact_match("The answer is 32", rec) == exact_match("320", rec) == 0.0
    assert exact_match(" Paris  is\nbig ", {"answer": "paris is big"}) == 1.0
    assert contains_answer("The answer is 32.", rec) == contains_answer("32", rec) == 1.0
    assert contains_answer("132", rec) == contains_answer("3.32", rec) == contains_answer("32nd", rec) == 0.0
    assert contains_answer("it is Toronto!", {"answer": "toronto"}) == 1.0
    assert numeric("It is 1,000 apples", {"answer": "1000"}) == numeric("-5 degrees", {"answer": "-5"}) == 1.0
    assert numeric("about 32.0 or 40", rec) == 1.0
    assert numeric("31 or 32", rec) == numeric("no number", rec) == numeric("32", {"answer": "many"}) == 0.0
    assert {"exact_match", "contains_answer", "numeric"} <= set(REWARDS)
    assert all(REWARDS[k].needs == ("answer",) for k in ("exact_match", "contains_answer", "numeric"))


def test_prompts_are_the_conversation_without_its_final_reply():
    user = {"role": "user", "content": "What is 2 plus 3?"}
    assert prompt_of({"messages": [user, {"role": "assistant", "content": "5"}], "answer": "5"}) == [user]
    assert prompt_of({"messages": [user], "answer": "5"}) == [user]
    assert prompt_of({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}) == [
        {"role": "user", "content": "hi"}]
    assert prompt_of({"prompt": "What is 2 plus 3?", "answer": "5"}) == "What is 2 plus 3?"


@pytest.fixture
def length_reward(request):
    """A reward registered from Python, as a user's script does: the reply's length in characters / 10."""
    register_reward("test_length", lambda reply, record: len(reply) / 10)
    request.addfinalizer(lambda: REWARDS.pop("test_length", None))
    return "test_length"


def test_a_python_reward_is_registered_through_the_api_only(length_reward):
    cfg = build_config({"objective": {"name": "grpo", "reward": length_reward}})
    assert cfg.objective.reward == length_reward and REWARDS[length_reward].fn("abcde", {}) == 0.5
    with pytest.raises(ValueError, match="already registered"):
        register_reward(length_reward, lambda reply, record: 0.0)
    register_reward(length_reward, lambda reply, record: 1.0, replace=True)
    assert REWARDS[length_reward].fn("", {}) == 1.0
    with pytest.raises(TypeError, match="not callable"):
        register_reward("test_not_callable", "os:system")  # type: ignore[arg-type]
    assert "test_not_callable" not in REWARDS


def test_a_config_names_a_reward_and_never_imports_one(tmp_path, monkeypatch):
    (tmp_path / "reward_probe_mod.py").write_text(
        "from pathlib import Path\nPath(__file__).with_name('imported').write_text('yes')\n"
        "def fn(reply, record):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("os:system", "reward_probe_mod:fn", "reward_probe_mod.fn", "subprocess.run", "__import__"):
        with pytest.raises(ConfigError) as e:
            build_config({"objective": {"name": "grpo", "reward": name}})
        msg = e.value.message
        assert len(msg.splitlines()) == 1 and f"unknown reward {name!r}" in msg
        assert "registered: contains_answer, exact_match, numeric" in msg and "register_reward" in msg
    assert not (tmp_path / "imported").exists() and "reward_probe_mod" not in sys.modules
    with pytest.raises(ConfigError, match=r"did you mean 'exact_match'\?"):
        build_config({"objective": {"name": "rloo", "reward": "exact_matc"}})
    cfg_file = tmp_path / "rl.yaml"
    cfg_file.write_text("objective:\n  name: grpo\n  reward: reward_probe_mod:fn\n")
    with pytest.raises(ConfigError, match="rl.yaml: objective.reward: unknown reward"):
        load_config(cfg_file)
    assert build_config({"objective": {"name": "grpo"}}).objective.reward == "exact_match"  # the default
    assert build_config({"objective": {"name": "rloo", "reward_model": "runs/rm"}}).objective.reward is None
    with pytest.raises(ConfigError, match="one of reward .* not both"):
        build_config({"objective": {"name": "grpo", "reward": "numeric", "reward_model": "runs/rm"}})
    with pytest.raises(ConfigError, match="num_generations"):
        build_config({"objective": {"name": "grpo", "reward": "numeric", "num_generations": 1}})
    assert not (tmp_path / "imported").exists() and "reward_probe_mod" not in sys.modules


# ----------------------------------------------------------------------------- rollouts


def chat_records(n: int, offset: int = 0) -> list[dict]:
    """TinyWorld-like skill records: a question, its answer as the assistant turn, and "answer"."""
    out = []
    for i in range(n):
        thing, colour = tiny.THINGS[(i + offset) % 8], tiny.COLOURS[(i + offset) % 8]
        q = f"what colour is the {thing}?" + " and the stone?" * (i % 3)
        out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": colour}],
                    "answer": colour, "task": "colours"})
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory, llama_dir, tok) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("grpo")
    torch.manual_seed(0)  # a scalar-head reward model, saved as a `head` run saves it
    rm = METHODS["head"].apply(AutoModelForCausalLM.from_pretrained(str(llama_dir)), HeadConfig(num_labels=1))
    with torch.no_grad():
        rm.head.weight.normal_(0, 1.0)
    save_artifact(rm, tok, HeadConfig(num_labels=1), ModelConfig(name_or_path=str(llama_dir)), d / "rm")
    prompts = [{"prompt": r["messages"][0]["content"], "answer": r["answer"]} for r in chat_records(8)]
    return {
        "rm": d / "rm",
        "chat": tiny.write_jsonl(d / "chat.jsonl", chat_records(8)),
        "chat_eval": tiny.write_jsonl(d / "chat_eval.jsonl", chat_records(3, offset=4)),
        "prompts": tiny.write_jsonl(d / "prompts.jsonl", prompts),
        "no_answer": tiny.write_jsonl(d / "no_answer.jsonl", [{"prompt": "hi"}, {"prompt": "yo", "answer": "1"},
                                                              {"prompt": "so"}]),
    }


def lora_policy(llama_dir: Path, tok, boost: torch.Tensor | None = None):
    """The tiny Llama with LoRA (B = 0: the policy is its reference); `boost` (V,) is added to its logits."""
    base = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    if boost is None:
        boost = torch.zeros(len(tok))
        boost[tok.convert_tokens_to_ids("<|im_end|>")] = STOP_BOOST
    base.lm_head.register_forward_hook(lambda mod, args, out: out + boost)  # policy and reference both see it
    return METHODS["lora"].apply(base, build_config({"method": {"name": "lora", "r": 4, "dropout": 0.0}}).method)


def make_runtime(llama_dir, tok, files, data: str = "chat", batch_size: int = 4, eval_data: str | None = None,
                 boost: torch.Tensor | None = None, **objective):
    cfg = build_config({
        "model": {"name_or_path": str(llama_dir)},
        "data": {"train": str(files[data]), "eval": str(files[eval_data]) if eval_data else None, "max_length": 64},
        "method": {"name": "lora", "r": 4, "dropout": 0.0},
        "objective": {"name": "grpo", "num_generations": 3, "prompts_per_rollout": 2, "max_new_tokens": 6,
                      **objective},
        "train": {"batch_size": batch_size, "seed": 3},
    })
    policy = lora_policy(llama_dir, tok, boost)
    spec = OBJECTIVES[cfg.objective.name]
    data = load_tokenized(cfg.data, "train", tok, mask_prompt=True, formats=spec.formats, log=tiny.quiet)
    runtime = spec.make_runtime(RunContext(cfg, policy, tok, CPU, tiny.quiet, data.examples, tok.pad_token_id))
    stream = runtime.stream(BatchStream(data.examples, batch_size=batch_size, packing=False, max_length=64, seed=3,
                                        pad_id=tok.pad_token_id))
    return runtime, stream, policy, data.examples


def replies_of(mb) -> list[list[int]]:
    return [[int(x) for x in row if int(x) != IGNORE] for row in mb.tensors["labels"]]


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_a_rollout_samples_each_prompt_g_times_and_scores_them_in_groups(llama_dir, tok, files, length_reward,
                                                                         loss_type):
    runtime, stream, policy, examples = make_runtime(llama_dir, tok, files, reward=length_reward, beta=0.1,
                                                     loss_type=loss_type, epochs=2)
    assert isinstance(stream, RolloutStream) and runtime.reference.kind == "adapter-disabled policy"
    assert stream.micro_batches_per_epoch() == 2 * math.ceil(2 * 3 / 4)
    mbs = stream.next_group(4)  # one rollout: 2 epochs x (4 + 2) replies
    assert runtime.pending is None and runtime.n_rollouts == 1
    assert [len(mb.where) for mb in mbs] == [4, 2, 4, 2]
    where = [w for mb in mbs[:2] for w in mb.where]
    assert sorted(where) == sorted(w for mb in mbs[2:] for w in mb.where)
    assert sorted({w: where.count(w) for w in where}.values()) == [3, 3]  # 2 prompts x G = 3
    # each chat's prompt is its user turn with the generation prompt: the start of the chat's own ids
    template = resolve_template(None, tok)
    record = chat_records(8)[int(where[0].rsplit(":", 1)[1]) - 1]
    query = prompt_example({"prompt": record["messages"][:1]}, tok, template, "").input_ids
    chat_ids = next(e.input_ids for e in examples if e.where == where[0])
    assert chat_ids[: len(query)] == query and len(chat_ids) > len(query)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    advantages: dict[str, list[float]] = {}
    rewards: dict[str, list[float]] = {}
    for mb in mbs[:2]:
        t = mb.tensors
        mask = t["reply_mask"]
        assert mb.n_trained == (int(mask.sum()) if loss_type == "dapo" else len(mb.where))
        assert torch.equal(mask, t["labels"][:, 1:] != IGNORE) and t["advantages"].shape == (len(mb.where),)
        for r, ids in enumerate(replies_of(mb)):
            assert 1 <= len(ids) <= 6 and (len(ids) == 6 or ids[-1] == im_end)
            assert t["input_ids"][r, : len(query)].tolist() == query or mb.where[r] != where[0]
            text = drop_lead(tok.decode(ids, skip_special_tokens=True), reply_lead(tok))  # as rewards read it
            rewards.setdefault(mb.where[r], []).append(len(text) / 10)
            advantages.setdefault(mb.where[r], []).append(float(t["advantages"][r]))
        # the sampling policy's log-probs, and the reference's: the LoRA policy at init is its reference
        with torch.no_grad():
            logits = policy(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, t["input_ids"][:, 1:, None])[..., 0]
        torch.testing.assert_close(t["old_logp"][mask], logp[mask], rtol=1e-5, atol=1e-5)
        assert torch.equal(t["ref_logp"], t["old_logp"]) and not t["old_logp"][~mask].any()
    # advantages: (r - mean) / (std + 1e-4) within each prompt's G replies
    for w, rs in rewards.items():
        want = naive_advantages(rs, 3, scale=True, leave_one_out=False)
        assert advantages[w] == pytest.approx(want, abs=1e-5)  # the same reply order: the same list
    stats = runtime.stats()
    all_r = [x for rs in rewards.values() for x in rs]
    assert stats["reward"] == pytest.approx(sum(all_r) / 6, abs=1e-6) and stats["kl"] == 0.0
    assert stats["reward_std"] == pytest.approx(sum(torch.tensor(rs).std().item() for rs in rewards.values()) / 2,
                                                abs=1e-5)
    assert stats["frac_zero_std"] == sum(len(set(rs)) == 1 for rs in rewards.values()) / 2
    assert 0 <= stats["truncated_fraction"] <= 1 and 1 <= stats["response_length"] <= 6 and stats["entropy"] > 0
    # the loss of the first minibatch: ratio 1, no KL yet, so the policy loss is -mean A per the variant
    policy.train()
    loss, n = runtime.loss(policy, mbs[0].tensors)
    t = mbs[0].tensors
    per_row = t["reply_mask"].sum(-1)
    adv = t["advantages"]
    want = -float((adv * per_row).sum() / per_row.sum()) if loss_type == "dapo" else -float(adv.mean())
    assert float(loss.detach()) / int(n) == pytest.approx(want, abs=1e-5) and int(n) == mbs[0].n_trained
    loss_stats = runtime.stats()
    assert loss_stats["approx_kl"] < 1e-10 and loss_stats["clip_fraction"] == 0.0 and loss_stats["kl_token"] < 1e-10
    with pytest.raises(TunelabError, match="rollouts") as e:
        runtime.loss(policy, {k: t[k] for k in ("input_ids", "attention_mask", "labels")})
    assert e.value.fix
    with pytest.raises(TunelabError, match="runtime"):
        OBJECTIVES["grpo"].loss(policy, t, runtime.cfg)


def test_the_rest_of_a_rollout_survives_a_checkpoint_exactly(llama_dir, tok, files, length_reward):
    runtime, stream, _, _ = make_runtime(llama_dir, tok, files, reward=length_reward, batch_size=2)
    first = stream.next_group(1)[0]
    state = json.loads(json.dumps(runtime.state_dict()))  # what trainer_state.json keeps
    assert len(state["pending"]["todo"]) == 2 and state["n_rollouts"] == 1
    rest = stream.next_group(2)
    assert runtime.pending is None
    other, _, _, _ = make_runtime(llama_dir, tok, files, reward=length_reward, batch_size=2)
    other.load_state_dict(state)
    replay = [other.next_minibatch() for _ in range(2)]
    assert other.pending is None and other.stats()["reward"] == runtime.history[0]["reward"]
    for a, b in zip(rest, replay, strict=True):
        assert a.where == b.where and a.n_trained == b.n_trained
        assert a.tensors.keys() == b.tensors.keys()
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert sorted(first.where + [w for mb in rest for w in mb.where]) == sorted(state["pending"]["where"])
    assert isinstance(Rollout(**state["pending"]), Rollout)


# ----------------------------------------------------------------------------- the credit path, on known answers


@pytest.fixture
def amber_reward(request):
    """1 for the reply "amber" (then the end of turn or nothing), 0 for anything else."""
    register_reward("test_amber", lambda reply, record: float(reply.strip() == "amber"))
    request.addfinalizer(lambda: REWARDS.pop("test_amber", None))
    return "test_amber"


def test_each_on_policy_step_raises_the_probability_of_the_one_rewarded_reply(llama_dir, tok, files, amber_reward):
    """A toy task with a known optimum: the reply "amber<|im_end|>" scores 1, every other 0, so the expected
    reward is pi(amber | prompt) * pi(<|im_end|> | prompt, amber), computed exactly here (not sampled). One
    rollout = one minibatch = one on-policy Adam step, as the loop takes it: every step must raise it. A
    wrong sign, an advantage given to another group's reply or log-probs one position off do not."""
    (amber,) = tok(" amber", add_special_tokens=False)["input_ids"]  # a reply starts with the template's space
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    boost = torch.zeros(len(tok))
    boost[[amber, im_end]] = STOP_BOOST  # the random model samples "amber<|im_end|>" in ~2% of replies
    runtime, stream, policy, examples = make_runtime(llama_dir, tok, files, boost=boost, reward=amber_reward, beta=0.0,
                                                     num_generations=16, prompts_per_rollout=4, max_new_tokens=2,
                                                     batch_size=64)
    queries = [runtime.query(e) for e in examples]

    @torch.no_grad()
    def expected_reward() -> float:
        policy.eval()
        total = 0.0
        for q in queries:
            logp = torch.log_softmax(policy(input_ids=torch.tensor([q + [amber]])).logits[0].double(), -1)
            total += float((logp[-2, amber] + logp[-1, im_end]).exp())
        return total / len(queries)

    opt = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=3e-3)
    curve, sampled = [expected_reward()], []
    for _ in range(5):
        (mb,) = stream.next_group(1)
        assert runtime.pending is None and len(mb.where) == 64  # the whole rollout in one step
        policy.train()
        loss, n = runtime.loss(policy, mb.tensors)
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
        sampled.append(runtime.stats()["reward"])
        curve.append(expected_reward())
    assert any(sampled), "no rollout sampled the rewarded reply: the test teaches nothing"
    assert all(b > a for a, b in zip(curve, curve[1:], strict=False)), curve
    assert curve[-1] > 1.4 * curve[0], curve


def naive_reply_logps(model, query: list[int], reply: list[int], temperature: float) -> torch.Tensor:
    """log softmax(logits / T) of each reply token, the sequence alone (no padding, positions from 0)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([query + reply])).logits[0, len(query) - 1 : -1]  # (R, V)
    return torch.log_softmax(logits.double() / temperature, -1).gather(-1, torch.tensor(reply)[:, None])[:, 0]


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_rollout_log_probs_are_the_sampling_policys_recomputed_one_reply_at_a_time(llama_dir, tok, files,
                                                                                 length_reward, temperature):
    runtime, stream, policy, _ = make_runtime(llama_dir, tok, files, reward=length_reward, beta=0.1,
                                              temperature=temperature, num_generations=4, prompts_per_rollout=3,
                                              batch_size=6)
    torch.manual_seed(0)
    with torch.no_grad():  # a trained adapter: the policy is no longer its reference
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    mbs = stream.next_group(2)
    policy.eval()
    n_query, checked = set(), 0
    for mb in mbs:
        t = mb.tensors
        for r, reply in enumerate(replies_of(mb)):
            row = t["input_ids"][r][t["attention_mask"][r].bool()].tolist()
            query = row[: len(row) - len(reply)]
            n_query.add(len(query))
            mask = t["reply_mask"][r]
            torch.testing.assert_close(t["old_logp"][r][mask].double(), naive_reply_logps(policy, query, reply,
                                                                                          temperature),
                                       rtol=0, atol=2e-5)
            with policy.disable_adapter():
                ref = naive_reply_logps(policy, query, reply, temperature)
            torch.testing.assert_close(t["ref_logp"][r][mask].double(), ref, rtol=0, atol=2e-5)
            checked += 1
    assert checked == 12 and len(n_query) > 1  # prompts of several lengths: the rollout batch was padded
    assert not torch.equal(mbs[0].tensors["old_logp"], mbs[0].tensors["ref_logp"])
    # the first inner step is on-policy: the loss's log-probs are the rollout's, ratio exactly 1
    policy.train()
    runtime.loss(policy, mbs[0].tensors)
    stats = runtime.stats()
    assert stats["approx_kl"] < 1e-12 and stats["clip_fraction"] == 0.0 and stats["kl_token"] > 0


def test_replies_are_sampled_from_softmax_of_logits_over_temperature_and_nothing_else(llama_dir, tok, files,
                                                                                    length_reward):
    """No hidden top_k (transformers' default is 50), top_p or the model's own generation_config temperature:
    the first reply token's frequencies match softmax(logits / T) of the prompt alone, within 4 sigma."""
    temperature, g = 0.7, 1000
    boost = torch.zeros(len(tok))
    boost[tok.convert_tokens_to_ids("<|im_end|>")] = STOP_BOOST
    boost[torch.arange(10, 30)] = torch.linspace(3.0, 0.5, 20)  # a peaked head and a long tail of ~370 tokens
    runtime, stream, policy, _ = make_runtime(llama_dir, tok, files, boost=boost, reward=length_reward,
                                              temperature=temperature, num_generations=g, prompts_per_rollout=2,
                                              max_new_tokens=1, batch_size=500)
    policy.generation_config.update(top_k=3, top_p=0.5, temperature=3.0)  # what a shipped model may carry
    stream.next_group(1)
    rollout = runtime.pending
    for s in (0, g):
        query = rollout.rows[s][: rollout.n_query[s]]
        assert all(row[: rollout.n_query[s]] == query for row in rollout.rows[s : s + g])
        first = torch.tensor([row[rollout.n_query[s]] for row in rollout.rows[s : s + g]])
        freq = torch.bincount(first, minlength=len(tok)).double() / g  # (V,)
        with torch.no_grad():
            p = torch.softmax(policy(input_ids=torch.tensor([query])).logits[0, -1].double() / temperature, -1)
        order = p.argsort(descending=True)
        head, tail = order[:5], order[50:]  # a top_k of 50 would leave the tail no mass at all
        for ids in [*head[:, None], tail]:
            want, got = float(p[ids].sum()), float(freq[ids].sum())
            assert abs(got - want) < 4 * math.sqrt(want * (1 - want) / g), (ids.tolist()[:3], got, want)
        assert float(p[tail].sum()) > 0.2


def test_records_without_an_answer_are_refused_by_file_and_line(llama_dir, tok, files):
    with pytest.raises(DataError) as e:
        make_runtime(llama_dir, tok, files, data="no_answer", reward="exact_match")
    assert "2 record(s)" in e.value.message and "exact_match" in e.value.message and "answer" in e.value.fix
    assert [p.split(": ", 1)[0] for p in e.value.problems] == [f"{files['no_answer']}:1", f"{files['no_answer']}:3"]
    with pytest.raises(DataError) as e:  # eval records too, before any training
        make_runtime(llama_dir, tok, files, data="prompts", eval_data="no_answer", reward="numeric")
    assert [p.split(": ", 1)[0] for p in e.value.problems] == [f"{files['no_answer']}:1", f"{files['no_answer']}:3"]
    # a reward model needs no answer
    runtime, *_ = make_runtime(llama_dir, tok, files, data="no_answer", reward_model=str(files["rm"]))
    assert runtime.scorer.model is not None


# ----------------------------------------------------------------------------- end to end


def run_config(llama_dir, files, run: Path, **objective) -> dict:
    return {
        "model": {"name_or_path": str(llama_dir)},
        "data": {"train": str(files["chat"]), "eval": str(files["chat_eval"]), "max_length": 64},
        "method": {"name": "lora", "r": 4, "dropout": 0.0},
        "objective": {"name": "grpo", "num_generations": 2, "prompts_per_rollout": 2, "max_new_tokens": 6,
                      "epochs": 2, **objective},
        # 2 prompts x 2 replies / batch 2 x 2 epochs = 4 minibatches (steps) per rollout: 6 steps = 1.5 rollouts
        "train": {"max_steps": 6, "batch_size": 2, "lr": 1e-2, "scheduler": "constant", "eval_every": 4,
                  "save_every": 1, "keep_last": 10, "tensorboard": False, "precision": "fp32"},
        "output": {"dir": str(run)},
    }


def metric_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_grpo_run_logs_evaluates_and_resumes_mid_rollout_bit_identically(llama_dir, tok, files, length_reward,
                                                                        tmp_path):
    run = tmp_path / "run"
    cfg = run_config(llama_dir, files, run, reward=length_reward, loss_type="dapo", beta=0.1, epsilon_high=0.28,
                     eval_prompts=2)
    result = tunelab.train(cfg, quiet=True)
    assert result.status == "completed" and result.steps == 6
    lines = metric_lines(run)
    steps = [m for m in lines if "loss" in m]
    keys = {"reward", "reward_std", "frac_zero_std", "kl", "response_length", "truncated_fraction", "entropy",
            "policy_loss", "clip_fraction", "approx_kl", "kl_token"}
    for m in steps:
        assert keys <= set(m), keys - set(m)
        assert all(math.isfinite(m[k]) for k in keys) and 0 <= m["frac_zero_std"] <= 1
    assert [m["rollout"] for m in steps] == [0.0] * 4 + [1.0] * 2
    assert len({(m["reward"], m["kl"], m["entropy"]) for m in steps[:4]}) == 1
    assert steps[0]["kl"] == 0.0 and steps[0]["approx_kl"] == 0.0 and steps[4]["approx_kl"] < 1e-8
    # evaluation: greedy replies of the policy and of the base to the first 2 eval prompts, rewarded
    evals = [m for m in lines if "eval_reward" in m]
    assert [m["step"] for m in evals] == [4, 6]
    base = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    ref = greedy(base, tok, [r["messages"][:1] for r in chat_records(2, offset=4)], max_new_tokens=6, chat=True)
    for m in evals:
        assert m["eval_reward_reference"] == pytest.approx(sum(len(x) / 10 for x in ref) / 2)
        assert m["eval_win_rate"] in {k / 4 for k in range(5)}
    rollouts = [json.loads(x) for x in (run / "rollouts.jsonl").read_text().splitlines()]
    assert [r["rollout"] for r in rollouts] == [0, 1] and rollouts[0]["reward"] == pytest.approx(steps[0]["reward"])
    assert (run / "reward_curve.png").read_bytes()[:8] == PNG
    state = json.loads((run / "checkpoints" / "step-2" / "trainer_state.json").read_text())["objective_state"]
    assert len(state["pending"]["todo"]) == 2 and state["n_rollouts"] == 1
    saved = load_file(str(run / "final" / "adapter_model.safetensors"))
    assert any("lora_B" in k and float(v.abs().sum()) > 0 for k, v in saved.items())  # the policy trained
    # resumed from the middle of a rollout (step 2) and of the next (step 5): the same steps, bit for bit
    for ckpt in ("step-2", "step-5"):
        again = tunelab.train(cfg, quiet=True, resume_from=ckpt)
        assert again.status == "completed"
        replayed = load_file(str(run / "final" / "adapter_model.safetensors"))
        assert all(torch.equal(saved[k], replayed[k]) for k in saved), f"resumed from {ckpt}: weights differ"
        tail = [m for m in metric_lines(run) if "loss" in m][-(6 - int(ckpt[-1])):]
        for a, b in zip(steps[int(ckpt[-1]):], tail, strict=True):
            assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}


def test_rloo_run_with_a_reward_model_on_prompt_records(llama_dir, tok, files, reward_model_scores, tmp_path):
    run = tmp_path / "rloo"
    cfg = run_config(llama_dir, files, run, name="rloo", reward_model=str(files["rm"]), epochs=1, epsilon=None)
    cfg["data"] = {"train": str(files["prompts"]), "eval": str(files["chat_eval"]), "max_length": 64}
    cfg["train"].update(max_steps=4, eval_every=0, save_every=0)
    result = tunelab.train(cfg, quiet=True)
    assert result.status == "completed" and result.steps == 4
    lines = metric_lines(run)
    steps = [m for m in lines if "loss" in m]
    assert all({"reward", "reward_std", "frac_zero_std", "kl", "clip_fraction", "policy_loss"} <= set(m)
               for m in steps)
    assert "kl_token" not in steps[0] and steps[0]["clip_fraction"] == 0.0  # rloo: KL in the reward, no clip
    (final,) = [m for m in lines if "eval_reward" in m]
    assert final["eval_reward_reference"] == pytest.approx(reward_model_scores, abs=1e-4)


@pytest.fixture(scope="module")
def reward_model_scores(files, llama_dir, tok) -> float:
    """The reward model's mean score of the base's greedy replies to the eval chats' questions."""
    rm, rm_tok = tunelab.load(files["rm"])
    prompts = [r["messages"][:1] for r in chat_records(3, offset=4)]
    base = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    replies = greedy(base, tok, prompts, max_new_tokens=6, chat=True)
    return sum(rewards_of(rm.eval(), rm_tok, list(zip(prompts, replies, strict=True)))) / 3
