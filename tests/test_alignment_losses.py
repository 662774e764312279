"""objectives/alignment_losses.py against naive float64 references (python loops, explicit formulas) and their grads."""

from __future__ import annotations

import math

import pytest
import torch

from tunelab.data.types import IGNORE
from tunelab.objectives.alignment_losses import (
    DISTILL_KINDS,
    DPO_LOSS_TYPES,
    KL_ESTIMATORS,
    AdaptiveKLController,
    bradley_terry_loss,
    distill_loss,
    dpo_loss,
    entropy_from_logits,
    gae,
    kl_per_token,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_logps,
    token_logps,
)

F64 = torch.float64
# (B, T) masks: a full row, an empty row, a run starting mid-sequence, a run ending early
MASK = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


def assert_same(fn, ref, *inputs: torch.Tensor) -> None:
    """fn and ref agree in value and in the grads (of a fixed random weighting of the output) wrt every input."""
    xs = [x.clone().requires_grad_() for x in inputs]
    ys = [x.clone().requires_grad_() for x in inputs]
    out, exp = fn(*xs), ref(*ys)
    torch.testing.assert_close(out, exp)
    w = randn(*out.shape, seed=99)
    torch.testing.assert_close(torch.autograd.grad((out * w).sum(), xs), torch.autograd.grad((exp * w).sum(), ys))


def assert_zero_with_zero_grads(fn, *inputs: torch.Tensor) -> None:
    """fully masked: a finite 0 whose backward works and gives zero grads."""
    xs = [x.clone().requires_grad_() for x in inputs]
    out = fn(*xs)
    assert torch.isfinite(out).all() and (out == 0).all()
    for g in torch.autograd.grad(out.sum(), xs):
        assert torch.isfinite(g).all() and (g == 0).all()


def log_softmax_ref(z: torch.Tensor) -> torch.Tensor:
    return torch.log(torch.exp(z) / torch.exp(z).sum())


# --- sequence log-probs ---------------------------------------------------------------------------


def labels_for(b: int, t: int, v: int) -> torch.Tensor:
    labels = torch.randint(0, v, (b, t), generator=torch.Generator().manual_seed(1))
    labels[0, :2] = IGNORE  # a prompt
    labels[1] = IGNORE  # a row with nothing trained
    labels[2, -1] = IGNORE
    return labels


def test_sequence_logps_matches_a_loop_over_positions():
    logits, labels = randn(3, 5, 7), labels_for(3, 5, 7)

    def ref(z):
        rows = []
        for b in range(z.shape[0]):
            terms = [log_softmax_ref(z[b, t - 1])[labels[b, t]] for t in range(1, z.shape[1]) if labels[b, t] != IGNORE]
            rows.append(torch.stack(terms).sum() if terms else z.new_zeros(()))
        return torch.stack(rows)

    assert_same(lambda z: sequence_logps(z, labels)[0], ref, logits)
    assert sequence_logps(logits, labels)[1].tolist() == [(labels[b, 1:] != IGNORE).sum().item() for b in range(3)]


def test_token_logps_mask_zeros_and_dtype():
    logits, labels = randn(3, 5, 7), labels_for(3, 5, 7)
    logp, mask = token_logps(logits, labels)
    assert logp.shape == mask.shape == (3, 4) and mask.dtype == torch.bool
    assert torch.equal(mask, labels[:, 1:] != IGNORE) and (logp[~mask] == 0).all() and (logp[mask] < 0).all()
    torch.testing.assert_close(logp.sum(-1), sequence_logps(logits, labels)[0])
    assert token_logps(logits.bfloat16(), labels)[0].dtype == torch.float32
    assert_zero_with_zero_grads(lambda z: sequence_logps(z, torch.full_like(labels, IGNORE))[0], logits)


# --- preference losses ----------------------------------------------------------------------------


def logsigmoid_ref(x: torch.Tensor) -> torch.Tensor:
    return torch.log(1 / (1 + torch.exp(-x)))


