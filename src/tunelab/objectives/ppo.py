"""RLHF with PPO `ppo` (O05): InstructGPT-style RL from a reward model or a verifiable reward, on the one loop.

Ziegler et al. 2019 (arXiv:1909.08593), Ouyang et al. 2022 (arXiv:2203.02155), PPO: Schulman et al.
2017 (arXiv:1707.06347), GAE: Schulman et al. 2016 (arXiv:1506.02438). Pieces:
- policy: the model being trained, with any method (full, LoRA, QLoRA, ...), plus a value head
  (a linear layer on the policy's last hidden state, zero-initialised, trained with it; it is
  checkpointed but not part of the exported model);
- reference: frozen (objectives/frozen.py: the adapter-disabled policy for peft, no copy);
- the score of a reply, exactly one of (objectives/rewards.py, shared with grpo and rloo): `reward_model`, a
  scalar-head model trained with objective `reward`, or `reward`, a registered function of the reply and
  its record (exact_match, contains_answer, numeric against the record's "answer", or your own).

One rollout: `rollout_prompts` prompts from data.train (`{"prompt"}` records, with an "answer" for the
built-in rewards; in the seeded order of the data stream) -> sampled replies (temperature, top_k, at
most max_new_tokens, cut after the stop token) -> per-token rewards r_t = -kl_coef * KL_t (kl_estimator,
policy vs reference at rollout) with the reply's score (optionally whitened over the rollout) added at
the last reply token -> values -> GAE advantages (whitened) and returns. Then `ppo_epochs` passes over
the rollout in shuffled minibatches of train.batch_size replies; each minibatch is a micro-batch
of the loop (one optimizer step per grad_accum minibatches): clipped policy loss + vf_coef x
clipped value loss - entropy_coef x entropy, token-weighted. After each rollout the adaptive KL
controller (kl_target set) moves kl_coef towards the target KL per reply.

Logged per step (the rollout's numbers repeat until the next rollout): reward (mean score),
kl (mean summed KL per reply), kl_coef, entropy, response_length, and per minibatch
clip_fraction, approx_kl, value_loss, policy_loss. Evaluation (data.eval prompts): greedy replies
of the policy and of the reference, scored as the rollouts are: eval_reward, eval_reward_reference,
eval_win_rate (ties count half). At the end, reward_curve.png in the run dir.

Resume: a checkpoint keeps the policy, value head, optimizer, data cursor, kl_coef and what is left of
the current rollout (per reply its ids, and per reply token the sampling log-prob, value, advantage and
return, plus the minibatches still to run; JSON in trainer_state.json), so a run resumed mid-rollout
trains on exactly what the uninterrupted run would (bit-identical on CPU in fp32, tested).
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from peft import PeftModel
from pydantic import Field
from torch import nn

from tunelab.data.collate import collate
from tunelab.data.stream import MicroBatch
from tunelab.data.templates import resolve_template
from tunelab.data.types import IGNORE, Example
from tunelab.errors import TunelabError
from tunelab.inference.generation import generate_ids, greedy, pad_id, reply_lead, reply_text, stop_token_ids
from tunelab.inference.logits import tempered, tempered_logits
from tunelab.modeling.heads import ClassifierModel
from tunelab.objectives.alignment_losses import (
    AdaptiveKLController,
    entropy_from_logits,
    gae,
    kl_per_token,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    token_logps,
)
from tunelab.objectives.frozen import Reference, check_same_vocab, load_frozen, unwrap
from tunelab.objectives.registry import RunContext, Runtime, StatSums, register_objective
from tunelab.objectives.rewards import RewardChoice, Scorer, compare, prompt_of

VALUE_HEAD = "tunelab_value_head"


class PPOConfig(RewardChoice):
    name: Literal["ppo"] = "ppo"
    reference: str | None = Field(None, description="reference policy; default: adapter-disabled policy or a copy")
    rollout_prompts: int = Field(64, gt=0, description="prompts per rollout")
    max_new_tokens: int = Field(24, gt=0)
    temperature: float = Field(1.0, gt=0.0)
    top_k: int | None = Field(None, gt=0, description="sample from the k most likely tokens (None: all)")
    ppo_epochs: int = Field(2, gt=0, description="passes over each rollout")
    clip: float = Field(0.2, gt=0.0, description="policy ratio clip")
    value_clip: float = Field(0.2, gt=0.0)
    vf_coef: float = Field(0.1, ge=0.0)
    entropy_coef: float = Field(0.0, ge=0.0)
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    lam: float = Field(0.95, ge=0.0, le=1.0)
    kl_coef: float = Field(0.05, ge=0.0, description="initial coefficient of the per-token KL penalty")
    kl_target: float | None = Field(6.0, gt=0.0, description="target KL per reply (adaptive coefficient); None: fixed")
    kl_horizon: int = Field(10000, gt=0, description="horizon of the adaptive KL controller (replies)")
    kl_estimator: Literal["k1", "k2", "k3", "abs"] = "k1"
    whiten_rewards: bool = False
    missing_stop_penalty: float | None = Field(None, description="added to the score of a reply that never stops")
    value_model: str | None = Field(
        None, description="a separate value model: the body of this model (a causal LM, LoRA run or reward model, "
        "e.g. the reward model) under the value head, trained beside the policy; default: the head on the "
        "policy's own last hidden state")


class ValueHead(nn.Module):
    """V(s_t) = w . h_t + b, zero-initialised, on the policy's last hidden state h_t, or on that of a
    separate `body` (objective.value_model) that trains with it."""

    def __init__(self, hidden: int, like: torch.Tensor, body: nn.Module | None = None):
        super().__init__()
        self.body = body
        self.proj = nn.Linear(hidden, 1, device=like.device, dtype=torch.float32)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.float()).squeeze(-1)  # (B, T)

    def of_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Values (B, T) from the separate body's last hidden state."""
        assert self.body is not None
        out = self.body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return self(out.last_hidden_state)


