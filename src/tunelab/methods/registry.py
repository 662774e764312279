"""The method registry: one `MethodSpec` per technique, registered by one decorator.

A method changes the model (which parameters train, which modules are injected). The training
loop only ever calls the spec's hooks; it never branches on a method's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunelab.config import MethodConfig

ApplyFn = Callable[[nn.Module, Any], nn.Module]


def _no_step(model: nn.Module, cfg: Any, step: int) -> None:
    return None


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type[MethodConfig]
    apply: ApplyFn
    family: str
    backend: str  # "ours" | "peft"
    paper: str
    mergeable: bool
    summary: str
    # Called after every optimizer step (AdaLoRA budgets, DyLoRA rank sampling, mask phases).
    on_step: Callable[[nn.Module, Any, int], None] = _no_step


METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    config_cls: type[MethodConfig],
    *,
    family: str,
    backend: str,
    paper: str,
    mergeable: bool,
    summary: str,
    on_step: Callable[[nn.Module, Any, int], None] = _no_step,
) -> Callable[[ApplyFn], ApplyFn]:
    def deco(fn: ApplyFn) -> ApplyFn:
        if name in METHODS:
            raise RuntimeError(f"method {name!r} registered twice")
        METHODS[name] = MethodSpec(name, config_cls, fn, family, backend, paper, mergeable, summary, on_step)
        return fn

    return deco


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, shared tensors counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        if getattr(p, "quant_state", None) is not None or p.dtype == torch.uint8:
            n *= 2  # 4-bit packed storage holds two parameters per byte
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def is_peft_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()
