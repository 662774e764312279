"""M20 MPT (Wang et al., "Multitask Prompt Tuning Enables Parameter-Efficient Transfer Learning",
arXiv:2303.02861): one prompt shared by many tasks, specialised per task by a rank-one multiplicative
update; a thin wrapper over peft's `MultitaskPromptTuningConfig`.

With P* (n, d) the shared prompt and u_k (n, r), v_k (r, d) task k's factors (r = num_ranks, 1 in the
paper), task k's prompt, prepended to the input embeddings as in prompt tuning, is

    P_k = P* o (u_k v_k)            (o: elementwise product)

Two stages, as the paper:
(a) source training: `num_tasks` = the number of tasks of a multi-task `data.train`; each example's task
    id comes from the batch's `task_ids` (data/stream.MixtureStream), passed to peft's forward;
(b) target adaptation: `init_from` a saved `mpt` run starts a one-task prompt from P* and the source
    factors averaged over tasks (peft's AVERAGE_SOURCE_TASKS), or task `init_task`'s (EXACT_SOURCE_TASK);
    from a saved `prompt` run, P* is its prompt and u v = 1 (the prompt unchanged).

Departures and peft workarounds (peft 0.21): peft refuses a forward without task ids, so generation and
evaluation (whose batches carry none) raised; here they use the factors averaged over tasks, exactly the
prompt stage (b) starts from (for a one-task target prompt: its task). peft's forward is replaced, for
that, by the same formula written without its in-place product. The saved adapter records a random
init, so reloading it never needs the source run again. One task per row: packed rows mixing tasks are
refused (`data.packing: false`); one-task packed rows run through inference/logits.packed_prompt_logits,
which gives each example what it gets alone (peft's own forward ignores position ids). peft draws
u, v from N(0, 0.02), so a fresh source prompt starts near zero; a start
from a `prompt` run sets u v = 1 instead. Not mergeable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from peft import MultitaskPromptTuningConfig, MultitaskPromptTuningInit, get_peft_model
from peft.tuners.multitask_prompt_tuning import MultitaskPromptEmbedding
from pydantic import Field, model_validator
from torch import nn

from tunelab.config import MethodConfig
from tunelab.errors import TunelabError
from tunelab.methods.registry import register_method

ADAPTER = "adapter_model.safetensors"


class MPTConfig(MethodConfig):
    name: Literal["mpt"] = "mpt"
    num_virtual_tokens: int = Field(16, gt=0, description="number of trainable virtual tokens")
    num_tasks: int = Field(1, gt=0, description="source training: the number of tasks in data.train; target: 1")
    num_ranks: int = Field(1, gt=0, description="r of each task's factors u (n, r), v (r, d); the paper's is 1")
    init_from: str | None = Field(None, description="target adaptation: a saved mpt or prompt run (or its "
                                  "adapter folder) whose shared prompt starts this one")
    init_task: int | None = Field(None, ge=0, description="with init_from an mpt run: start from this source "
                                  "task's factors (default: their average over tasks)")

    @model_validator(mode="after")
    def _target_is_one_task(self) -> MPTConfig:
        if self.init_from is not None and self.num_tasks != 1:
            raise ValueError("init_from starts a target prompt for one task: set num_tasks: 1")
        if self.init_task is not None and self.init_from is None:
            raise ValueError("init_task picks a source task of init_from: set init_from too, or drop init_task")
        return self


def _row_tasks(task_ids: torch.Tensor, n_tasks: int) -> torch.Tensor:
    """(B,) task per example from (B,) or the stream's per-token (B, T) ids (-1 on padding)."""
    if task_ids.dim() == 2:
        real = task_ids.masked_fill(task_ids < 0, task_ids.max() + 1)
        rows, lo = task_ids.max(dim=1).values, real.min(dim=1).values  # (B,) each
        if bool((rows != lo).any()):
            raise TunelabError("method mpt: a packed row holds examples of several tasks, and a prompt serves one",
                               fix="set data.packing: false")
        task_ids = rows
    if bool((task_ids < 0).any()) or bool((task_ids >= n_tasks).any()):
        raise TunelabError(f"method mpt: task ids {sorted(set(task_ids.tolist()))} but the prompt has {n_tasks} "
                           "task(s)", fix="set method.num_tasks to the number of tasks in data.train")
    return task_ids


