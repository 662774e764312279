"""M06 LT-SFT: lottery-ticket sparse fine-tuning, two phases in one run.

Ansell et al., "Composable Sparse Fine-Tuning for Cross-Lingual Transfer", arXiv:2110.07560.
With theta0 the pretrained weights and E the eligible weights (the targeted linear weights, plus the
input embeddings when `embeddings` is set):

    phase 1 (steps 1 .. phase1_steps)   train every weight in E densely: theta0 -> theta1
    selection (after step phase1_steps) mask = top-k over E of |theta1 - theta0|,
                                        k = round(density x |E|); reset theta := theta0
    phase 2 (the rest of the run)       train only the masked entries:
                                        theta = theta0 + mask ⊙ (theta - theta0)

The phases run through the `on_step` hook, because the optimizer is built once from the
parameters that train: all of E trains throughout, and phase 2 is enforced by (1) a gradient
hook multiplying each gradient by the mask (so clipping sees only the masked gradient) and
(2) putting theta0 back outside the mask after every optimizer step, which undoes what AdamW's
weight decay would otherwise move there. The result differs from
the base in exactly the masked entries (`tunelab_changed` records the count). Mergeable: the
trained weights are plain weights.

Memory: a frozen copy of theta0 for every eligible weight (the `ltsft_theta0` buffers, rebuilt
from the base on load, never saved) doubles the eligible weights, plus a bool mask (1 byte per
weight, saved) on top of the cost of full fine-tuning of E. The selection needs one more float32
and bool per eligible weight, transiently.

Departures from the paper:
- only the targeted linear weights (and optionally the input embeddings) are eligible and train;
  norms, biases and the output head stay frozen in both phases, where the paper selects over
  (nearly) all parameters;
- phase 2 starts with a fresh optimizer, as the paper's new fine-tuning run does (AdamW's moments
  and step count are cleared after the selection: the `restarts_optimizer` hook), but continues
  the run's learning-rate schedule rather than starting a new one;
- the saved artifact holds the eligible weights densely plus the mask, not a sparse vector, and a
  model loaded with `tunelab.load` keeps the theta0 copies (its training form; export --merge for a
  plain model);
- a run that ends by `phase1_steps` never selects: its result is dense fine-tuning of E.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from tunelab.config import MethodConfig
from tunelab.methods import _sparse
from tunelab.methods.registry import register_method

THETA0 = "ltsft_theta0"  # not `tunelab_`: rebuilt from the base on apply, so never part of the state
MASK = "tunelab_mask"
HOOKS = "_ltsft_hooks"


class LtsftConfig(MethodConfig):
    name: Literal["ltsft"] = "ltsft"
    density: float = Field(0.05, gt=0.0, le=1.0, description="fraction of eligible weights trained in phase 2")
    phase1_steps: int = Field(100, gt=0, description="optimizer steps of dense phase 1; phase 2 is the rest")
    target_modules: _sparse.Targets = Field("all-linear", description="leaf names, all-linear or attention")
    embeddings: bool = Field(False, description="the input embedding matrix is eligible too")


def _eligible(model: nn.Module, cfg: LtsftConfig) -> list[nn.Module]:
    modules = [m for _, m in _sparse.target_linears(model, cfg.target_modules)]
    if cfg.embeddings:
        modules.append(model.get_input_embeddings())
    owners, seen = [], set()
    for m in modules:
        if id(m.weight) not in seen:
            seen.add(id(m.weight))
            owners.append(m)
    return owners


def _owners_of(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if THETA0 in m._buffers]


def _mask_grad(module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    return grad * getattr(module, MASK)


@torch.no_grad()
def select(model: nn.Module, density: float) -> None:
    """The phase change: mask the top-k |theta1 - theta0| and reset every eligible weight to theta0."""
    owners = _owners_of(model)
    diffs = [(m.weight - getattr(m, THETA0)).abs() for m in owners]
    k = _sparse.budget(density, sum(d.numel() for d in diffs))
    for m, keep in zip(owners, _sparse.topk_masks(diffs, k), strict=True):
        getattr(m, MASK).copy_(keep)
        m.weight.copy_(getattr(m, THETA0))


@torch.no_grad()
def restore_outside_mask(model: nn.Module) -> None:
    for m in _owners_of(model):
        m.weight.copy_(torch.where(getattr(m, MASK), m.weight, getattr(m, THETA0)))


def on_step(model: nn.Module, cfg: LtsftConfig, step: int) -> None:
    if step == cfg.phase1_steps:
        select(model, cfg.density)
    elif step > cfg.phase1_steps:
        restore_outside_mask(model)


def _count(model: nn.Module) -> tuple[torch.Tensor, int]:
    owners = _owners_of(model)
    changed = sum((m.weight != getattr(m, THETA0)).sum() for m in owners)
    return torch.as_tensor(changed), sum(m.weight.numel() for m in owners)


def merge(model: nn.Module, cfg: LtsftConfig) -> nn.Module:
    """The weights are already plain: drop the hooks and the method's buffers."""
    for h in getattr(model, HOOKS, []):
        h.remove()
    for m in _owners_of(model):
        delattr(m, THETA0)
        delattr(m, MASK)
    for name in (HOOKS, _sparse.CHANGED):
        if hasattr(model, name):
            delattr(model, name)
    return model


@register_method(
    "ltsft", LtsftConfig, family="sparse", backend="ours", paper="arXiv:2110.07560", mergeable=True,
    summary="dense phase, top-k weights by change, reset, then only those train",
    on_step=on_step, state=_sparse.state_with_count(_count, "ltsft"), merge=merge, identity_at_init=True,
    restarts_optimizer=lambda cfg, step: step == cfg.phase1_steps,
)
def apply(model: nn.Module, cfg: LtsftConfig) -> nn.Module:
    _sparse.freeze(model)
    hooks = []
    for m in _eligible(model, cfg):
        m.weight.requires_grad_(True)
        m.register_buffer(THETA0, m.weight.detach().clone(), persistent=False)
        m.register_buffer(MASK, torch.ones_like(m.weight, dtype=torch.bool))
        hooks.append(m.weight.register_hook(partial(_mask_grad, m)))
    setattr(model, HOOKS, hooks)
    _sparse.add_counter(model)
    return model
