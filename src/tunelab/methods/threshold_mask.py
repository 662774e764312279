"""M08 Threshold-Mask: learn which pretrained weights to keep, with a binary mask per weight.

Piggyback (Mallya et al., arXiv:1801.06519) and "Masking as an efficient alternative to
finetuning" (Zhao et al., arXiv:2004.12406). Every targeted weight matrix W gets a real-valued
score per entry, s; the layer uses

    m = 1[s > tau]          W_eff = W ⊙ m

and the step function is crossed with a straight-through estimator: dL/ds := dL/dm = dL/dW_eff ⊙ W.
W stays frozen; only the scores train. Scores start at `init_score` > `threshold`, so the mask is
all ones and the model is exactly the base at init. Mergeable: W ⊙ m is a plain weight, which
differs from the base exactly where a nonzero weight was masked out (the `tunelab_changed`
buffer records that count).

Departures from the papers:
- only the targeted linear layers (default: every linear layer but the output head) are masked;
  embeddings, norms, biases and the head stay as they are;
- the mask multiplies the weight (W ⊙ m, the papers' form), no learned rescaling;
- scores are stored flattened, as 1-D float32 tensors, so the optimizer's no-decay group holds
  them: weight decay would otherwise pull every score towards 0 < tau and mask weights out by
  itself. They train with the run's single learning rate (Piggyback: Adam, lr 1e-4).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from tunelab.config import MethodConfig
from tunelab.methods import _sparse
from tunelab.methods.registry import register_method


class ThresholdMaskConfig(MethodConfig):
    name: Literal["threshold_mask"] = "threshold_mask"
    target_modules: _sparse.Targets = Field("all-linear", description="leaf names, all-linear or attention")
    threshold: float = Field(5e-3, description="tau: a weight is kept while its score is above it")
    init_score: float = Field(1e-2, description="initial score of every weight; must be above threshold")

    @model_validator(mode="after")
    def _starts_all_ones(self) -> ThresholdMaskConfig:
        if not self.init_score > self.threshold:
            raise ValueError("init_score must be above threshold, so that the mask starts all ones")
        return self


class _StraightThrough(torch.autograd.Function):
    """m = 1[s > tau] forward; the gradient passes to s unchanged."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, threshold: float) -> torch.Tensor:
        return (scores > threshold).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class ThresholdMask(nn.Module):
    """Parametrization W -> W ⊙ 1[s > tau]."""

    def __init__(self, weight: torch.Tensor, cfg: ThresholdMaskConfig):
        super().__init__()
        self.shape = weight.shape
        self.threshold = cfg.threshold
        self.scores = nn.Parameter(torch.full((weight.numel(),), cfg.init_score, dtype=torch.float32,
                                              device=weight.device))

    def mask(self) -> torch.Tensor:
        return _StraightThrough.apply(self.scores, self.threshold).view(self.shape)  # (out, in) or Conv1D (in, out)

    def merged(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask().to(weight.dtype)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.merged(weight)


def _count(model: nn.Module) -> tuple[torch.Tensor, int]:
    return _sparse.count_parametrized(model, ThresholdMask)


@register_method(
    "threshold_mask", ThresholdMaskConfig, family="sparse", backend="ours", paper="arXiv:1801.06519",
    mergeable=True, summary="learned binary masks over frozen weights (thresholded scores, straight-through)",
    state=_sparse.state_with_count(_count, "threshold_mask"),
    merge=lambda model, cfg: _sparse.fold(model, ThresholdMask), identity_at_init=True,
)
def apply(model: nn.Module, cfg: ThresholdMaskConfig) -> nn.Module:
    _sparse.freeze(model)
    _sparse.parametrize_weights(model, _sparse.target_linears(model, cfg.target_modules),
                                lambda w: ThresholdMask(w, cfg))
    _sparse.add_counter(model)
    return model
