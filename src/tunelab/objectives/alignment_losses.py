"""Pure tensor losses for reward modelling, DPO, PPO, GRPO/RLOO and distillation (no models, configs or I/O).

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


# --- GRPO and RLOO ----------------------------------------------------------------------------------
# Rewards (N,) come in N/G groups of G consecutive replies to one prompt. Per-token tensors are
# (B, T) over reply positions (mask); per-reply tensors (B,).

def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    if group_size < 2 or rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} are not groups of {group_size} (>= 2) replies")
    return _up(rewards).view(-1, group_size)  # (P, G)


def group_advantages(rewards: Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO's group-relative advantages (Shao et al. 2024, arXiv:2402.03300), one per reply:

        A_i = r_i - mean_g(r)                          (scale False: Dr. GRPO, Liu et al. 2025)
        A_i = (r_i - mean_g(r)) / (std_g(r) + eps)     (scale True; std with Bessel's correction, as TRL's)

    rewards (N,) as N/G groups of G consecutive replies -> (N,). A group of equal rewards gets A = 0.
    """
    r = _grouped(rewards, group_size)
    adv = r - r.mean(-1, keepdim=True)  # (P, G)
    if scale:
        adv = adv / (r.std(-1, keepdim=True) + eps)
    return adv.reshape(-1)


def leave_one_out_advantages(rewards: Tensor, group_size: int, *, scale: bool = False, eps: float = 1e-4) -> Tensor:
    """RLOO's advantages (Kool et al. 2019; Ahmadian et al. 2024, arXiv:2402.14740), one per reply:

        A_i = r_i - 1/(G-1) * sum_{j != i} r_j     (= G/(G-1) * (r_i - mean_g(r)))
        scale: A_i / (std_g(r) + eps)

    rewards (N,) as N/G groups of G consecutive replies -> (N,).
    """
    r = _grouped(rewards, group_size)
    adv = r - (r.sum(-1, keepdim=True) - r) / (group_size - 1)  # (P, G)
    if scale:
        adv = adv / (r.std(-1, keepdim=True) + eps)
    return adv.reshape(-1)


def clipped_objective(
    log_ratio: Tensor, advantages: Tensor, *, epsilon: float, epsilon_high: float | None = None
) -> tuple[Tensor, Tensor]:
    """The clipped surrogate as a loss, elementwise (broadcasting log_ratio against advantages):

        rho = exp(log_ratio);  loss = max(-A*rho, -A*clip(rho, 1-epsilon, 1+epsilon_high))

    epsilon_high None: epsilon (symmetric); larger: DAPO's clip-higher (Yu et al. 2025, arXiv:2503.14476).
    Returns (loss, clipped: where the clipped term is the larger one, i.e. the gradient is cut).
    """
    hi = epsilon if epsilon_high is None else epsilon_high
    ratio = log_ratio.exp()
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1 - epsilon, 1 + hi)
    return torch.maximum(pg1, pg2), pg2 > pg1


