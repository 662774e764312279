"""M01 full fine-tuning: every parameter of the model trains.

The baseline every other method is measured against. Costs the most memory: weights, gradients
and two AdamW moments for every parameter (about 16 bytes per parameter in fp32).
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from tunelab.config import MethodConfig
from tunelab.methods.registry import register_method


class FullConfig(MethodConfig):
    name: Literal["full"] = "full"


@register_method(
    "full", FullConfig, family="full", backend="ours", paper="-", mergeable=False,
    summary="all parameters train", artifact="full", identity_at_init=True, merge=lambda model, cfg: model,
)
def apply(model: nn.Module, cfg: FullConfig) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model
