"""M02 partial (selective) fine-tuning: freeze every parameter except the chosen parts.

No paper of its own: the classic "freeze the bottom, tune the top" transfer recipe (e.g. the last-k
layers baseline in Lee et al., arXiv:1911.03090). With a selection S of parameters,

    theta_i <- theta_i - lr * g_i   for i in S,    theta_i fixed otherwise.

Selections add up: `last_k` (the last k transformer blocks), `layers` (block indices, negative
counts from the end), `regex` (searched in every parameter name, tied aliases included), `norms`
(every normalisation layer), `embeddings` (every nn.Embedding: tokens and learned positions),
`head` (the output projection). At least one is required. Tied weights are one tensor: choosing the
head of a tied model (GPT-2, Gemma) trains the input embedding too, and the other way round.

The result is plain weights, so it "merges" as is; the artifact saves only the trained tensors.
`decoder_layers` (the ModuleList of transformer blocks) is shared with the other methods.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator
from torch import nn

from tunelab.config import MethodConfig
from tunelab.errors import TunelabError
from tunelab.methods.registry import register_method

_SELECTORS = ("last_k", "layers", "regex", "norms", "embeddings", "head")


class PartialConfig(MethodConfig):
    name: Literal["partial"] = "partial"
    last_k: int | None = Field(None, gt=0, description="train the last k transformer blocks")
    layers: list[int] | None = Field(None, description="train these blocks (0-based; -1 is the last)")
    regex: str | None = Field(None, description="train every parameter whose name matches (re.search)")
    norms: bool = Field(False, description="train every normalisation layer (weights and biases)")
    embeddings: bool = Field(False, description="train the token (and learned position) embeddings")
    head: bool = Field(False, description="train the output head (the embedding too, when tied)")

    @field_validator("regex")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"not a valid regular expression: {e}") from None
        return v

    @model_validator(mode="after")
    def _something_chosen(self) -> PartialConfig:
        if not any(getattr(self, k) for k in _SELECTORS):
            raise ValueError(f"choose what trains: set at least one of {', '.join(_SELECTORS)}")
        return self


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, ModuleList) of the transformer blocks: model.model.layers, transformer.h,
    gpt_neox.layers, ... found as the outermost ModuleList of one block class whose length is the
    config's layer count (or, without one, the longest such list)."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1]
    exact = [c for c in lists if len(c[1]) == n_layers]
    if exact:
        return min(exact, key=lambda c: c[0].count("."))
    if lists:
        return max(lists, key=lambda c: len(c[1]))
    raise TunelabError(f"cannot find the transformer blocks of {type(model).__name__}",
                       fix="select parameters with method.regex instead")


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm and the architectures' own *Norm classes."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "norm" in type(module).__name__.lower()


def _block_params(model: nn.Module, cfg: PartialConfig) -> list[nn.Parameter]:
    _, blocks = decoder_layers(model)
    n = len(blocks)
    chosen: set[int] = set()
    if cfg.last_k is not None:
        if cfg.last_k > n:
            raise TunelabError(f"method.last_k={cfg.last_k} but the model has {n} blocks",
                               fix=f"set method.last_k to at most {n}")
        chosen |= set(range(n - cfg.last_k, n))
    for i in cfg.layers or []:
        if not -n <= i < n:
            raise TunelabError(f"method.layers: block {i} does not exist (the model has {n})",
                               fix=f"use indices in [{-n}, {n - 1}]")
        chosen.add(i % n)
    return [p for i in sorted(chosen) for p in blocks[i].parameters()]


def _regex_params(model: nn.Module, pattern: str) -> list[nn.Parameter]:
    rx = re.compile(pattern)
    found = [p for name, p in model.named_parameters(remove_duplicate=False) if rx.search(name)]
    if not found:
        example = next(iter(dict(model.named_parameters())), "")
        raise TunelabError(f"method.regex {pattern!r} matches no parameter name",
                           fix=f"names look like {example!r}")
    return found


def selected_parameters(model: nn.Module, cfg: PartialConfig) -> list[nn.Parameter]:
    """The parameters the selection trains (a tied tensor once per alias)."""
    params: list[nn.Parameter] = []
    if cfg.last_k is not None or cfg.layers:
        params += _block_params(model, cfg)
    if cfg.regex is not None:
        params += _regex_params(model, cfg.regex)
    if cfg.norms:
        params += [p for m in model.modules() if is_norm(m) for p in m.parameters(recurse=False)]
    if cfg.embeddings:
        params += [p for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()]
    if cfg.head:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            raise TunelabError(f"{type(model).__name__} has no output head", fix="set method.head=false")
        params += list(head.parameters())
    return params


@register_method(
    "partial", PartialConfig, family="selective", backend="ours", paper="-", mergeable=True,
    summary="freeze all but the chosen blocks / names / norms / embeddings / head",
    merge=lambda model, cfg: model, identity_at_init=True,
)
def apply(model: nn.Module, cfg: PartialConfig) -> nn.Module:
    chosen = {id(p) for p in selected_parameters(model, cfg)}
    if not chosen:
        raise TunelabError("method partial: the selection holds no parameter", fix="choose other parts")
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    return model
