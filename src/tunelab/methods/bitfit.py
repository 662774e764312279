"""M05 BitFit (Ben Zaken et al., arXiv:2106.10199): only the bias terms train.

    h = W x + b,   W frozen,   b trained

Targets: the bias of every targeted linear layer (`targets`: all-linear — every Linear/Conv1D but
the output head —, attention, or a list of leaf names) and, with `train_norm_bias`, the biases of
the normalisation layers (LayerNorm in GPT-2 and GPT-NeoX; RMSNorm has none). Trainable: the sum of
the targeted layers' output widths, plus the norm widths.

Departure from the paper: most current architectures (Llama, Mistral, Gemma, Phi-3; most of Qwen2)
have bias-free linear layers, so BitFit would train nothing there. Those layers get a new bias,
zero-initialised so the model is unchanged at init. The result is then no longer the plain
architecture (its config says bias=False), so BitFit is not mergeable: the artifact is the biases
on top of the base, reloaded by re-applying the method.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from tunelab.config import MethodConfig
from tunelab.methods._linear import dense_modules, in_out
from tunelab.methods.partial import is_norm
from tunelab.methods.registry import register_method


class BitFitConfig(MethodConfig):
    name: Literal["bitfit"] = "bitfit"
    targets: list[str] | Literal["all-linear", "attention"] = Field(
        "all-linear", description="linear layers whose bias trains (a zero bias is added where missing)"
    )
    train_norm_bias: bool = Field(True, description="also train the biases of LayerNorms, where they exist")


def _add_zero_bias(layer: nn.Module) -> None:
    w = layer.weight
    layer.bias = nn.Parameter(torch.zeros(in_out(layer)[1], device=w.device, dtype=w.dtype))


@register_method(
    "bitfit", BitFitConfig, family="selective", backend="ours", paper="arXiv:2106.10199", mergeable=False,
    summary="only bias terms train (zero biases added where the architecture has none)", identity_at_init=True,
)
def apply(model: nn.Module, cfg: BitFitConfig) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in dense_modules(model, cfg.targets):
        if layer.bias is None:
            _add_zero_bias(layer)
        layer.bias.requires_grad_(True)
    if cfg.train_norm_bias:
        for m in model.modules():
            bias = getattr(m, "bias", None)
            if is_norm(m) and isinstance(bias, nn.Parameter):
                bias.requires_grad_(True)
    return model
