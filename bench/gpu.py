"""GPU training speed: plain transformers + peft against tunelab's loop, on Llama-3-shaped random models.

    python bench/gpu.py [--cases lora-8b,qlora-8b,full-3b] [--sides plain,tunelab,fast] [--steps 10] [--warmup 3]
                        [--seq 2048] [--batch 4] [--peak-tflops 989] [--json docs/results/gpu.json]
    python bench/gpu.py --toy      # every row at toy size, on CPU in about a minute (tests/test_bench_gpu.py)

Cases (random weights built from the config, seeded; no hub):
- lora-8b: Llama-3.1-8B's shape (hidden 4096, 32 layers, 32 query / 8 key-value heads, MLP 14336,
  vocabulary 128256, untied head); LoRA r16, alpha 32 on every linear layer but the head; the base in
  bf16 on CUDA, the adapters in fp32 (peft's default).
- qlora-8b: the same base in NF4 with double quantisation (bitsandbytes), LoRA as above, compute in
  bf16, bitsandbytes' paged 8-bit AdamW on CUDA (tunelab's QLoRA default; AdamW on CPU).
- full-3b: Llama-3.2-3B's shape (hidden 3072, 28 layers, 24 / 8 heads, MLP 8192, tied embeddings);
  every weight trains, fp32 master weights.
Sides, each row in a fresh process (its own peak memory; liger's patches stay in it):
- plain: transformers + peft and a hand-written loop: forward with `labels`, backward, clip at 1.0,
  optimizer step, zero_grad; sdpa attention, torch's default AdamW.
- tunelab: tunelab's loop (`training.loop.Loop.train_step`, what `tunelab train` runs each step:
  the loss normalised by the batch's trained tokens, clipping, the non-finite guard); switches off.
- fast: tunelab's loop with the GPU speed switches on (docs/training.md): varlen attention
  (flash_attention_2 where flash-attn is installed, else flex_attention), liger-kernel, fused AdamW,
  torch.compile of the decoder layers. Where this machine lacks one, the row's notes say which.
Every side trains the same weights on the same packed batches (tunelab's batch stream over the same
synthetic documents: random tokens, the first quarter of each untrained as a prompt, lengths powers of
two from T/32 to T, so every packed row is exactly T tokens: fixed shapes, no recompiles), with the
same seed, lr and precision (bf16 autocast on CUDA, fp32 on CPU). So the first step's loss is the
same on every side of a case (a check, in the table).

Measured per row, over the steps after --warmup: tokens/s (non-padding tokens; the rows have no
padding), seconds per step (the GPU synchronised at the end of each), MFU, and peak memory over all
steps (CUDA: `torch.cuda.max_memory_allocated`, so weights, optimizer states and activations; CPU:
the process's peak RSS). MFU = (6 N + 12 L d T) x tokens/s / peak FLOP/s (PaLM's count, appendix B):
N every weight that takes part in a matmul (all parameters but the input embedding lookup, 4-bit
weights at their logical size, LoRA's adapters included), L layers, d the hidden size, T the row
length. It counts a full backward for every weight; a frozen weight needs no weight gradient, so
`mfu_needed` counts 6 N_trained + 4 N_frozen instead (the same for full fine-tuning). Peak FLOP/s:
--peak-tflops (989: the H200's bf16 dense figure); on CPU none unless given. Prints a table,
writes JSON with the machine and the command. docs/results/gpu.md says how to run it on a lent GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from tunelab.data.stream import BatchStream
from tunelab.data.types import IGNORE, Example
from tunelab.methods import METHODS
from tunelab.methods.qlora import QLoraConfig, quantize_
from tunelab.modeling.attention import usable_attention
from tunelab.runconfig import build_config
from tunelab.training.loop import Loop
from tunelab.training.progress import Reporter

SHAPES = {  # Meta's published configs; rope scaling left out (it changes no cost)
    "llama-3.1-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                     "tie_word_embeddings": False, "rope_theta": 500000.0},
    "llama-3.2-3b": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                     "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 128256,
                     "tie_word_embeddings": True, "rope_theta": 500000.0},
}
TOY = {"hidden_size": 64, "intermediate_size": 224, "num_hidden_layers": 2, "num_attention_heads": 4,
       "num_key_value_heads": 2, "vocab_size": 512}  # each case keeps its shape's tied/untied head
CASES = {"lora-8b": ("llama-3.1-8b", "lora"), "qlora-8b": ("llama-3.1-8b", "qlora"),
         "full-3b": ("llama-3.2-3b", "full")}
SIDES = ("plain", "tunelab", "fast")
SWITCHES = ("attention", "liger", "fused", "compile")
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
LR = 2e-4
H200_BF16_TFLOPS = 989.0
GIB = 2**30


# ----------------------------------------------------------------------------- one row (in its own process)


def shape_config(shape: str, toy: bool, seq: int) -> LlamaConfig:
    dims = {**TOY, "tie_word_embeddings": SHAPES[shape]["tie_word_embeddings"]} if toy else SHAPES[shape]
    return LlamaConfig(**dims, max_position_embeddings=max(seq, 8192), pad_token_id=0, bos_token_id=1,
                       eos_token_id=2)


def documents(rows: int, seq: int, vocab: int, seed: int) -> list[Example]:
    """Documents that pack into exactly `rows` rows of `seq` tokens: each row cut at random into pieces whose
    lengths are powers of two from seq/32 to seq (best-fit decreasing packs such pieces without a gap)."""
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        stack = [seq]
        while stack:
            n = stack.pop()
            if n > seq // 32 and rng.random() < 0.6:
                stack += [n // 2, n // 2]
                continue
            ids = [rng.randrange(3, vocab) for _ in range(n)]
            out.append(Example(ids, [IGNORE] * (n // 4) + ids[n // 4:], where=f"doc:{len(out)}"))
    return out


def build_model(hf: LlamaConfig, attn: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(hf, dtype=dtype, attn_implementation=attn)


def fast_attention(cuda: bool) -> tuple[str, list[str]]:
    """flash_attention_2 where it runs, else flex_attention (CUDA), else what tunelab falls back to."""
    impl, note = usable_attention("flash_attention_2")
    if impl == "flash_attention_2" or not cuda:
        return impl or "sdpa", [note] if note else []
    return "flex_attention", [f"{note} -> flex_attention instead"]


def matmul_params(hf: LlamaConfig) -> int:
    """Weights that take part in a matmul: all but the input embedding lookup (the head's counted, tied or not)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    total = sum(p.numel() for p in model.parameters())  # a tied embedding is counted once, as the head
    return total if hf.tie_word_embeddings else total - hf.vocab_size * hf.hidden_size


class Notes(Reporter):
    """tunelab's reporter, its lines kept for the row's notes instead of printed."""

    def __init__(self) -> None:
        super().__init__(None, quiet=True)
        self.lines: list[str] = []

    def say(self, text: str) -> None:
        self.lines.append(text)


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def plain_steps(model: torch.nn.Module, method: str, stream: BatchStream, n: int,
                cuda: bool) -> tuple[list[dict], int]:
    """The hand-written loop: transformers + peft as a user writes it."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if method in ("lora", "qlora"):
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=LORA["r"], lora_alpha=LORA["alpha"],
                                                 lora_dropout=LORA["dropout"], target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "qlora" and cuda:
        import bitsandbytes as bnb

        opt: torch.optim.Optimizer = bnb.optim.PagedAdamW8bit(params, lr=LR)
    else:
        opt = torch.optim.AdamW(params, lr=LR)
    model.train()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()  # from the batch's collation on, as tunelab's step
        batch = {k: v.to(model.device) for k, v in stream.next_group(1)[0].tensors.items()}
        with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                         use_cache=False).loss  # no KV cache: transformers then reads the packed documents
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(cuda)
        out.append({"seconds": time.perf_counter() - t0, "tokens": int(batch["input_ids"].numel()),
                    "loss": float(loss.detach())})
    return out, sum(p.numel() for p in params)


def tunelab_steps(model: torch.nn.Module, method_cfg: dict, examples: list[Example], s: dict, fast: set[str],
                  attn: str, cuda: bool, notes: list[str]) -> tuple[list[dict], int]:
    """tunelab's loop, its public step, as `tunelab train` builds it (the method applied, then the Loop)."""
    cfg = build_config({
        "model": {"name_or_path": "random", "attn_implementation": attn},
        "data": {"train": "synthetic", "max_length": s["seq"], "packing": True},
        "method": method_cfg, "objective": {"name": "sft"},
        "train": {"batch_size": s["batch"], "max_steps": s["warmup"] + s["steps"], "lr": LR, "seed": 0,
                  "tensorboard": False, "fused_optimizer": "fused" in fast, "liger": "liger" in fast,
                  "compile": "compile" in fast},
    })
    model = METHODS[cfg.method.name].apply(model, cfg.method)
    reporter = Notes()
    with tempfile.TemporaryDirectory() as run_dir:
        loop = Loop(cfg, Path(run_dir), model, examples, None, 0, "synthetic", reporter)
        notes += reporter.lines
        out = []
        for _ in range(s["warmup"] + s["steps"]):
            t0 = time.perf_counter()
            m = loop.train_step()  # reads the gradient norm: the host waits for the GPU every step
            sync(cuda)
            out.append({"seconds": time.perf_counter() - t0, "tokens": int(m["tokens"]), "loss": float(m["loss"])})
        trained = sum(p.numel() for p in loop.params)
    return out, trained


def run_row(case: str, side: str, s: dict) -> dict:
    shape, method = CASES[case]
    cuda = torch.cuda.is_available() and not s["toy"]
    row: dict[str, Any] = {"case": case, "side": side, "shape": shape + (" (toy)" if s["toy"] else ""),
                           "method": method, "device": "cuda" if cuda else "cpu", "notes": []}
    if method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        return {**row, "status": "needs bitsandbytes (pip install 'tunelab[qlora]')"}
    fast = set(s["switches"]) if side == "fast" else set()
    row["switches"] = sorted(fast)  # asked for; the notes say which of them this machine could not run
    attn = "sdpa"
    if "attention" in fast:
        attn, lines = fast_attention(cuda)
        row["notes"] += lines
    hf = shape_config(shape, s["toy"], s["seq"])
    dtype = torch.bfloat16 if cuda and method != "full" else torch.float32
    model = build_model(hf, attn, dtype, "cuda" if cuda else "cpu")
    compute = "bfloat16" if cuda else "float32"
    if method == "qlora" and side == "plain":  # tunelab's QLoRA quantises inside its method; plain does it here
        quantize_(model, QLoraConfig(compute_dtype=compute))
    examples = documents(s["batch"] * (s["warmup"] + s["steps"]) + s["batch"], s["seq"], hf.vocab_size, seed=1)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if side == "plain":
        stream = BatchStream(examples, batch_size=s["batch"], packing=True, max_length=s["seq"], seed=0, pad_id=0)
        steps, trained = plain_steps(model, method, stream, s["warmup"] + s["steps"], cuda)
    else:
        method_cfg = {"name": method, **(LORA if method != "full" else {}),
                      **({"compute_dtype": compute} if method == "qlora" else {})}
        steps, trained = tunelab_steps(model, method_cfg, examples, s, fast, attn, cuda, row["notes"])
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    timed = steps[s["warmup"]:]
    seconds = sum(x["seconds"] for x in timed)
    rate = sum(x["tokens"] for x in timed) / seconds
    base = matmul_params(hf)
    n_all, n_trained = (base, base) if method == "full" else (base + trained, trained)
    attention = 12 * hf.num_hidden_layers * hf.hidden_size * s["seq"]
    peak_flops = s["peak_tflops"] * 1e12 if s["peak_tflops"] else None
    return {**row, "status": "ok", "tokens_per_s": rate, "step_seconds": seconds / len(timed),
            "mfu": (6 * n_all + attention) * rate / peak_flops if peak_flops else None,
            "mfu_needed": (6 * n_trained + 4 * (n_all - n_trained) + attention) * rate / peak_flops
            if peak_flops else None,
            "peak_memory_bytes": peak, "peak_memory_kind": "cuda max allocated" if cuda else "process peak RSS",
            "first_loss": steps[0]["loss"], "losses": [x["loss"] for x in steps],
            "step_times": [x["seconds"] for x in steps],  # warm-up steps included
            "params_matmul": n_all, "params_trained": n_trained, "attention": attn}


# ----------------------------------------------------------------------------- the table (the parent process)


def machine() -> dict:
    versions = {}
    for pkg in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "liger-kernel", "flash-attn", "triton"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[pkg] = importlib.metadata.version(pkg)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"gpu": gpu, "cpu": f"{platform.machine()} {os.cpu_count()} cores", "python": platform.python_version(),
            "packages": versions}


