"""Token-level metrics over a tokenized dataset: mean NLL of trained tokens and perplexity."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from tunelab.data.collate import collate, pack
from tunelab.data.types import Example
from tunelab.inference.logits import forward_logits, token_nll_sum


@torch.no_grad()
def evaluate_loss(
    model: nn.Module, examples: list[Example], *, batch_size: int, pad_id: int, packing: bool, max_length: int,
    autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    loss: Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, float]:
    """Loss (mean NLL per trained token, in nats), perplexity and the token count, in data order.
    `loss(model, batch) -> (sum, count)` replaces the next-token loss (e.g. an objective's own)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    if packing:
        rows = pack([len(e.input_ids) for e in examples], max_length)
    else:
        rows = [[i] for i in range(len(examples))]
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = [[examples[i] for i in row] for row in rows[start : start + batch_size]]
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id=pad_id, packed=packing).items()}
        with autocast():
            if loss is None:
                loss_sum, n = token_nll_sum(forward_logits(model, batch), batch["labels"])
            else:
                loss_sum, n = loss(model, batch)
        total += float(loss_sum)
        count += int(n)
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": float(count)}
