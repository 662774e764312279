"""M19 LST (Sung et al., "LST: Ladder Side-Tuning for Parameter and Memory Efficient Transfer Learning",
arXiv:2206.06522): a small side network beside the frozen backbone, fed by "ladders", trained without
backpropagating through the backbone.

With h_0 the backbone's embedding output, h_i the output of decoder layer i (i = 1..N), D_i a linear
down-projection d -> d/r per ladder, g_i a side transformer block of width d/r, mu_i = sigmoid(alpha_i / T)
a learned gate, and h_out the backbone's last hidden state (after its final norm):

    s_0 = D_0(h_0)
    s_i = g_i(mu_i * D_i(h_i) + (1 - mu_i) * s_{i-1})          i = 1..N
    logits = lm_head(h_out + U(LN(s_N)))                           U: d/r -> d, zero at init

The backbone runs under `torch.no_grad`: autograd keeps nothing of it, so activation memory is the side
network's (bench/lst_memory.py measures it). alpha starts at 0 (mu = 0.5) as in the paper, T = 0.1.
U starts at zero, so the model computes exactly what the base did at init.

Departures: as we read the paper, its side network's up-projected final state alone feeds the output
head (the backbone's last state reaching it through the last ladder); here it is added to the backbone's
last hidden state before the frozen LM head, which keeps the base at init. The side blocks are small
pre-norm transformer blocks (causal attention, GELU MLP x4) initialised at random (std 0.02), not
copies of the backbone's layers pruned by weight magnitude. Side attention sees positions through the
backbone's hidden states (no positional encoding of its own); packed rows (documents are the runs of
position ids counting up by one, as data/collate.py) get a block-diagonal mask. Generation with a KV
cache keeps the side blocks' keys and values beside the backbone's (greedy and sampling; beam search,
which reorders the cache, is not supported). Not mergeable (a separate network); the artifact is the
side network's weights on top of the base.
"""

from __future__ import annotations

import functools
import types
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from tunelab.config import MethodConfig
from tunelab.data.collate import document_index
from tunelab.errors import TunelabError
from tunelab.methods.registry import register_method
from tunelab.modeling.load import decoder_layers

ATTR = "tunelab_lst"


class LSTConfig(MethodConfig):
    name: Literal["lst"] = "lst"
    reduction: int = Field(8, gt=0, le=4096, description="r: the side network's width is hidden / r")
    heads: int | None = Field(None, gt=0, description="attention heads of the side blocks (default: width / 64, "
                              "at least 1)")
    temperature: float = Field(0.1, gt=0, description="T of the gates mu_i = sigmoid(alpha_i / T)")


