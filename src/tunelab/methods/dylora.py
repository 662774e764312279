"""M16 DyLoRA (Valipour et al., arXiv:2210.07558): LoRA trained for every rank up to r at once.

Each optimizer step draws b ~ Uniform{1, ..., r} and trains the truncated update

    h = W0 x + (alpha / b) * B[:, :b] A[:b] x,    A (r, in) Kaiming-uniform,  B (out, r) zero

so the leading components are ordered by usefulness (nested-dropout style) and any rank k <= r
works after training: eval and export use `eval_rank` (default r), and `set_rank(model, k)` picks
another one on a loaded model. Merge writes W0 + (alpha / k) B[:, :k] A[:k] into the base exactly.
Trainable per layer: r * (in + out); the artifact keeps the full r-rank factors.

Variants (`update`): "all" (default) lets every component <= b learn at the step's rank; "last"
detaches components < b, so only the b-th row of A and column of B learn (the paper's "frozen"
mode).

Departures from the paper: one b per optimizer step for the whole model, drawn from torch's global
RNG. `on_step` only clears the step's rank; the draw happens at the next training forward. That
keeps checkpoint/resume exact: the RNG state a checkpoint saves has not yet produced the next
rank, so a resumed run draws the same b as an uninterrupted one. Eval mode never draws.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from tunelab.config import MethodConfig
from tunelab.errors import TunelabError
from tunelab.methods._linear import add_to_weight, dense_modules, in_out, unwrap
from tunelab.methods.registry import register_method


class DyLoraConfig(MethodConfig):
    name: Literal["dylora"] = "dylora"
    r: int = Field(8, gt=0, description="largest rank; each step trains a rank drawn from 1..r")
    alpha: float = Field(16.0, gt=0, description="the rank-b update is scaled by alpha / b")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    target_modules: list[str] | Literal["all-linear", "attention"] = "all-linear"
    eval_rank: int | None = Field(None, gt=0, description="rank used in eval and export; default r")
    update: Literal["all", "last"] = Field("all", description="last: only the b-th component learns (frozen mode)")

    @model_validator(mode="after")
    def _rank_in_range(self) -> DyLoraConfig:
        if self.eval_rank is not None and self.eval_rank > self.r:
            raise ValueError(f"eval_rank ({self.eval_rank}) must be <= r ({self.r})")
        return self


class RankState:
    """The rank every DyLoRA layer of one model uses: drawn once per training step, fixed in eval."""

    def __init__(self, r: int, eval_rank: int):
        self.r = r
        self.eval_rank = eval_rank
        self.train_rank: int | None = None  # None: draw at the next training forward

    def current(self, training: bool) -> int:
        if not training:
            return self.eval_rank
        if self.train_rank is None:
            self.train_rank = int(torch.randint(1, self.r + 1, (1,)).item())
        return self.train_rank


class DyLoraLinear(nn.Module):
    """A frozen Linear/Conv1D plus (alpha / b) * B[:, :b] A[:b] at the shared rank b."""

    def __init__(self, base: nn.Module, cfg: DyLoraConfig, state: RankState):
        super().__init__()
        n_in, n_out = in_out(base)
        w = base.weight
        self.base_layer = base.requires_grad_(False)
        self.alpha, self.update, self.state = cfg.alpha, cfg.update, state
        self.lora_A = nn.Parameter(torch.empty(cfg.r, n_in, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(n_out, cfg.r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.train(base.training)

    def factors(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A[:b] (b, in) and B[:, :b] (out, b); in "last" mode while training, only component b has grad."""
        A, B = self.lora_A[:b], self.lora_B[:, :b]
        if self.update == "last" and self.training and b > 1:
            A = torch.cat([A[:-1].detach(), A[-1:]], dim=0)
            B = torch.cat([B[:, :-1].detach(), B[:, -1:]], dim=1)
        return A, B

    def delta_weight(self, b: int) -> torch.Tensor:
        A, B = self.lora_A[:b], self.lora_B[:, :b]
        return (self.alpha / b) * B @ A  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.state.current(self.training)
        A, B = self.factors(b)
        return self.base_layer(x) + (self.alpha / b) * (self.dropout(x) @ A.T) @ B.T

    def merged(self) -> nn.Module:
        add_to_weight(self.base_layer, self.delta_weight(self.state.eval_rank).detach())
        return self.base_layer


def rank_state(model: nn.Module) -> RankState:
    for m in model.modules():
        if isinstance(m, DyLoraLinear):
            return m.state
    raise TunelabError("the model has no DyLoRA layer", fix="apply method dylora first")


def set_rank(model: nn.Module, k: int) -> None:
    """Use rank k (1 <= k <= r) in eval mode and for merge."""
    state = rank_state(model)
    if not 1 <= k <= state.r:
        raise TunelabError(f"DyLoRA rank {k} is outside 1..{state.r}", fix=f"pick a rank in 1..{state.r}")
    state.eval_rank = k


def on_step(model: nn.Module, cfg: DyLoraConfig, step: int) -> None:
    rank_state(model).train_rank = None


def merge(model: nn.Module, cfg: DyLoraConfig) -> nn.Module:
    return unwrap(model, DyLoraLinear)


@register_method(
    "dylora", DyLoraConfig, family="reparameterized", backend="ours", paper="arXiv:2210.07558", mergeable=True,
    summary="LoRA trained at a random rank each step; any rank <= r usable after; mergeable",
    on_step=on_step, merge=merge, identity_at_init=True,
)
def apply(model: nn.Module, cfg: DyLoraConfig) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    state = RankState(cfg.r, cfg.eval_rank or cfg.r)
    for name, layer in dense_modules(model, cfg.target_modules):
        model.set_submodule(name, DyLoraLinear(layer, cfg, state))
    return model
