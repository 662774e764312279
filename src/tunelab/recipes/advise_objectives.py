"""What each objective adds to a training step's memory and time, for `tunelab advise`.

Every registered objective must appear in `PLANS` (tests/test_advise.py checks it), so a new
objective gets a decision rather than a silent default:
- lm, sft: nothing; the token-NLL loss.
- classify: nothing; a small classification head instead of the LM head's logits.
- reward: two rows per pair (chosen and rejected); a scalar head.
- contrastive: two rows per pair (query and passage); no LM-head logits (the body's mean-pooled
  states and a B x B similarity matrix), counted as a small head.
- dpo: two rows per pair; sequence log-probs over every position; the reference model
  (objectives/frozen.py): the adapter-disabled policy for peft methods (no copy), the model given
  by `reference`, or a frozen copy of the policy; dropped after `precompute_reference`. Its forward
  (no gradient) adds a forward's flops unless precomputed.
- simpo, orpo: two rows per pair; sequence log-probs; no reference model.
- kto: one row per example; sequence log-probs; the reference (as dpo) scores the rows and as many
  mismatched rows (prompt + another row's completion), which the policy scores without gradient
  too: three forwards' flops beside the step's (their activations are transient, not counted).
- distill: the frozen teacher (`teacher`), in the dtype it loads in; its forward's flops.
- ppo: the reference (as dpo), the frozen reward model when `reward_model` is set (body + scalar head), a
  trainable value head (hidden + 1 values, fp32) on the policy; rollouts generate with a KV cache
  of 2 x layers x kv heads x head_dim x positions x 32 prompts at a time; per optimizer step, a
  share of the rollout's generation and scoring forwards.

Frozen models load in fp32, or bf16 on a bf16-capable GPU (modeling/load.py, inference).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from tunelab.errors import TunelabError
from tunelab.modeling.load import model_config
from tunelab.training.memory import Counts

GENERATION_BATCH = 32  # inference/generation.py generate_ids' default, used by PPO rollouts


@dataclass(frozen=True)
class Extra:
    """A model beside the one being trained, or state an objective adds."""

    name: str
    bytes: int
    note: str = ""


@dataclass
class Plan:
    rows: int = 1  # rows per example: 2 for pairs (chosen + rejected)
    loss: str = "nll"  # the closed form's loss head: nll | sequence | classify
    extras: list[Extra] = field(default_factory=list)
    trainable: list[tuple[int, int]] = field(default_factory=list)  # (numel, bytes) trained beside the policy
    forward_params: float = 0.0  # parameters of extra forwards per trained token (reference, teacher ...)
    side_phase: Callable[[int], tuple[str, int]] | None = None  # seq -> (label, bytes) outside the step
    loss_extra: Callable[[int, int], tuple[int, int]] | None = None  # (rows, seq) -> (saved, transient) bytes
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Context:
    cfg: Any  # RunConfig
    model: nn.Module  # the policy, method applied, on the meta device
    counts: Counts
    hf: Any  # the policy's transformers config
    frozen_bytes: int  # bytes per parameter of a frozen model loaded for inference on the target device


def _params_of(hf: Any, body_only: bool = False) -> int:
    """Parameters of a model built from `hf` on the meta device (tied tensors once)."""
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(hf)
    seen = {id(p): p.numel() for p in m.parameters()}
    if body_only and m.get_output_embeddings() is not None and not getattr(hf, "tie_word_embeddings", False):
        seen.pop(id(m.get_output_embeddings().weight), None)
    return sum(seen.values()) + (hf.hidden_size if body_only else 0)


def _config_at(path: str, what: str) -> Any:
    """The transformers config of a model dir, run dir (its final model) or peft adapter (its base)."""
    p = Path(path).expanduser()
    for cand in (p / "final", p):
        if (cand / "adapter_config.json").is_file():
            return _config_at(json.loads((cand / "adapter_config.json").read_text())["base_model_name_or_path"], what)
        if (cand / "config.json").is_file():
            return AutoConfig.from_pretrained(str(cand))
    try:
        return model_config(path)
    except TunelabError as e:
        raise TunelabError(f"cannot read the {what} {path!r}: {e.message}", fix=e.fix) from None


def _same_model(path: str, ctx: Context) -> bool:
    return path == ctx.cfg.model.name_or_path


def _frozen(ctx: Context, path: str, what: str, body_only: bool = False) -> tuple[Extra, int]:
    hf = ctx.hf if _same_model(path, ctx) else _config_at(path, what)
    n = _params_of(hf, body_only)
    dtype = "fp32" if ctx.frozen_bytes == 4 else "bf16"
    return Extra(f"{what} (frozen, {dtype})", n * ctx.frozen_bytes, f"{n:,} parameters from {path}"), n


def _reference(ctx: Context, plan: Plan) -> None:
    obj = ctx.cfg.objective
    if getattr(obj, "precompute_reference", False):
        plan.notes.append("reference log-probs precomputed: the reference is dropped before training")
        return
    if obj.reference is not None:
        extra, n = _frozen(ctx, obj.reference, "reference model")
        plan.extras.append(extra)
        plan.forward_params += n
    elif isinstance(ctx.model, PeftModel):
        plan.extras.append(Extra("reference (adapter-disabled policy)", 0, "no second copy of the weights"))
        plan.forward_params += ctx.counts.params
    else:
        w = ctx.counts.weight_bytes
        plan.extras.append(Extra("reference (frozen copy of the policy)", w, "the method's weights included"))
        plan.forward_params += ctx.counts.params


def _dpo(ctx: Context) -> Plan:
    plan = Plan(rows=2, loss="sequence")
    _reference(ctx, plan)
    return plan


def _kto(ctx: Context) -> Plan:
    plan = Plan(loss="sequence")
    _reference(ctx, plan)
    plan.forward_params = 2 * plan.forward_params + ctx.counts.params  # reference x 2, policy on mismatched rows
    return plan


def _distill(ctx: Context) -> Plan:
    plan = Plan()
    path = ctx.cfg.objective.teacher
    extra, n = _frozen(ctx, path, "teacher")
    plan.extras.append(extra)
    plan.forward_params += n
    vocab = (ctx.hf if _same_model(path, ctx) else _config_at(path, "teacher")).vocab_size

    def divergence(rows: int, seq: int) -> tuple[int, int]:
        # alignment_losses.distill_loss on every trained position (assumed: all of them): the student's fp32
        # log-probs and the teacher's probabilities saved; the teacher's logits and log-probs alive meanwhile
        n = rows * (seq - 1) * min(vocab, ctx.hf.vocab_size)
        return 2 * 4 * n, rows * seq * vocab * ctx.frozen_bytes + 4 * n
    plan.loss_extra = divergence
    plan.notes.append("distill: the divergence's tensors are counted for every position (text data); fewer "
                      "trained positions (chat replies) save less")
    return plan


def _ppo(ctx: Context) -> Plan:
    obj, hf = ctx.cfg.objective, ctx.hf
    plan = Plan(loss="sequence")
    _reference(ctx, plan)
    n_reward = 0
    if obj.reward_model is not None:  # else a registered reward function: no model
        extra, n_reward = _frozen(ctx, obj.reward_model, "reward model", body_only=True)
        plan.extras.append(extra)
    plan.trainable.append((hf.hidden_size + 1, 4))
    plan.extras.append(Extra("value head (trained)", 4 * (hf.hidden_size + 1), "its gradients and optimizer "
                             "states are counted with the policy's"))
    if getattr(obj, "value_model", None) is not None:  # a separate body under the head: it trains too
        _, n_value = _frozen(ctx, obj.value_model, "value model", body_only=True)
        plan.trainable.append((n_value, 4))
        plan.extras.append(Extra("value model (trained, fp32)", 4 * n_value, f"{n_value:,} parameters from "
                                 f"{obj.value_model}; gradients and AdamW states counted with the policy's"))
        plan.forward_params += n_value
    batch = ctx.cfg.train.batch_size * ctx.cfg.train.grad_accum
    per_rollout = max(1, obj.ppo_epochs * obj.rollout_prompts // max(batch, 1))  # optimizer steps per rollout
    # each rollout: generate (policy), then reference, reward model and policy/values score it
    plan.forward_params += (3 * ctx.counts.params + n_reward) * obj.rollout_prompts / (per_rollout * batch)
    plan.side_phase = _rollout_phase(ctx, min(GENERATION_BATCH, obj.rollout_prompts))
    plan.notes.append("ppo: --seq is prompt + reply; the loss head is approximated by dpo's (log-probs, values)")
    return plan


def _rollout_phase(ctx: Context, rows: int) -> Callable[[int], tuple[str, int]]:
    """The memory of generating `rows` replies at once: their KV cache and the last logits."""
    hf = ctx.hf
    kv = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    hd = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    size = next(iter(ctx.model.parameters())).element_size()

    def rollout(seq: int) -> tuple[str, int]:
        cache = 2 * hf.num_hidden_layers * kv * hd * seq * rows * size
        return "rollout (generation KV cache + logits)", cache + rows * hf.vocab_size * 4 * 2
    return rollout


def _group(ctx: Context) -> Plan:
    """grpo, rloo: the reference (as dpo) when there is one (beta > 0, a reference path, or a peft policy),
    the frozen reward model when `reward_model` is set; a rollout generates all prompts_per_rollout x
    num_generations replies in one call, then the policy and the reference score them."""
    obj = ctx.cfg.objective
    plan = Plan(loss="sequence")
    if getattr(obj, "beta", 0) > 0 or obj.reference is not None or isinstance(ctx.model, PeftModel):
        _reference(ctx, plan)
    n_reward = 0
    if obj.reward_model is not None:
        extra, n_reward = _frozen(ctx, obj.reward_model, "reward model", body_only=True)
        plan.extras.append(extra)
    replies = obj.prompts_per_rollout * obj.num_generations
    batch = ctx.cfg.train.batch_size * ctx.cfg.train.grad_accum
    per_rollout = max(1, obj.epochs * replies // max(batch, 1))  # optimizer steps per rollout
    plan.forward_params += (2 * ctx.counts.params + n_reward) * replies / (per_rollout * batch)
    plan.side_phase = _rollout_phase(ctx, replies)
    plan.notes.append(f"{obj.name}: --seq is prompt + reply; the loss head is approximated by dpo's (log-probs)")
    return plan


PLANS: dict[str, Callable[[Context], Plan]] = {
    "lm": lambda ctx: Plan(),
    "sft": lambda ctx: Plan(),
    "classify": lambda ctx: Plan(loss="classify"),
    "reward": lambda ctx: Plan(rows=2, loss="classify"),
    "contrastive": lambda ctx: Plan(rows=2, loss="classify", notes=[
        "contrastive: query and passage rows through the body only (mean-pooled states, no LM-head logits); "
        "counted as a small head"]),
    "dpo": _dpo,
    "simpo": lambda ctx: Plan(rows=2, loss="sequence"),
    "orpo": lambda ctx: Plan(rows=2, loss="sequence"),
    "kto": _kto,
    "distill": _distill,
    "ppo": _ppo,
    "grpo": _group,
    "rloo": _group,
}


def objective_plan(ctx: Context) -> Plan:
    name = ctx.cfg.objective.name
    if name not in PLANS:  # registered after this table was written: say so rather than guess silently
        plan = Plan()
        plan.notes.append(f"objective {name}: no memory plan; estimated as sft (no extra models)")
        return plan
    return PLANS[name](ctx)
