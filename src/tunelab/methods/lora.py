"""M13 LoRA (Hu et al., arXiv:2106.09685), a thin wrapper over peft.

h = W0 x + (alpha / r) * B A x with A (r, in) random, B (out, r) zero-initialised, so the model
is unchanged at init. W0 is frozen; after training B A can be merged into W0 exactly.
`target_modules`: a list of module names, `all-linear` (every linear layer but the output head)
or `attention` (the architecture's attention projections).
"""

from __future__ import annotations

from typing import Literal

from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from pydantic import Field
from torch import nn

from tunelab.config import MethodConfig
from tunelab.methods.registry import register_method
from tunelab.modeling.load import attention_targets, linear_targets


class LoraConfig(MethodConfig):
    name: Literal["lora"] = "lora"
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear", "attention"] = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = Field(False, description="scale by alpha/sqrt(r) instead of alpha/r")
    modules_to_save: list[str] | None = None


def resolve_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    if targets == "all-linear":
        return linear_targets(model)
    if targets == "attention":
        return attention_targets(model)
    return list(targets)


@register_method(
    "lora", LoraConfig, family="reparameterized", backend="peft", paper="arXiv:2106.09685", mergeable=True,
    summary="low-rank update B A added to frozen weights; mergeable", identity_at_init=True,
)
def apply(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    peft_cfg = PeftLoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=resolve_targets(model, cfg.target_modules),
        bias=cfg.bias,
        use_rslora=cfg.use_rslora,
        modules_to_save=cfg.modules_to_save,
    )
    return get_peft_model(model, peft_cfg)