def value_body(path: str, device: torch.device, tokenizer: Any) -> nn.Module:
    """The transformer body of `path` (its LM head or reward head dropped; a LoRA merged), trainable."""
    model, tok = load_frozen(path, device, "value model")
    check_same_vocab(tokenizer, tok, "value model", path)
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    body = model.body if isinstance(model, ClassifierModel) else model.base_model
    return body.train().requires_grad_(True)


def policy_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, T, V), values (B, T)) for the batch's T tokens (virtual-token positions dropped)."""
    t = batch["input_ids"].shape[1]
    head = getattr(unwrap(model), VALUE_HEAD)
    separate = head.body is not None
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                output_hidden_states=not separate)
    return out.logits[:, -t:], head.of_tokens(batch) if separate else head(out.hidden_states[-1][:, -t:])


def right_pad(rows: list[list[int]], n_query: list[int], pad: int) -> dict[str, torch.Tensor]:
    """Query+reply rows right-padded (data/collate.py): input_ids, attention_mask, labels (IGNORE except
    reply tokens)."""
    examples = [Example(row, [IGNORE] * q + row[q:]) for row, q in zip(rows, n_query, strict=True)]
    return collate([[ex] for ex in examples], pad_id=pad, packed=False)


def spread(values: list[list[float]], mask: torch.Tensor) -> torch.Tensor:
    """Per-reply-token values laid on the reply positions of `mask` (N, T-1), 0 elsewhere."""
    out = torch.zeros(mask.shape, dtype=torch.float32)
    out[mask] = torch.tensor([v for row in values for v in row], dtype=torch.float32)
    return out


def gather(x: torch.Tensor, mask: torch.Tensor) -> list[list[float]]:
    """The inverse of `spread`: each row's values at its reply positions."""
    return [row[m].tolist() for row, m in zip(x.float().cpu(), mask.cpu(), strict=True)]


def minibatch(data: dict[str, torch.Tensor], idx: list[int], where: list[str], unit: str) -> MicroBatch:
    """Replies `idx` of a rollout's tensors, all-padding columns dropped; units: replies with a token or tokens."""
    width_all = data["input_ids"].shape[1]
    width = int(data["attention_mask"][idx].sum(-1).max())
    t = {k: v[idx] if v.dim() == 1 else v[idx][:, : width if v.shape[1] == width_all else width - 1]
         for k, v in data.items()}
    mask = t["reply_mask"]
    n = int(mask.sum()) if unit == "tokens" else int(mask.any(-1).sum())
    return MicroBatch(t, [where[i] for i in idx], n, int(t["attention_mask"].sum()))


