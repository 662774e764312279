"""The prompt family: M10 prefix tuning, M11 prompt tuning, M12 P-tuning; thin wrappers over peft.

All three freeze the whole base model and learn `n` virtual tokens; they differ in where those
tokens enter and how they are parameterised.

- `prefix` (Li & Liang, arXiv:2101.00190): every layer attends to n trainable key/value pairs,
  [K_prefix; K] and [V_prefix; V]. Per layer the prefix holds 2 * n_kv_heads * head_dim values per
  virtual token (peft sizes it by the key/value width, so grouped-query models get smaller
  prefixes). `prefix_projection` reparameterises it, as the paper does for stability:
  P = MLP(E) with E (n, d_kv) and MLP d_kv -> encoder_hidden_size -> tanh -> layers * 2 * d_kv.
- `prompt` (Lester et al., arXiv:2104.08691): n trainable input embeddings P (n, hidden) are
  prepended to the token embeddings, [P; E(x)]. `init: text` starts P from the embeddings of
  `init_text`'s tokens (repeated or cut to n), which the paper found better than random.
- `ptuning` (Liu et al., arXiv:2103.10385): the prepended embeddings come from a prompt encoder,
  P = MLP(E) (3 linear layers) or MLP(BiLSTM(E)), trained jointly with E.

Departures: P-tuning's virtual tokens are all prepended (peft's form), not interleaved with
anchor tokens as in the paper. `prompt` and `ptuning` lengthen the sequence: the model's logits
cover n + T positions, the first n belonging to the virtual tokens. peft ignores `position_ids`
for them; packed batches go through inference/logits.packed_prompt_logits instead, which gives
each packed example what it would get alone.
On the meta device (`tunelab methods --model`, `method_cost`) `init: text` falls back to random
init: the parameter count is the same and no tokenizer is needed.
"""

from __future__ import annotations

from typing import Literal

from peft import (
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptTuningConfig,
    PromptTuningInit,
    get_peft_model,
)
from pydantic import Field, model_validator
from torch import nn

from tunelab.config import MethodConfig
from tunelab.errors import TunelabError
from tunelab.methods.registry import register_method

_VIRTUAL = "number of trainable virtual tokens"


class PrefixConfig(MethodConfig):
    name: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = Field(16, gt=0, description=_VIRTUAL)
    prefix_projection: bool = Field(False, description="reparameterise the prefix through a 2-layer MLP")
    encoder_hidden_size: int | None = Field(
        None, gt=0, description="hidden width of that MLP (default: the key/value width)"
    )


class PromptConfig(MethodConfig):
    name: Literal["prompt"] = "prompt"
    num_virtual_tokens: int = Field(16, gt=0, description=_VIRTUAL)
    init: Literal["random", "text"] = Field("random", description="`text`: start from `init_text`'s embeddings")
    init_text: str | None = Field(None, description="e.g. 'Answer the question about the world:'")

    @model_validator(mode="after")
    def _text_needs_text(self) -> PromptConfig:
        if self.init == "text" and not self.init_text:
            raise ValueError("init: text needs init_text (the words whose embeddings start the prompt)")
        if self.init == "random" and self.init_text is not None:
            raise ValueError("init_text is only used with init: text")
        return self


class PTuningConfig(MethodConfig):
    name: Literal["ptuning"] = "ptuning"
    num_virtual_tokens: int = Field(16, gt=0, description=_VIRTUAL)
    encoder_type: Literal["mlp", "lstm"] = Field("mlp", description="the prompt encoder")
    encoder_hidden_size: int | None = Field(None, gt=0, description="its hidden width (default: the model's)")


def _tokenizer_path(model: nn.Module) -> str:
    path = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    if not path:
        raise TunelabError(
            "prompt tuning with init: text needs the base model's tokenizer, but the model does not say where "
            "it was loaded from", fix="load the base with from_pretrained, or use init: random",
        )
    return str(path)


@register_method(
    "prefix", PrefixConfig, family="soft-prompt", backend="peft", paper="arXiv:2101.00190", mergeable=False,
    summary="trainable key/value prefixes in every layer, optional MLP reparameterisation",
)
def apply_prefix(model: nn.Module, cfg: PrefixConfig) -> nn.Module:
    return get_peft_model(model, PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens,
        prefix_projection=cfg.prefix_projection, encoder_hidden_size=cfg.encoder_hidden_size,
    ))


@register_method(
    "prompt", PromptConfig, family="soft-prompt", backend="peft", paper="arXiv:2104.08691", mergeable=False,
    summary="trainable virtual-token embeddings prepended to the input",
)
def apply_prompt(model: nn.Module, cfg: PromptConfig) -> nn.Module:
    text = cfg.init == "text" and not any(p.is_meta for p in model.parameters())
    return get_peft_model(model, PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT if text else PromptTuningInit.RANDOM,
        prompt_tuning_init_text=cfg.init_text if text else None,
        tokenizer_name_or_path=_tokenizer_path(model) if text else None,
    ))


@register_method(
    "ptuning", PTuningConfig, family="soft-prompt", backend="peft", paper="arXiv:2103.10385", mergeable=False,
    summary="virtual tokens produced by a trainable prompt encoder (MLP or LSTM)",
)
def apply_ptuning(model: nn.Module, cfg: PTuningConfig) -> nn.Module:
    kind = {"mlp": PromptEncoderReparameterizationType.MLP, "lstm": PromptEncoderReparameterizationType.LSTM}
    return get_peft_model(model, PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens,
        encoder_reparameterization_type=kind[cfg.encoder_type], encoder_hidden_size=cfg.encoder_hidden_size,
    ))
