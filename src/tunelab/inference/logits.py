"""The model call every loss is built on: logits for a batch's tokens, and the summed next-token NLL."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.data.types import IGNORE


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


def forward_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits (B, T, V) for the batch's T tokens. Prompt-learning models (prompt tuning, P-tuning)
    prepend virtual-token positions to their logits; those are dropped. use_cache=False: with no KV
    cache transformers builds the block-diagonal mask of packed rows from the position ids."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    return model(**inputs, use_cache=False).logits[:, -batch["input_ids"].shape[1]:]
