"""Preference objectives over (chosen, rejected) pairs: `reward` (O04) and `dpo` (O06).

Data: `preference` records (prompt/chosen/rejected) or `ranking` records (prompt + responses best
first, expanded to every ordered pair); see data/preference.py. A batch holds the B chosen
conversations then the B rejected ones (2B rows) and counts B units: the loop divides the summed
loss by the pairs of the whole accumulated batch.

reward (Bradley-Terry; Ouyang et al. 2022, arXiv:2203.02155): a scalar head (method `head` with
`num_labels: 1`, on a base or an SFT model) scores r(x, y) at the last token of the conversation;

    loss = -log sigmoid(r(x, y_chosen) - r(x, y_rejected)) [+ c * (r_chosen + r_rejected)^2]

the optional term (`center_rewards`, c) keeps rewards near zero (Eisenstein et al. 2023), which
helps PPO's reward scale. Logged: pairwise accuracy (r_chosen > r_rejected) and the mean margin.

dpo (Rafailov et al. 2023, arXiv:2305.18290): the policy's log-ratio to a frozen reference,

    h = [log pi(y_c|x) - log ref(y_c|x)] - [log pi(y_r|x) - log ref(y_r|x)]

with the losses of objectives/alignment_losses.py `dpo_loss` (sigmoid, conservative/label
smoothing, IPO, hinge). IPO uses per-token mean log-probs (its regression target assumes
length-normalised ratios, as TRL does); the others sequence sums. The reference is the
adapter-disabled policy for peft methods (no second copy), a model given by `reference`, or a
frozen copy of the initial policy (objectives/frozen.py). `precompute_reference: true` scores
the whole training set with the reference once before training and then drops a held copy.
Logged: preference accuracy (implicit reward margin > 0), the margin, chosen/rejected rewards.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from tunelab.config import ObjectiveConfig
from tunelab.data.collate import collate
from tunelab.data.preference import null_prompt_ids
from tunelab.data.templates import resolve_template
from tunelab.errors import TunelabError
from tunelab.inference.logits import forward_logits
from tunelab.inference.reward import reward_scores
from tunelab.modeling.heads import reply_loglik
from tunelab.objectives.alignment_losses import bradley_terry_loss, dpo_loss, sequence_logps
from tunelab.objectives.frozen import Reference
from tunelab.objectives.registry import RunContext, Runtime, StatSums, register_objective

PAIR_FORMATS = ("preference", "ranking")


class RewardConfig(ObjectiveConfig):
    name: Literal["reward"] = "reward"
    center_rewards: float = Field(0.0, ge=0.0, description="c of the c * (r_chosen + r_rejected)^2 centring term")
    lm_weight: float = Field(
        0.0, ge=0.0, description="weight of an auxiliary next-token loss on the chosen replies, through the body's "
        "tied input embeddings (keeps the body a language model; needs tied embeddings)")


class DPOConfig(ObjectiveConfig):
    name: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0.0, description="strength of the KL constraint to the reference (temperature)")
    loss_type: Literal["sigmoid", "conservative", "ipo", "hinge"] = Field("sigmoid", description="the DPO loss")
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="eps of conservative DPO (probability a label is flipped)")
    reference: str | None = Field(
        None, description="reference model path/id; default: the adapter-disabled policy (peft methods) or a frozen "
        "copy of the initial policy")
    precompute_reference: bool = Field(False, description="score the training set with the reference once, up front")


def split_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B, ...) rows of a pair batch -> (chosen (B, ...), rejected (B, ...))."""
    b = x.shape[0] // 2
    return x[:b], x[b:]


def need_pairs(batch: dict[str, torch.Tensor], objective: str) -> None:
    if "n_pairs" not in batch:
        raise TunelabError(f"objective {objective} needs preference data (prompt/chosen/rejected or prompt/responses)",
                           fix="set data.train to a preference or ranking dataset (e.g. tinyworld:prefs)")


# ----------------------------------------------------------------------------- reward


def reward_terms(
    model: nn.Module, batch: dict[str, torch.Tensor], cfg: RewardConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses (B,), r_chosen (B,), r_rejected (B,))."""
    need_pairs(batch, "reward")
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                output_hidden_states=cfg.lm_weight > 0)
    r_chosen, r_rejected = split_pairs(reward_scores(model, batch, out))
    losses = bradley_terry_loss(r_chosen, r_rejected)
    if cfg.center_rewards:
        losses = losses + cfg.center_rewards * (r_chosen + r_rejected) ** 2
    if cfg.lm_weight:
        losses = losses + cfg.lm_weight * chosen_lm_loss(model, out.hidden_states[-1], batch["labels"])
    return losses, r_chosen, r_rejected


def chosen_lm_loss(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) mean next-token NLL of each chosen reply, through the LM head (tied input embeddings,
    or the head a `likelihood` reward model keeps)."""
    inner = getattr(model, "module", model)
    if inner.lm_head is None and not getattr(inner.config, "tie_word_embeddings", False):
        raise TunelabError("objective.lm_weight needs a model whose LM head is tied to its input embeddings "
                           "(or a reward head with method.likelihood=reply or pmi, which keeps the LM head)",
                           fix="set objective.lm_weight=0")
    h, lab = split_pairs(hidden)[0], split_pairs(labels)[0]  # chosen rows (B, T, H), (B, T)
    n = (lab[:, 1:] != -100).sum(-1).clamp(min=1)  # (B,)
    return -reply_loglik(h, lab, inner.lm_weight()) / n


