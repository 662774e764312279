"""Frozen models beside the one being trained: DPO's and PPO's reference, a teacher, a reward model.

`Reference` gives the reference policy's logits without a second copy of the weights when it can:
- the policy is a peft adapter (LoRA, QLoRA, DoRA, prompt/prefix tuning ...) and no reference path
  is given: the reference is the same model with its adapter disabled (peft `disable_adapter`);
- a path is given: that model, loaded frozen (any model, run dir or adapter `tunelab.load` reads);
- otherwise (full or one of our delta methods): a frozen copy of the policy as training starts.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from tunelab.artifacts import load
from tunelab.errors import TunelabError


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP / accelerate wrapper."""
    return getattr(model, "module", model)


def freeze(model: nn.Module, device: torch.device) -> nn.Module:
    model.requires_grad_(False)
    return model.eval().to(device)


def load_frozen(path: str, device: torch.device, what: str) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a model dir, hub id, adapter or run dir, frozen on `device`."""
    try:
        model, tokenizer = load(path)
    except TunelabError as e:
        raise TunelabError(f"cannot load the {what} {path!r}: {e.message}", fix=e.fix) from None
    return freeze(model, device), tokenizer


def check_same_vocab(tokenizer: Any, other: Any, what: str, path: str) -> None:
    if tokenizer is not None and other is not None and tokenizer.get_vocab() != other.get_vocab():
        raise TunelabError(f"the {what} {path!r} has a different tokenizer from the model being trained",
                           fix=f"use a {what} that shares the trained model's tokenizer")


class Reference:
    """Logits of the frozen reference policy for a batch (no gradient)."""

    def __init__(self, policy: nn.Module, path: str | None, device: torch.device, tokenizer: Any = None):
        self.model: nn.Module | None = None
        self.released = False
        self.kind = "adapter-disabled policy"
        if path is not None:
            self.model, ref_tok = load_frozen(path, device, "reference model")
            check_same_vocab(tokenizer, ref_tok, "reference model", path)
            self.kind = f"model {path}"
        elif not isinstance(unwrap(policy), PeftModel):
            self.model = freeze(copy.deepcopy(unwrap(policy)), device)
            self.kind = "frozen copy of the initial policy"

    @contextlib.contextmanager
    def _as_reference(self, policy: nn.Module) -> Iterator[nn.Module]:
        if self.model is not None:
            yield self.model
            return
        inner = unwrap(policy)
        was_training = inner.training
        inner.eval()  # no dropout in the reference
        try:
            with inner.disable_adapter():
                yield inner
        finally:
            inner.train(was_training)

    @torch.no_grad()
    def forward(self, policy: nn.Module, fn: Any, *args: Any) -> Any:
        """`fn(reference_model, *args)` with the reference in place of the policy."""
        if self.released:
            raise TunelabError("the reference model was dropped after precomputing the training pairs' log-probs "
                               "(precompute_reference), so it cannot score other pairs",
                               fix="set objective.precompute_reference=false to evaluate on other data")
        with self._as_reference(policy) as ref:
            return fn(ref, *args)

    def release(self) -> None:
        """Drop a held copy (after precomputing what was needed from it); the adapter-disabled policy stays."""
        if self.model is not None:
            self.model, self.released = None, True
