"""The classification / reward model type of the `head` and `features` methods (methods/heads.py):
a causal LM's body, pooled, under a new linear head, optionally adding the LM's own log-likelihood
of the reply (`likelihood: reply | pmi`; the equations are in methods/heads.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from tunelab.data.collate import collate
from tunelab.data.types import IGNORE, Example
from tunelab.errors import TunelabError


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """(B, T, H) hidden states -> (B, H): the last non-padding token's (any padding side), or the
    mean over non-padding tokens. No mask: every token is real."""
    b, t, _ = hidden.shape
    if attention_mask is None:
        attention_mask = torch.ones(b, t, dtype=torch.long, device=hidden.device)
    if attention_mask.dim() != 2:
        raise ValueError("a classification head needs a (batch, tokens) attention mask: packed rows cannot be pooled")
    real = attention_mask.bool()  # (B, T)
    if how == "last":
        pos = torch.arange(t, device=hidden.device).expand(b, t)  # (B, T)
        last = pos.masked_fill(~real, -1).amax(dim=1).clamp(min=0)  # (B,)
        return hidden[torch.arange(b, device=hidden.device), last]  # (B, H)
    if how == "mean":
        w = real.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        return (hidden * w).sum(dim=1) / w.sum(dim=1).clamp(min=1)  # (B, H)
    raise ValueError(f"unknown pooling {how!r}")


def reply_loglik(hidden: torch.Tensor, labels: torch.Tensor, lm_weight: torch.Tensor) -> torch.Tensor:
    """(B,) sum of log p(label_t | tokens before t) over the trained labels (not -100) of each row,
    through an LM head of weight (V, H); only the reply's positions go through the vocabulary."""
    target = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    mask = target != -100
    logits = hidden[:, :-1][mask].float() @ lm_weight.float().T  # (N, V), N = trained tokens
    logp = logits.log_softmax(-1).gather(1, target[mask].unsqueeze(1)).squeeze(1)  # (N,)
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(target)[mask]  # (N,)
    return torch.zeros(labels.shape[0], device=hidden.device, dtype=logp.dtype).index_add(0, rows, logp)


NULL_PROMPT_CAPACITY = 64  # tokens of the saved null prompt (an empty user turn + the assistant header)


