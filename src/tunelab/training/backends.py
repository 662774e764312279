"""How the processes of a run share the model (`train.distributed`): DDP (each holds all of it, the
default), FSDP2 (each holds a shard: training/fsdp.py) or DeepSpeed ZeRO (training/deepspeed.py).

The loop asks its backend to prepare the model and optimizer, to skip gradient sync on the first
micro-batches of a step, to save and restore a checkpoint and, once the run completes, for the
plain model the final artifact is saved from. One process is always the plain (DDP) backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from tunelab.errors import ConfigError
from tunelab.runconfig import RunConfig
from tunelab.training import checkpoint, deepspeed, fsdp
from tunelab.training.state import load_run_state, load_training_state

FSDP_METHODS = ("full", "lora")  # what FSDP2 runs are tested with (tests/test_distributed.py) ...
FSDP_OBJECTIVES = ("sft", "lm")  # ... and plain next-token losses (no reference model, no generation)

MakeOptimizer = Callable[[nn.Module], torch.optim.Optimizer]


def _raw(opt: Any) -> torch.optim.Optimizer:
    return getattr(opt, "optimizer", opt)  # accelerate's wrapper holds the torch optimizer


class Backend:
    """DDP through accelerate (and a single process): every process holds the whole model."""

    sharded = False

    def prepare(self, acc: Accelerator, model: nn.Module, make_opt: MakeOptimizer) -> tuple[nn.Module, Any]:
        return acc.prepare(model, make_opt(model))

    def no_sync(self, acc: Accelerator, model: nn.Module) -> contextlib.AbstractContextManager:
        return acc.no_sync(model)

    def save(self, root: Path, step: int, model: nn.Module, opt: Any, main: bool,
             write_main: Callable[[Path], None], keep_last: int) -> Path | None:
        """Checkpoint `step` (every process calls it): the main process writes it all with `write_main`."""
        return checkpoint.commit(root, step, write_main, keep_last) if main else None

    def restore(self, ckpt: Path, model: nn.Module, opt: Any, sched: Any) -> dict[str, Any]:
        """Load a checkpoint into the model (unwrapped), optimizer and scheduler; returns its counters."""
        return load_training_state(ckpt, model, opt, sched)

    def final_model(self, model: nn.Module, main: bool) -> nn.Module:
        return model


class FSDP(Backend):
    sharded = True

    def prepare(self, acc: Accelerator, model: nn.Module, make_opt: MakeOptimizer) -> tuple[nn.Module, Any]:
        self.plain = fsdp.skeleton(model)
        model = fsdp.shard(model, acc)
        return model, acc.prepare_optimizer(make_opt(model))  # the model is not accelerate's: no DDP around it

    def no_sync(self, acc: Accelerator, model: nn.Module) -> contextlib.AbstractContextManager:
        return fsdp.no_sync(model)

    def save(self, root: Path, step: int, model: nn.Module, opt: Any, main: bool,
             write_main: Callable[[Path], None], keep_last: int) -> Path | None:
        return fsdp.save(root, step, model, _raw(opt), main, write_main, keep_last)

    def restore(self, ckpt: Path, model: nn.Module, opt: Any, sched: Any) -> dict[str, Any]:
        fsdp.restore(ckpt, model, _raw(opt))
        return load_run_state(ckpt, sched)

    def final_model(self, model: nn.Module, main: bool) -> nn.Module:
        return fsdp.consolidate(model, self.plain, main)


def backend_for(cfg: RunConfig, run_dir: Path, world: int, mixed: str) -> Backend:
    """The backend of `train.distributed` (`mixed`: the run's resolved precision); a combination it cannot
    run is one error naming the fix, in one process as in many (the same config runs in both)."""
    kind = cfg.train.distributed
    if kind.startswith("deepspeed"):
        deepspeed.check_runnable(deepspeed.write_config(cfg, run_dir, world, mixed))
    if kind == "fsdp" and cfg.method.name not in FSDP_METHODS:
        raise ConfigError(f"train.distributed=fsdp runs method {'/'.join(FSDP_METHODS)}, not "
                          f"{cfg.method.name!r}", fix="use train.distributed=ddp for this method")
    if kind == "fsdp" and cfg.objective.name not in FSDP_OBJECTIVES:
        raise ConfigError(f"train.distributed=fsdp runs objective {'/'.join(FSDP_OBJECTIVES)}, not "
                          f"{cfg.objective.name!r}", fix="use train.distributed=ddp for this objective")
    return FSDP() if kind == "fsdp" and world > 1 else Backend()
