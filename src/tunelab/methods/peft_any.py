"""M18: any other peft method by name, through a pass-through config.

    method: {name: peft, peft_type: LOKR, config: {r: 8, target_modules: all-linear}}

`peft_type` is one of peft's `PeftType` names (case-insensitive) or `DORA`, a convenience for
LoRA with weight decomposition (Liu et al., arXiv:2402.09353), i.e. peft's LoraConfig(use_dora=True).
`config` holds the keyword arguments of that type's peft config class; its keys are checked against
the class's own fields when the config is read, and the class validates the values, so a typo is a
config error naming the key and the allowed ones. tunelab sets `task_type: CAUSAL_LM` itself.
`target_modules` may use tunelab's shorthands (`all-linear`, `attention`); when it is left out,
peft's per-architecture default applies, or `all-linear` where peft has none for the model (then
IA3 scales every target's output: no `feedforward_modules` unless given).

The method's math is peft's: see peft's documentation of each type. The artifact is a plain peft
adapter. AdaLoRA is refused here: it needs tunelab's per-step budget update (`method.name: adalora`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from peft import PeftConfig, PeftType, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import constants
from pydantic import Field, field_validator, model_validator
from torch import nn

from tunelab.config import MethodConfig
from tunelab.errors import ConfigError
from tunelab.methods.lora import resolve_targets
from tunelab.methods.registry import register_method

CONVENIENCE = {"DORA": ("LORA", {"use_dora": True})}
REFUSED = {"ADALORA": "use method.name: adalora, which runs AdaLoRA's rank-budget update every step"}
# Set by tunelab or by peft itself, never by the user.
RESERVED = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
            "inference_mode"}


def peft_types() -> list[str]:
    return sorted([t.value for t in PeftType if t.value not in REFUSED] + list(CONVENIENCE))


def _resolve(peft_type: str) -> tuple[str, type[PeftConfig], dict[str, Any]]:
    """peft's type name, its config class and the settings the (convenience) name implies."""
    base, implied = CONVENIENCE.get(peft_type, (peft_type, {}))
    return base, PEFT_TYPE_TO_CONFIG_MAPPING[base], implied


def allowed_keys(peft_type: str) -> list[str]:
    _, cls, implied = _resolve(peft_type)
    return [f.name for f in dataclasses.fields(cls) if f.name not in RESERVED and f.name not in implied]


class PeftAnyConfig(MethodConfig):
    name: Literal["peft"] = "peft"
    peft_type: str = Field(description="a peft PeftType name (IA3, LOKR, LOHA, VERA, OFT, ...) or DORA")
    config: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of that type's peft config")

    @field_validator("peft_type")
    @classmethod
    def _known(cls, v: str) -> str:
        v = v.upper()
        if v in REFUSED:
            raise ValueError(f"{v} is not available through the pass-through: {REFUSED[v]}")
        if v not in peft_types():
            raise ValueError(f"unknown peft type {v!r}; known: {', '.join(peft_types())}")
        return v

    @model_validator(mode="after")
    def _keys(self) -> PeftAnyConfig:
        allowed = allowed_keys(self.peft_type)
        for key in self.config:
            if key not in allowed:
                raise ValueError(f"config.{key}: not a setting of peft's {self.peft_type}; "
                                 f"allowed: {', '.join(allowed)}")
        build_peft_config(self)  # peft's own checks of the values, at config time
        return self


def build_peft_config(cfg: PeftAnyConfig, model: nn.Module | None = None) -> PeftConfig:
    _, cls, implied = _resolve(cfg.peft_type)
    kwargs = {**cfg.config, **implied}
    if model is not None and "target_modules" in allowed_keys(cfg.peft_type):
        kwargs.update(_targets(model, cfg, kwargs))
    try:
        return cls(task_type="CAUSAL_LM", **kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"peft's {cls.__name__} rejects the settings: {e}") from None


def _targets(model: nn.Module, cfg: PeftAnyConfig, kwargs: dict[str, Any]) -> dict[str, Any]:
    """tunelab's shorthands resolved; where none is given and peft has no default for the architecture,
    all-linear (and for IA3 no feed-forward modules: every target's output is scaled)."""
    given = kwargs.get("target_modules")
    if given in ("all-linear", "attention"):
        return {"target_modules": resolve_targets(model, given)}
    if given is not None or _peft_has_defaults(model, cfg.peft_type):
        return {}
    out: dict[str, Any] = {"target_modules": resolve_targets(model, "all-linear")}
    if "feedforward_modules" in allowed_keys(cfg.peft_type) and kwargs.get("feedforward_modules") is None:
        out["feedforward_modules"] = []
    return out


def _peft_has_defaults(model: nn.Module, peft_type: str) -> bool:
    base = _resolve(peft_type)[0]
    names = (f"TRANSFORMERS_MODELS_TO_{base}_TARGET_MODULES_MAPPING",
             f"TRANSFORMERS_MODELS_TO_{base.replace('_', '')}_TARGET_MODULES_MAPPING")  # LN_TUNING -> LNTUNING
    mapping = next((getattr(constants, n) for n in names if hasattr(constants, n)), {})
    return getattr(getattr(model, "config", None), "model_type", "") in mapping


@register_method(
    "peft", PeftAnyConfig, family="peft", backend="peft", paper="-", mergeable=False,
    summary="any other peft method by name (DoRA, IA3, LoKr, LoHa, VeRA, OFT, ...); merge where peft can",
)
def apply(model: nn.Module, cfg: PeftAnyConfig) -> nn.Module:
    try:
        peft_cfg = build_peft_config(cfg, model)
        return get_peft_model(model, peft_cfg)
    except ValueError as e:
        raise ConfigError(f"method ({cfg.peft_type}): {e}",
                          fix="check method.config against peft's documentation of this type") from None