@dataclass
class Rollout:
    """One PPO rollout, JSON-able (a checkpoint keeps what is left of it): per reply its prompt + reply ids,
    prompt length and record, and per reply token the sampling policy's log-prob and value, the advantage
    and the return; and the minibatches (reply indices) still to train on."""

    rows: list[list[int]]
    n_query: list[int]
    where: list[str]
    old_logp: list[list[float]]
    old_values: list[list[float]]
    advantages: list[list[float]]
    returns: list[list[float]]
    todo: list[list[int]]

    def tensors(self, pad: int) -> dict[str, torch.Tensor]:
        batch = right_pad(self.rows, self.n_query, pad)
        mask = batch["labels"][:, 1:] != IGNORE  # (N, T-1): position t-1 predicts reply token t
        return {**batch, "reply_mask": mask, **{k: spread(getattr(self, k), mask) for k in
                                                ("old_logp", "old_values", "advantages", "returns")}}


class RolloutStream:
    """The loop's stream for the rollout objectives (ppo, grpo, rloo): minibatches of the current rollout
    (`runtime.pending`, taken by `runtime.next_minibatch()`); `runtime.rollout(prompts)` samples the next
    one from `per_rollout` prompts when it is used up. An "epoch" is one rollout's minibatches."""

    def __init__(self, runtime: Any, prompts: Any, per_rollout: int, minibatches: int):
        self.runtime, self.prompts = runtime, prompts
        self.per_rollout, self.minibatches = per_rollout, minibatches

    def micro_batches_per_epoch(self) -> int:
        return self.minibatches

    def state(self) -> dict[str, Any]:
        return self.prompts.state()

    def restore(self, state: dict[str, Any]) -> None:
        self.prompts.restore(state)  # the rest of the rollout comes back with the runtime's state

    def next_group(self, n: int) -> list[MicroBatch]:
        out = []
        for _ in range(n):
            if self.runtime.pending is None:
                self.runtime.rollout(self.prompts.next_examples(self.per_rollout))
            out.append(self.runtime.next_minibatch())
        return out


