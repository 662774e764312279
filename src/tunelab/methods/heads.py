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

from typing import Any, Literal

from peft import LoraConfig, get_peft_model
from pydantic import Field, field_validator, model_validator
from torch import nn

from tunelab.config import MethodConfig
from tunelab.errors import TunelabError
from tunelab.methods.registry import register_method
from tunelab.modeling.heads import ClassifierModel


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
        body = get_peft_model(body, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                               target_modules="all-linear"))
    return ClassifierModel(body, head, cfg.pool, cfg.labels, lm_head, cfg.likelihood)


register_method(
    "features", FeaturesConfig, family="head", backend="ours", paper="arXiv:1903.05987", mergeable=False,
    summary="feature extraction: frozen body, only a new classification head trains",
)(apply)
