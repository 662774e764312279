"""Activation memory of one training step, in closed form: the bytes autograd keeps for backward
(exactly what `torch.autograd.graph.saved_tensors_hooks` is handed, each storage once, parameters
excluded) for a Llama-family decoder — Llama, Mistral, Qwen2: pre-norm RMSNorm, RoPE, SDPA
attention, SwiGLU MLP — with any mix of trainable weights, biases, norms, low-rank adapters,
bottleneck adapters and virtual tokens. Pure: dimensions and flags in, bytes out (no torch).

One rule of autograd gives every term: an op saves a tensor only if a gradient needs it. A matmul
y = x W^T saves x when W trains (for dW) and W when x needs a gradient (for dx; W is a
parameter, not counted, except under autocast where the saved W is a 2-byte copy). Per block, with
n = rows x positions, d hidden, i MLP width, h x hd query width, kv x hd key/value width, s bytes
of the residual stream (4 fp32; 2 for bf16/fp16 weights), a = bytes of matmul outputs (s; 2 under
autocast):

    tensor                                       elements        saved when
    block input x (RMSNorm pow, x * rstd)        n d    (s)      x needs a gradient
    rstd = rsqrt(mean(x^2) + eps)                n      (4)      x needs a gradient
    x_hat (normalised, before the weight)        n d    (s)      the norm weight trains
    norm output y (input of q, k, v)             n d    (s)      W_q, W_k or W_v trains
    q, k, v after RoPE (SDPA inputs)             n (h + 2 kv') hd any of q, k, v needs a gradient
    attention output (o_proj input)              n h hd (a)      same, or W_o trains
    log-sum-exp of the attention rows            n h    (4)      same as q, k, v
    post-attention norm: x2, rstd2, x_hat2, y2   as above        as above (W_gate or W_up for y2)
    gate (SiLU input), SiLU(gate), up            3 n i  (a)      gate / up need gradients
    SiLU(gate) * up (down_proj input)            n i    (a)      W_down trains

kv' = kv when the batch has no padding mask (SDPA repeats heads itself); with one, transformers
repeats k and v to h heads first (`repeat_kv`) and saves the copies (kv' = h); SDPA also turns
the boolean padding mask into an additive one in q's dtype, per block, and saves it (rows x
positions x key positions). Shared by every block, counted once: RoPE's cos and sin
(2 x positions x hd x s). A LoRA-family adapter on a projection saves its input (peft first casts
it to the adapter's dtype; with dropout > 0 a dropout copy plus its mask: bool on CUDA, the input's
dtype on CPU) and A x (n r); a bottleneck adapter its input, the bottleneck (n m) and, with ReLU,
its output. The head saves the final norm's tensors, the LM head's input when it trains, and the
loss's: token NLL (sft, lm) keeps the fp32 log-softmax of n (V) values and the shifted labels;
sequence log-probs (dpo) the same over every position.

Autocast (bf16/fp16 over fp32 weights) casts each matmul's input anew (a 2-byte copy per matmul,
so q, k and v each save their own copy of y) and saves a 2-byte copy of every weight on the
gradient path; norms, RoPE products and the residual stream stay fp32.

With gradient checkpointing (non-reentrant, per block) the forward keeps only each block's input
(n d s) plus what is shared and the head; backward recomputes one block at a time, whose saved
set is then alive on top (`recompute`). Transients (`fwd_transient`, `bwd_transient`) are the
largest tensors alive beside the saved ones: the logits and their copies around the loss, and the
gradients of the log-softmax.

Assumptions: training mode, SDPA attention (flash or memory-efficient kernels: no T x T
probabilities saved; the math kernel would save them), a padded batch (so a 4-D mask exists),
`position_ids` shared by the rows (no packing), no dropout inside the base model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

MASK_BYTES = 1  # CUDA's fused dropout keeps a bool mask


@dataclass(frozen=True)
class Linear:
    """One projection of a block as the method left it."""

    d_in: int
    d_out: int
    weight: bool = False  # W trains
    bias: bool = False  # a bias trains (nothing saved; the gradient flows from here on)
    rank: int = 0  # a low-rank adapter x -> A (r, in) -> B (out, r): LoRA, QLoRA, DyLoRA (its largest rank)
    dropout: bool = False  # dropout on the adapter's input
    other: bool = False  # trainable parts the formula does not know (taken as: the input is saved)
    quantized: bool = False  # a frozen 4-bit base: bitsandbytes saves only its packed weight (no copy)


@dataclass(frozen=True)
class Block:
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    gate: Linear
    up: Linear
    down: Linear
    norm1: bool = False  # input_layernorm weight trains
    norm2: bool = False  # post_attention_layernorm weight trains
    adapter_attn: int = 0  # bottleneck width of an adapter after the attention output (0: none)
    adapter_mlp: int = 0  # ... after the MLP output
    adapter_saves_output: bool = True  # ReLU saves its output; GELU / SiLU their input


@dataclass(frozen=True)
class Decoder:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    blocks: tuple[Block, ...]
    embed: bool = False  # the token embedding trains
    final_norm: bool = False
    head: bool = False  # the LM head's weight trains (tied: the embedding)
    virtual: int = 0  # prompt-tuning virtual tokens prepended to every row
    virtual_trains: bool = False
    prefix: int = 0  # prefix-tuning key/value positions in every block (they train)
    classes: int = 0  # a classification / scalar head replaces the LM head (its width)


@dataclass(frozen=True)
class Precision:
    weights: int = 4  # bytes of a float weight and of the residual stream: 4 fp32, 2 bf16/fp16
    autocast: bool = False  # bf16/fp16 autocast over the weights: matmuls in 2 bytes
    cpu: bool = False  # dropout on CPU keeps a mask in the input's dtype (CUDA's fused kernel: 1-byte bool)


@dataclass(frozen=True)
class Activations:
    saved: int  # bytes saved for backward at the end of the forward, no checkpointing
    blocks: tuple[int, ...]  # of which each block's own
    head: int  # final norm, LM head and loss
    shared: int  # RoPE tables, attention mask, token ids
    checkpointed: int  # kept by the forward with gradient checkpointing: block inputs + ckpt_shared + ckpt_head
    ckpt_input: int  # one block's input, kept per block under checkpointing
    ckpt_shared: int
    ckpt_head: int
    recompute: int  # one block's saved set, alive again while backward recomputes it
    fwd_transient: int  # largest extra alive around the loss in the forward (logits, copies)
    bwd_transient: int  # largest extra alive at the start of backward (log-softmax gradients)
    weight_copies: int = 0  # autocast's saved 2-byte weight copies (part of saved)

    def total(self, checkpointing: bool) -> int:
        return self.checkpointed if checkpointing else self.saved


@dataclass
class _T:
    """A tensor of the forward: `width` elements per position, `size` bytes each."""

    key: str
    width: int
    size: int
    grad: bool


@dataclass
class _Saved:
    n: int  # rows x positions
    p: Precision
    tensors: dict[str, int] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=dict)  # autocast weight copies (no positions)
    attention: bool = False  # SDPA saved its inputs (so the shared RoPE tables and mask are kept)

    def add(self, t: _T, n: int | None = None) -> None:
        self.tensors.setdefault(t.key, (self.n if n is None else n) * t.width * t.size)

    def total(self) -> int:
        return sum(self.tensors.values()) + sum(self.weights.values())


def _promote(a: _T, b: _T) -> int:
    return max(a.size, b.size)


def _matmul(s: _Saved, x: _T, key: str, d_out: int, trains: bool, bias: bool, w_numel: int,
            quantized: bool = False) -> _T:
    """x W^T (+ b): saves x when W trains; under autocast the input is a fresh 2-byte copy and a
    2-byte copy of W is saved when x needs a gradient (not for a 4-bit W: it is dequantised again)."""
    xin = x
    if s.p.autocast and x.size != 2 and trains:
        xin = _T(f"{key}.in", x.width, 2, x.grad)
    if trains:
        s.add(xin)
    if s.p.autocast and x.grad and not quantized:
        s.weights.setdefault(f"{key}.w", 2 * w_numel)
    size = 2 if s.p.autocast else s.p.weights
    return _T(f"{key}.out", d_out, size, x.grad or trains or bias)


def _linear(s: _Saved, x: _T, key: str, lin: Linear) -> _T:
    out = _matmul(s, x, key, lin.d_out, lin.weight or lin.other, lin.bias, lin.d_in * lin.d_out, lin.quantized)
    if lin.rank:  # peft casts the adapter's input to the adapter's dtype (the weights') first
        a_in = x if x.size == s.p.weights else _T(f"{key}.cast", x.width, s.p.weights, x.grad)
        if lin.dropout:
            if x.grad:
                s.add(_T(f"{key}.mask", x.width, a_in.size if s.p.cpu else MASK_BYTES, True))
            a_in = _T(f"{key}.drop", x.width, a_in.size, x.grad)
        a = _matmul(s, a_in, f"{key}.A", lin.rank, True, False, lin.rank * lin.d_in)
        _matmul(s, a, f"{key}.B", lin.d_out, True, False, lin.rank * lin.d_out)
        out = replace(out, grad=True)
    return out


def _rmsnorm(s: _Saved, x: _T, key: str, trains: bool) -> _T:
    """w * (x * rsqrt(mean(x^2) + eps)), computed in fp32 (a bf16 input is first copied to fp32)."""
    if x.grad:
        s.add(x if x.size == 4 else _T(f"{key}.x32", x.width, 4, True))
        s.add(_T(f"{key}.rstd", 1, 4, True))
    if trains:
        s.add(_T(f"{key}.xhat", x.width, x.size, True))
    return _T(f"{key}.out", x.width, x.size, x.grad or trains)


def _bottleneck(s: _Saved, z: _T, key: str, m: int, d: int, saves_output: bool) -> _T:
    """z + up(act(down(z))), every part trainable."""
    dn = _matmul(s, z, f"{key}.down", m, True, True, d * m)
    act = _T(f"{key}.act", m, dn.size, True)
    s.add(act if saves_output else dn)
    up = _matmul(s, act, f"{key}.up", d, True, True, m * d)
    return _T(f"{key}.res", d, _promote(z, up), True)


@dataclass(frozen=True)
class _Shape:
    rows: int
    positions: int  # per row, virtual tokens included
    kv_positions: int  # positions + prefix
    padded: bool


def _attention(s: _Saved, dec: Decoder, b: Block, y: _T, sh: _Shape, res_size: int) -> _T:
    q = _linear(s, y, "q", b.q)
    k = _linear(s, y, "k", b.k)
    v = _linear(s, y, "v", b.v)
    prefix = dec.prefix > 0
    qkv_grad = q.grad or k.grad or v.grad or prefix
    rows, hd = sh.rows, dec.head_dim
    # RoPE: the rotated q, k are new tensors (promoted to the residual dtype); cos/sin are shared (_shared)
    q = _T("q.rope", dec.heads * hd, max(q.size, res_size), q.grad)
    k = _T("k.rope", dec.kv_heads * hd, max(k.size, res_size), k.grad)
    kv_width = dec.heads * hd if sh.padded and dec.kv_heads < dec.heads else dec.kv_heads * hd
    n_kv = rows * sh.kv_positions
    s.attention = s.attention or qkv_grad
    if qkv_grad:
        sdpa_size = 2 if s.p.autocast else None
        for t, width in ((q, q.width), (k, kv_width), (v, kv_width)):
            size = sdpa_size or t.size
            same = width == t.width and size == t.size and not (prefix and t is not q)
            saved = t if same else _T(f"{t.key}.sdpa", width, size, True)
            s.add(saved, None if t is q else n_kv)
        s.add(_T("lse", dec.heads, 4, True))
        if sh.padded:  # SDPA turns the boolean mask into an additive one in q's dtype, per call
            s.add(_T("mask", sh.kv_positions, sdpa_size or q.size, True))
    out = _T("attn", dec.heads * hd, 2 if s.p.autocast else max(q.size, v.size), qkv_grad)
    if qkv_grad:
        s.add(out)
    return _linear(s, out, "o", b.o)


def _mlp(s: _Saved, b: Block, y: _T) -> _T:
    gate = _linear(s, y, "gate", b.gate)
    up = _linear(s, y, "up", b.up)
    if gate.grad:
        s.add(gate)  # SiLU saves its input
    act = _T("silu", gate.width, gate.size, gate.grad)
    if up.grad:
        s.add(act)
    if act.grad:
        s.add(up)
    prod = _T("prod", gate.width, _promote(act, up), act.grad or up.grad)
    return _linear(s, prod, "down", b.down)


def _block(dec: Decoder, b: Block, x: _T, sh: _Shape, p: Precision) -> tuple[_Saved, _T]:
    """What one block saves, and its output."""
    s = _Saved(sh.rows * sh.positions, p)
    y = _rmsnorm(s, x, "norm1", b.norm1)
    o = _attention(s, dec, b, y, sh, x.size)
    if b.adapter_attn:
        o = _bottleneck(s, o, "adapter_attn", b.adapter_attn, dec.hidden, b.adapter_saves_output)
    h = _T("h2", dec.hidden, _promote(x, o), x.grad or o.grad)
    y2 = _rmsnorm(s, h, "norm2", b.norm2)
    m = _mlp(s, b, y2)
    if b.adapter_mlp:
        m = _bottleneck(s, m, "adapter_mlp", b.adapter_mlp, dec.hidden, b.adapter_saves_output)
    return s, _T("x", dec.hidden, _promote(x, m), x.grad or m.grad)


@dataclass(frozen=True)
class _Head:
    saved: int
    weight_copies: int
    fwd_transient: int
    bwd_transient: int


def _head(dec: Decoder, x: _T, sh: _Shape, p: Precision, loss: str, tokens: int) -> _Head:
    """Final norm, LM head (or classification head) and the loss over `tokens` positions per row."""
    s = _Saved(sh.rows * sh.positions, p)
    y = _rmsnorm(s, x, "norm", dec.final_norm)
    rows = sh.rows
    if dec.classes or loss == "classify":  # one pooled position per row, a small head
        if dec.head:
            s.add(_T("pooled", dec.hidden, y.size, True), rows)
        small = rows * max(dec.classes, 1) * 4
        return _Head(s.total() + small, sum(s.weights.values()), small, 2 * small)
    logits = _matmul(s, y, "lm_head", dec.vocab, dec.head, False, dec.vocab * dec.hidden)
    full = rows * sh.positions * dec.vocab * logits.size
    if not logits.grad:
        return _Head(s.total(), sum(s.weights.values()), full, 0)
    # token NLL (sft, lm): logits[:, :-1] is copied (reshape of a strided slice), upcast to fp32 when
    # it is not, log-softmax kept (fp32) with the shifted labels (int64). Sequence log-probs (dpo):
    # every position's log-softmax; the fp32 view needs no copy unless virtual tokens are sliced off.
    shifted = tokens - 1 if loss == "nll" else tokens
    n_lsm = rows * shifted * dec.vocab
    copies = 0
    if loss == "nll":
        copies = n_lsm * logits.size
    if logits.size != 4 or (loss != "nll" and dec.virtual):
        copies += n_lsm * 4
    saved = s.total() + n_lsm * 4 + rows * shifted * 8
    return _Head(saved, sum(s.weights.values()), full + copies, 2 * n_lsm * 4)


def _shared(dec: Decoder, sh: _Shape, p: Precision, attention_grad: bool) -> int:
    """Tensors every block uses, counted once: RoPE cos/sin; token ids for the embeddings."""
    total = 0
    if attention_grad:
        total += 2 * sh.positions * dec.head_dim * p.weights
    if dec.embed:
        total += sh.rows * (sh.positions - dec.virtual) * 8
    if dec.virtual and dec.virtual_trains:
        total += sh.rows * dec.virtual * 8
    return total


def activations(dec: Decoder, rows: int, tokens: int, p: Precision, loss: str = "nll",
                padded: bool = True) -> Activations:
    """The activation memory of one micro-batch of `rows` sequences of `tokens` positions.

    `loss`: "nll" (token NLL: sft, lm, distill), "sequence" (per-sequence log-probs: dpo), "classify"."""
    positions = tokens + dec.virtual
    sh = _Shape(rows, positions, positions + dec.prefix, padded)
    x = _T("x", dec.hidden, p.weights, dec.embed or (dec.virtual > 0 and dec.virtual_trains))
    blocks, copies = [], 0
    attention_grad = False
    for b in dec.blocks:
        s, x = _block(dec, b, x, sh, p)
        blocks.append(s.total())
        copies += sum(s.weights.values())
        attention_grad = attention_grad or s.attention
    head = _head(dec, x, sh, p, loss, tokens)
    shared = _shared(dec, sh, p, attention_grad)
    # Checkpointing: the loop makes the embeddings' output require grad, so every block is on the
    # gradient path; the forward keeps each block's input, the backward one block's saved set.
    x_in = _T("x", dec.hidden, p.weights, True)
    recompute = max((_block(dec, b, x_in, sh, p)[0].total() for b in set(dec.blocks)), default=0)
    head_ckpt = _head(dec, x_in, sh, p, loss, tokens)
    one_input = rows * positions * dec.hidden * p.weights
    # the boolean 4-D mask is an input of every checkpointed block, so it stays alive too
    ckpt_shared = _shared(dec, sh, p, True) + (rows * positions * sh.kv_positions if padded else 0)
    return Activations(
        saved=sum(blocks) + head.saved + shared, blocks=tuple(blocks), head=head.saved, shared=shared,
        checkpointed=len(dec.blocks) * one_input + ckpt_shared + head_ckpt.saved, ckpt_input=one_input,
        ckpt_shared=ckpt_shared, ckpt_head=head_ckpt.saved, recompute=recompute,
        fwd_transient=head.fwd_transient, bwd_transient=head.bwd_transient,
        weight_copies=copies + head.weight_copies,
    )