class PPORuntime(Runtime):
    def __init__(self, ctx: RunContext):
        super().__init__(ppo, ctx.cfg.objective)
        cfg: PPOConfig = ctx.cfg.objective
        self.ctx, self.policy, self.tokenizer = ctx, ctx.model, ctx.tokenizer
        self.batch_size = ctx.cfg.train.batch_size
        self.seed = ctx.cfg.train.seed
        self.reference = Reference(ctx.model, cfg.reference, ctx.device, ctx.tokenizer)
        self.scorer = Scorer.of_run(ctx)  # the records checked before any training
        # the prompts are rendered with the run's template: its reply lead is not part of a reply's text
        self.lead = reply_lead(ctx.tokenizer, resolve_template(ctx.cfg.data.chat_template, ctx.tokenizer).source)
        self.records = self.scorer.records
        hidden = unwrap(ctx.model).get_input_embeddings().weight
        body = value_body(cfg.value_model, ctx.device, ctx.tokenizer) if cfg.value_model is not None else None
        width = body.config.hidden_size if body is not None else hidden.shape[1]
        setattr(unwrap(ctx.model), VALUE_HEAD, ValueHead(width, hidden, body))
        self.kl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        self.sums = StatSums()
        self.rollout_stats: dict[str, float] = {}
        self.n_rollouts = 0
        self.history: list[dict[str, float]] = []
        self.pending: Rollout | None = None  # what is left of the current rollout
        self._tensors: dict[str, torch.Tensor] | None = None
        ctx.say(f"ppo: reference = {self.reference.kind}; reward {self.scorer.label}; value "
                f"{'model ' + cfg.value_model if body is not None else 'head on the policy'}; "
                f"{cfg.rollout_prompts} prompts per rollout x {cfg.ppo_epochs} epochs")

    # -------------------------------------------------------------- the loop's hooks

    def stream(self, default: Any) -> RolloutStream:
        cfg = self.cfg
        return RolloutStream(self, default, cfg.rollout_prompts, cfg.ppo_epochs * -(-cfg.rollout_prompts //
                                                                                   self.batch_size))

    def state_dict(self) -> dict[str, Any]:
        return {"kl": self.kl.state_dict(), "n_rollouts": self.n_rollouts, "history": self.history,
                "rollout_stats": self.rollout_stats, "pending": None if self.pending is None else asdict(self.pending)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.kl.load_state_dict(state["kl"])
            self.n_rollouts = state["n_rollouts"]
            self.history = list(state.get("history", []))
            self.rollout_stats = dict(state.get("rollout_stats", {}))
            self.pending = Rollout(**state["pending"]) if state.get("pending") else None
            self._tensors = None

    def next_minibatch(self) -> MicroBatch:
        p = self.pending
        assert p is not None and p.todo
        if self._tensors is None:
            self._tensors = p.tensors(pad_id(self.tokenizer))
        mb = minibatch(self._tensors, p.todo.pop(0), p.where, "tokens")
        if not p.todo:
            self.pending, self._tensors = None, None
        return mb

    def stats(self) -> dict[str, float]:
        return {**self.rollout_stats, **self.sums.take()}

    # -------------------------------------------------------------- rollouts

    @torch.no_grad()
    def rollout(self, prompts: list[Example]) -> None:
        cfg: PPOConfig = self.cfg
        device = self.ctx.device
        torch.manual_seed(self.seed * 1_000_003 + self.n_rollouts)
        queries = [list(p.input_ids) for p in prompts]
        replies = generate_ids(unwrap(self.policy), self.tokenizer, queries, max_new_tokens=cfg.max_new_tokens,
                               batch_size=len(queries), temperature=cfg.temperature, top_k=cfg.top_k)
        stops = stop_token_ids(unwrap(self.policy), self.tokenizer)
        replies = [r if r else [stops[0]] for r in replies]
        texts = [reply_text(self.tokenizer, r, self.lead) for r in replies]
        scores = torch.tensor(self.scorer([p.where for p in prompts], texts))  # (N,)
        if cfg.missing_stop_penalty is not None:
            scores = scores + torch.tensor([0.0 if r[-1] in stops else cfg.missing_stop_penalty for r in replies])
        batch = right_pad([q + r for q, r in zip(queries, replies, strict=True)], [len(q) for q in queries],
                          pad_id(self.tokenizer))
        batch = {k: v.to(device) for k, v in batch.items()}
        was_training = self.policy.training
        self.policy.eval()
        logits, values = policy_forward(self.policy, batch)
        self.policy.train(was_training)
        # log-probs of the sampling distribution, softmax(logits / temperature), here, in the loss and the reference
        logp, mask = token_logps(tempered(logits, cfg.temperature), batch["labels"])  # (N, T-1): t-1 predicts t
        ref_logp, _ = token_logps(self.reference.forward(self.policy, functools.partial(
            tempered_logits, temperature=cfg.temperature), batch), batch["labels"])
        values = values[:, :-1] * mask  # value before each reply token
        maskf = mask.float()
        kl = kl_per_token(logp, ref_logp, cfg.kl_estimator) * maskf  # (N, T-1)
        score = masked_whiten(scores, torch.ones_like(scores, dtype=torch.bool), shift_mean=False) \
            if cfg.whiten_rewards else scores
        rewards = -self.kl.coef * kl
        last = mask.long().cumsum(-1).argmax(-1)  # index of the last reply token per row
        rewards[torch.arange(len(replies)), last] += score.to(device)
        adv, returns = gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
        adv = masked_whiten(adv, mask)
        kl_per_reply = float(kl.sum(-1).mean())
        entropy = float(masked_mean(entropy_from_logits(logits[:, :-1].float()), mask))
        self.rollout_stats = {"reward": float(scores.mean()), "kl": kl_per_reply, "kl_coef": self.kl.coef,
                              "entropy": entropy, "response_length": float(maskf.sum(-1).mean()),
                              "rollout": float(self.n_rollouts)}
        self.history.append({"rollout": self.n_rollouts, "reward": float(scores.mean()), "kl": kl_per_reply})
        self.kl.update(kl_per_reply, len(replies))
        self.n_rollouts += 1
        rows = [q + r for q, r in zip(queries, replies, strict=True)]
        self.pending = Rollout(rows, [len(q) for q in queries], [p.where for p in prompts], gather(logp, mask),
                               gather(values, mask), gather(adv, mask), gather(returns, mask), self._order(len(rows)))
        self._tensors = None

    def _order(self, n: int) -> list[list[int]]:
        """`ppo_epochs` shuffled passes over the rollout's n replies, in minibatches of train.batch_size."""
        rng = random.Random(f"{self.seed}/ppo/{self.n_rollouts}")
        out = []
        for _ in range(self.cfg.ppo_epochs):
            order = list(range(n))
            rng.shuffle(order)
            out += [order[s : s + self.batch_size] for s in range(0, n, self.batch_size)]
        return out

    # -------------------------------------------------------------- the loss

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if "advantages" not in batch:
            raise TunelabError("objective ppo trains on its own rollouts; this batch is not one",
                               fix="evaluate a PPO run with `tunelab eval` on prompts")
        cfg: PPOConfig = self.cfg
        logits, values = policy_forward(model, batch)
        logits = tempered(logits, cfg.temperature)
        logp, _ = token_logps(logits, batch["labels"])
        mask = batch["reply_mask"]
        pg, pg_stats = ppo_policy_loss(logp, batch["old_logp"], batch["advantages"], mask, clip=cfg.clip)
        vf, vf_clip = ppo_value_loss(values[:, :-1], batch["old_values"], batch["returns"], mask,
                                     clip=cfg.value_clip)
        total = pg + cfg.vf_coef * vf
        if cfg.entropy_coef:
            total = total - cfg.entropy_coef * masked_mean(entropy_from_logits(logits[:, :-1].float()), mask)
        n = mask.sum()
        k = float(n)
        for name, value in (("policy_loss", pg), ("value_loss", vf), ("clip_fraction", pg_stats["clip_fraction"]),
                            ("approx_kl", pg_stats["approx_kl"]), ("value_clip_fraction", vf_clip)):
            self.sums.add(name, float(value.detach()) * k, k)
        return total * n, n

    # -------------------------------------------------------------- evaluation and the end

    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples: list[Example]) -> dict[str, float]:
        """Greedy replies of the policy and of the reference to the eval prompts, rewarded."""
        where = [e.where for e in examples]
        prompts = [prompt_of(self.records[w]) for w in where]
        n = self.cfg.max_new_tokens
        mine = greedy(unwrap(model), self.tokenizer, prompts, max_new_tokens=n, chat=True)
        ref = self.reference.forward(model, lambda m: greedy(m, self.tokenizer, prompts, max_new_tokens=n, chat=True))
        scores = self.scorer(where * 2, mine + ref)  # both in one call: a reward model scores them in one batch
        return compare(scores[: len(where)], scores[len(where) :])

    def finish(self, model: nn.Module, run_dir: Path) -> None:
        """Detach the value head (not part of the exported policy) and draw the reward curve."""
        if hasattr(unwrap(model), VALUE_HEAD):
            delattr(unwrap(model), VALUE_HEAD)
        (run_dir / "rollouts.jsonl").write_text("".join(json.dumps(h) + "\n" for h in self.history),
                                                encoding="utf-8")
        plot_reward_curve(run_dir, self.ctx.say)


def plot_reward_curve(run_dir: Path, say: Any = print) -> Path | None:
    """reward_curve.png from the run's metrics.jsonl (reward and KL per step; eval reward)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("ppo: matplotlib is not installed; no reward_curve.png (pip install matplotlib)")
        return None
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    train = [r for r in rows if "reward" in r]
    evals = [r for r in rows if "eval_reward" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["reward"] for r in train], label="rollout reward (sampled)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_reward"] for r in evals], "o-", label="held-out reward (greedy)")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in train], [r["kl"] for r in train], color="grey", alpha=0.5, label="KL per reply")
    ax2.set_ylabel("KL to reference")
    fig.legend(loc="upper left")
    fig.tight_layout()
    out = run_dir / "reward_curve.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def ppo(model: nn.Module, batch: dict[str, torch.Tensor], cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    raise TunelabError("ppo needs its runtime (rollouts, reference, reward model): train it through tunelab.train")


register_objective(
    "ppo", PPOConfig, formats=("prompt",), mask_prompt=True, runtime=PPORuntime,
    summary="RLHF with PPO: rollouts, KL-penalised reward-model score, GAE, clipped policy and value losses",
)(ppo)
