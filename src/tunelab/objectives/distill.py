"""Knowledge distillation `distill` (O07): the student mimics a teacher's token distributions.

    loss = (1 - hard_weight) * T^2 * D(p_teacher^T, q_student^T) + hard_weight * NLL(labels)

per trained token (the same tokens SFT trains: assistant replies, or every token of text data),
where p^T = softmax(logits / T). D is forward KL(p || q) (Hinton et al. 2015, arXiv:1503.02531),
reverse KL(q || p) (MiniLLM, Gu et al. 2023, arXiv:2306.08543) or the generalised JSD with weight
`beta` (GKD, Agarwal et al. 2024, arXiv:2306.13649); see alignment_losses.py `distill_loss`. The
teacher is any model tunelab can load (model dir, hub id, adapter or run dir), frozen, with the
student's tokenizer; it may be larger or smaller than the student. Sequences are the dataset's
(off-policy); an on-policy variant (student-generated sequences, GKD's lambda) is not implemented.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from tunelab.config import ObjectiveConfig
from tunelab.data.types import IGNORE
from tunelab.errors import TunelabError
from tunelab.inference.logits import forward_logits, token_nll_sum
from tunelab.objectives.alignment_losses import distill_loss
from tunelab.objectives.frozen import check_same_vocab, load_frozen
from tunelab.objectives.registry import RunContext, Runtime, StatSums, register_objective


class DistillConfig(ObjectiveConfig):
    name: Literal["distill"] = "distill"
    teacher: str = Field(description="the teacher: model dir, hub id, adapter or tunelab run dir")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = Field("forward_kl", description="the divergence D")
    beta: float = Field(0.5, gt=0.0, lt=1.0, description="the JSD's mixture weight (divergence: jsd)")
    temperature: float = Field(1.0, gt=0.0, description="softmax temperature of both distributions")
    hard_weight: float = Field(0.0, ge=0.0, le=1.0, description="weight of the hard-label NLL in the mix")


class DistillRuntime(Runtime):
    def __init__(self, ctx: RunContext):
        super().__init__(distill, ctx.cfg.objective)
        self.teacher, tokenizer = load_frozen(self.cfg.teacher, ctx.device, "teacher")
        check_same_vocab(ctx.tokenizer, tokenizer, "teacher", self.cfg.teacher)
        n_t = sum(p.numel() for p in self.teacher.parameters())
        n_s = sum(p.numel() for p in ctx.model.parameters())
        ctx.say(f"distill: teacher {self.cfg.teacher} ({n_t:,} parameters) -> student ({n_s:,}); "
                f"{self.cfg.divergence}, T={self.cfg.temperature}, hard_weight={self.cfg.hard_weight}")
        self.sums = StatSums()

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        cfg: DistillConfig = self.cfg
        logits = forward_logits(model, batch)  # (B, T, V)
        with torch.no_grad():
            teacher = forward_logits(self.teacher, batch)  # (B, T, V')
        mask = batch["labels"][:, 1:] != IGNORE  # position t-1 predicts label t
        div, n = distill_loss(logits[:, :-1], teacher[:, :-1], mask, kind=cfg.divergence, beta=cfg.beta,
                              temperature=cfg.temperature)
        nll, _ = token_nll_sum(logits, batch["labels"])
        self.sums.add("divergence", float(div.detach()), float(n))
        self.sums.add("nll", float(nll.detach()), float(n))
        return (1 - cfg.hard_weight) * div + cfg.hard_weight * nll, n

    def stats(self) -> dict[str, float]:
        return self.sums.take()


def distill(model: nn.Module, batch: dict[str, torch.Tensor], cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    raise TunelabError("distill needs its runtime (a teacher model): train it through tunelab.train")


register_objective(
    "distill", DistillConfig, formats=("instruction", "chat", "text"), mask_prompt=True, runtime=DistillRuntime,
    summary="knowledge distillation: match a frozen teacher's token distributions (forward/reverse KL, JSD)",
)(distill)
