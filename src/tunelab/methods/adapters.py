"""M09 bottleneck adapters: Houlsby et al. (arXiv:1902.00751) and Pfeiffer et al. (arXiv:2005.00247).

A small residual bottleneck is inserted after a sub-layer's output h (before the block's own
residual add):

    adapter(h) = h + W_up act(W_down h + b_down) + b_up,   W_down (m, d), W_up (d, m), m = d // reduction

W_up and b_up start at zero, so every adapter is the identity at init and the model is unchanged.
Placement `houlsby`: after the attention output and after the feed-forward output of every block
(2 per block); `pfeiffer`: after the feed-forward output only (1 per block). Everything else is
frozen. Trainable: n_adapters * (2 d m + m + d).

The adapters hook the output of each block's attention module (self_attn / attn / attention; the
first element when it returns a tuple) and of its mlp module, found through
`partial.decoder_layers`, so any architecture with those attribute names works; an adapter lives
under its host as `<host>.tunelab_adapter`.

Departures from the papers: no layer norm is trained or added (Houlsby also trains the layer norms;
Pfeiffer's configuration feeds the adapter the pre-norm residual and adds its own residual
handling); W_down keeps PyTorch's default Linear init rather than a near-zero normal. The
nonlinearity makes the adapters unmergeable into the base weights.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from tunelab.config import MethodConfig
from tunelab.errors import TunelabError
from tunelab.methods.partial import decoder_layers
from tunelab.methods.registry import register_method

ATTENTION_NAMES = ("self_attn", "attn", "attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class AdaptersConfig(MethodConfig):
    name: Literal["adapters"] = "adapters"
    placement: Literal["houlsby", "pfeiffer"] = Field(
        "houlsby", description="houlsby: after attention and FFN; pfeiffer: after the FFN only"
    )
    reduction_factor: int = Field(16, gt=0, description="bottleneck width = hidden_size // reduction_factor")
    nonlinearity: Literal["relu", "gelu", "silu"] = "relu"


class Bottleneck(nn.Module):
    """h + up(act(down(h))), the identity while `up` is zero."""

    def __init__(self, d: int, m: int, act: str, like: torch.Tensor):
        super().__init__()
        self.down = nn.Linear(d, m, device=like.device, dtype=like.dtype)
        self.act = ACTIVATIONS[act]()
        self.up = nn.Linear(m, d, device=like.device, dtype=like.dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


def _run_adapter(module: nn.Module, args: Any, output: Any) -> Any:
    if isinstance(output, tuple):
        return (module.tunelab_adapter(output[0]), *output[1:])
    return module.tunelab_adapter(output)


def _child(block: nn.Module, names: tuple[str, ...], what: str) -> nn.Module:
    for n in names:
        if isinstance(getattr(block, n, None), nn.Module):
            return getattr(block, n)
    raise TunelabError(f"cannot find the {what} module of {type(block).__name__} (looked for {', '.join(names)})",
                       fix="this architecture is not supported by method adapters; try lora")


def adapter_sites(model: nn.Module, placement: str) -> list[nn.Module]:
    """The modules whose output gets an adapter, in block order."""
    _, blocks = decoder_layers(model)
    sites = []
    for block in blocks:
        if placement == "houlsby":
            sites.append(_child(block, ATTENTION_NAMES, "attention"))
        sites.append(_child(block, MLP_NAMES, "feed-forward"))
    return sites


@register_method(
    "adapters", AdaptersConfig, family="additive", backend="ours", paper="arXiv:1902.00751", mergeable=False,
    summary="bottleneck adapters after attention and/or FFN (Houlsby, Pfeiffer); identity at init",
    identity_at_init=True,
)
def apply(model: nn.Module, cfg: AdaptersConfig) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    d = model.config.hidden_size
    m = max(1, d // cfg.reduction_factor)
    for site in adapter_sites(model, cfg.placement):
        like = next(site.parameters())  # the host's device and dtype
        site.add_module("tunelab_adapter", Bottleneck(d, m, cfg.nonlinearity, like).train(site.training))
        site.register_forward_hook(_run_adapter)
    return model
