"""Linear-layer helpers shared by methods that wrap or edit linear weights (KronA, DyLoRA, BitFit):
one place for the Linear (weight (out, in)) vs GPT-2 Conv1D (weight (in, out)) difference."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tunelab.errors import TunelabError
from tunelab.methods.lora import resolve_targets

DENSE = (nn.Linear, Conv1D)


def in_out(layer: nn.Module) -> tuple[int, int]:
    """(in, out) features of a Linear (weight (out, in)) or a GPT-2 Conv1D (weight (in, out))."""
    w = layer.weight
    return (w.shape[0], w.shape[1]) if isinstance(layer, Conv1D) else (w.shape[1], w.shape[0])


def dense_modules(model: nn.Module, targets: list[str] | str) -> list[tuple[str, nn.Module]]:
    """(qualified name, layer) of every Linear/Conv1D whose leaf name is targeted; never the head."""
    names = set(resolve_targets(model, targets))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, DENSE) and m is not head and n.rsplit(".", 1)[-1] in names]
    if not found:
        raise TunelabError(f"method.target_modules {targets!r} matches no linear layer of {type(model).__name__}",
                           fix="list leaf names of linear layers, e.g. [q_proj, v_proj], or use all-linear")
    return found


@torch.no_grad()
def add_to_weight(layer: nn.Module, delta: torch.Tensor) -> None:
    """W += delta, with delta in (out, in) layout whatever the layer's own layout."""
    w = layer.weight
    w.add_((delta.T if isinstance(layer, Conv1D) else delta).to(w.dtype))


def unwrap(model: nn.Module, wrapper_cls: type[nn.Module]) -> nn.Module:
    """Fold every `wrapper_cls` layer (which has `merged()` -> base layer) back into a plain layer."""
    for name, mod in [(n, m) for n, m in model.named_modules() if isinstance(m, wrapper_cls)]:
        model.set_submodule(name, mod.merged())
    return model
