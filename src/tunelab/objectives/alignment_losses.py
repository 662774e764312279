"""Pure tensor losses for reward modelling, DPO, PPO and distillation (no models, configs or I/O).

Shape letters: B batch rows, T positions, V vocabulary. Masks are bool (or 0/1) tensors; a fully
masked input gives a finite 0 with a gradient path (zero grads), never NaN. Log-prob and
divergence computations run in float32 at least (float64 stays float64).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from tunelab.data.types import IGNORE

DPO_LOSS_TYPES = ("sigmoid", "conservative", "ipo", "hinge")
KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
DISTILL_KINDS = ("forward_kl", "reverse_kl", "jsd")


def _up(x: Tensor) -> Tensor:
    """x in float32, or float64 if it already is."""
    return x if x.dtype == torch.float64 else x.float()


def _check(kind: str, known: tuple[str, ...], what: str) -> None:
    if kind not in known:
        raise ValueError(f"unknown {what} {kind!r}; known: {', '.join(known)}")


# --- sequence log-probs ---------------------------------------------------------------------------


def token_logps(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token log-prob of the next label.

        logp[b, t] = log softmax(logits[b, t])[labels[b, t+1]]   where labels[b, t+1] != IGNORE, else 0

    logits (B, T, V); labels (B, T) unshifted. Returns (logp (B, T-1), mask (B, T-1) bool).
    """
    b, t, v = logits.shape
    # Shift the labels rather than the logits: the logits stay a view (no copy for float32 input);
    # the last position gets IGNORE and is dropped.
    nxt = F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # (B, T)
    nll = F.cross_entropy(_up(logits).reshape(b * t, v), nxt.reshape(-1), ignore_index=IGNORE, reduction="none")
    return -nll.view(b, t)[:, :-1], labels[:, 1:] != IGNORE  # 0 (with grad path) where ignored


def sequence_logps(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sequence sum of next-token log-probs over trained positions, and their count.

        logp_sum[b] = sum_{t: labels[b, t] != IGNORE, t >= 1} log softmax(logits[b, t-1])[labels[b, t]]

    logits (B, T, V); labels (B, T) unshifted with IGNORE where untrained (as in
    F.cross_entropy(logits[:, :-1], labels[:, 1:])). Returns (logp_sum (B,), n_tokens (B,) long).
    """
    logp, mask = token_logps(logits, labels)
    return logp.sum(-1), mask.sum(-1)


# --- preference losses ----------------------------------------------------------------------------


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Direct preference optimisation losses on (B,) sequence log-probs.

        h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
        sigmoid      (Rafailov et al. 2023):  -logsigmoid(beta*h)
        conservative (cDPO, eps = label_smoothing):  -(1-eps)*logsigmoid(beta*h) - eps*logsigmoid(-beta*h)
                     ("sigmoid" with label_smoothing > 0 is the same formula)
        ipo          (Azar et al. 2023):  (h - 1/(2*beta))**2
        hinge        (SLiC, Zhao et al. 2023):  relu(1 - beta*h)
    label_smoothing only affects sigmoid/conservative.

    Returns (losses (B,), chosen_rewards (B,) = beta*(policy_chosen - ref_chosen), rejected_rewards (B,)),
    the rewards detached.
    """
    _check(loss_type, DPO_LOSS_TYPES, "DPO loss_type")
    chosen, rejected = policy_chosen - ref_chosen, policy_rejected - ref_rejected  # (B,)
    h = chosen - rejected  # (B,)
    if loss_type in ("sigmoid", "conservative"):
        eps = label_smoothing
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:  # hinge
        losses = F.relu(1 - beta * h)
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | None = None) -> Tensor:
    """Pairwise reward-model loss (Ouyang et al. 2022; margin as in Llama 2), all (B,):

    loss = -logsigmoid(r_chosen - r_rejected - margin)   (margin 0 when None)
    """
    diff = r_chosen - r_rejected  # (B,)
    return -F.logsigmoid(diff if margin is None else diff - margin)


