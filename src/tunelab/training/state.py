"""What a checkpoint holds, and putting it back: trainable weights, optimizer, scheduler, RNGs,
the data cursor, counters, and digests of the config and the data."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab.errors import ResumeError
from tunelab.methods.registry import load_trainable
from tunelab.training.checkpoint import load_tree, save_tree


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(
    d: Path, model_state: dict[str, torch.Tensor], opt: torch.optim.Optimizer, sched: Any, meta: dict[str, Any]
) -> None:
    """`model_state`: the method's state (trainable tensors and `tunelab_` buffers), by name."""
    save_file(model_state, str(d / "trainable.safetensors"))
    save_tree(opt.state_dict(), d / "optimizer")
    save_run_state(d, sched, meta)


def save_run_state(d: Path, sched: Any, meta: dict[str, Any]) -> None:
    """What one process stores for all: the scheduler, RNGs, counters and digests (`meta`)."""
    save_tree(sched.state_dict(), d / "scheduler")
    save_tree(rng_state(), d / "rng")
    (d / "trainer_state.json").write_text(json.dumps(meta, indent=1, sort_keys=True), encoding="utf-8")


def read_meta(d: Path) -> dict[str, Any]:
    return json.loads((d / "trainer_state.json").read_text(encoding="utf-8"))


def load_training_state(d: Path, model: nn.Module, opt: torch.optim.Optimizer, sched: Any) -> dict[str, Any]:
    if not (d / "trainable.safetensors").is_file():
        raise ResumeError(f"{d} holds sharded state (written with train.distributed=fsdp)",
                          fix="resume with train.distributed=fsdp and --nproc > 1")
    load_trainable(model, load_file(str(d / "trainable.safetensors")))
    opt.load_state_dict(load_tree(d / "optimizer"))
    return load_run_state(d, sched)


def load_run_state(d: Path, sched: Any) -> dict[str, Any]:
    """Put back the scheduler and RNGs; returns the counters and digests."""
    sched.load_state_dict(load_tree(d / "scheduler"))
    set_rng_state(load_tree(d / "rng"))
    return read_meta(d)
