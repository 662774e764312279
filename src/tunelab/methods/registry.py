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
from peft import NoMatchingPeftModuleError
from torch import nn

from tunelab.config import MethodConfig
from tunelab.errors import TunelabError

ApplyFn = Callable[[nn.Module, Any], nn.Module]


def _no_step(model: nn.Module, cfg: Any, step: int) -> None:
    return None


def _no_penalty(model: nn.Module, cfg: Any) -> torch.Tensor | None:
    return None


def default_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a non-peft, non-full method saves: its trainable parameters, plus the buffers it
    registered under a `tunelab_` name (masks, ranks), by their state_dict names."""
    out = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out.update({n: b for n, b in model.named_buffers() if n.rsplit(".", 1)[-1].startswith("tunelab_")})
    return {n: t.detach().cpu().contiguous() for n, t in out.items()}


def default_merge(model: nn.Module, cfg: Any) -> nn.Module:
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    raise NotImplementedError


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
    # A regulariser added once per optimizer step to the token-mean loss (e.g. an L0 penalty).
    penalty: Callable[[nn.Module, Any], torch.Tensor | None] = _no_penalty
    # What the final artifact holds: "peft" (a peft adapter dir), "full" (a transformers model dir)
    # or "delta" (the method's state on top of the base: tunelab_method.json + safetensors).
    artifact: str = "delta"
    state: Callable[[nn.Module], dict[str, torch.Tensor]] = default_state
    # Fold the method into plain base weights (export --merge); mergeable methods only.
    merge: Callable[[nn.Module, Any], nn.Module] = default_merge
    # The model computes exactly what the base did right after `apply` (checked by the contract tests).
    identity_at_init: bool = False
    # Which optimizer the loop builds for this config: "adamw" | "paged_adamw_8bit" | "paged_adamw_32bit".
    optimizer: Callable[[Any], str] = lambda cfg: "adamw"
    # True after the optimizer step where training starts anew: the loop clears the optimizer's state
    # (AdamW's moments and step count) right after that step's on_step (LT-SFT's phase 2).
    restarts_optimizer: Callable[[Any, int], bool] = lambda cfg, step: False
    # State beside the weights that a resumed run needs (AdaLoRA's importance scores): saved in every
    # checkpoint as tensors by name, and put back on resume.
    aux_state: Callable[[nn.Module], dict[str, torch.Tensor]] = lambda model: {}
    load_aux_state: Callable[[nn.Module, dict[str, torch.Tensor]], None] = lambda model, tensors: None


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
    **hooks: Any,
) -> Callable[[ApplyFn], ApplyFn]:
    """Register `apply(model, cfg) -> model`. `hooks`: on_step, penalty, artifact, state, merge,
    identity_at_init, optimizer, restarts_optimizer, aux_state, load_aux_state (see MethodSpec);
    peft-backed methods default to the peft artifact."""
    hooks.setdefault("artifact", "peft" if backend == "peft" else "delta")

    def deco(fn: ApplyFn) -> ApplyFn:
        if name in METHODS:
            raise RuntimeError(f"method {name!r} registered twice")
        METHODS[name] = MethodSpec(name, config_cls, _user_errors(name, fn), family, backend, paper, mergeable,
                                   summary, **hooks)
        return fn

    return deco


def _user_errors(name: str, fn: ApplyFn) -> ApplyFn:
    """`apply` whose failures caused by the config are tunelab errors: modules that match nothing
    (peft), and weights too large to allocate (e.g. a huge rank)."""
    def apply(model: nn.Module, cfg: Any) -> nn.Module:
        try:
            return fn(model, cfg)
        except NoMatchingPeftModuleError as e:
            raise TunelabError(f"method {name}: {' '.join(str(e).split())}",
                               fix="set method.target_modules to module names of this model (the error lists "
                               "them), or a keyword: all-linear, attention") from None
        except RuntimeError as e:
            if "alloc" not in str(e) and "memory" not in str(e):
                raise
            raise TunelabError(f"method {name}: its weights do not fit in memory ({str(e).splitlines()[0][:120]})",
                               fix="lower the method's size settings (e.g. method.r)") from None
    return apply


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


def load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor], exact: bool = True) -> None:
    """Copy saved tensors into the model's parameters and buffers by name. Every trainable
    parameter must be covered (when `exact`) and every saved name must exist."""
    targets = dict(model.named_parameters())
    targets.update(dict(model.named_buffers()))
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in tensors] if exact else []
    unknown = [n for n in tensors if n not in targets]
    if missing or unknown:
        raise RuntimeError(f"saved state does not match the model: missing {missing[:3]}, unknown {unknown[:3]}")
    with torch.no_grad():
        for n, t in tensors.items():
            targets[n].copy_(t)