def row_in_process(case: str, side: str, s: dict) -> dict:
    """One row in a fresh Python process; its failure (out of memory, a missing kernel) becomes the row's status."""
    cmd = [sys.executable, __file__, "--row", f"{case}:{side}", "--settings", json.dumps(s)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=s["row_timeout"])
    except subprocess.TimeoutExpired:
        return {"case": case, "side": side, "status": f"error: no result within {s['row_timeout']} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("ROW "):
            return json.loads(line[4:])
    tail = [x for x in done.stderr.strip().splitlines() if x.strip()][-1:] or ["no output"]
    return {"case": case, "side": side, "status": f"error: {tail[0][:300]}"}


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    lines = [f"{'case':<10}{'side':<9}{'tokens/s':>11}{'s/step':>9}{'MFU':>7}{'needed':>8}{'peak GiB':>10}"
             f"{'loss@1':>9}  status"]
    for r in rows:
        ok = r.get("status") == "ok"
        lines.append(f"{r['case']:<10}{r['side']:<9}{fmt(r.get('tokens_per_s'), ',.0f'):>11}"
                     f"{fmt(r.get('step_seconds'), '.3f'):>9}{fmt(r.get('mfu'), '.3f'):>7}"
                     f"{fmt(r.get('mfu_needed'), '.3f'):>8}"
                     f"{fmt(r['peak_memory_bytes'] / GIB if ok else None, '.2f'):>10}"
                     f"{fmt(r.get('first_loss'), '.4f'):>9}  {r['status']}")
    for r in rows:
        for note in r.get("notes", []):
            lines.append(f"  {r['case']} {r['side']}: {note}")
    return "\n".join(lines)


def ratios(rows: list[dict]) -> dict[str, dict[str, float]]:
    """tokens/s of tunelab and fast over plain, per case (where both ran)."""
    rate = {(r["case"], r["side"]): r["tokens_per_s"] for r in rows if r.get("status") == "ok"}
    out: dict[str, dict[str, float]] = {}
    for case in dict.fromkeys(r["case"] for r in rows):
        plain = rate.get((case, "plain"))
        for side in ("tunelab", "fast"):
            if plain and (case, side) in rate:
                out.setdefault(case, {})[f"{side}_over_plain"] = rate[(case, side)] / plain
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--switches", default=",".join(SWITCHES), help="what the fast side turns on")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10; --toy 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; --toy 1)")
    ap.add_argument("--seq", type=int, default=None, help="row length T (default 2048; --toy 128)")
    ap.add_argument("--batch", type=int, default=None, help="rows per step (default 4; --toy 2)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help=f"the device's peak FLOP/s for MFU (default on CUDA: {H200_BF16_TFLOPS:g}, an H200's bf16 "
                    "dense; on CPU: none)")
    ap.add_argument("--toy", action="store_true", help="toy shapes on CPU: checks the script, measures nothing")
    ap.add_argument("--row-timeout", type=int, default=1200)
    ap.add_argument("--in-process", action="store_true",
                    help="every row in this process (one import; peak memory is then the whole run's): for tests")
    ap.add_argument("--json", default=None, help="default docs/results/gpu.json (--toy: gpu-toy.json)")
    ap.add_argument("--row", help=argparse.SUPPRESS)
    ap.add_argument("--settings", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.row:  # a child: one row, printed as one JSON line
        case, side = args.row.split(":")
        print("ROW " + json.dumps(run_row(case, side, json.loads(args.settings))), flush=True)
        return
    toy = args.toy
    if toy:  # the toy run is the CPU's, also where there is a GPU (tunelab's loop would take it); children inherit
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    cases, sides = args.cases.split(","), args.sides.split(",")
    switches = [x for x in args.switches.split(",") if x]
    bad = [x for x in cases if x not in CASES] + [x for x in sides if x not in SIDES] + \
        [x for x in switches if x not in SWITCHES]
    if bad:
        ap.error(f"unknown: {', '.join(bad)} (cases {', '.join(CASES)}; sides {', '.join(SIDES)}; switches "
                 f"{', '.join(SWITCHES)})")
    cuda = torch.cuda.is_available() and not toy
    peak = args.peak_tflops if args.peak_tflops is not None else (H200_BF16_TFLOPS if cuda else None)
    s = {"toy": toy, "steps": args.steps or (3 if toy else 10), "warmup": args.warmup if args.warmup is not None
         else (1 if toy else 3), "seq": args.seq or (128 if toy else 2048), "batch": args.batch or (2 if toy else 4),
         "peak_tflops": peak, "switches": switches, "row_timeout": args.row_timeout, "in_process": args.in_process}
    rows = []
    for case in cases:
        for side in sides:
            rows.append(run_row(case, side, s) if args.in_process else row_in_process(case, side, s))
            print(f"{case} {side}: {rows[-1]['status']}", file=sys.stderr, flush=True)
    result = {"command": "python " + " ".join(sys.argv), "machine": machine(), "settings": s,
              "formula": "mfu = (6 N + 12 L d T) x tokens/s / peak; mfu_needed: 6 N_trained + 4 N_frozen + 12 L d T",
              "rows": rows, "ratios": ratios(rows)}
    print(table(rows))
    for case, r in result["ratios"].items():
        print(f"{case}: " + ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in r.items()))
    out = Path(args.json or ("docs/results/gpu-toy.json" if toy else "docs/results/gpu.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
