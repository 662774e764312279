"""Next-token objectives: `lm` (continued pretraining, O01) and `sft` (instruction tuning, O02).

Both minimise the token-level negative log-likelihood; they differ only in which tokens are
trained, which the data pipeline decides from `mask_prompt`: `lm` trains every token of the
(packed) text, `sft` only the assistant turns and their end-of-turn token.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from tunelab.config import ObjectiveConfig
from tunelab.inference.logits import forward_logits, token_nll, token_nll_sum
from tunelab.objectives.registry import register_objective


class LMConfig(ObjectiveConfig):
    name: Literal["lm"] = "lm"


class SFTConfig(ObjectiveConfig):
    name: Literal["sft"] = "sft"


def next_token_loss(model: nn.Module, batch: dict[str, torch.Tensor], cfg: object) -> tuple[torch.Tensor, torch.Tensor]:
    return token_nll_sum(forward_logits(model, batch), batch["labels"])


def next_token_losses(
    model: nn.Module, batch: dict[str, torch.Tensor], cfg: object
) -> tuple[torch.Tensor, torch.Tensor]:
    return token_nll(forward_logits(model, batch), batch["labels"])


register_objective(
    "lm", LMConfig, formats=("text", "instruction", "chat"), mask_prompt=False,
    summary="continued pretraining: next-token loss on every token", token_loss=next_token_losses,
)(next_token_loss)
register_objective(
    "sft", SFTConfig, formats=("instruction", "chat", "text"), mask_prompt=True,
    summary="supervised fine-tuning: loss on assistant turns and their end-of-turn token", token_loss=next_token_losses,
)(next_token_loss)