DPO_REF = {
    "sigmoid": lambda h, beta, eps: -logsigmoid_ref(beta * h),
    "conservative": lambda h, beta, eps: -(1 - eps) * logsigmoid_ref(beta * h) - eps * logsigmoid_ref(-beta * h),
    "ipo": lambda h, beta, eps: (h - 1 / (2 * beta)) ** 2,
    "hinge": lambda h, beta, eps: torch.clamp(1 - beta * h, min=0),
}


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_variants_match_their_formula(loss_type):
    beta, eps = 0.5, 0.1 if loss_type == "conservative" else 0.0  # sigmoid with eps > 0: test_dpo_rewards_smoothing...
    inputs = [randn(6, seed=s, scale=3) for s in range(4)]

    def ref(pc, pr, rc, rr):
        return DPO_REF[loss_type]((pc - rc) - (pr - rr), beta, eps)

    assert_same(lambda *x: dpo_loss(*x, beta=beta, loss_type=loss_type, label_smoothing=eps)[0], ref, *inputs)
    if loss_type == "hinge":  # both sides of the hinge are exercised
        h = (inputs[0] - inputs[2]) - (inputs[1] - inputs[3])
        assert (beta * h > 1).any() and (beta * h < 1).any()


def test_dpo_rewards_smoothing_and_errors():
    pc, pr, rc, rr = (randn(4, seed=s).requires_grad_() for s in range(4))
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.2)
    base = dpo_loss(pc, pr, rc, rr)[0]
    torch.testing.assert_close(chosen, 0.2 * (pc - rc).detach())
    torch.testing.assert_close(rejected, 0.2 * (pr - rr).detach())
    assert losses.requires_grad and not chosen.requires_grad and not rejected.requires_grad
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, loss_type="conservative")[0], base)  # eps = 0
    torch.testing.assert_close(
        dpo_loss(pc, pr, rc, rr, loss_type="sigmoid", label_smoothing=0.2)[0],
        dpo_loss(pc, pr, rc, rr, loss_type="conservative", label_smoothing=0.2)[0],
    )
    assert not torch.allclose(dpo_loss(pc, pr, rc, rr, label_smoothing=0.2)[0], base)
    with pytest.raises(ValueError, match="sigmoid, conservative, ipo, hinge"):
        dpo_loss(pc, pr, rc, rr, loss_type="kto")


@pytest.mark.parametrize("with_margin", [False, True])
def test_bradley_terry_matches_formula(with_margin):
    a, b, m = randn(5, seed=1, scale=2), randn(5, seed=2, scale=2), randn(5, seed=3).abs()
    if with_margin:
        assert_same(bradley_terry_loss, lambda a, b, m: -torch.log(1 / (1 + torch.exp(-(a - b - m)))), a, b, m)
    else:
        assert_same(bradley_terry_loss, lambda a, b: -torch.log(1 / (1 + torch.exp(-(a - b)))), a, b)


# --- masked statistics ----------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [None, 0, 1])
def test_masked_mean_matches_explicit_and_ignores_masked_nan(dim):
    x = randn(4, 5)

    def ref(x):
        if dim is None:
            return torch.stack([x[i, j] for i in range(4) for j in range(5) if MASK[i, j]]).mean()
        xs = x if dim == 1 else x.T
        ms = MASK if dim == 1 else MASK.T
        return torch.stack([xs[i][ms[i]].mean() if ms[i].any() else x.new_zeros(()) for i in range(len(xs))])

    assert_same(lambda x: masked_mean(x, MASK, dim), ref, x)
    assert torch.isfinite(masked_mean(x.masked_fill(~MASK, math.nan), MASK, dim)).all()
    assert_zero_with_zero_grads(lambda x: masked_mean(x, torch.zeros_like(MASK), dim), x)


def test_masked_whiten():
    x = randn(4, 5, scale=3) + 2
    y = masked_whiten(x, MASK)
    assert torch.equal(y[~MASK], x[~MASK])
    torch.testing.assert_close(y[MASK].mean(), torch.tensor(0.0, dtype=F64))
    torch.testing.assert_close(y[MASK].std(unbiased=False), torch.tensor(1.0, dtype=F64))
    vals = x[MASK]
    ref = (vals - vals.mean()) / torch.sqrt(vals.var(unbiased=False) + 1e-8)
    torch.testing.assert_close(y[MASK], ref)
    torch.testing.assert_close(masked_whiten(x, MASK, shift_mean=False)[MASK], ref + vals.mean())
    for n in (0, 1):  # fewer than 2 entries: unchanged
        one = torch.zeros_like(MASK)
        one.view(-1)[:n] = True
        assert torch.equal(masked_whiten(x, one), x)