# --- masked statistics ----------------------------------------------------------------------------


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """mean of x over entries where mask is true: sum(x*mask) / max(sum(mask), 1), over `dim` (all if None).

    All-zero mask -> 0 with a gradient path. Masked-out entries never leak (even NaN/inf there).
    """
    m = mask.bool()
    total = torch.where(m, x, 0).sum() if dim is None else torch.where(m, x, 0).sum(dim)
    count = m.sum() if dim is None else m.sum(dim)
    return total / count.clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Whiten x over its masked entries (all rows together):

        mu = masked_mean(x), var = masked_mean((x - mu)**2)   (unbiased=False)
        y = (x - mu) / sqrt(var + eps)   (+ mu when shift_mean is False)

    Entries outside the mask are returned unchanged; with fewer than 2 masked entries x is returned as is.
    """
    m = mask.bool()
    mu = masked_mean(x, m)
    var = masked_mean((x - mu) ** 2, m)
    y = (x - mu) * torch.rsqrt(var + eps)
    if not shift_mean:
        y = y + mu
    return torch.where(m & (m.sum() >= 2), y, x)  # no host sync for the small-count case


# --- PPO -------------------------------------------------------------------------------------------


@torch.no_grad()
def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), no grad.

        delta_t = r_t + gamma*V_{t+1} - V_t     (V beyond the last masked token = 0)
        A_t     = delta_t + gamma*lam*A_{t+1}
        R_t     = A_t + V_t

    rewards, values, mask (B, T); the mask marks response tokens, one contiguous (possibly empty) run per row.
    Returns (advantages (B, T), returns (B, T)), both 0 where mask is 0.
    """
    m = mask.bool()
    r = torch.where(m, rewards, 0).to(values.dtype)  # (B, T)
    v = torch.where(m, values, 0)  # (B, T): V outside the run is 0
    adv = torch.zeros_like(v)
    nxt_a = torch.zeros_like(v[:, 0])  # (B,) A_{t+1}
    nxt_v = torch.zeros_like(v[:, 0])  # (B,) V_{t+1}
    for t in range(v.shape[1] - 1, -1, -1):
        delta = r[:, t] + gamma * nxt_v - v[:, t]
        nxt_a = torch.where(m[:, t], delta + gamma * lam * nxt_a, 0)
        nxt_v = v[:, t]
        adv[:, t] = nxt_a
    return adv, torch.where(m, adv + v, 0)


def ppo_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, clip: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate (Schulman et al. 2017) over (B, T) per-token tensors:

        ratio = exp(logp - old_logp)
        pg1 = -A*ratio,  pg2 = -A*clip(ratio, 1-clip, 1+clip)
        loss = masked_mean(max(pg1, pg2))

    old_logp and advantages are treated as constants (detached). Returns (loss scalar,
    {"clip_fraction": masked_mean(pg2 > pg1), "approx_kl": masked_mean(0.5*(logp - old_logp)**2)}), stats detached.
    """
    m = mask.bool()
    log_ratio = torch.where(m, logp - old_logp.detach(), 0)  # (B, T); 0 outside the mask keeps exp finite
    ratio = log_ratio.exp()
    adv = advantages.detach()
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(pg1, pg2), m)
    with torch.no_grad():
        stats = {"clip_fraction": masked_mean((pg2 > pg1).float(), m), "approx_kl": masked_mean(0.5 * log_ratio**2, m)}
    return loss, stats


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip: float = 0.2
) -> tuple[Tensor, Tensor]:
    """Clipped value loss over (B, T) per-token tensors:

        v_clip = old_v + clip(v - old_v, -clip, clip)
        loss = 0.5 * masked_mean(max((v - R)**2, (v_clip - R)**2))

    old_values and returns are constants (detached).
    Returns (loss scalar, clip_fraction = masked_mean(vf2 > vf1), detached).
    """
    old, ret = old_values.detach(), returns.detach()
    v_clip = old + (values - old).clamp(-clip, clip)
    vf1, vf2 = (values - ret) ** 2, (v_clip - ret) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.maximum(vf1, vf2), mask)
    return loss, masked_mean((vf2 > vf1).float(), mask).detach()


def kl_per_token(logp: Tensor, ref_logp: Tensor, kind: str = "k1") -> Tensor:
    """Sample estimators of KL(pi || ref) from tokens drawn from pi (Schulman, "Approximating KL divergence"):

        d = logp - ref_logp;  k1 = d;  k2 = 0.5*d**2;  k3 = (exp(-d) - 1) + d  (>= 0);  abs = |d|

    Same shape as the inputs.
    """
    _check(kind, KL_ESTIMATORS, "KL estimator")
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d**2
    if kind == "k3":
        return torch.expm1(-d) + d
    return d.abs()


# --- entropy and distillation -----------------------------------------------------------------------


def _log_probs(logits: Tensor) -> Tensor:
    """log softmax over the last dim, -inf clamped to the dtype's min so that 0 * logp stays 0 (also in backward)."""
    x = _up(logits)
    return F.log_softmax(x, -1).clamp(min=torch.finfo(x.dtype).min)


