"""M21 PASTA (Yang et al., "Parameter-Efficient Tuning by Special Token Adaptation", arXiv:2210.04382):
trainable vectors added to the hidden states of special tokens, in every layer.

With s(t) the special token at position t (or none) and h_l the input of decoder layer l:

    h_l[t] <- h_l[t] + e_{l, s(t)}        for every layer l and every position t holding a special token

Everything else is frozen; the vectors start at zero (the model is unchanged at init). Trainable:
n_layers x n_tokens x hidden. The paper adapts the [CLS]/[SEP] tokens of an encoder; in a causal chat
model the special tokens are the chat template's markers (`<|im_start|>`, `<|im_end|>`, end of text),
which every turn passes through: `tokens: special` takes the tokenizer's special tokens (padding
excepted), found through the model's own folder. A position is matched by its input id, so generation
with a KV cache adds the vectors to each new special token as it is fed, exactly as a full forward does
(tested). Inputs given as embeddings (no input ids) get no vectors.

Not mergeable (the addition depends on the token); the artifact is the vectors and the token ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn
from transformers import AutoTokenizer

from tunelab.config import MethodConfig
from tunelab.errors import TunelabError
from tunelab.methods.registry import register_method
from tunelab.modeling.load import decoder_layers

ATTR = "tunelab_pasta"


class PastaConfig(MethodConfig):
    name: Literal["pasta"] = "pasta"
    tokens: list[str] | Literal["special"] = Field(
        "special", description="the tokens whose hidden states get a vector per layer: `special` (the tokenizer's "
        "special tokens but padding) or a list of token strings")
    token_ids: list[int] | None = Field(None, description="token ids instead of `tokens` (no tokenizer needed)")


class PastaVectors(nn.Module):
    """e (n_layers, n_tokens, hidden), zero at init, and the token ids they belong to."""

    def __init__(self, n_layers: int, ids: list[int], hidden: int, like: torch.Tensor):
        super().__init__()
        self.vectors = nn.Parameter(torch.zeros(n_layers, len(ids), hidden, device=like.device, dtype=like.dtype))
        self.register_buffer("tunelab_ids", torch.tensor(ids, dtype=torch.long, device=like.device))
        self.index: torch.Tensor | None = None  # (B, T): which token of `ids` each position holds, -1 for none

    def locate(self, input_ids: torch.Tensor) -> None:
        match = input_ids.unsqueeze(-1) == self.tunelab_ids.to(input_ids.device)  # (B, T, K)
        self.index = torch.where(match.any(-1), match.float().argmax(-1), -1)  # (B, T)

    def add(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        if self.index is None or self.index.shape != hidden.shape[:2]:
            return hidden
        idx = self.index.to(hidden.device)
        vec = self.vectors[layer].to(hidden.dtype)[idx.clamp(min=0)]  # (B, T, hidden)
        return hidden + vec * (idx >= 0).unsqueeze(-1).to(hidden.dtype)


def resolve_ids(model: nn.Module, cfg: PastaConfig) -> list[int]:
    if cfg.token_ids is not None:
        return list(dict.fromkeys(cfg.token_ids))
    tok = _tokenizer_of(model)
    if tok is None:
        fallback = [getattr(model.config, k, None) for k in ("bos_token_id", "eos_token_id")]
        ids = [i for i in fallback if isinstance(i, int)]
        if cfg.tokens == "special" and ids:
            return list(dict.fromkeys(ids))
        raise TunelabError("method pasta: no tokenizer beside the model to find its special tokens",
                           fix="set method.token_ids to the ids of the tokens to adapt")
    if cfg.tokens == "special":
        ids = [i for i in tok.all_special_ids if i != tok.pad_token_id]
    else:
        unknown = [t for t in cfg.tokens if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)]
        if unknown:
            raise TunelabError(f"method pasta: {', '.join(map(repr, unknown))} not in the tokenizer's vocabulary",
                               fix="list tokens of the vocabulary (e.g. <|im_start|>), or set method.token_ids")
        ids = [tok.convert_tokens_to_ids(t) for t in cfg.tokens]
    if not ids:
        raise TunelabError("method pasta: the tokenizer has no special tokens", fix="set method.tokens or token_ids")
    return list(dict.fromkeys(ids))


def _tokenizer_of(model: nn.Module) -> Any:
    path = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if not path or not Path(path).is_dir():
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


@register_method(
    "pasta", PastaConfig, family="additive", backend="ours", paper="arXiv:2210.04382", mergeable=False,
    summary="a trainable vector per layer added to the hidden state of each special (chat-marker) token",
    identity_at_init=True,
)
def apply(model: nn.Module, cfg: PastaConfig) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    layers = decoder_layers(model)
    like = model.get_input_embeddings().weight
    pasta = PastaVectors(len(layers), resolve_ids(model, cfg), like.shape[1], like)
    model.add_module(ATTR, pasta)

    def capture(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        pasta.index = None
        if ids is not None and ids.dtype == torch.long:
            pasta.locate(ids)

    def add_at(layer: int) -> Any:
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if args:
                return (pasta.add(layer, args[0]), *args[1:]), kwargs
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": pasta.add(layer, kwargs["hidden_states"])}
            return None
        return hook

    model.register_forward_pre_hook(capture, with_kwargs=True)
    for i, block in enumerate(layers):
        block.register_forward_pre_hook(add_at(i), with_kwargs=True)
    return model
