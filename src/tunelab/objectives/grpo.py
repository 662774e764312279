"""Group-relative RL on the one loop: `grpo` (O11) and `rloo`, rewarded by a verifiable function or a reward model.

GRPO: Shao et al. 2024 (DeepSeekMath, arXiv:2402.03300); its `dr_grpo` normalisation: Liu et al. 2025
(arXiv:2503.20783); `dapo` token-level mean and clip-higher: Yu et al. 2025 (arXiv:2503.14476). RLOO:
Kool et al. 2019, Ahmadian et al. 2024 (arXiv:2402.14740). Losses and advantages are pure functions in
alignment_losses.py. Both objectives sample G replies per prompt and need no value model:

    GRPO   A_i = (r_i - mean_g r) / (std_g r + 1e-4)    (scale_rewards; off for dr_grpo)
           l_it = max(-A_i rho_it, -A_i clip(rho_it, 1-eps, 1+eps_high)) + beta k3_it,  rho = pi / pi_old
           reduced per loss_type: grpo (mean over tokens, then over replies), dr_grpo (sum / (replies x
           max_new_tokens)), dapo (mean over every token of the optimizer step)
    RLOO   R_i = r_i - beta sum_t log(pi_old / pi_ref)   (KL in the reward, k1, at rollout)
           A_i = R_i - mean_{j != i} R_j;  l_i = max(-A_i rho_i, -A_i clip(rho_i, ...)) with the reply's ratio rho_i

One rollout (PPO's pieces, objectives/ppo.py: the prompt stream, `right_pad`, the seeded sampling, the
frozen reference of objectives/frozen.py): `prompts_per_rollout` prompts from data.train in the seeded
order of the data stream, each sampled `num_generations` times -> rewards -> advantages per group ->
`epochs` shuffled passes in minibatches of train.batch_size replies, each a micro-batch of the loop
(one optimizer step per grad_accum of them). The loop normalises by the units of the whole step:
replies (grpo, dr_grpo, rloo) or reply tokens (dapo), so accumulation never changes the update.

Rewards (objectives/rewards.py, shared with ppo): `reward: <name>` picks a registered function
`fn(reply, record) -> float` (built in: exact_match, contains_answer, numeric, each against the record's
"answer"; exact_match without reward_model); `reward_model: <path>` a scalar-head model (objective reward).
A config only NAMES a reward: nothing is imported from it. Your own Python reward is registered from your
own script: `register_reward("mine", fn)` before `tunelab.train`. Data: `{"prompt", "answer"}` records, or
chats (`{"messages", "answer"}`, TinyWorld's skills) whose prompt is the conversation without its final
assistant turn.

Logged per step (the rollout's numbers repeat until the next rollout): reward, reward_std (mean std
within a group), frac_zero_std (groups whose replies all scored the same: no policy gradient),
kl (mean summed KL per reply to the reference at rollout; k3 for grpo, k1 for rloo; when there is a
reference), response_length, truncated_fraction (replies that never stopped), entropy; per minibatch
policy_loss, clip_fraction, approx_kl (and grpo's kl_token, the k3 in its loss). Evaluation (data.eval,
the first `eval_prompts`): greedy replies of the policy and of the reference: eval_reward (accuracy for
a 0/1 reward), eval_reward_reference, eval_win_rate (ties half). At the end rollouts.jsonl and
reward_curve.png.

Resume: a checkpoint keeps the unused rest of the current rollout (ids, sampling and reference
log-probs, advantages, the minibatches still to run), so a resumed run replays exactly what the
uninterrupted run would have trained on (PPO keeps its rollout the same way). pi is the policy replies are
sampled from, softmax(logits / temperature), in the rollout's log-probs, the loss and the reference alike
(as TRL); a `top_k` truncation is not divided out. Departures: one process;
DAPO's dynamic sampling and overlong shaping are not implemented; with beta 0 and a method that is
not a peft adapter there is no reference (no kl, no eval_reward_reference).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from peft import PeftModel
from pydantic import Field
from torch import nn

from tunelab.data.preference import prompt_example
from tunelab.data.stream import MicroBatch
from tunelab.data.templates import resolve_template
from tunelab.data.types import IGNORE, Example
from tunelab.errors import TunelabError
from tunelab.inference.generation import generate_ids, pad_id, reply_lead, reply_text, stop_token_ids
from tunelab.inference.logits import tempered_logits
from tunelab.objectives.alignment_losses import (
    GRPO_LOSSES,
    entropy_from_logits,
    group_advantages,
    grpo_token_loss,
    kl_per_token,
    leave_one_out_advantages,
    masked_mean,
    rloo_loss,
    token_logps,
)
from tunelab.objectives.frozen import Reference, unwrap
from tunelab.objectives.ppo import RolloutStream, gather, minibatch, plot_reward_curve, right_pad, spread
from tunelab.objectives.registry import RunContext, Runtime, StatSums, register_objective
from tunelab.objectives.rewards import (  # noqa: F401  (re-exported: the rewards lived here before #19)
    REWARDS,
    RewardChoice,
    Scorer,
    compare,
    contains_answer,
    exact_match,
    is_chat,
    numeric,
    prompt_of,
    read_tasks,
    register_reward,
)

# ----------------------------------------------------------------------------- configs


class GroupConfig(RewardChoice):
    """What grpo and rloo share: rewards, sampling, clipping, the reference, evaluation."""

    default_reward = "exact_match"
    reward: str | None = Field(None, description="a registered reward by name: exact_match (the default without "
                               "reward_model), contains_answer, numeric, or your own (register_reward in your "
                               "script); never imported")
    reference: str | None = Field(None, description="reference policy; default: adapter-disabled policy or a copy")
    num_generations: int = Field(8, ge=2, description="G: replies sampled per prompt")
    prompts_per_rollout: int = Field(8, gt=0)
    max_new_tokens: int = Field(16, gt=0)
    temperature: float = Field(1.0, gt=0.0)
    top_k: int | None = Field(None, gt=0, description="sample from the k most likely tokens (None: all)")
    epochs: int = Field(1, gt=0, description="mu: passes over each rollout")
    epsilon: float | None = Field(0.2, gt=0.0, lt=1.0, description="ratio clip (below: 1 - epsilon)")
    epsilon_high: float | None = Field(None, gt=0.0, description="ratio clip above (DAPO's clip-higher); None: epsilon")
    scale_rewards: bool | None = Field(None, description="divide advantages by the group's reward std")
    eval_prompts: int | None = Field(None, gt=0, description="evaluate on the first n data.eval prompts (None: all)")


class GRPOConfig(GroupConfig):
    name: Literal["grpo"] = "grpo"
    epsilon: float = Field(0.2, gt=0.0, lt=1.0, description="ratio clip (below: 1 - epsilon)")
    beta: float = Field(0.04, ge=0.0, description="coefficient of the k3 KL to the reference in the loss; 0: none")
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "grpo"

    def scaled(self) -> bool:
        return self.loss_type != "dr_grpo" if self.scale_rewards is None else self.scale_rewards


class RLOOConfig(GroupConfig):
    name: Literal["rloo"] = "rloo"
    num_generations: int = Field(4, ge=2, description="G: replies sampled per prompt")
    beta: float = Field(0.05, ge=0.0, description="coefficient of the reply's KL to the reference in its reward")

    def scaled(self) -> bool:
        return bool(self.scale_rewards)


# ----------------------------------------------------------------------------- rollouts


@dataclass
class Rollout:
    """One rollout, JSON-able (a checkpoint keeps what is left of it): per reply its prompt + reply ids,
    prompt length and record, the sampling policy's and the reference's log-probs of its tokens, its
    advantage; and the minibatches (reply indices) still to train on."""

    rows: list[list[int]]
    n_query: list[int]
    where: list[str]
    old_logp: list[list[float]]
    ref_logp: list[list[float]] | None
    advantages: list[float]
    todo: list[list[int]]

    def tensors(self, pad: int) -> dict[str, torch.Tensor]:
        batch = right_pad(self.rows, self.n_query, pad)
        mask = batch["labels"][:, 1:] != IGNORE  # (N, T-1): position t-1 predicts reply token t
        out = {**batch, "reply_mask": mask, "old_logp": spread(self.old_logp, mask),
               "advantages": torch.tensor(self.advantages, dtype=torch.float32)}
        if self.ref_logp is not None:
            out["ref_logp"] = spread(self.ref_logp, mask)
        return out


# ----------------------------------------------------------------------------- the runtime


class GroupRuntime(Runtime):
    """Rollouts, rewards, evaluation and state shared by grpo and rloo; the subclasses' advantages and loss."""

    unit = "replies"

    def __init__(self, ctx: RunContext, fn: Any):
        super().__init__(fn, ctx.cfg.objective)
        cfg = self.cfg
        self.ctx, self.policy, self.tokenizer = ctx, ctx.model, ctx.tokenizer
        self.batch_size, self.seed = ctx.cfg.train.batch_size, ctx.cfg.train.seed
        self.scorer = Scorer.of_run(ctx)  # the records checked before any training
        self.records = self.scorer.records
        self.template = resolve_template(ctx.cfg.data.chat_template, ctx.tokenizer)
        self.lead = reply_lead(ctx.tokenizer, self.template.source)  # not part of a reply's text
        free = isinstance(unwrap(ctx.model), PeftModel)  # the adapter-disabled policy costs no memory
        self.reference = (Reference(ctx.model, cfg.reference, ctx.device, ctx.tokenizer)
                          if cfg.beta > 0 or cfg.reference is not None or free else None)
        self.pending: Rollout | None = None
        self._tensors: dict[str, torch.Tensor] | None = None
        self._queries: dict[str, list[int]] = {}
        self._reference_eval: dict[tuple[str, ...], list[float]] = {}
        self.sums = StatSums()
        self.rollout_stats: dict[str, float] = {}
        self.n_rollouts = 0
        self.history: list[dict[str, float]] = []
        ctx.say(f"{cfg.name}: reward {self.scorer.label}; reference = "
                f"{self.reference.kind if self.reference else 'none'}; {cfg.prompts_per_rollout} prompts x "
                f"{cfg.num_generations} replies per rollout x {cfg.epochs} epochs")

    # -------------------------------------------------------------- the loop's hooks

    def stream(self, default: Any) -> RolloutStream:
        cfg = self.cfg
        replies = cfg.prompts_per_rollout * cfg.num_generations
        return RolloutStream(self, default, cfg.prompts_per_rollout, cfg.epochs * -(-replies // self.batch_size))

    def state_dict(self) -> dict[str, Any]:
        return {"n_rollouts": self.n_rollouts, "history": self.history, "rollout_stats": self.rollout_stats,
                "pending": None if self.pending is None else asdict(self.pending)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.n_rollouts, self.history = state["n_rollouts"], list(state.get("history", []))
            self.rollout_stats = dict(state.get("rollout_stats", {}))
            self.pending = Rollout(**state["pending"]) if state.get("pending") else None
            self._tensors = None

    def stats(self) -> dict[str, float]:
        return {**self.rollout_stats, **self.sums.take()}

    # -------------------------------------------------------------- prompts

    def query(self, example: Example) -> list[int]:
        """The prompt's token ids with the generation prompt: a prompt example's own, or a chat re-rendered."""
        if example.where not in self._queries:
            record = self.records[example.where]
            self._queries[example.where] = (prompt_example({"prompt": prompt_of(record)}, self.tokenizer,
                                                           self.template, example.where).input_ids
                                            if is_chat(record) else list(example.input_ids))
        return self._queries[example.where]

    # -------------------------------------------------------------- rollouts

    @torch.no_grad()
    def rollout(self, prompts: list[Example]) -> None:
        cfg, g = self.cfg, self.cfg.num_generations
        torch.manual_seed(self.seed * 1_000_003 + self.n_rollouts)
        queries = [self.query(p) for p in prompts for _ in range(g)]
        where = [p.where for p in prompts for _ in range(g)]
        model = unwrap(self.policy)
        replies = generate_ids(model, self.tokenizer, queries, max_new_tokens=cfg.max_new_tokens,
                               batch_size=len(queries), temperature=cfg.temperature, top_k=cfg.top_k)
        stops = stop_token_ids(model, self.tokenizer)
        replies = [r if r else [stops[0]] for r in replies]
        rewards = torch.tensor(self.scorer(where, self._texts(replies)))  # (N,)
        rows = [q + r for q, r in zip(queries, replies, strict=True)]
        n_query = [len(q) for q in queries]
        batch = {k: v.to(self.ctx.device) for k, v in right_pad(rows, n_query, pad_id(self.tokenizer)).items()}
        logp, ref_logp, entropy = self._logps(batch)  # (N, T-1) each but entropy
        mask = batch["labels"][:, 1:] != IGNORE
        kl = None if ref_logp is None else (kl_per_token(logp, ref_logp, self.kl_estimator) * mask).sum(-1).cpu()
        adv = self.advantages(rewards, kl)  # (N,)
        self._log_rollout(rewards, kl, mask, replies, stops, entropy)
        order = self._order(len(rows))
        keep_ref = ref_logp is not None and self.ref_in_loss and cfg.beta > 0
        self.pending = Rollout(rows, n_query, where, gather(logp, mask), gather(ref_logp, mask) if keep_ref else None,
                               adv.tolist(), order)
        self._tensors = None
        self.n_rollouts += 1

    def _logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """Log-probs of the reply tokens by the policy (eval mode) and the reference, in chunks of
        train.batch_size rows; the policy's mean entropy over reply tokens."""
        logps, refs, ent, count = [], [], 0.0, 0
        was_training = self.policy.training
        self.policy.eval()
        for s in range(0, batch["input_ids"].shape[0], self.batch_size):
            part = {k: v[s : s + self.batch_size] for k, v in batch.items()}
            logits = self._tempered(self.policy, part)
            logp, mask = token_logps(logits, part["labels"])
            logps.append(logp)
            ent += float(masked_mean(entropy_from_logits(logits[:, :-1].float()), mask)) * int(mask.sum())
            count += int(mask.sum())
            if self.reference is not None:
                refs.append(token_logps(self.reference.forward(self.policy, self._tempered, part), part["labels"])[0])
        self.policy.train(was_training)
        return torch.cat(logps), torch.cat(refs) if refs else None, ent / max(count, 1)

    def _tempered(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The logits of the distribution the replies are sampled from (rollout, loss and reference alike)."""
        return tempered_logits(model, batch, self.cfg.temperature)

    def _order(self, n: int) -> list[list[int]]:
        """`epochs` shuffled passes over the rollout's replies in minibatches of train.batch_size."""
        rng = random.Random(f"{self.seed}/{self.cfg.name}/{self.n_rollouts}")
        out = []
        for _ in range(self.cfg.epochs):
            order = list(range(n))
            rng.shuffle(order)
            out += [order[s : s + self.batch_size] for s in range(0, n, self.batch_size)]
        return out

    def _log_rollout(self, rewards: torch.Tensor, kl: torch.Tensor | None, mask: torch.Tensor,
                     replies: list[list[int]], stops: list[int], entropy: float) -> None:
        groups = rewards.view(-1, self.cfg.num_generations)  # (P, G)
        stats = {"reward": float(rewards.mean()), "reward_std": float(groups.std(-1).mean()),
                 "frac_zero_std": float((groups.max(-1).values == groups.min(-1).values).float().mean())}
        if kl is not None:
            stats["kl"] = float(kl.mean())
        self.history.append({"rollout": self.n_rollouts, **stats})
        self.rollout_stats = {**stats, "response_length": float(mask.sum(-1).float().mean()),
                              "truncated_fraction": sum(r[-1] not in stops for r in replies) / len(replies),
                              "entropy": entropy, "rollout": float(self.n_rollouts)}

    def next_minibatch(self) -> MicroBatch:
        p = self.pending
        assert p is not None and p.todo
        if self._tensors is None:
            self._tensors = p.tensors(pad_id(self.tokenizer))
        mb = minibatch(self._tensors, p.todo.pop(0), p.where, self.unit)
        if not p.todo:
            self.pending, self._tensors = None, None
        return mb

    # -------------------------------------------------------------- the loss

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if "advantages" not in batch:
            raise TunelabError(f"objective {self.cfg.name} trains on its own rollouts; this batch is not one",
                               fix=f"evaluate a {self.cfg.name} run with `tunelab eval` on prompts")
        logp, _ = token_logps(self._tempered(model, batch), batch["labels"])
        loss_sum, n, stats = self.policy_loss(logp, batch)
        k = float(n)
        for name, value in stats.items():
            self.sums.add(name, float(value) * k, k)
        return loss_sum, n

    # -------------------------------------------------------------- evaluation and the end

    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples: list[Example]) -> dict[str, float]:
        """Greedy replies of the policy and of the reference to the eval prompts, rewarded."""
        examples = examples[: self.cfg.eval_prompts] if self.cfg.eval_prompts else examples
        where = [e.where for e in examples]
        queries = [self.query(e) for e in examples]
        mine = self.scorer(where, self._greedy(unwrap(model), queries))
        if self.reference is None:
            return {"reward": sum(mine) / len(mine)}
        key = tuple(where)
        if key not in self._reference_eval:  # the reference is frozen: its replies never change
            self._reference_eval[key] = self.scorer(where, self.reference.forward(model, self._greedy, queries))
        return compare(mine, self._reference_eval[key])

    def _greedy(self, model: nn.Module, queries: list[list[int]]) -> list[str]:
        return self._texts(generate_ids(model, self.tokenizer, queries, max_new_tokens=self.cfg.max_new_tokens))

    def _texts(self, replies: list[list[int]]) -> list[str]:
        """Replies as the reward reads them: decoded, without the chat template's reply lead."""
        return [reply_text(self.tokenizer, r, self.lead) for r in replies]

    def finish(self, model: nn.Module, run_dir: Path) -> None:
        """rollouts.jsonl and reward_curve.png (reward and KL per step, eval reward) in the run dir."""
        (run_dir / "rollouts.jsonl").write_text("".join(json.dumps(h) + "\n" for h in self.history), encoding="utf-8")
        if self.history and "kl" in self.history[-1]:
            plot_reward_curve(run_dir, self.ctx.say)
        else:
            self.ctx.say(f"{self.cfg.name}: no reference, so no KL: no reward_curve.png")

    # -------------------------------------------------------------- what grpo and rloo differ in

    kl_estimator = "k3"
    ref_in_loss = True

    def advantages(self, rewards: torch.Tensor, kl: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def policy_loss(self, logp: torch.Tensor, batch: dict[str, torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


class GRPORuntime(GroupRuntime):
    def __init__(self, ctx: RunContext):
        super().__init__(ctx, grpo)
        self.unit = "tokens" if self.cfg.loss_type == "dapo" else "replies"

    def advantages(self, rewards: torch.Tensor, kl: torch.Tensor | None) -> torch.Tensor:
        return group_advantages(rewards, self.cfg.num_generations, scale=self.cfg.scaled())

    def policy_loss(self, logp: torch.Tensor, batch: dict[str, torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        cfg: GRPOConfig = self.cfg
        mask = batch["reply_mask"]
        per_token, stats = grpo_token_loss(logp, batch["old_logp"], batch["advantages"], mask, epsilon=cfg.epsilon,
                                           epsilon_high=cfg.epsilon_high, ref_logp=batch.get("ref_logp"),
                                           beta=cfg.beta)
        loss_sum, n = GRPO_LOSSES[cfg.loss_type](per_token, mask, cfg.max_new_tokens)
        if "kl" in stats:
            stats["kl_token"] = stats.pop("kl")
        return loss_sum, n, {"policy_loss": loss_sum.detach() / n.clamp(min=1), **stats}


class RLOORuntime(GroupRuntime):
    kl_estimator = "k1"  # summed over the reply: log pi_old(y|x) - log pi_ref(y|x), in the reward
    ref_in_loss = False

    def __init__(self, ctx: RunContext):
        super().__init__(ctx, rloo)

    def advantages(self, rewards: torch.Tensor, kl: torch.Tensor | None) -> torch.Tensor:
        shaped = rewards if kl is None or not self.cfg.beta else rewards - self.cfg.beta * kl
        return leave_one_out_advantages(shaped, self.cfg.num_generations, scale=self.cfg.scaled())

    def policy_loss(self, logp: torch.Tensor, batch: dict[str, torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        cfg: RLOOConfig = self.cfg
        loss_sum, n, stats = rloo_loss(logp, batch["old_logp"], batch["advantages"], batch["reply_mask"],
                                       epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high)
        return loss_sum, n, {"policy_loss": loss_sum.detach() / n.clamp(min=1), **stats}


def grpo(model: nn.Module, batch: dict[str, torch.Tensor], cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    raise TunelabError("grpo needs its runtime (rollouts, rewards, reference): train it through tunelab.train")


def rloo(model: nn.Module, batch: dict[str, torch.Tensor], cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    raise TunelabError("rloo needs its runtime (rollouts, rewards, reference): train it through tunelab.train")


register_objective(
    "grpo", GRPOConfig, formats=("chat", "prompt"), mask_prompt=True, runtime=GRPORuntime,
    summary="GRPO: G sampled replies per prompt, group-relative advantages, clipped ratio, k3 KL to the reference",
)(grpo)
register_objective(
    "rloo", RLOOConfig, formats=("chat", "prompt"), mask_prompt=True, runtime=RLOORuntime,
    summary="RLOO: REINFORCE with a leave-one-out baseline over G sampled replies per prompt, KL in the reward",
)(rloo)