def reward_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], cfg: RewardConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    losses, _, _ = reward_terms(model, batch, cfg)
    return losses.sum(), torch.tensor(losses.shape[0])


class RewardRuntime(Runtime):
    def __init__(self, ctx: RunContext):
        super().__init__(reward_loss, ctx.cfg.objective)
        if getattr(ctx.model, "likelihood", "off") == "pmi":  # the null prompt, in the chat template of the data
            template = resolve_template(ctx.cfg.data.chat_template, ctx.tokenizer)
            ctx.model.set_null_prompt(null_prompt_ids(ctx.tokenizer, template))
        self.sums = StatSums()

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        losses, r_chosen, r_rejected = reward_terms(model, batch, self.cfg)
        n = losses.shape[0]
        self.sums.add("accuracy", float((r_chosen > r_rejected).sum()), n)
        self.sums.add("margin", float((r_chosen - r_rejected).detach().sum()), n)
        return losses.sum(), torch.tensor(n)

    def stats(self) -> dict[str, float]:
        return self.sums.take()


register_objective(
    "reward", RewardConfig, formats=PAIR_FORMATS, mask_prompt=True, runtime=RewardRuntime,
    summary="reward model: Bradley-Terry loss of a scalar head on preference pairs / rankings",
)(reward_loss)


# ----------------------------------------------------------------------------- dpo


def pair_logps(model: nn.Module, batch: dict[str, torch.Tensor], mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen (B,), rejected (B,)) log-probs of the replies: sums, or per-token means when `mean`."""
    logp, n = sequence_logps(forward_logits(model, batch), batch["labels"])  # (2B,), (2B,)
    if mean:
        logp = logp / n.clamp(min=1)
    return split_pairs(logp)


def pair_stats(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B,) statistics of a pair loss's implicit rewards, logged as means: preference accuracy
    (margin > 0), the margin, and each side's reward."""
    margin = r_chosen - r_rejected
    return {"accuracy": (margin > 0).float(), "margin": margin, "reward_chosen": r_chosen,
            "reward_rejected": r_rejected}


def _row_key(batch: dict[str, torch.Tensor], i: int) -> tuple[int, ...]:
    return tuple(batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist())


class DPORuntime(Runtime):
    def __init__(self, ctx: RunContext):
        super().__init__(dpo, ctx.cfg.objective)
        cfg: DPOConfig = ctx.cfg.objective
        self.reference = Reference(ctx.model, cfg.reference, ctx.device, ctx.tokenizer)
        ctx.say(f"dpo: reference = {self.reference.kind}; loss {cfg.loss_type}, beta {cfg.beta}")
        self.sums = StatSums()
        self.cache: dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[float, float]] | None = None
        if cfg.precompute_reference:
            self._precompute(ctx)

    def _precompute(self, ctx: RunContext, batch_size: int = 16) -> None:
        self.cache = {}
        examples = ctx.examples
        for start in range(0, len(examples), batch_size):
            batch = collate([[ex] for ex in examples[start : start + batch_size]], ctx.pad_id, packed=False)
            batch = {k: v.to(ctx.device) for k, v in batch.items()}
            chosen, rejected = self.reference.forward(ctx.model, pair_logps, batch, self._mean)
            b = chosen.shape[0]
            for i in range(b):
                self.cache[(_row_key(batch, i), _row_key(batch, b + i))] = (float(chosen[i]), float(rejected[i]))
        self.reference.release()
        ctx.say(f"dpo: reference log-probs of {len(examples):,} pairs precomputed")

    @property
    def _mean(self) -> bool:
        return self.cfg.loss_type == "ipo"

    def _reference_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is None:
            return self.reference.forward(model, pair_logps, batch, self._mean)
        b = batch["input_ids"].shape[0] // 2
        try:
            pairs = [self.cache[(_row_key(batch, i), _row_key(batch, b + i))] for i in range(b)]
        except KeyError:  # not a training pair (e.g. evaluation data): the reference scores it, if still held
            return self.reference.forward(model, pair_logps, batch, self._mean)
        t = torch.tensor(pairs, device=batch["input_ids"].device)  # (B, 2)
        return t[:, 0], t[:, 1]

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        need_pairs(batch, "dpo")
        ref_chosen, ref_rejected = self._reference_logps(model, batch)
        chosen, rejected = pair_logps(model, batch, self._mean)
        losses, r_chosen, r_rejected = dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected, beta=self.cfg.beta, loss_type=self.cfg.loss_type,
            label_smoothing=self.cfg.label_smoothing)
        self.sums.add_rows(pair_stats(r_chosen, r_rejected))
        return losses.sum(), torch.tensor(chosen.shape[0])

    def stats(self) -> dict[str, float]:
        return self.sums.take()


def dpo(model: nn.Module, batch: dict[str, torch.Tensor], cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    raise TunelabError("dpo needs its runtime (a reference model): train it through tunelab.train")


register_objective(
    "dpo", DPOConfig, formats=PAIR_FORMATS, mask_prompt=True, runtime=DPORuntime,
    summary="direct preference optimisation against a frozen reference (sigmoid, conservative, IPO, hinge)",
)(dpo)