# --- PPO -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_matches_a_backward_loop_per_row(gamma, lam):
    rewards, values = randn(4, 5, seed=1), randn(4, 5, seed=2).requires_grad_()
    adv, ret = gae(rewards, values, MASK, gamma=gamma, lam=lam)
    exp_adv = torch.zeros(4, 5, dtype=F64)
    for b in range(4):
        idx = [t for t in range(5) if MASK[b, t]]
        a = 0.0
        for k in reversed(range(len(idx))):
            t = idx[k]
            v_next = values[b, t + 1].item() if k + 1 < len(idx) else 0.0
            a = rewards[b, t].item() + gamma * v_next - values[b, t].item() + gamma * lam * a
            exp_adv[b, t] = a
    torch.testing.assert_close(adv, exp_adv)
    torch.testing.assert_close(ret, torch.where(MASK, exp_adv + values.detach(), 0))
    assert not adv.requires_grad and not ret.requires_grad


def ppo_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    old = randn(4, 5, seed=1) - 2
    return old + randn(4, 5, seed=2, scale=0.4), old, randn(4, 5, seed=3)


def per_token_mean(fn, mask: torch.Tensor) -> torch.Tensor:
    """mean over masked (b, t) of fn(b, t), a python loop."""
    terms = [fn(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]
    return sum(terms) / len(terms)


def test_ppo_policy_loss_matches_per_token_computation():
    logp, old, adv = ppo_inputs()
    clip = 0.2

    def pg(lp, b, t):  # (-A*ratio, -A*clip(ratio))
        ratio = torch.exp(lp[b, t] - old[b, t])
        return -adv[b, t] * ratio, -adv[b, t] * min(max(ratio, 1 - clip), 1 + clip)

    def ref(lp):
        return per_token_mean(lambda b, t: max(pg(lp, b, t)), MASK)

    assert_same(lambda lp: ppo_policy_loss(lp, old, adv, MASK, clip=clip)[0], ref, logp)
    _, stats = ppo_policy_loss(logp, old, adv, MASK, clip=clip)
    clipped = per_token_mean(lambda b, t: float(pg(logp, b, t)[1] > pg(logp, b, t)[0]), MASK)
    assert 0 < clipped < 1 and stats["clip_fraction"].item() == pytest.approx(clipped)
    kl = per_token_mean(lambda b, t: 0.5 * (logp[b, t] - old[b, t]).item() ** 2, MASK)
    assert stats["approx_kl"].item() == pytest.approx(kl)
    assert torch.autograd.gradcheck(lambda lp: ppo_policy_loss(lp, old, adv, MASK, clip=clip)[0], logp.requires_grad_())
    empty = torch.zeros_like(MASK)
    assert_zero_with_zero_grads(lambda lp: ppo_policy_loss(lp, old, adv, empty)[0], logp.detach())
    assert all(v == 0 for v in ppo_policy_loss(logp, old, adv, empty)[1].values())


def test_ppo_value_loss_matches_per_token_computation():
    values, old, returns = ppo_inputs()
    clip = 0.2

    def vf(v, b, t):  # ((v-R)^2, (v_clip-R)^2)
        v_clip = old[b, t] + min(max(v[b, t] - old[b, t], -clip), clip)
        return (v[b, t] - returns[b, t]) ** 2, (v_clip - returns[b, t]) ** 2

    def ref(v):
        return 0.5 * per_token_mean(lambda b, t: max(vf(v, b, t)), MASK)

    assert_same(lambda v: ppo_value_loss(v, old, returns, MASK, clip=clip)[0], ref, values)
    clipped = per_token_mean(lambda b, t: float(vf(values, b, t)[1] > vf(values, b, t)[0]), MASK)
    frac = ppo_value_loss(values, old, returns, MASK, clip=clip)[1]
    assert 0 < clipped < 1 and frac.item() == pytest.approx(clipped) and not frac.requires_grad
    assert_zero_with_zero_grads(lambda v: ppo_value_loss(v, old, returns, torch.zeros_like(MASK))[0], values)


KL_REF = {
    "k1": lambda d: d,
    "k2": lambda d: d**2 / 2,
    "k3": lambda d: torch.exp(-d) - 1 + d,
    "abs": lambda d: torch.abs(d),
}


@pytest.mark.parametrize("kind", KL_ESTIMATORS)
def test_kl_estimators_match_formula(kind):
    logp, ref_logp = randn(3, 4, seed=1), randn(3, 4, seed=2)
    assert_same(lambda a, b: kl_per_token(a, b, kind), lambda a, b: KL_REF[kind](a - b), logp, ref_logp)
    if kind == "k3":
        assert (kl_per_token(randn(1000, seed=3, scale=5), torch.zeros(1000, dtype=F64), "k3") >= 0).all()


def test_kl_unknown_kind():
    with pytest.raises(ValueError, match="k1, k2, k3, abs"):
        kl_per_token(torch.zeros(1), torch.zeros(1), "k4")


# --- entropy and distillation ---------------------------------------------------------------------


def softmax_ref(z: torch.Tensor) -> torch.Tensor:
    return torch.exp(z) / torch.exp(z).sum()


def test_entropy_matches_explicit_sum():
    logits = randn(2, 3, 6, scale=2)

    def ref(z):
        rows = [-(softmax_ref(v) * torch.log(softmax_ref(v))).sum() for v in z.reshape(-1, z.shape[-1])]
        return torch.stack(rows).view(z.shape[:-1])

    assert_same(entropy_from_logits, ref, logits)
    z = torch.tensor([[0.0, -math.inf, 1.0]], requires_grad=True)  # a masked-out vocabulary entry
    h = entropy_from_logits(z)
    h.sum().backward()
    assert torch.isfinite(h).all() and torch.isfinite(z.grad).all()
    assert entropy_from_logits(torch.zeros(2, 4, dtype=torch.bfloat16)).dtype == torch.float32


def kl_ref(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return sum(p[i] * torch.log(p[i] / q[i]) for i in range(len(p)))


def distill_ref(student, teacher, mask, kind, beta, temp):
    v = min(student.shape[-1], teacher.shape[-1])
    total = student.new_zeros(())
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t]:
                p, q = softmax_ref(teacher[b, t, :v] / temp), softmax_ref(student[b, t, :v] / temp)
                if kind == "forward_kl":
                    total = total + kl_ref(p, q)
                elif kind == "reverse_kl":
                    total = total + kl_ref(q, p)
                else:
                    m = beta * p + (1 - beta) * q
                    total = total + beta * kl_ref(p, m) + (1 - beta) * kl_ref(q, m)
    return total * temp**2


@pytest.mark.parametrize("kind", DISTILL_KINDS)
@pytest.mark.parametrize("teacher_v", [6, 8])  # 8: a teacher vocabulary padded past the student's
def test_distill_matches_explicit_sums(kind, teacher_v):
    student, teacher = randn(4, 5, 6, seed=1, scale=2), randn(4, 5, teacher_v, seed=2, scale=2)
    beta, temp = 0.3, 2.0

    def fn(s):
        return distill_loss(s, teacher, MASK, kind=kind, beta=beta, temperature=temp)[0]

    assert_same(fn, lambda s: distill_ref(s, teacher, MASK, kind, beta, temp), student)
    assert distill_loss(student, teacher, MASK, kind=kind)[1].item() == MASK.sum().item()
    t = teacher.clone().requires_grad_()
    distill_loss(student.requires_grad_(), t, MASK, kind=kind, beta=beta)[0].backward()
    assert t.grad is None and student.grad is not None


@pytest.mark.parametrize("kind", DISTILL_KINDS)
def test_distill_fully_masked_is_zero(kind):
    student, teacher, empty = randn(2, 3, 5, seed=1), randn(2, 3, 5, seed=2), torch.zeros(2, 3, dtype=torch.bool)
    assert_zero_with_zero_grads(lambda s: distill_loss(s, teacher, empty, kind=kind)[0], student)
    assert distill_loss(student, teacher, empty, kind=kind)[1].item() == 0
    assert distill_loss(student.bfloat16(), teacher.bfloat16(), MASK[:2, :3], kind=kind)[0].dtype == torch.float32


def test_distill_errors():
    s = torch.zeros(1, 1, 3)
    m = torch.ones(1, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="forward_kl, reverse_kl, jsd"):
        distill_loss(s, s, m, kind="tvd")
    for beta in (0.0, 1.0):
        with pytest.raises(ValueError, match="beta"):
            distill_loss(s, s, m, kind="jsd", beta=beta)


# --- KL coefficient ---------------------------------------------------------------------------------


def test_adaptive_kl_controller_follows_the_formula():
    ctl, coef = AdaptiveKLController(0.2, target=6.0, horizon=1000), 0.2
    for kl, n in [(3.0, 64), (6.6, 64), (20.0, 128), (6.0, 32)]:
        coef *= 1 + min(max(kl / 6.0 - 1, -0.2), 0.2) * n / 1000
        assert ctl.update(kl, n) == pytest.approx(coef)
    state = ctl.state_dict()
    assert state == {"coef": pytest.approx(coef)} and isinstance(state["coef"], float)
    other = AdaptiveKLController(0.2, target=6.0, horizon=1000)
    other.load_state_dict(state)
    assert other.coef == ctl.coef

    fixed = AdaptiveKLController(0.05, target=None, horizon=1000)
    assert fixed.update(100.0, 64) == 0.05 and fixed.coef == 0.05