def null_rows(prompt: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The replies of a batch (its trained labels) after `prompt` (P,) instead of their own prompts,
    collated like any batch (data/collate.py): input_ids, attention_mask, labels (-100 on the prompt)."""
    head = prompt.tolist()
    replies = [ids[lab != IGNORE].tolist() for ids, lab in zip(input_ids, labels, strict=True)]
    batch = collate([[Example(head + r, [IGNORE] * len(head) + r)] for r in replies], pad_id=0, packed=False)
    return {k: v.to(input_ids.device) for k, v in batch.items()}


class ClassifierModel(nn.Module):
    """A causal LM's body (no LM head) + pooling + a linear classification head (+ optionally the LM
    head, for a verifier reward: `likelihood`)."""

    def __init__(
        self, body: nn.Module, head: nn.Linear, pool: str, label_names: Sequence[str] | None = None,
        lm_head: nn.Module | None = None, likelihood: str = "off",
    ):
        super().__init__()
        self.body = body
        self.head = head
        self.pool = pool
        self.config = body.config  # max_position_embeddings etc., as evaluation reads them
        self.label_names = list(label_names) if label_names else None
        self.lm_head = lm_head  # None when tied to the body's input embeddings (see lm_weight)
        self.likelihood = likelihood
        self.likelihood_scale = nn.Parameter(torch.ones((), device=head.weight.device)) if likelihood != "off" else None
        if likelihood == "pmi":  # -1 = unset; filled by set_null_prompt
            self.register_buffer("tunelab_null_prompt", torch.full((NULL_PROMPT_CAPACITY,), -1, dtype=torch.long,
                                                                   device=head.weight.device))

    def set_null_prompt(self, ids: Sequence[int]) -> None:
        """The token ids a reply is scored after for `pmi` (an empty user turn and the assistant header)."""
        if not 0 < len(ids) <= NULL_PROMPT_CAPACITY:
            raise TunelabError(f"the null prompt has {len(ids)} tokens; a pmi reward head holds 1 to "
                               f"{NULL_PROMPT_CAPACITY}", fix="use a chat template with a shorter empty turn, or "
                               "method.likelihood=reply")
        self.tunelab_null_prompt.fill_(-1)
        self.tunelab_null_prompt[: len(ids)] = torch.tensor(list(ids), dtype=torch.long)

    def null_prompt(self) -> torch.Tensor:
        prompt = self.tunelab_null_prompt[self.tunelab_null_prompt >= 0]
        if not len(prompt):
            raise TunelabError("this pmi reward head has no null prompt (it is set when objective reward trains it)",
                               fix="train it with objective.name=reward, or call model.set_null_prompt(ids)")
        return prompt

    def lm_weight(self) -> torch.Tensor:
        """(V, H) weight of the LM head: the model's own, else the input embeddings it was tied to."""
        if self.lm_head is not None:
            return self.lm_head.weight
        return self.body.get_input_embeddings().weight

    def body_trains(self) -> bool:
        return any(p.requires_grad for p in self.body.parameters())

    def train(self, mode: bool = True) -> ClassifierModel:
        super().train(mode)
        if not self.body_trains():  # a frozen feature extractor: no dropout noise in the features
            self.body.eval()
        return self

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None, use_cache: bool | None = None, output_hidden_states: bool = False,
        labels: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput:
        """`labels` (B, T): the reply's token ids, -100 elsewhere; read only by a `likelihood` head."""
        hidden = self._hidden(input_ids, attention_mask, position_ids)  # (B, T, H)
        pooled = pool_hidden(hidden, attention_mask, self.pool)  # (B, H)
        logits = self.head(pooled.to(self.head.weight.dtype))  # (B, C)
        if self.likelihood_scale is not None:
            if labels is None:
                raise TunelabError("this reward model adds the LM's log-likelihood of the reply (method.likelihood) "
                                   "and needs the reply span (labels) to score",
                                   fix="score (prompt, reply) pairs with tunelab score / tunelab.score")
            loglik = reply_loglik(hidden, labels, self.lm_weight())  # (B,)
            if self.likelihood == "pmi":
                null = null_rows(self.null_prompt(), input_ids, labels)
                null_hidden = self._hidden(null["input_ids"], null["attention_mask"])
                loglik = loglik - reply_loglik(null_hidden, null["labels"], self.lm_weight())
            logits = logits + (self.likelihood_scale * loglik).unsqueeze(1).to(logits.dtype)
        return SequenceClassifierOutput(logits=logits, hidden_states=(hidden,) if output_hidden_states else None)

    def _hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, H) last hidden states of the body; no autograd through a frozen body."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.body_trains()):
            return self.body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False).last_hidden_state

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        self.body.gradient_checkpointing_enable(**kwargs)

    def enable_input_require_grads(self) -> None:
        self.body.enable_input_require_grads()


def is_classifier(model: Any) -> bool:
    return isinstance(model, ClassifierModel)


@torch.no_grad()
def predict(model: ClassifierModel, examples: list[Example], *, pad_id: int, batch_size: int = 32) -> list[int]:
    """The argmax class of every example, in order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds: list[int] = []
    for start in range(0, len(examples), batch_size):
        rows = [[ex] for ex in examples[start : start + batch_size]]
        batch = collate(rows, pad_id=pad_id, packed=False)
        logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).logits  # (B, C)
        preds += logits.argmax(dim=-1).tolist()
    model.train(was_training)
    return preds


def is_reward_model(model: Any) -> bool:
    return is_classifier(model) and model.head.out_features == 1