class SideBlock(nn.Module):
    """A pre-norm transformer block of width w: causal self-attention and a GELU MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, past: tuple | None) -> tuple[torch.Tensor, tuple]:
        b, t, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        if past is not None:  # (B, heads, T_past, w / heads) each
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, T, w / heads)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, w))
        return x + self.out(F.gelu(self.fc(self.ln2(x)))), (k, v)


class LadderSide(nn.Module):
    """Ladders D_0..D_N, gates alpha_1..alpha_N, side blocks g_1..g_N, final norm and up-projection U."""

    def __init__(self, n_layers: int, hidden: int, cfg: LSTConfig):
        super().__init__()
        width = hidden // cfg.reduction
        if width < 1:
            raise TunelabError(f"method lst: reduction {cfg.reduction} leaves no side width (hidden size {hidden})",
                               fix=f"set method.reduction to at most {hidden}")
        heads = cfg.heads or max(1, width // 64)
        if width % heads:
            raise TunelabError(f"method lst: side width {width} (hidden {hidden} / reduction {cfg.reduction}) is not "
                               f"divisible by {heads} heads", fix="set method.heads to a divisor of the side width")
        self.temperature = cfg.temperature
        self.ladders = nn.ModuleList(nn.Linear(hidden, width) for _ in range(n_layers + 1))
        self.alpha = nn.Parameter(torch.zeros(n_layers))
        self.blocks = nn.ModuleList(SideBlock(width, heads) for _ in range(n_layers))
        self.ln_f, self.up = nn.LayerNorm(width), nn.Linear(width, hidden)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.up.weight)
        self.feeds: list[torch.Tensor] = []  # h_0..h_N of the current forward, without grad
        self.inputs: dict[str, Any] = {}
        self.cache: list[tuple] | None = None  # the side blocks' keys and values, while generating

    def gates(self) -> torch.Tensor:
        return torch.sigmoid(self.alpha / self.temperature)  # (N,)

    def run(self, feeds: list[torch.Tensor], mask: torch.Tensor, past: list[tuple] | None) -> torch.Tensor:
        dtype = self.up.weight.dtype
        s = self.ladders[0](feeds[0].to(dtype))  # (B, T, w)
        mu, kv = self.gates(), []
        for i, block in enumerate(self.blocks):
            s = mu[i] * self.ladders[i + 1](feeds[i + 1].to(dtype)) + (1 - mu[i]) * s
            s, pair = block(s, mask, past[i] if past is not None else None)
            kv.append(pair)
        self.cache = [(k.detach(), v.detach()) for k, v in kv] if not torch.is_grad_enabled() else None
        return self.up(self.ln_f(s))  # (B, T, hidden)


def side_mask(t: int, past: int, attention_mask: Any, position_ids: Any, device: torch.device) -> torch.Tensor:
    """(B or 1, 1, T, past + T) bool: causal, padding keys out, packed documents apart; each query sees itself
    (so a left-padding query is never left with no key)."""
    k = past + t
    q_pos = torch.arange(past, k, device=device)
    mask = (torch.arange(k, device=device)[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T, K)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and attention_mask.shape[1] >= k:
        mask = mask & attention_mask[:, None, None, -k:].to(device).bool()
    if past == 0 and isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2:
        seg = document_index(position_ids).to(device)  # (B, T): document index in a packed row
        mask = mask & (seg[:, None, :, None] == seg[:, None, None, :])
    return mask | (torch.arange(k, device=device)[None, :] == q_pos[:, None])[None, None]


def _no_grad_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    with torch.no_grad():
        return type(self).forward(self, *args, **kwargs)


def _start(side: LadderSide, _body: nn.Module, args: tuple, kwargs: dict) -> None:
    side.feeds = []
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
    side.inputs = {"attention_mask": kwargs.get("attention_mask"), "position_ids": kwargs.get("position_ids"),
                   "past": past}


def _embeddings(side: LadderSide, _layer: nn.Module, args: tuple, kwargs: dict) -> None:
    side.feeds = [args[0] if args else kwargs["hidden_states"]]


def _layer_output(side: LadderSide, _layer: nn.Module, _args: tuple, out: Any) -> None:
    side.feeds.append(out[0] if isinstance(out, tuple) else out)


def _finish(side: LadderSide, _body: nn.Module, _args: tuple, _kwargs: dict, out: Any) -> Any:
    h = out[0] if isinstance(out, tuple) else out.last_hidden_state  # (B, T, hidden)
    past = side.inputs.get("past", 0)
    if past and (side.cache is None or side.cache[0][0].shape[2] != past):
        raise TunelabError("method lst: a cached forward without the side network's cache of the same length",
                           fix="generate with model.generate (greedy or sampling), or call the model with "
                           "use_cache=False")
    mask = side_mask(h.shape[1], past, side.inputs.get("attention_mask"), side.inputs.get("position_ids"), h.device)
    delta = side.run(side.feeds, mask, side.cache if past else None)
    side.feeds = []
    h = h + delta.to(h.dtype)
    if isinstance(out, tuple):
        return (h, *out[1:])
    out.last_hidden_state = h
    return out


@register_method(
    "lst", LSTConfig, family="additive", backend="ours", paper="arXiv:2206.06522", mergeable=False,
    summary="a small gated side network fed by down-projected frozen hidden states; no backprop through the base",
    identity_at_init=True,
)
def apply(model: nn.Module, cfg: LSTConfig) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    layers = decoder_layers(model)
    body = getattr(model, "base_model", model)
    like = model.get_input_embeddings().weight
    side = LadderSide(len(layers), like.shape[1], cfg).to(device=like.device, dtype=like.dtype)
    model.add_module(ATTR, side)
    # bound methods and partials of `side` and `body`, so a deep copy of the model carries its own wiring
    body.forward = types.MethodType(_no_grad_forward, body)
    body.register_forward_pre_hook(functools.partial(_start, side), with_kwargs=True)
    layers[0].register_forward_pre_hook(functools.partial(_embeddings, side), with_kwargs=True)
    for layer in layers:
        layer.register_forward_hook(functools.partial(_layer_output, side))
    body.register_forward_hook(functools.partial(_finish, side), with_kwargs=True)
    return model
