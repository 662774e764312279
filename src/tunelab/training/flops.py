"""Floating-point operations of one training micro-batch, from the closed form's view of the model
(training/activations.py `Decoder`).

A matmul of a (n, a) input by an (a, b) weight costs 2 n a b in the forward. Backward costs the
same again for the input's gradient when the input needs one (every block from the first one on
the gradient path), and again for the weight's gradient when the weight trains: full fine-tuning
is the familiar 6 N per token, a frozen base under LoRA about 4 N, and blocks before the first
trainable one cost only their forward. Causal attention adds 2 x 2 x h hd x (positions / 2 +
prefix) per position and block in the forward (QK^T and AV over the visible keys), twice that in
backward. Gradient checkpointing adds one more forward of every block.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.training.activations import Block, Decoder, Linear


@dataclass(frozen=True)
class Flops:
    forward: float
    backward: float
    recompute: float  # the extra forward of gradient checkpointing

    def total(self, checkpointing: bool) -> float:
        return self.forward + self.backward + (self.recompute if checkpointing else 0.0)


def _linear(lin: Linear) -> tuple[float, float]:
    """(forward flops per position, of which trainable) of one projection with its adapter."""
    base = 2.0 * lin.d_in * lin.d_out
    low = 2.0 * lin.rank * (lin.d_in + lin.d_out)
    return base + low, (base if lin.weight or lin.other else 0.0) + low


def _block(dec: Decoder, b: Block, positions: int) -> tuple[float, float, bool]:
    """(forward flops per position, trainable-matmul flops per position, anything trains)."""
    fwd = train = 0.0
    for lin in (b.q, b.k, b.v, b.o, b.gate, b.up, b.down):
        f, t = _linear(lin)
        fwd, train = fwd + f, train + t
    for m in (b.adapter_attn, b.adapter_mlp):
        fwd, train = fwd + 4.0 * dec.hidden * m, train + 4.0 * dec.hidden * m
    fwd += 4.0 * dec.heads * dec.head_dim * (positions / 2 + dec.prefix)
    trains = train > 0 or b.norm1 or b.norm2 or any(lin.bias for lin in (b.q, b.k, b.v, b.o, b.gate, b.up, b.down))
    return fwd, train, trains or dec.prefix > 0


def step_flops(dec: Decoder, rows: int, tokens: int) -> Flops:
    """Flops of one forward + backward over `rows` sequences of `tokens` positions."""
    positions = tokens + dec.virtual
    n = rows * positions
    grad = dec.embed or (dec.virtual > 0 and dec.virtual_trains)
    fwd = bwd = recompute = 0.0
    for b in dec.blocks:
        f, t, trains = _block(dec, b, positions)
        grad = grad or trains
        fwd += f * n
        recompute += f * n
        if grad:
            bwd += f * n + t * n  # input gradients (attention's counted twice: f includes it once) + weights'
            bwd += 4.0 * dec.heads * dec.head_dim * (positions / 2 + dec.prefix) * n
    head = 2.0 * dec.hidden * (dec.classes or dec.vocab) * (rows if dec.classes else n)
    fwd += head
    bwd += head * ((1 if grad else 0) + (1 if dec.head else 0))
    return Flops(fwd, bwd, recompute)
