"""Next-token objectives: `lm` (continued pretraining, O01) and `sft` (instruction tuning, O02).

Both minimise the token-level negative log-likelihood; they differ only in which tokens are
trained, which the data pipeline decides from `mask_prompt`: `lm` trains every token of the
(packed) text, `sft` only the assistant turns and their end-of-turn token.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.config import ObjectiveConfig
from tunelab.data.types import IGNORE
from tunelab.objectives.registry import register_objective


class LMConfig(ObjectiveConfig):
    name: Literal["lm"] = "lm"


class SFTConfig(ObjectiveConfig):
    name: Literal["sft"] = "sft"


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL over trained positions and their count.

    logits (B, T, V), labels (B, T) unshifted with IGNORE where untrained. A batch with no trained
    token gives (0, 0) with a gradient path, never NaN.
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()  # (B*(T-1), V)
    shift_labels = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    loss_sum = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE, reduction="sum")
    return loss_sum, (shift_labels != IGNORE).sum()


def forward_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits (B, T, V) for the batch's T tokens. Prompt-learning models (prompt tuning, P-tuning)
    prepend virtual-token positions to their logits; those are dropped. use_cache=False: with no KV
    cache transformers builds the block-diagonal mask of packed rows from the position ids."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    return model(**inputs, use_cache=False).logits[:, -batch["input_ids"].shape[1]:]


def next_token_loss(model: nn.Module, batch: dict[str, torch.Tensor], cfg: object) -> tuple[torch.Tensor, torch.Tensor]:
    return token_nll_sum(forward_logits(model, batch), batch["labels"])


register_objective(
    "lm", LMConfig, formats=("text", "instruction", "chat"), mask_prompt=False,
    summary="continued pretraining: next-token loss on every token",
)(next_token_loss)
register_objective(
    "sft", SFTConfig, formats=("instruction", "chat", "text"), mask_prompt=True,
    summary="supervised fine-tuning: loss on assistant turns and their end-of-turn token",
)(next_token_loss)
