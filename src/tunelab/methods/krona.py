"""M15 KronA (Edalati et al., arXiv:2212.10650): a Kronecker-product update of frozen linear weights.

    h = W0 x + alpha * (A ⊗ B) x,    A (a1, a2),  B (b1, b2),  a1 * b1 = out,  a2 * b2 = in

(A ⊗ B)[i*b1 + k, j*b2 + l] = A[i, j] * B[k, l]: the update has rank(A) * rank(B), far more than a
LoRA of the same size. Factor shapes: for each of out and in, `a` is the divisor of n closest to
sqrt(n) — which is always the largest divisor not above sqrt(n) — and `b = n / a` (a prime n gives
a = 1, b = n, so B spans that whole dimension). Trainable per layer: a1*a2 + b1*b2.

A starts Kaiming-uniform and B at zero, so the model is unchanged at init (as in LoRA). The forward
never builds the (out, in) matrix: with x reshaped to X (a2, b2), (A ⊗ B) x = vec(A X B^T), done in
whichever matmul order costs fewer multiply-adds. After training, merge writes W0 + alpha A ⊗ B into
the base layer exactly.

Departures from the paper: the paper studies KronA on the attention projections and a variant
parallel to the FFN with a residual connection (KronA^B_res); here it is one generic linear-layer adapter
with `target_modules` as in LoRA (default all-linear). The factor-shape rule is ours.

Also home to the small linear-layer helpers the other wrapping methods (dylora) share.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from tunelab.config import MethodConfig
from tunelab.methods._linear import add_to_weight, dense_modules, in_out, unwrap
from tunelab.methods.registry import register_method

# ----------------------------------------------------------------------------- KronA


class KronaConfig(MethodConfig):
    name: Literal["krona"] = "krona"
    alpha: float = Field(1.0, gt=0, description="scale of the update: delta W = alpha * A ⊗ B")
    target_modules: list[str] | Literal["all-linear", "attention"] = "all-linear"


def factor_pair(n: int) -> tuple[int, int]:
    """(a, b) with a * b = n and a the divisor of n closest to sqrt(n) (a <= b)."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


def kron_matvec(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """(A ⊗ B) applied to the last dim of x without building A ⊗ B."""
    (a1, a2), (b1, b2) = A.shape, B.shape
    X = x.reshape(*x.shape[:-1], a2, b2)  # (..., a2, b2)
    if a1 * b2 * (a2 + b1) <= a2 * b1 * (b2 + a1):
        Y = torch.matmul(torch.matmul(A, X), B.T)  # (..., a1, b2) -> (..., a1, b1)
    else:
        Y = torch.matmul(A, torch.matmul(X, B.T))  # (..., a2, b1) -> (..., a1, b1)
    return Y.reshape(*x.shape[:-1], a1 * b1)


class KronaLinear(nn.Module):
    """A frozen Linear/Conv1D plus alpha * (A ⊗ B)."""

    def __init__(self, base: nn.Module, alpha: float):
        super().__init__()
        n_in, n_out = in_out(base)
        (a1, b1), (a2, b2) = factor_pair(n_out), factor_pair(n_in)
        w = base.weight
        self.base_layer = base.requires_grad_(False)
        self.alpha = alpha
        self.krona_A = nn.Parameter(torch.empty(a1, a2, device=w.device, dtype=w.dtype))
        self.krona_B = nn.Parameter(torch.zeros(b1, b2, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.krona_A, a=math.sqrt(5))
        self.train(base.training)

    def delta_weight(self) -> torch.Tensor:
        return self.alpha * torch.kron(self.krona_A, self.krona_B)  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.alpha * kron_matvec(x, self.krona_A, self.krona_B)

    def merged(self) -> nn.Module:
        add_to_weight(self.base_layer, self.delta_weight().detach())
        return self.base_layer


def merge(model: nn.Module, cfg: KronaConfig) -> nn.Module:
    return unwrap(model, KronaLinear)


@register_method(
    "krona", KronaConfig, family="reparameterized", backend="ours", paper="arXiv:2212.10650", mergeable=True,
    summary="Kronecker-product update A ⊗ B added to frozen weights; mergeable", merge=merge,
    identity_at_init=True,
)
def apply(model: nn.Module, cfg: KronaConfig) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in dense_modules(model, cfg.target_modules):
        model.set_submodule(name, KronaLinear(layer, cfg.alpha))
    return model
