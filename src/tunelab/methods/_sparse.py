"""Building blocks shared by the sparse methods: LT-SFT (`ltsft`), diff pruning (`diff_pruning`) and
Threshold-Mask (`threshold_mask`).

- which linear layers a method targets (`all-linear`, `attention` or a list of leaf names);
- a global top-k over many tensors with a fixed tie rule (ties go to the earlier position);
- the sparsity summary every sparse method keeps in the `tunelab_changed` buffer on the model root:
  how many weights of the result differ from the base, refreshed whenever the method's state is taken;
- weight parametrizations (`torch.nn.utils.parametrize`) for the methods that rewrite a frozen weight,
  and folding them back into plain weights for `merge`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers.pytorch_utils import Conv1D

from tunelab.errors import TunelabError
from tunelab.methods.registry import default_state
from tunelab.modeling.load import attention_targets, linear_targets

Targets = list[str] | Literal["all-linear", "attention"]
CHANGED = "tunelab_changed"


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def target_linears(model: nn.Module, targets: Targets) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Linear/Conv1D whose leaf name is targeted, the output head excluded."""
    available = linear_targets(model)
    names = set(available if targets == "all-linear" else attention_targets(model) if targets == "attention"
                else targets)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = [
        (n, m) for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, Conv1D)) and m is not head and n.rsplit(".", 1)[-1] in names
    ]
    if not found:
        raise TunelabError(
            f"target_modules {targets!r} matches no linear layer of this model",
            fix=f"choose among {', '.join(available)} (or all-linear / attention)",
        )
    return found


def topk_masks(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Boolean masks holding the `k` largest entries over all `scores` together (exactly k, ties
    broken by position in the concatenation). Transient memory: one float32 and one bool per entry."""
    flat = torch.cat([s.detach().reshape(-1).float() for s in scores])  # (N,)
    n = flat.numel()
    if k >= n:
        keep = torch.ones(n, dtype=torch.bool, device=flat.device)
    elif k <= 0:
        keep = torch.zeros(n, dtype=torch.bool, device=flat.device)
    else:
        kth = flat.kthvalue(n - k + 1).values  # the k-th largest
        keep = flat > kth
        short = k - int(keep.sum())
        if short > 0:
            keep[(flat == kth).nonzero().squeeze(1)[:short]] = True
    return [m.view(s.shape) for m, s in zip(keep.split([s.numel() for s in scores]), scores, strict=True)]


def budget(density: float, eligible: int) -> int:
    """Number of entries a `density` keeps out of `eligible`."""
    return min(eligible, round(density * eligible))


# ----------------------------------------------------------------------------- the sparsity summary


def add_counter(model: nn.Module) -> None:
    device = next(model.parameters()).device
    model.register_buffer(CHANGED, torch.zeros((), dtype=torch.long, device=device))


def record(model: nn.Module, method: str, changed: torch.Tensor, eligible: int) -> None:
    """Store the number of weights that differ from the base, and print it (once per state taken:
    every checkpoint and the final artifact)."""
    getattr(model, CHANGED).copy_(changed)
    print(f"{method}: {summary_line(int(changed), eligible)}", file=sys.stderr)


def summary_line(changed: int, eligible: int) -> str:
    share = 100 * changed / max(eligible, 1)
    return f"{changed:,} of {eligible:,} targeted weights differ from the base ({share:.3f}%)"


def state_with_count(count: Callable[[nn.Module], tuple[torch.Tensor, int]], method: str):
    """A `state` hook: refresh the summary buffer, then the default state (trainable tensors and
    `tunelab_` buffers)."""

    def state(model: nn.Module) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            changed, eligible = count(model)
        record(model, method, changed, eligible)
        return default_state(model)

    return state


# ----------------------------------------------------------------------------- weight parametrizations


def parametrize_weights(model: nn.Module, modules: list[tuple[str, nn.Module]], make: Callable[..., nn.Module]) -> None:
    """Freeze each module's weight and compute it through `make(weight)` from now on. The new
    module follows its host's train/eval mode (a model loaded for inference is in eval mode)."""
    for _, module in modules:
        module.weight.requires_grad_(False)
        p = make(module.weight)
        p.train(module.training)
        parametrize.register_parametrization(module, "weight", p, unsafe=True)


def parametrizations(model: nn.Module, cls: type) -> list[tuple[nn.Module, Any]]:
    """(host module, parametrization) for every weight parametrized by a `cls` instance."""
    out = []
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight"):
            found = [p for p in m.parametrizations.weight if isinstance(p, cls)]
            out += [(m, p) for p in found]
    return out


def count_parametrized(model: nn.Module, cls: type) -> tuple[torch.Tensor, int]:
    """(weights whose merged value differs from the frozen base, targeted weights). `merged(weight)`
    is the exact expression `merge` folds in, so the count is exact."""
    changed = torch.zeros((), dtype=torch.long, device=getattr(model, CHANGED).device)
    eligible = 0
    for host, p in parametrizations(model, cls):
        base = host.parametrizations.weight.original
        changed += (p.merged(base) != base).sum().to(changed.device)
        eligible += base.numel()
    return changed, eligible


def fold(model: nn.Module, cls: type) -> nn.Module:
    """Replace every `cls` parametrization by the plain weight it computes in eval mode."""
    model.eval()
    for host, _ in parametrizations(model, cls):
        parametrize.remove_parametrizations(host, "weight", leave_parametrized=True)
    if hasattr(model, CHANGED):
        delattr(model, CHANGED)
    return model
