"""The math of continual learning's strategies and metrics (recipes/continual.py runs them): ACC / BWT /
FWT of an accuracy matrix, the diagonal empirical Fisher and EWC's penalty, the replay reservoir.
Each is tested against a naive reference (tests/test_continual.py)."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tunelab.data.collate import collate
from tunelab.data.types import Example
from tunelab.inference.logits import forward_logits, token_nll_sum

# ----------------------------------------------------------------------------- the metrics


def transfer_metrics(R: list[list[float]], base: list[float]) -> dict[str, float]:
    """ACC, BWT and FWT of a complete T x T accuracy matrix (R[i][j]: task j after stage i) and the base's
    scores b_j (Lopez-Paz & Ranzato 2017)."""
    T = len(R)
    acc = sum(R[T - 1]) / T
    bwt = sum(R[T - 1][j] - R[j][j] for j in range(T - 1)) / (T - 1)
    fwt = sum(R[j - 1][j] - base[j] for j in range(1, T)) / (T - 1)
    return {"acc": acc, "bwt": bwt, "fwt": fwt, "forgetting": max(0.0, -bwt)}


# ----------------------------------------------------------------------------- EWC


def diagonal_fisher(model: nn.Module, examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """The diagonal empirical Fisher of the trainable parameters: the mean over `examples` of the squared
    gradient of each example's log-likelihood (its summed NLL over trained tokens)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    was_training = model.training
    model.eval()  # dropout off: the Fisher of the model as it answers
    device = next(iter(params.values())).device
    for ex in examples:
        batch = {k: v.to(device) for k, v in collate([[ex]], pad_id=pad_id, packed=False).items()}
        nll, _ = token_nll_sum(forward_logits(model, batch), batch["labels"])
        grads = torch.autograd.grad(nll, list(params.values()), allow_unused=True)
        for (n, _p), g in zip(params.items(), grads, strict=True):
            if g is not None:
                fisher[n] += g.detach().float() ** 2
    model.train(was_training)
    return {n: f / max(len(examples), 1) for n, f in fisher.items()}


def ewc_penalty(anchors: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]],
                lam: float) -> Callable[[nn.Module], torch.Tensor]:
    """lambda/2 * sum over earlier stages k and parameters i of F_k,i (theta_i - theta*_k,i)^2."""
    def penalty(model: nn.Module) -> torch.Tensor:
        params = dict(model.named_parameters())
        total = torch.zeros((), device=next(iter(params.values())).device)
        for fisher, star in anchors:
            for n, f in fisher.items():
                p = params[n]
                total = total + (f.to(p.device) * (p.float() - star[n].to(p.device)) ** 2).sum()
        return 0.5 * lam * total
    return penalty


# ----------------------------------------------------------------------------- replay


def reservoir_add(buffer: list[dict[str, Any]], seen: int, records: list[dict[str, Any]], size: int,
                  rng: random.Random) -> int:
    """Algorithm R: offer `records` to the reservoir `buffer` (in place) of at most `size`; `seen` is how
    many were offered before. Returns the new count."""
    for r in records:
        seen += 1
        if len(buffer) < size:
            buffer.append(r)
        else:
            j = rng.randrange(seen)
            if j < size:
                buffer[j] = r
    return seen
