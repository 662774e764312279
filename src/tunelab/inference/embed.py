"""Texts as vectors: the mean of a model's last hidden states over the attention mask, L2-normalised.
One function for what a dense retriever indexes and queries with (nonparametric/encode.py) and what
the contrastive objective trains (objectives/contrastive.py), so that the two never drift apart."""

from __future__ import annotations

import torch
from torch import nn


def body(model: nn.Module) -> nn.Module:
    """The part of a model that makes hidden states: a causal LM's decoder (its head unused), or an
    encoder model itself."""
    get = getattr(model, "get_decoder", None)
    return get() if callable(get) else model


def embed(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, H) unit vectors of right-padded (B, T) token rows."""
    hidden = body(model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, H)
    return nn.functional.normalize(mean.float(), dim=-1)
