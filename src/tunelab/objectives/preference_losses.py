"""Pure tensor losses of the preference objectives beside DPO (O12): SimPO, ORPO, KTO.

Tensors in, tensors out: no models, configs or I/O. DPO's and the reward model's losses and the
sequence log-probs they all read are in alignment_losses.py. Inputs are (B,) per-sequence
log-probs of replies (sums over the reply's tokens, or per-token means where a loss says so);
statistics and rewards come back detached.

    simpo  (Meng et al. 2024, arXiv:2405.14734), reference-free, length-normalised (means m):
           -log sigmoid(beta * (m_w - m_l) - gamma),   gamma = gamma_beta_ratio * beta
    orpo   (Hong et al. 2024, arXiv:2403.07691), reference-free (means m):
           -m_w - lam * log sigmoid(log odds(y_w) - log odds(y_l)),   log odds = m - log(1 - exp(m))
    kto    (Ethayarajh et al. 2024, arXiv:2402.01306), unpaired (sums), r = log pi - log ref:
           desirable    lam_D * (1 - sigmoid(beta * (r - z0)))
           undesirable  lam_U * (1 - sigmoid(beta * (z0 - r)))
           z0 = max(0, mean over mismatched (prompt, completion) pairs of their log-ratio), a constant
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012, "Accurately computing
    log(1 - exp(-|a|))"):

        log(-expm1(x))   for x > -log 2   (1 - e^x is small: expm1 keeps its digits)
        log1p(-exp(x))   otherwise        (e^x is small: log1p keeps its digits)

    x is first clamped to <= -eps (the dtype's machine epsilon): a log-prob within eps of 0 is
    rounding, and log(1 - 1) = -inf would make odds infinite. Where clamped the result is
    log(1 - exp(-eps)) ~ log(eps) and passes no gradient to x. Both branches stay finite for every
    clamped x, so no NaN leaks through `where` into the gradient.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def log_odds(mean_logp: Tensor) -> Tensor:
    """log(P / (1 - P)) with P = exp(mean_logp), the per-token mean log-prob of a reply (ORPO's odds)."""
    return mean_logp - log1mexp(mean_logp)


def simpo_loss(
    chosen: Tensor, rejected: Tensor, *, beta: float = 2.0, gamma_beta_ratio: float = 0.5
) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO on (B,) per-token mean log-probs of the chosen and rejected replies:

        losses = -logsigmoid(beta * chosen - beta * rejected - gamma),   gamma = gamma_beta_ratio * beta

    Returns (losses (B,), chosen_rewards = beta * chosen, rejected_rewards = beta * rejected), rewards detached.
    """
    gamma = gamma_beta_ratio * beta
    chosen_rewards, rejected_rewards = beta * chosen, beta * rejected  # (B,)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def orpo_loss(chosen: Tensor, rejected: Tensor, *, weight: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    """ORPO on (B,) per-token mean log-probs of the chosen and rejected replies:

        nll    = -chosen                                  (the SFT term: mean NLL of the chosen reply)
        ratio  = log odds(chosen) - log odds(rejected)    (log odds(m) = m - log(1 - exp(m)))
        losses = nll - weight * logsigmoid(ratio)

    Returns (losses (B,), nll (B,), ratio (B,)), the last two detached.
    """
    nll = -chosen
    ratio = log_odds(chosen) - log_odds(rejected)  # (B,)
    return nll - weight * F.logsigmoid(ratio), nll.detach(), ratio.detach()


def kto_reference_point(mismatched_logratios: Tensor) -> Tensor:
    """KTO's z0, an estimate of KL(pi || ref): the (B,) log-ratios log pi(y'|x) - log ref(y'|x) of
    mismatched (prompt, completion) pairs, averaged, floored at 0, detached (a constant, as in the
    paper and TRL). Returns a scalar."""
    return mismatched_logratios.detach().mean().clamp(min=0)


def kto_loss(
    policy: Tensor,
    reference: Tensor,
    desirable: Tensor,
    reference_point: Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """KTO on (B,) summed log-probs of each completion under the policy and the reference; `desirable`
    (B,) bool; `reference_point` z0 (scalar, treated as a constant):

        r = policy - reference
        desirable:    desirable_weight   * (1 - sigmoid(beta * (r - z0)))
        undesirable:  undesirable_weight * (1 - sigmoid(beta * (z0 - r)))

    Returns (losses (B,), rewards = beta * r (B,), detached).
    """
    r = policy - reference  # (B,)
    z0 = reference_point.detach()
    losses_desirable = desirable_weight * (1 - torch.sigmoid(beta * (r - z0)))
    losses_undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r)))
    return torch.where(desirable.bool(), losses_desirable, losses_undesirable), (beta * r).detach()
