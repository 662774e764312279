"""FSDP2 (`train.distributed: fsdp`): torch's `fully_shard` on each decoder layer and the root.

accelerate's FSDP path is for GPUs only (it keeps CPU processes on DDP), so tunelab applies
`fully_shard` itself, the same wrapping on CPU (gloo) and GPU (nccl): what the CPU tests check is
what a GPU runs. accelerate still owns the device, mixed precision's autocast and the optimizer.

Checkpoints are sharded: every process writes its shards of the trainable weights and of the
optimizer's moments through torch.distributed.checkpoint in safetensors (`shards/`, no pickle),
beside the main process's scheduler, RNG and counters; they resume with any process count. The
final model is consolidated into a plain module (`consolidate`) that saves as usual.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from tunelab.errors import ResumeError
from tunelab.training import checkpoint
from tunelab.training.checkpoint import load_tree, save_tree

SHARDS = "shards"  # the folder of a checkpoint that holds every process's safetensors shards
GROUPS = "optimizer_groups"  # the optimizer's hyperparameters (lr, betas ...), the same in every process
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True, ignore_frozen_params=True)
# loading the trainable part only (LoRA: the frozen base stays as loaded); DCP's load already failed on
# any of these keys missing from the checkpoint
_LOAD = StateDictOptions(flatten_optimizer_state_dict=True, ignore_frozen_params=True, strict=False)


def shard(model: nn.Module, accelerator: Accelerator) -> nn.Module:
    """Shard `model` over the processes in place: each block of `_no_split_modules` (the decoder layers),
    then the root with what is left (embeddings, final norm, head). Each `fully_shard` moves its unit to
    the device as it shards it: the whole model is never on one GPU."""
    mp = MixedPrecisionPolicy()
    if accelerator.mixed_precision == "bf16":  # compute in bf16, reduce gradients and keep weights in fp32
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    blocks = set(_no_split(model))
    for module in list(model.modules())[1:]:
        if type(module).__name__ in blocks:
            fully_shard(module, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def _no_split(model: nn.Module) -> list[str]:
    """The block classes a transformers model declares unsplittable (peft wraps it: look inside)."""
    for m in model.modules():
        names = getattr(m, "_no_split_modules", None)
        if names:
            return list(names)
    return []


def skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters are on the meta device (no memory): what `consolidate` fills.
    Taken before sharding; tied parameters stay tied, buffers are copied (small)."""
    memo: dict[int, Any] = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def consolidate(model: nn.Module, plain: nn.Module, main: bool) -> nn.Module:
    """Gather every sharded parameter (all processes, in the same order) into `plain` (from `skeleton`),
    on the CPU of the main process; the others get `plain` with its parameters left on meta."""
    full: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        if main:
            full[name] = t.detach().to("cpu", copy=True)
    if not main:
        return plain
    metas = dict(plain.named_parameters())
    replace = {id(metas[n]): nn.Parameter(t, requires_grad=metas[n].requires_grad) for n, t in full.items()}
    for module in plain.modules():
        for key, p in module._parameters.items():
            if p is not None and id(p) in replace:
                module._parameters[key] = replace[id(p)]
    return plain


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate a micro-batch's gradients without reduce-scattering them (the last one syncs)."""
    assert isinstance(model, FSDPModule)
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _split(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The sharded tensors to store (weights `model.*`, optimizer moments `optim.*`) and the rest."""
    msd, osd = get_state_dict(model, opt, options=_OPTIONS)
    tensors = {f"model.{k}": v for k, v in msd.items()}
    tensors.update({f"optim.{k}": v for k, v in osd.items() if isinstance(v, torch.Tensor)})
    return tensors, {k: v for k, v in osd.items() if not isinstance(v, torch.Tensor)}


def save(root: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer, main: bool,
         write_main: Callable[[Path], None], keep_last: int) -> Path | None:
    """Every process writes its shards into the same temp folder; the main process adds its own files
    (`write_main`) and commits the whole checkpoint atomically (checkpoint.commit)."""
    tensors, groups = _split(model, opt)
    tmp = [checkpoint.tmp_dir(root, step, os.getpid()) if main else None]
    dist.broadcast_object_list(tmp, src=0)  # the main process names the folder every process writes into
    folder = Path(tmp[0])
    if main:
        checkpoint.fresh(folder)
    dist.barrier()
    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(folder / SHARDS), save_distributed=True))
    dist.barrier()  # every shard is on disk before the main process writes the manifest
    if not main:
        return None

    def write(d: Path) -> None:
        save_tree(groups, d / GROUPS)
        write_main(d)
    return checkpoint.commit(root, step, write, keep_last, tmp=folder)


def restore(ckpt: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Load a sharded checkpoint into the sharded model and optimizer (any process count)."""
    if not (ckpt / SHARDS).is_dir():
        raise ResumeError(f"{ckpt} was written without FSDP (train.distributed=ddp): it has no {SHARDS}/",
                          fix="resume with train.distributed=ddp --allow-changed, or start a new run")
    tensors, _ = _split(model, opt)
    dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(ckpt / SHARDS)))
    groups = load_tree(ckpt / GROUPS)
    osd = {**groups, **{k[len("optim."):]: v for k, v in tensors.items() if k.startswith("optim.")}}
    msd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd, options=_LOAD)
