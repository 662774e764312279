"""Reference-free preference objectives over (chosen, rejected) pairs: `simpo` and `orpo` (O12).

Data, batches and units are dpo's (objectives/preference.py): preference or ranking records, the
B chosen rows then the B rejected ones, one pair one unit. Neither loads a reference model: the
loss reads only the policy's per-token mean log-probs of the two replies (`pair_logps` with
`mean`), one forward pass of 2B rows per micro-batch where dpo adds a reference pass. The pure
losses are in objectives/preference_losses.py.

simpo (Meng et al. 2024, arXiv:2405.14734): the implicit reward is the length-normalised
log-likelihood, and a target margin gamma must separate chosen from rejected,

    loss = -log sigmoid(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma),  gamma = gamma_beta_ratio * beta

parametrised by gamma/beta as the authors' trainer is (TRL's CPO takes gamma itself: `simpo_gamma`
= gamma_beta_ratio * beta; tests/test_trl_agreement.py). Defaults: beta 2.0 (the paper's range is
2.0-2.5), gamma_beta_ratio 0.5 (the paper's Llama-3-Base setting, beta 2.0 with gamma 1.0; the
authors' trainer defaults to 0.25). Not
implemented: the authors' hinge variant, label smoothing and optional SFT term (`sft_weight`).
Logged: accuracy, margin, reward_chosen, reward_rejected (rewards = beta * mean log-prob).

orpo (Hong et al. 2024, arXiv:2403.07691): SFT on the chosen reply plus an odds-ratio penalty,

    loss = -mean log pi(y_w|x) - lam * log sigmoid(log odds(y_w) - log odds(y_l)),
    odds(y) = P / (1 - P),  P = exp(mean token log-prob of y)

lam = `odds_ratio_weight` (TRL calls it `beta`), default 0.1 as in the paper. The SFT term makes a
separate SFT stage unnecessary: the paper starts from the base model. log(1 - P) is computed
stably (preference_losses.log1mexp; P within float epsilon of 1 is clamped there). Departure: the
NLL is each chosen reply's mean over its tokens, summed over pairs and divided by the pairs (the
paper's per-example mean); TRL averages over all chosen tokens of the batch, the prompt's included,
so long replies and prompts weigh more there. Logged: accuracy (log odds ratio > 0), log_odds_ratio, nll.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from tunelab.config import ObjectiveConfig
from tunelab.objectives.preference import PAIR_FORMATS, need_pairs, pair_logps, pair_stats
from tunelab.objectives.preference_losses import orpo_loss, simpo_loss
from tunelab.objectives.registry import LossFn, RunContext, Runtime, StatSums, register_objective

# (model, batch, cfg) -> (per-pair losses (B,), per-pair statistics {name: (B,)} to log as means)
PairTerms = Callable[[nn.Module, dict[str, torch.Tensor], Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]
UNMEASURED = "not yet measured on TinyWorld: docs/alignment.md"


class SimPOConfig(ObjectiveConfig):
    name: Literal["simpo"] = "simpo"
    beta: float = Field(2.0, gt=0.0, description="scale of the implicit reward, the mean token log-prob of a reply")
    gamma_beta_ratio: float = Field(
        0.5, ge=0.0, description="the target reward margin gamma over beta (gamma = gamma_beta_ratio * beta)")


class ORPOConfig(ObjectiveConfig):
    name: Literal["orpo"] = "orpo"
    odds_ratio_weight: float = Field(
        0.1, ge=0.0, description="lambda: weight of the odds-ratio term beside the chosen reply's NLL")


def summed(losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sum, units) of per-pair losses (B,)."""
    return losses.sum(), torch.tensor(losses.shape[0])


def stateless(terms: PairTerms) -> LossFn:
    """The registered loss of a pair objective: the sum of its terms' losses, and the pairs."""
    def loss(model: nn.Module, batch: dict[str, torch.Tensor], cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return summed(terms(model, batch, cfg)[0])
    return loss


class LoggedPairs(Runtime):
    """The runtime of a reference-free pair loss: no state but the statistics it logs."""

    def __init__(self, terms: PairTerms, ctx: RunContext):
        super().__init__(stateless(terms), ctx.cfg.objective)
        self.terms, self.sums = terms, StatSums()
        knobs = ", ".join(f"{k} {v}" for k, v in self.cfg.model_dump(exclude={"name"}).items())
        ctx.say(f"{self.cfg.name}: {knobs}; no reference model ({UNMEASURED})")

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        losses, stats = self.terms(model, batch, self.cfg)
        self.sums.add_rows(stats)
        return summed(losses)

    def stats(self) -> dict[str, float]:
        return self.sums.take()


def register_pair_objective(name: str, config_cls: type[ObjectiveConfig], terms: PairTerms, summary: str) -> None:
    register_objective(name, config_cls, formats=PAIR_FORMATS, mask_prompt=True,
                       runtime=functools.partial(LoggedPairs, terms), summary=summary)(stateless(terms))


# ----------------------------------------------------------------------------- simpo


def simpo_terms(
    model: nn.Module, batch: dict[str, torch.Tensor], cfg: SimPOConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    need_pairs(batch, "simpo")
    chosen, rejected = pair_logps(model, batch, mean=True)  # (B,), (B,)
    losses, r_chosen, r_rejected = simpo_loss(chosen, rejected, beta=cfg.beta, gamma_beta_ratio=cfg.gamma_beta_ratio)
    return losses, pair_stats(r_chosen, r_rejected)


register_pair_objective(
    "simpo", SimPOConfig, simpo_terms,
    "SimPO: reference-free preference loss on length-normalised log-likelihoods with a target margin")


# ----------------------------------------------------------------------------- orpo


def orpo_terms(
    model: nn.Module, batch: dict[str, torch.Tensor], cfg: ORPOConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    need_pairs(batch, "orpo")
    chosen, rejected = pair_logps(model, batch, mean=True)  # (B,), (B,)
    losses, nll, ratio = orpo_loss(chosen, rejected, weight=cfg.odds_ratio_weight)
    return losses, {"accuracy": (ratio > 0).float(), "log_odds_ratio": ratio, "nll": nll}


register_pair_objective(
    "orpo", ORPOConfig, orpo_terms,
    "ORPO: SFT on the chosen reply + an odds-ratio preference penalty, no reference model")
