"""M07 Diff pruning: a learned, sparse difference vector on top of frozen pretrained weights.

Guo, Rush & Kim, "Parameter-efficient transfer learning with diff pruning", arXiv:2012.07463.
Every targeted weight is theta = theta0 + delta with delta = z ⊙ w; theta0 is frozen, w starts at
zero (so the model is the base at init) and z is a hard-concrete gate (Louizos et al.,
arXiv:1712.01312) with one log_alpha per weight, temperature beta and stretch (gamma, zeta):

    training   u ~ U(0, 1),  s = sigmoid((log u - log(1 - u) + log_alpha) / beta)
               z = clamp(s * (zeta - gamma) + gamma, 0, 1)
    eval/merge z = clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)
    penalty    lambda_l0 * mean_i sigmoid(log_alpha_i - beta * log(-gamma / zeta))

The penalty (the expected L0 norm of delta) is returned by the `penalty` hook and added once per
optimizer step. Projection (the paper's magnitude pruning + fixed-mask fine-tuning): at step
`project_at_step` the deterministic delta is cut to its `density` x N largest entries by |delta|;
w takes the projected delta and every gate is pinned, z = 1 on the kept entries and 0 elsewhere
(log_alpha set to +-1e4, where the gate, its gradient and the penalty's gradient are exactly
constant), so the remaining steps train only the kept entries. Mergeable: theta0 + delta; the merged
weights differ from the base in exactly the `tunelab_changed` count (nonzero delta entries that
change theta0).

Departures from the paper:
- the penalty is normalised by the number of gated weights (a mean, so it reads as lambda_l0 x the
  expected fraction of nonzero delta entries), where the paper sums over all weights with
  lambda = 1.25e-7; the same per-weight pressure on a model of N weights is lambda_l0 = 1.25e-7 x N;
- z is resampled on every forward (every micro-batch), the paper samples it once per step;
- the paper gives log_alpha its own optimizer with lr 0.1 (w: 1e-5); tunelab has one AdamW lr, so
  log_alpha = `alpha_lr_scale` x a stored parameter `log_alpha_p`, which moves log_alpha
  `alpha_lr_scale` times faster under Adam. `log_alpha_p` is stored flattened (1-D) so it gets no
  weight decay (which would drag every gate to sigmoid(0)); w is decayed like a weight (an L2 pull
  of delta towards 0);
- Louizos' beta = 2/3 and stretch (-0.1, 1.1) are the defaults (the paper's code: beta = 1,
  stretch (-1.5, 1.5)); only the targeted linear layers are diff-pruned (the paper: all weights),
  and there is no structured (group) penalty;
- fixed-mask fine-tuning continues the same optimizer and schedule (moments carry over).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from tunelab.config import MethodConfig
from tunelab.methods import _sparse
from tunelab.methods.registry import register_method

U_EPS = 1e-6  # u is clamped to [U_EPS, 1 - U_EPS] so log u and log(1 - u) stay finite
PINNED = 1e4  # |log_alpha| that saturates the gate: z is exactly 0 or 1, with zero gradient


class DiffPruningConfig(MethodConfig):
    name: Literal["diff_pruning"] = "diff_pruning"
    target_modules: _sparse.Targets = Field("all-linear", description="leaf names, all-linear or attention")
    lambda_l0: float = Field(1.0, ge=0.0, description="weight of the expected-L0 penalty (mean over weights)")
    init_log_alpha: float = Field(5.0, description="initial log_alpha: gates start nearly always open")
    temperature: float = Field(2.0 / 3.0, gt=0.0, description="beta of the hard-concrete distribution")
    stretch: tuple[float, float] = Field((-0.1, 1.1), description="(gamma, zeta), gamma < 0 and zeta > 1")
    alpha_lr_scale: float = Field(100.0, gt=0.0, description="log_alpha moves this many times faster than w")
    density: float | None = Field(None, gt=0.0, le=1.0, description="fraction of delta kept by the projection")
    project_at_step: int | None = Field(None, gt=0, description="optimizer step at which to project")

    @model_validator(mode="after")
    def _check(self) -> DiffPruningConfig:
        gamma, zeta = self.stretch
        if not (gamma < 0.0 and zeta > 1.0):
            raise ValueError("stretch must be (gamma, zeta) with gamma < 0 < 1 < zeta")
        if (self.density is None) != (self.project_at_step is None):
            raise ValueError("density and project_at_step go together: set both to project, or neither")
        return self


class HardConcreteDelta(nn.Module):
    """Parametrization theta0 -> theta0 + z ⊙ w with a hard-concrete gate z per weight."""

    def __init__(self, weight: torch.Tensor, cfg: DiffPruningConfig):
        super().__init__()
        self.shape = weight.shape
        self.scale, self.beta = cfg.alpha_lr_scale, cfg.temperature
        self.gamma, self.zeta = cfg.stretch
        self.w = nn.Parameter(torch.zeros_like(weight))
        self.log_alpha_p = nn.Parameter(torch.full(
            (weight.numel(),), cfg.init_log_alpha / cfg.alpha_lr_scale, dtype=torch.float32, device=weight.device))

    def log_alpha(self) -> torch.Tensor:
        return (self.scale * self.log_alpha_p).view(self.shape)

    def gate(self, sample: bool) -> torch.Tensor:
        la = self.log_alpha()
        if sample:
            u = torch.rand_like(la).clamp(U_EPS, 1.0 - U_EPS)
            s = torch.sigmoid((u.log() - (-u).log1p() + la) / self.beta)
        else:
            s = torch.sigmoid(la)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0).to(self.w.dtype)

    def merged(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.gate(sample=False) * self.w

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.gate(sample=True) * self.w if self.training else self.merged(weight)

    def expected_l0(self) -> torch.Tensor:
        """Sum over this tensor of P(z != 0)."""
        return torch.sigmoid(self.scale * self.log_alpha_p - self.beta * math.log(-self.gamma / self.zeta)).sum()


def _gates(model: nn.Module) -> list[HardConcreteDelta]:
    return [p for _, p in _sparse.parametrizations(model, HardConcreteDelta)]


def penalty(model: nn.Module, cfg: DiffPruningConfig) -> torch.Tensor | None:
    gates = _gates(model)
    if not gates or cfg.lambda_l0 == 0.0:
        return None
    n = sum(g.log_alpha_p.numel() for g in gates)
    return cfg.lambda_l0 * torch.stack([g.expected_l0() for g in gates]).sum() / n


@torch.no_grad()
def project(model: nn.Module, density: float) -> None:
    """Keep the density x N largest |delta| (deterministic gates) and pin every gate to 0 or 1."""
    gates = _gates(model)
    deltas = [g.gate(sample=False) * g.w for g in gates]
    k = _sparse.budget(density, sum(d.numel() for d in deltas))
    for g, d, keep in zip(gates, deltas, _sparse.topk_masks([d.abs() for d in deltas], k), strict=True):
        g.w.copy_(torch.where(keep, d, torch.zeros_like(d)))
        pinned = torch.where(keep.reshape(-1), PINNED, -PINNED) / g.scale
        g.log_alpha_p.copy_(pinned)


def on_step(model: nn.Module, cfg: DiffPruningConfig, step: int) -> None:
    if cfg.project_at_step is not None and step == cfg.project_at_step:
        project(model, cfg.density)


def _count(model: nn.Module) -> tuple[torch.Tensor, int]:
    return _sparse.count_parametrized(model, HardConcreteDelta)


@register_method(
    "diff_pruning", DiffPruningConfig, family="sparse", backend="ours", paper="arXiv:2012.07463", mergeable=True,
    summary="sparse diff vector z ⊙ w on frozen weights, hard-concrete gates with an L0 penalty",
    on_step=on_step, penalty=penalty, state=_sparse.state_with_count(_count, "diff_pruning"),
    merge=lambda model, cfg: _sparse.fold(model, HardConcreteDelta), identity_at_init=True,
)
def apply(model: nn.Module, cfg: DiffPruningConfig) -> nn.Module:
    _sparse.freeze(model)
    _sparse.parametrize_weights(model, _sparse.target_linears(model, cfg.target_modules),
                                lambda w: HardConcreteDelta(w, cfg))
    _sparse.add_counter(model)
    return model
