"""`contrastive`: train a dense retriever on (question, passage) pairs with in-batch negatives
(InfoNCE; Karpukhin et al. 2020, DPR, arXiv 2004.04906; van den Oord et al. 2018, arXiv 1807.03748).

Each text is embedded as the mean of the model's last hidden states, L2-normalised
(inference/embed.py: the same function that indexes and queries). In a batch of B pairs the
passage of every other pair is a negative for a query:

    loss = sum_i -log softmax_j(q_i . p_j / temperature)[i]

summed over the B queries; the unit the loop divides by is the pair. One encoder embeds both
sides (shared weights, as DPR's single-encoder variant), so the index built with the trained
model and the queries agree.

Gradient accumulation is refused: the negatives are the batch's, so k micro-batches are not the
batch of their union (each query would see fewer negatives). Raise train.batch_size instead.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from tunelab.config import ObjectiveConfig
from tunelab.inference.embed import embed
from tunelab.objectives.registry import register_objective


class ContrastiveConfig(ObjectiveConfig):
    name: Literal["contrastive"] = "contrastive"
    temperature: float = Field(0.05, gt=0.0, le=10.0, description="softmax temperature of the similarity scores")

    def check_run(self, run: Any) -> None:
        if run.train.grad_accum > 1:
            raise ValueError("objective contrastive uses the batch's other passages as negatives: gradient "
                             "accumulation would change what each query is compared with; set train.grad_accum=1 "
                             "and raise train.batch_size")
        if run.train.batch_size < 2:
            raise ValueError("objective contrastive needs train.batch_size >= 2 (a query's negatives are the "
                             "other pairs of its batch)")


def info_nce(queries: torch.Tensor, passages: torch.Tensor, temperature: float) -> torch.Tensor:
    """Summed cross-entropy of each query (row of (B, H)) against every passage, its own the target."""
    logits = queries @ passages.T / temperature  # (B, B)
    target = torch.arange(len(queries), device=queries.device)
    return nn.functional.cross_entropy(logits.float(), target, reduction="sum")


def contrastive_loss(model: nn.Module, batch: dict[str, torch.Tensor],
                     cfg: ContrastiveConfig) -> tuple[torch.Tensor, torch.Tensor]:
    n = int(batch["n_pairs"])
    vectors = embed(model, batch["input_ids"], batch["attention_mask"])  # (2B, H): queries, then passages
    return info_nce(vectors[:n], vectors[n:], cfg.temperature), batch["n_pairs"]


register_objective(
    "contrastive", ContrastiveConfig, formats=("retrieval",), mask_prompt=False,
    summary="dense retriever training: InfoNCE over (query, passage) pairs with in-batch negatives",
)(contrastive_loss)
