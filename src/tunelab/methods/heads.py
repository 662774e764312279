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
from pydantic import Field, model_validator
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from tunelab.config import MethodConfig
from tunelab.data.collate import collate
from tunelab.data.types import Example
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

    @model_validator(mode="before")
    @classmethod
    def _num_labels_from_labels(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("labels") is not None and data.get("num_labels") is None:
            return {**data, "num_labels": len(data["labels"])}
        return data

    @model_validator(mode="after")
    def _labels_match(self) -> HeadConfig:
        if self.labels is not None:
            if len(set(self.labels)) != len(self.labels):
                raise ValueError(f"labels {self.labels} repeat a name")
            if len(self.labels) != self.num_labels:
                raise ValueError(f"num_labels={self.num_labels} but {len(self.labels)} labels are named")
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


class ClassifierModel(nn.Module):
    """A causal LM's body (no LM head) + pooling + a linear classification head."""

    def __init__(self, body: nn.Module, head: nn.Linear, pool: str, label_names: Sequence[str] | None = None):
        super().__init__()
        self.body = body
        self.head = head
        self.pool = pool
        self.config = body.config  # max_position_embeddings etc., as evaluation reads them
        self.label_names = list(label_names) if label_names else None

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
    ) -> SequenceClassifierOutput:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.body_trains()):
            out = self.body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False)
        pooled = pool_hidden(out.last_hidden_state, attention_mask, self.pool)  # (B, H)
        return SequenceClassifierOutput(logits=self.head(pooled.to(self.head.weight.dtype)),  # (B, C)
                                        hidden_states=(out.last_hidden_state,) if output_hidden_states else None)

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
    for p in body.parameters():
        p.requires_grad_(cfg.body == "full")
    if cfg.body == "lora":  # peft freezes the body and adds trainable low-rank adapters to its linear layers
        from peft import LoraConfig, get_peft_model

        body = get_peft_model(body, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                               target_modules="all-linear"))
    return ClassifierModel(body, head, cfg.pool, cfg.labels)


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
