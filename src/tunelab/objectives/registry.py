"""The objective registry: an objective turns a batch into a loss.

Each objective is a pure loss function plus the small batch logic of its family. The loop calls
its runtime's `loss(model, batch)`, which returns `(loss_sum, n_units)`: the loop divides by the
units (trained tokens; preference pairs) of the whole accumulated batch, so accumulation never
changes the update.

Stateless objectives (lm, sft, classify) register a function `loss(model, batch, cfg)`; the
default runtime calls it. Objectives that hold models or state beside the policy (a frozen
reference, a teacher, a reward model, a KL controller, rollouts) register a `runtime` factory
taking the `RunContext`: the loop asks it for the loss, for per-step statistics to log, for
checkpoint state, and (PPO) for the stream of batches. That is how recipes compose the one loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tunelab.config import ObjectiveConfig

LossFn = Callable[[nn.Module, dict[str, torch.Tensor], Any], tuple[torch.Tensor, torch.Tensor]]
# (model, batch, cfg) -> per-position loss (B, T-1) and its trained mask (B, T-1): the loss unreduced
TokenLossFn = Callable[[nn.Module, dict[str, torch.Tensor], Any], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class RunContext:
    """What an objective's runtime may use: built by the loop before accelerate prepares the model."""

    cfg: Any  # RunConfig
    model: nn.Module  # the policy / student / reward model being trained (method applied)
    tokenizer: Any
    device: torch.device
    say: Callable[[str], Any] = print
    examples: list[Any] = field(default_factory=list)  # the training examples (data.types.Example)
    pad_id: int = 0
    tasks: list[str] = field(default_factory=list)  # multi-task runs: the task names, by `task_ids` index


class Runtime:
    """Default runtime: the registered stateless loss. Subclasses override what they need."""

    def __init__(self, fn: LossFn, cfg: Any, token_fn: TokenLossFn | None = None, tasks: list[str] | None = None):
        self.fn, self.cfg, self.token_fn, self.tasks = fn, cfg, token_fn, tasks or []
        self.task_sums = StatSums()

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        task_ids = batch.get("task_ids")  # (B, T): a multi-task batch (data/stream.MixtureStream)
        if task_ids is None or self.token_fn is None:
            return self.fn(model, batch, self.cfg)
        nll, mask = self.token_fn(model, batch, self.cfg)  # (B, T-1) each
        predicted = task_ids[:, 1:]  # the task of the token each position predicts
        for t, name in enumerate(self.tasks):
            sel = mask & (predicted == t)
            if bool(sel.any()):
                self.task_sums.add(f"loss_{name}", float(nll.detach()[sel].sum()), float(sel.sum()))
        return (nll * mask).sum(), mask.sum()

    def stats(self) -> dict[str, float]:
        """Statistics accumulated since the last call (then reset), logged with the step or eval; in a
        multi-task run, `loss_<task>`: each task's mean loss per trained token over the step."""
        return self.task_sums.take()

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state saved in checkpoints (e.g. an adaptive KL coefficient)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def stream(self, default: Any) -> Any:
        """The stream of micro-batches; `default` is the BatchStream over the training data."""
        return default

    def evaluate(self, model: nn.Module, examples: list[Any]) -> dict[str, float] | None:
        """Evaluation metrics of data.eval, or None for the loss of `loss` over it (the default)."""
        return None

    def finish(self, model: nn.Module, run_dir: Any) -> None:
        """Called once a run completes, before the final model is saved."""


class StatSums:
    """Sums of named statistics and their counts; `take()` returns the means and resets."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def add(self, name: str, total: float, count: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(total)
        self.counts[name] = self.counts.get(name, 0.0) + float(count)

    def add_rows(self, values: dict[str, torch.Tensor]) -> None:
        """Each (B,) tensor's sum, counted B times: once taken, its mean over every row added."""
        for name, v in values.items():
            self.add(name, float(v.detach().sum()), v.numel())

    def take(self) -> dict[str, float]:
        out = {k: v / self.counts[k] for k, v in self.sums.items() if self.counts[k]}
        self.sums, self.counts = {}, {}
        return out


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    config_cls: type[ObjectiveConfig]
    loss: LossFn
    formats: tuple[str, ...]  # data formats this objective consumes
    mask_prompt: bool  # train only on completions (assistant turns) rather than every token
    summary: str
    runtime: Callable[[RunContext], Runtime] | None = None  # stateful objectives (see the module docstring)
    token_loss: TokenLossFn | None = None  # the loss unreduced: multi-task runs log it per task

    def make_runtime(self, ctx: RunContext) -> Runtime:
        if self.runtime is not None:
            return self.runtime(ctx)
        return Runtime(self.loss, ctx.cfg.objective, self.token_loss, ctx.tasks)


OBJECTIVES: dict[str, ObjectiveSpec] = {}


def register_objective(
    name: str,
    config_cls: type[ObjectiveConfig],
    *,
    formats: tuple[str, ...],
    mask_prompt: bool,
    summary: str,
    runtime: Callable[[RunContext], Runtime] | None = None,
    token_loss: TokenLossFn | None = None,
) -> Callable[[LossFn], LossFn]:
    def deco(fn: LossFn) -> LossFn:
        if name in OBJECTIVES:
            raise RuntimeError(f"objective {name!r} registered twice")
        OBJECTIVES[name] = ObjectiveSpec(name, config_cls, fn, formats, mask_prompt, summary, runtime, token_loss)
        return fn

    return deco
