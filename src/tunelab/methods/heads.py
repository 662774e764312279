"""M03 head replacement and M04 feature extraction: a new classification head on a causal LM.

M03, transfer learning by head replacement (ULMFiT, Howard & Ruder, arXiv:1801.06146; the linear
head on the last token is GPT's, Radford et al. 2018): drop the LM head, pool the body's last
hidden states and add a new, randomly initialised linear head; body and head train together.
M04, feature extraction (Peters, Ruder & Smith, "To Tune or Not to Tune?", arXiv:1903.05987):
the same model with the body frozen, so only the head trains. `body: lora` (M03 only) trains the
body through LoRA adapters (peft) instead of every weight, e.g. for a reward model.

    h = pool(Body(x)) in R^H,   z = W h + b in R^C,   p(y | x) = softmax(z)
    W ~ N(0, initializer_range^2), b = 0

pool `last`: the hidden state of the last non-padding token, the only position of a causal model
that has seen the whole text (the data ends every text with eos). pool `mean`: the mean over the
non-padding tokens. Train with objective `classify`.

`likelihood` (scalar reward heads only) adds what the model's own language model thinks of the
reply, read through its LM head, with a learned weight a (1 at init, saved with the head):

    reply:  r(x, y) = w . h + b + a * log p(y | x)
    pmi:    r(x, y) = w . h + b + a * [log p(y | x) - log p(y | x0)]

log p(y | x) sums the reply tokens' log-probs (the example's trained labels). x0 is the null prompt,
an empty user turn rendered by the training chat template (set at training, saved with the head as
`tunelab_null_prompt`): the pointwise mutual information of prompt and reply (Holtzman et al.,
arXiv:2104.08315) keeps what the prompt makes likely (the right fact about this person) and cancels
what is likely anyway (phrasing, length). A linear head on the last hidden state learns tone from a
few hundred people but cannot check a fact about a person it was not trained on; the language
model it starts from can. `reply` ranks fixed pairs best but rewards whatever the LM finds typical,
so a policy optimised against it (PPO) is judged by typicality; `pmi` is the one for RL
(docs/alignment.md has the numbers).

Departures: ULMFiT's gradual unfreezing and discriminative learning rates are not implemented
(`body: full` trains everything at one lr). A frozen body stays in eval mode (no dropout) and runs
without autograd: it is a fixed feature extractor. If the LM head is tied to the input embeddings,
the embeddings stay (they are the body's).

Saved as a delta artifact: the head, plus the body weights when they train. `tunelab.load(run)`
re-applies the method to a fresh base and puts the weights back. `labels` names the head's
outputs, so evaluation maps them to classes (default: the task's labels, sorted).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from tunelab.config import MethodConfig
from tunelab.data.collate import collate
from tunelab.data.types import IGNORE, Example
from tunelab.errors import TunelabError
from tunelab.methods.registry import register_method


class HeadConfig(MethodConfig):
    name: Literal["head"] = "head"
    num_labels: int = Field(
        2, ge=1, description="outputs of the head: classes (default len(labels), else 2), or 1 for a scalar reward "
        "head (objective reward)")
    labels: list[str] | None = Field(
        None, description="names of the head's outputs in order, saved with the model; must match the data's "
        "label order (objective.labels, else the sorted training labels)",
    )
    pool: Literal["last", "mean"] = Field("last", description="last non-padding token, or mean over tokens")
    body: Literal["full", "frozen", "lora"] = Field(
        "full", description="full: the body trains too; frozen: only the head; lora: the body trains through LoRA "
        "adapters on every linear layer (peft), far fewer trainable weights than full")
    lora_r: int = Field(8, gt=0, description="LoRA rank of the body (body: lora)")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA alpha of the body (body: lora)")
    likelihood: Literal["off", "reply", "pmi"] = Field(
        "off", description="scalar head (num_labels: 1) only: add a learned multiple (1 at init) of the model's own "
        "log-likelihood of the reply (reply), or of its pointwise mutual information with the prompt (pmi: minus "
        "the reply's log-likelihood after an empty user turn), read through the LM head, to the reward")

    @model_validator(mode="before")
    @classmethod
    def _num_labels_from_labels(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("labels") is not None and data.get("num_labels") is None:
            return {**data, "num_labels": len(data["labels"])}
        return data

    @field_validator("likelihood", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML reads a bare `off` as false

    @model_validator(mode="after")
    def _labels_match(self) -> HeadConfig:
        if self.labels is not None:
            if len(set(self.labels)) != len(self.labels):
                raise ValueError(f"labels {self.labels} repeat a name")
            if len(self.labels) != self.num_labels:
                raise ValueError(f"num_labels={self.num_labels} but {len(self.labels)} labels are named")
        if self.likelihood != "off" and self.num_labels != 1:
            raise ValueError(f"likelihood: {self.likelihood} needs a scalar reward head (num_labels: 1)")
        return self


class FeaturesConfig(HeadConfig):
    name: Literal["features"] = "features"  # type: ignore[assignment]
    body: Literal["frozen"] = Field("frozen", description="always frozen: only the head trains")  # type: ignore[assignment]


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


def _hidden_size(model: nn.Module) -> int:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and getattr(out, "weight", None) is not None:
        return int(out.weight.shape[1])  # what the LM head read: the body's final hidden size
    return int(model.config.hidden_size)


@register_method(
    "head", HeadConfig, family="head", backend="ours", paper="arXiv:1801.06146", mergeable=False,
    summary="drop the LM head, train a new classification head (and the body, unless body: frozen)",
)
def apply(model: nn.Module, cfg: HeadConfig) -> nn.Module:
    body = getattr(model, "base_model", model)
    if body is model:
        raise TunelabError(f"{type(model).__name__} has no body separate from its LM head",
                           fix="use a causal LM (AutoModelForCausalLM) as the base")
    ref = next(body.parameters())
    head = nn.Linear(_hidden_size(model), cfg.num_labels, device=ref.device, dtype=ref.dtype)
    nn.init.normal_(head.weight, std=float(getattr(model.config, "initializer_range", 0.02)))
    nn.init.zeros_(head.bias)
    lm_head = None
    if cfg.likelihood != "off":
        lm_head = model.get_output_embeddings()
        if lm_head is None:
            raise TunelabError(f"{type(model).__name__} has no LM head to read the reply's likelihood from",
                               fix="set method.likelihood=off")
        if lm_head.weight is body.get_input_embeddings().weight:
            lm_head = None  # tied: the body's embeddings are the LM head
    for p in body.parameters():
        p.requires_grad_(cfg.body == "full")
    if lm_head is not None:
        lm_head.requires_grad_(cfg.body == "full")
    if cfg.body == "lora":  # peft freezes the body and adds trainable low-rank adapters to its linear layers
        from peft import LoraConfig, get_peft_model

        body = get_peft_model(body, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                               target_modules="all-linear"))
    return ClassifierModel(body, head, cfg.pool, cfg.labels, lm_head, cfg.likelihood)


register_method(
    "features", FeaturesConfig, family="head", backend="ours", paper="arXiv:1903.05987", mergeable=False,
    summary="feature extraction: frozen body, only a new classification head trains",
)(apply)


# ----------------------------------------------------------------------------- prediction


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


def evaluate_head(
    model: ClassifierModel, tokenizer: Any, records: Sequence[dict[str, Any]], labels: Sequence[str] | None, *,
    batch_size: int = 32, max_length: int = 1024,
) -> dict[str, Any]:
    """Accuracy and per-class counts of the head's argmax on `{"text", "label"}` records.

    Output i means `model.label_names[i]`, else the i-th of `labels` (the task's labels) in the
    order training gives ids (data/classify.py `sort_labels`)."""
    from tunelab.data.classify import encode_texts, sort_labels
    from tunelab.eval.generation import pad_id

    names = model.label_names or sort_labels(str(x) for x in (labels or [r["label"] for r in records]))
    n_out = model.head.out_features
    if len(names) != n_out:
        raise TunelabError(f"the head has {n_out} outputs but the task has {len(names)} labels {names}",
                           fix="evaluate on the task the head was trained on, or train with method.labels set")
    examples = encode_texts(tokenizer, [r["text"] for r in records], max_length)
    preds = [names[i] for i in predict(model, examples, pad_id=pad_id(tokenizer), batch_size=batch_size)]
    per_class = {name: {"n": 0, "correct": 0, "predicted": 0} for name in names}
    for pred, record in zip(preds, records, strict=True):
        gold = str(record["label"])
        per_class[pred]["predicted"] += 1
        per_class.setdefault(gold, {"n": 0, "correct": 0, "predicted": 0})["n"] += 1
        per_class[gold]["correct"] += pred == gold
    correct = sum(c["correct"] for c in per_class.values())
    return {"kind": "classification", "n": len(records), "accuracy": correct / len(records), "per_class": per_class,
            "scored_by": "head"}