def _kl(logp_a: Tensor, logp_b: Tensor) -> Tensor:
    """KL(a || b) = sum_v a_v * (log a_v - log b_v), (..., V) log-probs -> (...)."""
    return (logp_a.exp() * (logp_a - logp_b)).sum(-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """H = -sum_v p_v log p_v with p = softmax(logits) over the last dim, (..., V) -> (...). Float32 at least."""
    logp = _log_probs(logits)
    return -(logp.exp() * logp).sum(-1)


def distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Token-level distillation divergence, summed over masked positions, times T**2 (Hinton et al. 2015).

        p = softmax(teacher/T), q = softmax(student/T)   per position, over the vocabulary
        forward_kl (Hinton):                     KL(p || q) = sum_v p (log p - log q)
        reverse_kl (MiniLLM, Gu et al. 2023):    KL(q || p)
        jsd (GKD, Agarwal et al. 2024), 0 < beta < 1:
            beta*KL(p || m) + (1-beta)*KL(q || m),   log m = logaddexp(log beta + log p, log(1-beta) + log q)
        loss_sum = T**2 * sum_{(b, t): mask} divergence[b, t]

    student_logits (B, T, V_s), teacher_logits (B, T, V_t), mask (B, T); positions are aligned as given (no shift).
    If V_s != V_t (vocabulary padding) only the first min(V_s, V_t) columns are compared, each side renormalised
    over them. The teacher gets no gradient. Returns (loss_sum scalar, n_positions long scalar).
    """
    _check(kind, DISTILL_KINDS, "distillation kind")
    if kind == "jsd" and not 0 < beta < 1:
        raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    m = mask.bool()
    v = min(student_logits.shape[-1], teacher_logits.shape[-1])
    # Select the masked positions first: the (N, V) work then scales with trained positions only.
    logq = _log_probs(_up(student_logits[..., :v][m]) / temperature)  # (N, V)
    with torch.no_grad():
        logp = _log_probs(_up(teacher_logits[..., :v][m]) / temperature).to(logq.dtype)  # (N, V)
    if kind == "forward_kl":
        div = _kl(logp, logq)
    elif kind == "reverse_kl":
        div = _kl(logq, logp)
    else:  # jsd
        logm = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))  # (N, V) log of the mixture
        div = beta * _kl(logp, logm) + (1 - beta) * _kl(logq, logm)  # (N,)
    return div.sum() * temperature**2, m.sum()


# --- KL coefficient ---------------------------------------------------------------------------------


class AdaptiveKLController:
    """Adaptive KL penalty coefficient (Ziegler et al. 2019):

        error = clip(current_kl / target - 1, -0.2, 0.2);   coef *= 1 + error * n_steps / horizon

    target None keeps the coefficient fixed (update does nothing).
    """

    def __init__(self, init_coef: float, target: float | None, horizon: int) -> None:
        if target is not None and (target <= 0 or horizon <= 0):
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {target}, {horizon}")
        self.coef = float(init_coef)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        if self.target is not None:
            error = min(max(float(current_kl) / self.target - 1, -0.2), 0.2)
            self.coef *= 1 + error * n_steps / self.horizon
        return self.coef

    def state_dict(self) -> dict[str, float]:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.coef = float(state["coef"])
