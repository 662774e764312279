"""`kto`: Kahneman-Tversky optimisation on unpaired replies rated desirable or undesirable (O12;
Ethayarajh et al. 2024, arXiv:2402.01306).

Data: `unpaired` records `{"prompt", "completion", "label": true | false}` (data/formats/unpaired.py):
the prompt + completion with only the completion trained, its rating on the batch's `label` (B,)
(1 desirable, 0 undesirable). One example is one unit: the loop divides by the examples of the
accumulated batch (data/stream.py counts labelled rows). Pair data becomes unpaired by rating
each reply on its own: TinyWorld's `prefs@unpaired` is `prefs@train` so split.

With r = log pi(y|x) - log ref(y|x), summed over the completion's tokens, the loss of an example is

    desirable    lambda_D * (1 - sigmoid(beta * (r - z0)))
    undesirable  lambda_U * (1 - sigmoid(beta * (z0 - r)))

(objectives/preference_losses.py). z0, the reference point, estimates KL(pi || ref) as the paper
and TRL do: from mismatched pairs, each prompt of the micro-batch followed by the previous row's
completion (row 0 takes the last row's: TRL's +1 rotation),

    z0 = max(0, mean_i [log pi(y_{i-1}|x_i) - log ref(y_{i-1}|x_i)]),

scored by the policy without gradient: a constant, as in both. The reference is dpo's
(objectives/frozen.py): the adapter-disabled policy for peft methods, the model at `reference`, or
a frozen copy of the initial policy. Defaults beta 0.1, lambda_D = lambda_U = 1 (the paper's
advice: keep lambda_D n_D / (lambda_U n_U) in [1, 4/3]; prefs@unpaired has n_D = n_U).
Logged: reward_desirable and reward_undesirable (means of beta * r), kl (z0).

Where this departs from TRL:
- The mismatched pairs are cut at loss time from the micro-batch's own tensors (each row's prompt
  and trained span), so their completions are exactly the batch's. TRL pairs them once while
  tokenizing, in chunks of the per-device batch before the data is shuffled, so a training
  batch's mismatched completions are mostly other examples' (its own docstring prefers ours).
- A mismatched row longer than data.max_length is cut to it (its completion scored in part).
- z0 is each process's own micro-batch estimate; TRL averages it over processes. Multi-GPU only.
- z0 couples the examples of a batch, so k micro-batches are not one batch of their union:
  train.grad_accum > 1 is refused (raise train.batch_size instead), and so is a batch of one
  (its only mismatched pair would be its own). Evaluation batches follow the data order.
- Not implemented: TRL's `apo_zero_unpaired` loss, precomputed reference log-probs.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from tunelab.config import ObjectiveConfig
from tunelab.data.collate import collate
from tunelab.data.types import IGNORE, Example
from tunelab.errors import TunelabError
from tunelab.inference.logits import forward_logits
from tunelab.objectives.alignment_losses import sequence_logps
from tunelab.objectives.frozen import Reference
from tunelab.objectives.preference_free import UNMEASURED
from tunelab.objectives.preference_losses import kto_loss, kto_reference_point
from tunelab.objectives.registry import RunContext, Runtime, StatSums, register_objective


class KTOConfig(ObjectiveConfig):
    name: Literal["kto"] = "kto"
    beta: float = Field(0.1, gt=0.0, description="scale of the implicit reward r = log pi - log ref (temperature)")
    desirable_weight: float = Field(1.0, gt=0.0, description="lambda_D: weight of the desirable examples' losses")
    undesirable_weight: float = Field(1.0, gt=0.0, description="lambda_U: weight of the undesirable examples' losses")
    reference: str | None = Field(
        None, description="reference model path/id; default: the adapter-disabled policy (peft methods) or a frozen "
        "copy of the initial policy")

    def check_run(self, run: Any) -> None:
        if run.train.grad_accum > 1:
            raise ValueError("objective kto estimates its reference point z0 from the whole micro-batch: gradient "
                             "accumulation would change the loss; set train.grad_accum=1 and raise train.batch_size")
        if run.train.batch_size < 2:
            raise ValueError("objective kto needs train.batch_size >= 2 (z0 pairs each prompt with another row's "
                             "completion)")


def need_ratings(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch's ratings (B,): 1 desirable, 0 undesirable, IGNORE where nothing is trained."""
    if "label" not in batch or "n_pairs" in batch:
        raise TunelabError('objective kto needs unpaired data ({"prompt", "completion", "label": true | false})',
                           fix="set data.train to unpaired records (e.g. tinyworld:prefs@unpaired)")
    return batch["label"]


