"""What one training step holds in memory, counted on the model as the method left it (built on the
meta device: shapes, dtypes and `requires_grad` without a byte of weights), plus the closed-form
activations of training/activations.py and the order in which a step allocates and frees.

Counted exactly, tensor by tensor (shared tensors once):
- weights: every parameter and buffer in its dtype; a linear layer a 4-bit method quantises counts
  as NF4 (`nf4_bytes`: codes, per-block absmax, double-quantisation constants);
- gradients: one per trainable parameter, in its dtype;
- optimizer states (`optimizer_bytes`): torch AdamW keeps exp_avg and exp_avg_sq in the parameter's
  dtype plus a 4-byte step per tensor; bitsandbytes' 32-bit AdamW two fp32 states; its 8-bit AdamW
  two uint8 states with an fp32 absmax per 256-value block and two shared 256-entry maps (tensors
  under 4,096 values keep fp32 states, as bitsandbytes does). Paged optimizers count the same
  bytes (they can spill to host memory under pressure instead of failing).

Peak (`peak`): a steady-state step starts with weights and optimizer states (gradients were set to
None by the last step). The forward adds the saved activations, then the logits and their copies
around the loss; backward starts with the log-softmax gradients and walks the blocks from the last,
freeing each block's saved tensors as it allocates its gradients; the optimizer step holds every
gradient plus its own temporaries (single-tensor AdamW, as on CPU: two of the largest parameter;
multi-tensor AdamW, as on CUDA: one per trainable fp32 value). The peak is the largest of these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from peft import PeftModel
from torch import nn

from tunelab.errors import TunelabError
from tunelab.methods.partial import decoder_layers
from tunelab.training.activations import Activations, Block, Decoder, Linear

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
_PROJ = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
         "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
NF4_BLOCK, NF4_ABSMAX_BLOCK = 64, 256
BNB_MIN_8BIT, BNB_BLOCK = 4096, 256


def nf4_bytes(numel: int, double_quant: bool) -> int:
    """Bytes of one weight matrix in bitsandbytes NF4: two 4-bit codes per byte, an absmax per block of
    64 (fp32; with double quantisation uint8, plus an fp32 absmax per 256 of those, their 256-entry
    fp32 code and an fp32 offset), and the 16-entry fp32 NF4 code."""
    blocks = math.ceil(numel / NF4_BLOCK)
    absmax = blocks + 4 * math.ceil(blocks / NF4_ABSMAX_BLOCK) + 4 * 256 + 4 if double_quant else 4 * blocks
    return math.ceil(numel / 2) + absmax + 4 * 16


def optimizer_bytes(tensors: list[tuple[int, int]], kind: str) -> int:
    """States of `kind` for trainable tensors given as (numel, bytes per element)."""
    if kind == "adamw":
        return sum(2 * n * size + 4 for n, size in tensors)
    if kind.endswith("32bit"):
        return sum(8 * n for n, _ in tensors)
    if kind.endswith("8bit"):
        big = [n for n, _ in tensors if n >= BNB_MIN_8BIT]
        maps = 2 * 256 * 4 if big else 0  # the two dynamic quantisation maps, shared by every tensor
        return sum(2 * n + 8 * math.ceil(n / BNB_BLOCK) for n in big) + sum(8 * n for n, _ in tensors
                                                                         if n < BNB_MIN_8BIT) + maps
    raise ValueError(f"unknown optimizer {kind!r}")


@dataclass
class Counts:
    """Exact tensor counts of a model as the method left it."""

    weights: dict[str, int]  # bytes by storage kind: float32, bfloat16, nf4, buffers ...
    params: int  # parameters (a 4-bit weight counts its values)
    trainable: int
    trainable_tensors: list[tuple[int, int]]  # (numel, bytes per element) of each trainable tensor
    largest_trainable: int  # bytes of the largest trainable tensor
    grads_by_region: dict[str, int] = field(default_factory=dict)  # "head", "block.<i>", "embed"

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def grad_bytes(self) -> int:
        return sum(n * size for n, size in self.trainable_tensors)


def count_tensors(model: nn.Module, quantized: set[int], double_quant: bool = True) -> Counts:
    """`quantized`: ids of the weight parameters stored in 4 bits."""
    weights: dict[str, int] = {}
    seen: set[int] = set()
    params = trainable = largest = 0
    tensors: list[tuple[int, int]] = []
    regions: dict[str, int] = {}
    block_of = _block_index(model)
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        params += p.numel()
        kind, nbytes = ("nf4", nf4_bytes(p.numel(), double_quant)) if id(p) in quantized else \
            (str(p.dtype).removeprefix("torch."), p.numel() * p.element_size())
        weights[kind] = weights.get(kind, 0) + nbytes
        if p.requires_grad:
            trainable += p.numel()
            tensors.append((p.numel(), p.element_size()))
            largest = max(largest, nbytes)
            region = block_of(name)
            regions[region] = regions.get(region, 0) + nbytes
    buffers = {id(b): b for b in model.buffers()}
    if buffers:
        weights["buffers"] = sum(b.numel() * b.element_size() for b in buffers.values())
    return Counts(weights, params, trainable, tensors, largest, regions)


def _block_index(model: nn.Module) -> Any:
    """name -> "block.<i>" for a parameter inside decoder block i, "embed" for input-side ones, else "head"."""
    try:
        prefix, _ = decoder_layers(model)
    except TunelabError:  # no blocks found: everything is "head" (allocated when backward starts)
        return lambda name: "head"
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed_ids = {id(p) for p in emb.parameters()} if emb is not None else set()
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    named = dict(model.named_parameters(remove_duplicate=False))

    def region(name: str) -> str:
        if name.startswith(prefix + "."):
            return "block." + name[len(prefix) + 1:].split(".", 1)[0]
        p = named[name]
        if id(p) in head_ids:  # tied embeddings get their gradient from the head first
            return "head"
        return "embed" if id(p) in embed_ids or "prompt" in name or "prefix" in name else "head"
    return region


# ----------------------------------------------------------------------------- structure


def _trains(module: nn.Module | None) -> bool:
    return module is not None and any(p.requires_grad for p in module.parameters())


def _linear(module: nn.Module, quantized: set[int], notes: set[str]) -> Linear:
    """One projection as the method left it: plain, LoRA-family wrapped, or otherwise adapted."""
    base = module
    while hasattr(base, "base_layer"):
        base = base.base_layer
    weight = base.weight if not hasattr(base, "parametrizations") else base.parametrizations.weight.original
    d_out, d_in = (getattr(base, "out_features", None), getattr(base, "in_features", None))
    if d_out is None or d_in is None:
        d_out, d_in = weight.shape[0], weight.shape[-1]
    bias = getattr(base, "bias", None)
    lin = Linear(d_in, d_out, weight=weight.requires_grad, bias=bias is not None and bias.requires_grad,
                 quantized=id(weight) in quantized)
    if hasattr(base, "parametrizations") and _trains(base.parametrizations):
        notes.add("weight parametrisations (sparse / masked methods) save weight-sized tensors per forward: "
                  "not in the closed form")
        return Linear(d_in, d_out, other=True, bias=lin.bias)
    if base is module:
        return lin
    rank, dropout = _low_rank(module)
    if rank:
        return replace(lin, rank=rank, dropout=dropout)
    if _trains(module):
        notes.add(f"{type(module).__name__}: an adapter the closed form does not model (counted as 'input saved')")
        return replace(lin, other=True)
    return lin


def _low_rank(module: nn.Module) -> tuple[int, bool]:
    """(rank, dropout > 0) of a LoRA-family wrapper (peft LoRA / AdaLoRA, DyLoRA), else (0, False)."""
    a = getattr(module, "lora_A", None)
    if a is None:
        return 0, False
    if isinstance(a, nn.Parameter):  # DyLoRA: the rank sampled each step is at most r
        drop = getattr(module, "dropout", None)
        return a.shape[0], isinstance(drop, nn.Dropout) and drop.p > 0
    weights = {k: getattr(a[k], "weight", a[k]) for k in a}  # nn.Linear (LoRA) or a Parameter (AdaLoRA)
    active = [k for k, w in weights.items() if w.requires_grad]
    if not active or any(getattr(module, "use_dora", {}).get(k) for k in active):
        return 0, False
    drop = module.lora_dropout[active[0]]
    return int(weights[active[0]].shape[0]), isinstance(drop, nn.Dropout) and drop.p > 0


def _block(block: nn.Module, quantized: set[int], notes: set[str]) -> Block:
    """One Llama-family block: its projections, norms and bottleneck adapters (methods/adapters.py)."""
    lins = {k: _linear(block.get_submodule(path), quantized, notes) for k, path in _PROJ.items()}
    sites = {site: getattr(block.get_submodule(site), "tunelab_adapter", None) for site in ("self_attn", "mlp")}
    width = {site: a.down.out_features if a is not None else 0 for site, a in sites.items()}
    relu = all(isinstance(a.act, nn.ReLU) for a in sites.values() if a is not None)
    known = [block.get_submodule(n) for n in (*_PROJ.values(), "input_layernorm", "post_attention_layernorm")]
    known_ids = {id(p) for m in known + [a for a in sites.values() if a is not None] for p in m.parameters()}
    if any(p.requires_grad and id(p) not in known_ids for p in block.parameters()):
        notes.add("trainable parameters outside the projections, norms and adapters: not in the closed form")
    return Block(**lins, norm1=_trains(block.input_layernorm), norm2=_trains(block.post_attention_layernorm),
                 adapter_attn=width["self_attn"], adapter_mlp=width["mlp"], adapter_saves_output=relu)


def _generic_block(block: nn.Module, d: int, i: int, q: int, kv: int) -> Block:
    """A block of another architecture, as a Llama block whose projections train when any of its parameters does."""
    t = _trains(block)

    def lin(a: int, b: int) -> Linear:
        return Linear(a, b, weight=t)
    return Block(lin(d, q), lin(d, kv), lin(d, kv), lin(q, d), lin(d, i), lin(d, i), lin(i, d), norm1=t, norm2=t)


def read_decoder(model: nn.Module, hf_cfg: Any, quantized: set[int] | None = None) -> tuple[Decoder, list[str]]:
    """The closed form's view of `model` (any method applied), and notes on what it approximates.
    `quantized`: ids of the weights stored in 4 bits."""
    notes: set[str] = set()
    virtual, prefix, virtual_trains = _virtual_tokens(model)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    d = hf_cfg.hidden_size
    heads = hf_cfg.num_attention_heads
    kv = getattr(hf_cfg, "num_key_value_heads", None) or heads
    hd = getattr(hf_cfg, "head_dim", None) or d // heads
    inter = getattr(hf_cfg, "intermediate_size", None) or 4 * d
    _, blocks = decoder_layers(base)
    family = getattr(hf_cfg, "model_type", "") in LLAMA_FAMILY
    if family:
        read = [_block(b, quantized or set(), notes) for b in blocks]
    else:
        notes.add(f"the closed form is for Llama-family decoders ({', '.join(LLAMA_FAMILY)}); "
                  f"{getattr(hf_cfg, 'model_type', '?')} is approximated by it")
        read = [_generic_block(b, d, inter, heads * hd, kv * hd) for b in blocks]
    classes, head_trains = 0, False
    if isinstance(getattr(base, "head", None), nn.Linear) and hasattr(base, "body"):  # methods head, features
        classes, head_trains, base = base.head.out_features, _trains(base.head), base.body
    else:
        head_trains = base.get_output_embeddings().weight.requires_grad
    emb = base.get_input_embeddings()
    norm = getattr(getattr(base, "model", base), "norm", None)
    dec = Decoder(d, heads, kv, hd, hf_cfg.vocab_size, tuple(read), embed=_trains(emb), final_norm=_trains(norm),
                  head=head_trains, virtual=virtual, virtual_trains=virtual_trains, prefix=prefix, classes=classes)
    return dec, sorted(notes)


def _virtual_tokens(model: nn.Module) -> tuple[int, int, bool]:
    """(prompt tokens prepended, prefix key/values per block, they train) of a peft prompt-learning model."""
    if not isinstance(model, PeftModel):
        return 0, 0, False
    cfg = model.active_peft_config
    if not getattr(cfg, "is_prompt_learning", False):
        return 0, 0, False
    n = cfg.num_virtual_tokens
    if str(cfg.peft_type).endswith("PREFIX_TUNING"):
        return 0, n, True
    return n, 0, True


# ----------------------------------------------------------------------------- peak


@dataclass(frozen=True)
class Peak:
    bytes: int
    phase: str  # where it happens: forward, backward, optimizer step


def peak(static: int, counts: Counts, act: Activations, checkpointing: bool, foreach: bool) -> Peak:
    """The largest memory of a steady-state step; `static` = weights + optimizer states (+ extra models)."""
    grads = counts.grads_by_region
    head_grads = grads.get("head", 0)
    n = len(act.blocks)
    kept = [act.ckpt_input] * n if checkpointing else list(act.blocks)
    shared = act.ckpt_shared if checkpointing else act.shared
    saved = act.total(checkpointing)
    phases = [Peak(static + saved + act.fwd_transient, "forward (logits and loss)"),
              Peak(static + saved + act.bwd_transient + head_grads, "backward (loss and head)")]
    below, done = sum(kept), head_grads
    for i in range(n - 1, -1, -1):
        done += grads.get(f"block.{i}", 0)
        recompute = act.recompute if checkpointing else 0
        phases.append(Peak(static + shared + below + recompute + done, f"backward (block {i})"))
        below -= kept[i]
    step_tmp = 4 * counts.trainable if foreach else 2 * counts.largest_trainable
    phases.append(Peak(static + counts.grad_bytes + step_tmp, "optimizer step"))
    return max(phases, key=lambda p: p.bytes)
