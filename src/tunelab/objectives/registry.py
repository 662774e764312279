"""The objective registry: an objective turns a batch into a loss.

Each objective is a pure loss function plus the small batch logic of its family. The loop calls
`spec.loss(model, batch, cfg)` which returns `(loss_sum, n_tokens)`: the loop divides by the
trainable tokens of the whole accumulated batch, so accumulation never changes the update.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tunelab.config import ObjectiveConfig

LossFn = Callable[[nn.Module, dict[str, torch.Tensor], Any], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    config_cls: type[ObjectiveConfig]
    loss: LossFn
    formats: tuple[str, ...]  # data formats this objective consumes
    mask_prompt: bool  # train only on completions (assistant turns) rather than every token
    summary: str


OBJECTIVES: dict[str, ObjectiveSpec] = {}


def register_objective(
    name: str,
    config_cls: type[ObjectiveConfig],
    *,
    formats: tuple[str, ...],
    mask_prompt: bool,
    summary: str,
) -> Callable[[LossFn], LossFn]:
    def deco(fn: LossFn) -> LossFn:
        if name in OBJECTIVES:
            raise RuntimeError(f"objective {name!r} registered twice")
        OBJECTIVES[name] = ObjectiveSpec(name, config_cls, fn, formats, mask_prompt, summary)
        return fn

    return deco