def _forward(self: MultitaskPromptEmbedding, indices: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
    """P* o (u_k v_k) for each row's task k; without task ids, P* o (mean_k u_k)(mean_k v_k)."""
    shared = self.embedding(indices)  # (B, n, d)
    if task_ids is None:
        cols = self.prefix_task_cols.mean(0, keepdim=True)  # (1, n, r)
        rows = self.prefix_task_rows.mean(0, keepdim=True)  # (1, r, d)
    else:
        k = _row_tasks(task_ids.to(indices.device), self.prefix_task_cols.shape[0])
        cols, rows = self.prefix_task_cols[k], self.prefix_task_rows[k]  # (B, n, r), (B, r, d)
    return shared * torch.matmul(cols, rows)


MultitaskPromptEmbedding.forward = _forward  # the peft workaround (module docstring)


def _source(path: str) -> tuple[Path, dict]:
    """The adapter weights file of a saved run or adapter folder, and its adapter config."""
    p = Path(path)
    for d in (p / "final", p):
        if (d / ADAPTER).is_file() and (d / "adapter_config.json").is_file():
            return d / ADAPTER, json.loads((d / "adapter_config.json").read_text(encoding="utf-8"))
    raise TunelabError(f"method mpt: init_from {path!r} holds no saved prompt adapter ({ADAPTER})",
                       fix="point method.init_from at a finished mpt or prompt run (runs/NAME)")


def _init(cfg: MPTConfig) -> tuple[dict, bool]:
    """peft's init keys for `cfg.init_from`, and whether its factors start at u v = 1 (a prompt run)."""
    if cfg.init_from is None:
        return {"prompt_tuning_init": MultitaskPromptTuningInit.RANDOM}, False
    path, src = _source(cfg.init_from)
    kind = src.get("peft_type")
    if kind not in ("MULTITASK_PROMPT_TUNING", "PROMPT_TUNING"):
        raise TunelabError(f"method mpt: init_from {cfg.init_from!r} is a {kind} adapter",
                           fix="start from a saved mpt or prompt run")
    n = src.get("num_virtual_tokens")
    if n != cfg.num_virtual_tokens:
        raise TunelabError(f"method mpt: init_from has {n} virtual tokens, this prompt {cfg.num_virtual_tokens}",
                           fix=f"set method.num_virtual_tokens: {n}")
    keys = {"prompt_tuning_init_state_dict_path": str(path)}
    if kind == "PROMPT_TUNING":
        return {**keys, "prompt_tuning_init": MultitaskPromptTuningInit.ONLY_SOURCE_SHARED}, True
    if src.get("num_ranks") != cfg.num_ranks:
        raise TunelabError(f"method mpt: init_from has rank {src.get('num_ranks')}, this prompt {cfg.num_ranks}",
                           fix=f"set method.num_ranks: {src.get('num_ranks')}")
    if cfg.init_task is None:
        return {**keys, "prompt_tuning_init": MultitaskPromptTuningInit.AVERAGE_SOURCE_TASKS}, False
    if cfg.init_task >= src.get("num_tasks", 1):
        raise TunelabError(f"method mpt: init_task {cfg.init_task} but init_from has {src.get('num_tasks')} tasks",
                           fix=f"set method.init_task below {src.get('num_tasks')}, or drop it for their average")
    return {**keys, "prompt_tuning_init": MultitaskPromptTuningInit.EXACT_SOURCE_TASK,
            "prompt_tuning_init_task": cfg.init_task}, False


@register_method(
    "mpt", MPTConfig, family="soft-prompt", backend="peft", paper="arXiv:2303.02861", mergeable=False,
    summary="a prompt shared over tasks, times a rank-one matrix per task; then adapted to a target task",
)
def apply(model: nn.Module, cfg: MPTConfig) -> nn.Module:
    meta = any(p.is_meta for p in model.parameters())  # `tunelab methods`, config tests: no source to read
    init, ones = _init(cfg) if not meta else ({"prompt_tuning_init": MultitaskPromptTuningInit.RANDOM}, False)
    model = get_peft_model(model, MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens, num_tasks=cfg.num_tasks,
        num_ranks=cfg.num_ranks, **init,
    ))
    enc = model.prompt_encoder["default"]
    if ones:
        with torch.no_grad():
            enc.prefix_task_cols.fill_(1.0)
            enc.prefix_task_rows.fill_(1.0 / cfg.num_ranks)
    saved = model.peft_config["default"]  # what the adapter records: reloading needs no source run
    saved.prompt_tuning_init, saved.prompt_tuning_init_state_dict_path = MultitaskPromptTuningInit.RANDOM, None
    model.tunelab_task_ids = True  # forward_logits passes the batch's task ids (inference/logits.py)
    return model