def grpo_token_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, epsilon: float = 0.2,
    epsilon_high: float | None = None, ref_logp: Tensor | None = None, beta: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO's per-token loss (B, T), 0 outside the mask:

        l_bt = max(-A_b*rho_bt, -A_b*clip(rho_bt, 1-eps, 1+eps_high)) + beta * k3(logp_bt, ref_logp_bt)
        rho_bt = exp(logp_bt - old_logp_bt);  k3 = exp(ref - logp) - (ref - logp) - 1   (kl_per_token "k3")

    logp, old_logp, ref_logp, mask (B, T); advantages (B,). old_logp, ref_logp and advantages are
    constants. The KL term needs ref_logp (beta 0 or ref_logp None: no term). Stats (detached, masked
    means): clip_fraction, approx_kl (0.5 (logp - old_logp)^2), and kl (k3) when the term is there.
    """
    m = mask.bool()
    log_ratio = torch.where(m, logp - old_logp.detach(), 0)  # (B, T); 0 outside keeps exp finite
    loss, clipped = clipped_objective(log_ratio, advantages.detach()[:, None], epsilon=epsilon,
                                      epsilon_high=epsilon_high)
    stats = {}
    if ref_logp is not None and beta:
        kl = kl_per_token(torch.where(m, logp, 0), torch.where(m, ref_logp.detach(), 0), "k3")  # (B, T)
        loss = loss + beta * kl
        stats["kl"] = masked_mean(kl.detach(), m)
    with torch.no_grad():
        stats.update(clip_fraction=masked_mean(clipped.float(), m), approx_kl=masked_mean(0.5 * log_ratio**2, m))
    return torch.where(m, loss, 0), stats


def grpo_loss(per_token: Tensor, mask: Tensor, max_new_tokens: int) -> tuple[Tensor, Tensor]:
    """`grpo` (the paper's): each reply's mean over its tokens, then the mean over replies.

    Returns (sum over replies of sum_t l_bt / |o_b|, number of replies with a token): the loop divides
    by the replies of the whole optimizer step. per_token, mask (B, T)."""
    m = mask.bool()
    n = m.sum(-1)  # (B,)
    return (torch.where(m, per_token, 0).sum(-1) / n.clamp(min=1)).sum(), (n > 0).sum()


def dr_grpo_loss(per_token: Tensor, mask: Tensor, max_new_tokens: int) -> tuple[Tensor, Tensor]:
    """`dr_grpo` (Liu et al. 2025, arXiv:2503.20783): the sum over every token divided by a constant,
    replies x max_new_tokens, so a reply's weight does not depend on its length.

    Returns (sum_bt l_bt / max_new_tokens, number of replies with a token)."""
    m = mask.bool()
    return torch.where(m, per_token, 0).sum() / max_new_tokens, (m.sum(-1) > 0).sum()


def dapo_loss(per_token: Tensor, mask: Tensor, max_new_tokens: int) -> tuple[Tensor, Tensor]:
    """`dapo` (Yu et al. 2025): the token-level mean over every reply token of the optimizer step.

    Returns (sum_bt l_bt, number of reply tokens)."""
    m = mask.bool()
    return torch.where(m, per_token, 0).sum(), m.sum()


GRPO_LOSSES = {"grpo": grpo_loss, "dr_grpo": dr_grpo_loss, "dapo": dapo_loss}


def rloo_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, epsilon: float | None = 0.2,
    epsilon_high: float | None = None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """REINFORCE with the leave-one-out baseline, the whole reply one action (Ahmadian et al. 2024):

        s_b = sum_t logp_bt,  rho_b = exp(s_b - s_old_b)
        l_b = max(-A_b*rho_b, -A_b*clip(rho_b, 1-eps, 1+eps_high))      (epsilon None: -A_b*rho_b)

    whose gradient at rho = 1 (the first pass over a rollout) is -A_b * grad s_b. logp, old_logp, mask
    (B, T); advantages (B,). Returns (sum of l_b over replies with a token, their number, stats:
    clip_fraction (of replies), approx_kl (per token, as ppo's)).
    """
    m = mask.bool()
    log_ratio = torch.where(m, logp - old_logp.detach(), 0)  # (B, T)
    seq = log_ratio.sum(-1)  # (B,)
    adv = advantages.detach()
    if epsilon is None:
        loss, clipped = -adv * seq.exp(), torch.zeros_like(adv, dtype=torch.bool)
    else:
        loss, clipped = clipped_objective(seq, adv, epsilon=epsilon, epsilon_high=epsilon_high)
    has = m.any(-1)  # (B,)
    with torch.no_grad():
        stats = {"clip_fraction": masked_mean(clipped.float(), has), "approx_kl": masked_mean(0.5 * log_ratio**2, m)}
    return torch.where(has, loss, 0).sum(), has.sum(), stats