def completion_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) summed log-probs of each row's trained tokens."""
    return sequence_logps(forward_logits(model, batch), batch["labels"])[0]


def reply_span(labels: list[int], length: int) -> tuple[int, int]:
    """[start, end) of a row's trained tokens, or (length, length) where none is."""
    trained = [t for t in range(length) if labels[t] != IGNORE]
    return (trained[0], trained[-1] + 1) if trained else (length, length)


def mismatched_batch(batch: dict[str, torch.Tensor], pad_id: int, max_length: int) -> dict[str, torch.Tensor]:
    """Row i's prompt followed by row i-1's completion (row 0: the last row's), only the completion
    trained, each row cut to `max_length`: the pairs whose log-ratios estimate z0."""
    ids, labels = batch["input_ids"].tolist(), batch["labels"].tolist()
    spans = [reply_span(lab, n) for lab, n in zip(labels, batch["attention_mask"].sum(-1).tolist(), strict=True)]
    prompts = [row[:start] for row, (start, _) in zip(ids, spans, strict=True)]
    replies = [row[start:end] for row, (start, end) in zip(ids, spans, strict=True)]
    rows = [[Example((p + y)[:max_length], ([IGNORE] * len(p) + y)[:max_length])]
            for p, y in zip(prompts, replies[-1:] + replies[:-1], strict=True)]
    return {k: v.to(batch["input_ids"].device) for k, v in collate(rows, pad_id, packed=False).items()}


class KTORuntime(Runtime):
    def __init__(self, ctx: RunContext):
        super().__init__(kto, ctx.cfg.objective)
        cfg: KTOConfig = ctx.cfg.objective
        self.reference = Reference(ctx.model, cfg.reference, ctx.device, ctx.tokenizer)
        self.pad_id, self.max_length = ctx.pad_id, ctx.cfg.data.max_length
        self.sums = StatSums()
        ctx.say(f"kto: reference = {self.reference.kind}; beta {cfg.beta}, weights {cfg.desirable_weight} / "
                f"{cfg.undesirable_weight} ({UNMEASURED})")

    def reference_point(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """z0 of the micro-batch (a detached scalar)."""
        mismatched = mismatched_batch(batch, self.pad_id, self.max_length)
        with torch.no_grad():
            policy = completion_logps(model, mismatched)
        return kto_reference_point(policy - self.reference.forward(model, completion_logps, mismatched))

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        ratings = need_ratings(batch)
        z0 = self.reference_point(model, batch)
        reference = self.reference.forward(model, completion_logps, batch)
        losses, rewards = kto_loss(
            completion_logps(model, batch), reference, ratings == 1, z0, beta=self.cfg.beta,
            desirable_weight=self.cfg.desirable_weight, undesirable_weight=self.cfg.undesirable_weight)
        rated = ratings != IGNORE  # a fully masked example has no rating and no loss
        for name, rows in (("reward_desirable", ratings == 1), ("reward_undesirable", ratings == 0)):
            self.sums.add(name, float(rewards[rows].sum()), int(rows.sum()))
        self.sums.add("kl", float(z0), 1)
        return losses[rated].sum(), rated.sum()

    def stats(self) -> dict[str, float]:
        return self.sums.take()


def kto(model: nn.Module, batch: dict[str, torch.Tensor], cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    raise TunelabError("kto needs its runtime (a reference model): train it through tunelab.train")


register_objective(
    "kto", KTOConfig, formats=("unpaired",), mask_prompt=True, runtime=KTORuntime,
    summary="KTO: desirable / undesirable replies rated one by one, against a frozen reference",
)(kto)
