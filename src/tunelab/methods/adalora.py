"""M17 AdaLoRA (Zhang et al., arXiv:2303.10512): LoRA in SVD form with an adaptive rank budget; peft.

Each adapted weight gets h = W0 x + (alpha / init_r) * P diag(lambda) Q x, with P (out, init_r),
Q (init_r, in) random and lambda zero-initialised (identity at init). After every optimizer step
the importance of each singular triplet (lambda_i, P[:, i], Q[i]) is scored from |w * grad w|,
smoothed (beta1) and weighted by its uncertainty (beta2); the lowest-scored lambda_i are zeroed
until the total rank meets a budget that falls cubically from init_r * n_layers to
target_r * n_layers between step tinit and step total_step - tfinal, re-allocated every deltaT
steps and fixed for the last tfinal steps. The loss gains the orthogonality regulariser

    R = orth_reg_weight * mean over P, Q of ||P^T P - I||_F  (resp. ||Q Q^T - I||_F).

tunelab wires the two pieces peft leaves to the trainer: `on_step` calls peft's
`update_and_allocate(step)` after `optimizer.step()` and before the gradients are cleared
(the importance scores read `p.grad`), with the 1-based step, so the last step is `total_step`;
`penalty` adds R, which peft only adds inside `forward` when labels are passed (tunelab's
objectives compute the loss themselves). `total_step` must be the run's length (train.max_steps):
with a shorter run the final budget is never applied.

A checkpoint keeps the allocator's state (the smoothed importance and uncertainty of every triplet and
the last rank pattern: `aux_state`), so a resumed run allocates exactly as the uninterrupted one.
Departure: peft keeps pruned triplets as zeros (masked) rather than resizing them during
training; the saved adapter holds only the kept ones (`rank_pattern`).
"""

from __future__ import annotations

from typing import Literal

import torch
from peft import AdaLoraConfig as PeftAdaLoraConfig
from peft import get_peft_model
from pydantic import Field, model_validator
from torch import nn

from tunelab.config import MethodConfig
from tunelab.methods.lora import resolve_targets
from tunelab.methods.registry import register_method


class AdaLoraConfig(MethodConfig):
    name: Literal["adalora"] = "adalora"
    init_r: int = Field(12, gt=0, description="rank of every adapted matrix at the start")
    target_r: int = Field(8, gt=0, description="average rank per matrix once the budget has fallen")
    tinit: int = Field(0, ge=0, description="steps before any rank is pruned")
    tfinal: int = Field(0, ge=0, description="last steps trained with the final ranks fixed")
    deltaT: int = Field(1, gt=0, description="steps between two budget allocations")
    beta1: float = Field(0.85, gt=0, lt=1, description="smoothing of the importance")
    beta2: float = Field(0.85, gt=0, lt=1, description="smoothing of its uncertainty")
    orth_reg_weight: float = Field(0.5, ge=0, description="weight of the orthogonality regulariser")
    total_step: int | None = Field(None, gt=0, description="the run's optimizer steps: set it to train.max_steps")
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear", "attention"] = "all-linear"

    @model_validator(mode="after")
    def _schedule(self) -> AdaLoraConfig:
        if self.total_step is None:
            raise ValueError("total_step is required: AdaLoRA's rank budget schedule ends there; "
                             "set method.total_step to train.max_steps")
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) must not exceed init_r ({self.init_r})")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(f"no steps left to prune ranks: need tinit ({self.tinit}) < total_step - tfinal "
                             f"({self.total_step} - {self.tfinal})")
        return self


def update_budget(model: nn.Module, cfg: AdaLoraConfig, step: int) -> None:
    """peft's importance update and rank allocation; `model.base_model` is peft's AdaLoraModel."""
    model.base_model.update_and_allocate(step)


def _factor_gram(name: str, p: torch.Tensor) -> torch.Tensor | None:
    if ".lora_A." in name:
        return p @ p.T  # Q (r, in): Q Q^T (r, r)
    if ".lora_B." in name:
        return p.T @ p  # P (out, r): P^T P (r, r)
    return None


def orth_penalty(model: nn.Module, cfg: AdaLoraConfig) -> torch.Tensor | None:
    """The regulariser peft's `AdaLoraModel.forward` adds when given labels, for tunelab's own losses."""
    if cfg.orth_reg_weight == 0:
        return None
    norms = []
    for name, p in model.named_parameters():
        gram = _factor_gram(name, p) if p.requires_grad else None
        if gram is not None:
            eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
            norms.append(torch.linalg.matrix_norm(gram - eye))  # Frobenius
    return cfg.orth_reg_weight * torch.stack(norms).mean() if norms else None


STATS = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # the RankAllocator's smoothed importance, by parameter name


def allocator_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a resumed run needs beside the weights: the importance statistics peft keeps in its
    RankAllocator (smoothed over every step so far) and the rank pattern of the last allocation."""
    ada = model.base_model
    out = {f"{kind}/{name}": t for kind in STATS for name, t in getattr(ada.rankallocator, kind).items()}
    pattern = ada.peft_config[ada.trainable_adapter_name].rank_pattern or {}
    out.update({f"rank_pattern/{name}": torch.tensor(keep, dtype=torch.bool) for name, keep in pattern.items()})
    return out


def load_allocator_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    ada = model.base_model
    device = next(model.parameters()).device
    for kind in STATS:
        setattr(ada.rankallocator, kind, {name.split("/", 1)[1]: t.to(device) for name, t in tensors.items()
                                          if name.startswith(f"{kind}/")})
    pattern = {name.split("/", 1)[1]: t.tolist() for name, t in tensors.items() if name.startswith("rank_pattern/")}
    ada.peft_config[ada.trainable_adapter_name].rank_pattern = pattern or None


@register_method(
    "adalora", AdaLoraConfig, family="reparameterized", backend="peft", paper="arXiv:2303.10512", mergeable=True,
    summary="SVD-form LoRA whose rank budget moves to the most important matrices during training",
    on_step=update_budget, penalty=orth_penalty, identity_at_init=True, aux_state=allocator_state,
    load_aux_state=load_allocator_state,
)
def apply(model: nn.Module, cfg: AdaLoraConfig) -> nn.Module:
    return get_peft_model(model, PeftAdaLoraConfig(
        task_type="CAUSAL_LM", init_r=cfg.init_r, target_r=cfg.target_r, tinit=cfg.tinit, tfinal=cfg.tfinal,
        deltaT=cfg.deltaT, beta1=cfg.beta1, beta2=cfg.beta2, orth_reg_weight=cfg.orth_reg_weight,
        total_step=cfg.total_step, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=resolve_targets(model, cfg.target_modules),
    ))
