"""The model call every loss is built on: logits for a batch's tokens, and the summed next-token NLL."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.data.collate import block_causal_mask
from tunelab.data.types import IGNORE
from tunelab.modeling.attention import flattens_rows

# peft's prompt-learning types whose virtual tokens are prepended input embeddings
PREPENDED = ("PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING")


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL over trained positions and their count.

    logits (B, T, V), labels (B, T) unshifted with IGNORE where untrained. A batch with no trained
    token gives (0, 0) with a gradient path, never NaN.
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()  # (B*(T-1), V)
    shift_labels = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    loss_sum = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE, reduction="sum")
    return loss_sum, (shift_labels != IGNORE).sum()


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position next-token NLL (B, T-1), 0 where untrained, and the trained mask (B, T-1):
    `token_nll_sum` unreduced, for losses split by task (multi-task runs log each task's loss)."""
    shift_labels = labels[:, 1:]  # (B, T-1)
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), shift_labels, ignore_index=IGNORE,
                          reduction="none")  # (B, T-1)
    return nll, shift_labels != IGNORE


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature: those of the distribution generation samples from at that temperature
    (RL's rollout, loss and reference log-probs are of it, as TRL's; `top_k` is not divided out)."""
    return logits if temperature == 1.0 else logits / temperature


def tempered_logits(model: nn.Module, batch: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """`forward_logits` at a sampling temperature."""
    return tempered(forward_logits(model, batch), temperature)


def forward_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits (B, T, V) for the batch's T tokens. Prompt-learning models (prompt tuning, P-tuning)
    prepend virtual-token positions to their logits; those are dropped. use_cache=False: with no KV
    cache transformers builds the block-diagonal mask of packed rows from the position ids. A model that
    declares `tunelab_task_ids` (multitask prompt tuning) also gets a multi-task batch's `task_ids`."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    if "task_ids" in batch and getattr(getattr(model, "module", model), "tunelab_task_ids", False):
        inputs["task_ids"] = batch["task_ids"]  # (B, T)
    if "position_ids" in inputs and _prepends_prompt(model):
        return packed_prompt_logits(model, inputs["input_ids"], inputs["position_ids"], inputs.get("task_ids"))
    b, t = batch["input_ids"].shape
    if "position_ids" in inputs and "attention_mask" not in inputs and b > 1 and flattens_rows(model):
        # flash-attention reads packed documents from the position ids of one row only: (B, T) -> (1, B*T); each
        # row's padding is a run of its own (collate), so no document runs into the next row
        flat = {k: v.reshape(1, b * t) for k, v in inputs.items()}
        return model(**flat, use_cache=False).logits.reshape(b, t, -1)
    return model(**inputs, use_cache=False).logits[:, -t:]


def _prepends_prompt(model: nn.Module) -> bool:
    inner = getattr(model, "module", model)
    cfg = getattr(inner, "active_peft_config", None)
    return bool(getattr(cfg, "is_prompt_learning", False)) and str(getattr(cfg, "peft_type", "")).split(".")[-1] in (
        PREPENDED)


def packed_prompt_logits(model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                         task_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, T, V) of a prompt-tuning / P-tuning / MPT model on packed rows, each example computed as
    if it were alone: the n virtual tokens come once at the head of the row, every example sees them
    and its own earlier tokens only (a block-causal mask), and its positions restart at n - exactly
    what peft computes for the example unpacked ([P; x] at positions 0..n+len-1). peft itself drops
    `position_ids` for these methods, so without this packed examples would see each other."""
    inner = getattr(model, "module", model)
    n = inner.active_peft_config.num_virtual_tokens
    b, t = input_ids.shape
    embeds = inner.word_embeddings(input_ids)  # (B, T, H)
    kw = {} if task_ids is None else {"task_ids": task_ids}  # MPT: one task per row (methods/mpt.py)
    prompts = inner.get_prompt(batch_size=b, **kw).to(embeds.dtype)  # (B, n, H)
    x = torch.cat([prompts, embeds], dim=1)  # (B, n+T, H)
    virtual = torch.arange(n, device=input_ids.device).expand(b, n)
    positions = torch.cat([virtual, position_ids + n], dim=1)  # (B, n+T)
    low = torch.finfo(embeds.dtype).min
    mask = torch.full((b, 1, n + t, n + t), low, dtype=embeds.dtype, device=input_ids.device)
    mask[:, :, :n, :n] = mask[0, 0, :n, :n].triu(1)  # virtual tokens: causal among themselves
    mask[:, :, n:, :n] = 0  # every token sees every virtual token
    mask[:, :, n:, n:] = block_causal_mask(position_ids, embeds.dtype).to(input_ids.device)
    out = inner.base_model(inputs_embeds=x, attention_mask=mask, position_ids=positions, use_cache=False)
    return out.logits[:, n:]
