"""The attention kernel a model runs (`model.attn_implementation`), as this machine can run it.

Packed rows (data/collate.py) carry `position_ids` that restart at 0 at every document and no
attention mask; transformers reads the documents from them, in one of two ways:
- sdpa, eager: a (B, 1, T, T) block-diagonal causal mask, built for every batch; the kernel still
  computes every (query, key) pair of the row and masks most of them away;
- flash_attention_2 (the flash-attn package) and flex_attention (torch's FlexAttention): variable
  length attention, each document against itself only, no (T, T) mask. FlexAttention reads the
  documents of every row; flash-attn's path reads them only from a batch of ONE row (transformers'
  `_is_packed_sequence`), so `inference.logits.forward_logits` hands such a model the batch flattened
  to (1, B x T) and folds the logits back (`flattens_rows`).
Without CUDA (or flash-attn) the varlen kernels cannot train: `usable_attention` says so in one
line and sdpa runs, which computes the same function (tests/test_speed.py).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.utils import is_flash_attn_2_available

VARLEN = ("flash_attention_2", "flex_attention")


def usable_attention(requested: str | None) -> tuple[str | None, str | None]:
    """(the implementation to load, a one-line note when it is not the one requested)."""
    why = _missing(requested)
    if why is None:
        return requested, None
    return "sdpa", (f"note: model.attn_implementation={requested} {why}: using sdpa, where packed documents are "
                    "kept apart by a block mask built from their position ids (the same result, more work)")


def _missing(requested: str | None) -> str | None:
    if requested not in VARLEN:
        return None
    if not torch.cuda.is_available():
        if requested == "flex_attention":
            return f"trains on CUDA only (torch {torch.__version__.split('+')[0]} has no FlexAttention backward on CPU)"
        return "needs a CUDA GPU (none here)"
    if requested == "flash_attention_2" and not is_flash_attn_2_available():
        return "needs the flash-attn package (pip install flash-attn --no-build-isolation), which is not installed"
    return None


def flattens_rows(model: nn.Module) -> bool:
    """True for a flash-attention model: it sees packed documents only in a batch of one row."""
    inner = getattr(model, "module", model)  # DDP
    impl = getattr(getattr(inner, "config", None), "_attn_implementation", None) or ""
    return "flash" in impl
