"""`tunelab advise` against measurement on a CUDA GPU: docs/results/advise-gpu.md.

    PYTHONPATH=src python bench/advise_gpu.py [--quick] [--device cuda|cpu] [--tiny] [--out DIR] [--budget-s 330]

The GPU counterpart of bench/advise.py (whose model, batch, step and counting code it imports).
For every cell of shape x method x objective x sequence length x checkpointing (Llama-3-shaped
random models: llama-1b, hidden 2048, 16 blocks, tied embeddings; llama-8b, hidden 4096, 32 blocks;
both 32 query / 8 key-value heads and vocabulary 128256; batch 4 sequences, dpo 4 pairs, the last
row padded by a quarter) it builds the model on the device (fp32 master weights, as `tunelab train`
holds them), applies the method, prepares model and optimizer with accelerate at the precision the
loop picks (bf16 autocast on a bf16 GPU) and runs the loop's steps: the objective's loss, backward,
clipping, AdamW, zero_grad. Measured:
- weights, trainable parameters, gradients, optimizer states, extra models: the tensors themselves
  after the first step (unique storages), compared with the estimate for exact equality;
- peak: `torch.cuda.max_memory_allocated()` over the second step (reset just before it; absolute,
  so it includes the weights, states and inputs; None on CPU);
- time: the median of steps 3-5 (synchronised), and the MFU it implies (advise's flops per step /
  seconds / the device's bf16 peak; on CPU the share of the measured fp32 GEMM rate).
Estimated: `tunelab.recipes.advise` (prepare / estimate / step_time) on the model's config.json
with the same overrides, for the device measured (h200 on CUDA: bf16 autocast, 40 % MFU assumed).
`--budget-s`: no cell starts after that many seconds from launch; the files are rewritten after
every cell, so an interrupted run keeps what it finished. `--tiny`: hidden 64, 2 blocks, vocabulary
512, sequences 64 / 128 (a smoke test of the script on CPU).
"""

# ruff: noqa: E402
from __future__ import annotations

import time

T0 = time.perf_counter()  # the budget counts the imports too

import argparse
import gc
import json
import platform
import sys
import tempfile
from pathlib import Path
from statistics import median

import torch
import transformers
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from advise import build, counted, estimate, make_batch, ratio, step  # bench/advise.py
from transformers import LlamaConfig

from tunelab.recipes import advise as adv

ROOT = Path(__file__).resolve().parents[1]
GPU = "h200"  # what advise is asked for on CUDA (its data-sheet peak is the MFU's denominator)
SHAPES = {  # Llama 3.2 1B and Llama 3.1 8B shapes; random weights
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True},
    "llama-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False},
}
TINY = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512}
TINY_SEQ = {512: 64, 2048: 128}
OVERRIDES = {"full": [], "lora": ["r=16"], "adapters": [], "prompt": []}  # advise and the measurement alike
BATCH = 4
GIB = 2**30
# (shape, method, objective, seq, gradient checkpointing); 1b first (cheap), then 8b, the largest (advise: 123 GiB)
# last; no 8b full (fp32 weights, gradients and AdamW's two states: 4 x 30 GiB before any activation)
CELLS = [
    ("llama-1b", "lora", "sft", 512, False),  # --quick
    ("llama-1b", "lora", "sft", 2048, False),
    ("llama-1b", "lora", "sft", 2048, True),
    ("llama-1b", "full", "sft", 512, False),
    ("llama-1b", "full", "sft", 2048, False),
    ("llama-1b", "full", "sft", 2048, True),
    ("llama-1b", "lora", "dpo", 512, False),
    ("llama-1b", "lora", "dpo", 2048, False),
    ("llama-1b", "adapters", "sft", 512, False),
    ("llama-1b", "adapters", "sft", 2048, False),
    ("llama-1b", "prompt", "sft", 512, False),
    ("llama-1b", "prompt", "sft", 2048, False),
    ("llama-8b", "lora", "sft", 512, False),
    ("llama-8b", "lora", "sft", 512, True),
    ("llama-8b", "lora", "sft", 2048, True),
    ("llama-8b", "lora", "dpo", 512, False),
    ("llama-8b", "lora", "dpo", 2048, True),
    ("llama-8b", "adapters", "sft", 2048, False),
    ("llama-8b", "prompt", "sft", 2048, False),
    ("llama-8b", "lora", "sft", 2048, False),
]
EXACT = ("weights", "extras", "trainable", "gradients", "optimizer")


def shape_config(shape: str, tiny: bool) -> LlamaConfig:
    dims = {**TINY, "tie_word_embeddings": SHAPES[shape]["tie_word_embeddings"]} if tiny else SHAPES[shape]
    return LlamaConfig(**dims, max_position_embeddings=8192)


def describe(shape: str, tiny: bool) -> str:
    c = shape_config(shape, tiny)
    return (f"{shape}{' (tiny)' if tiny else ''}: hidden {c.hidden_size}, MLP {c.intermediate_size}, "
            f"{c.num_hidden_layers} blocks, {c.num_attention_heads}/{c.num_key_value_heads} heads, vocab "
            f"{c.vocab_size}, {'tied' if c.tie_word_embeddings else 'untied'} embeddings")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def mixed_precision(device: str) -> str:
    """accelerate's setting as training/loop.py picks it for precision auto."""
    return "bf16" if device == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def measure(cfg_dir: Path, method: str, objective: str, seq: int, ckpt: bool, device: str, mixed: str) -> dict:
    """Build, prepare as training/loop.py does, run 5 steps: counts after the first, peak over the second,
    the median time of the last 3."""
    cuda = device == "cuda"
    baseline = torch.cuda.memory_allocated() if cuda else None  # left over from earlier cells (cuBLAS workspace)
    t0 = time.perf_counter()
    AcceleratorState._reset_state(reset_partial_state=False)  # as the loop does, one state per run
    acc = Accelerator(mixed_precision=mixed, cpu=not cuda)
    model, runtime, opt, params = build(cfg_dir, method, objective, ckpt, OVERRIDES[method], device)
    model, wrapped = acc.prepare(model, opt)  # the forward under autocast, its outputs cast back to fp32
    autocast = acc.mixed_precision == "bf16"
    hf = model.config
    batch = make_batch(BATCH * (2 if objective == "dpo" else 1), seq, objective == "dpo", hf.vocab_size, device)
    sync(device)
    build_s = time.perf_counter() - t0
    step(model, runtime, wrapped, batch, params, autocast=autocast, device=device)  # allocates the optimizer states
    c = counted(model, runtime, opt, batch)
    if cuda:
        sync(device)
        torch.cuda.reset_peak_memory_stats()
    grads = step(model, runtime, wrapped, batch, params, autocast=autocast, device=device)
    sync(device)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    times = []
    for _ in range(3):
        t = time.perf_counter()
        step(model, runtime, wrapped, batch, params, autocast=autocast, device=device)
        sync(device)
        times.append(time.perf_counter() - t)
    return {"weights": sum(c["weights"].values()), "extras": sum(c["extras"].values()),
            "optimizer": sum(c["optimizer"].values()), "inputs": sum(c["inputs"].values()), "gradients": grads,
            "trainable": sum(p.numel() for p in params), "peak": peak, "baseline": baseline,
            "seconds": median(times), "step_seconds": times,
            "build_seconds": build_s, "precision": "bf16 autocast" if autocast else "fp32"}


def cell_row(cell: tuple, seq: int) -> dict:
    shape, method, objective, _, ckpt = cell
    return {"shape": shape, "method": method, "objective": objective, "seq": seq, "checkpointing": ckpt,
            "batch": BATCH}


def advised(row: dict, cfg_dir: Path, device: str, cpu_rate: float | None) -> dict:
    """advise's estimate for the cell, asked for what is measured: h200 on CUDA, cpu on CPU."""
    return estimate(cfg_dir, row["method"], row["objective"], row["seq"], row["checkpointing"], cpu_rate,
                    device=GPU if device == "cuda" else "cpu", batch=BATCH, over=OVERRIDES[row["method"]])


def run_cell(cell: tuple, cfg_dir: Path, device: str, seq: int, cpu_rate: float | None) -> dict:
    row = cell_row(cell, seq)
    t0 = time.perf_counter()
    try:
        row["estimated"] = advised(row, cfg_dir, device, cpu_rate)
        row["measured"] = measure(cfg_dir, row["method"], row["objective"], seq, row["checkpointing"], device,
                                  mixed_precision(device))
    except Exception as e:  # one cell's failure (OOM ...) is recorded, the others go on
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:400]
    free(device)
    row["cell_seconds"] = time.perf_counter() - t0
    e, g = row.get("estimated"), row.get("measured")
    if e and g:
        row["exact"] = {k: e[k] == g[k] for k in EXACT}
        row["peak_ratio"] = ratio(e["peak"], g["peak"])
        row["time_ratio"] = ratio(e["seconds"], g["seconds"])
        row["mfu"] = e["flops"] / g["seconds"] / (cpu_rate or adv.DEVICES[GPU][0] * 1e12)
    return row


def label(r: dict) -> str:
    return f"{r['shape']} {r['method']} {r['objective']} T{r['seq']}{' ckpt' if r['checkpointing'] else ''}"


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def num(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def line(r: dict) -> str:
    """One cell, printed as it finishes."""
    if "error" in r:
        return f"{label(r):<36} ERROR {r['error']}  ({r['cell_seconds']:.0f} s)"
    e, g = r["estimated"], r["measured"]
    exact = "yes" if all(r["exact"].values()) else "no: " + ",".join(k for k, ok in r["exact"].items() if not ok)
    return (f"{label(r):<36} exact {exact}  peak est {gib(e['peak'])} / got {gib(g['peak'])} GiB "
            f"({num(r['peak_ratio'], '.3f')})  step est {e['seconds']:.3f} / got {g['seconds']:.3f} s "
            f"({r['time_ratio']:.2f})  mfu {r['mfu']:.3f}  [build {g['build_seconds']:.1f} s, cell "
            f"{r['cell_seconds']:.1f} s]")


def write(out: Path, meta: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "advise-gpu.json").write_text(json.dumps({"meta": meta, "cells": rows}, indent=1))
    done = [r for r in rows if "exact" in r]
    peaks = sorted(r["peak_ratio"] for r in done if r["peak_ratio"] is not None)
    times = sorted(r["time_ratio"] for r in done)
    mfus = sorted(r["mfu"] for r in done)
    unit = "of the data-sheet bf16 peak" if meta["device"] == "cuda" else "of the measured fp32 GEMM rate"
    lines = [
        "# `tunelab advise` against measurement on a GPU", "",
        f"Command: `{meta['command']}` ({meta['gpu']}; torch {meta['torch']}, transformers {meta['transformers']}, "
        f"Python {meta['python']}; {meta['seconds']:.0f} s). Raw numbers: `advise-gpu.json`. Estimates: `tunelab "
        f"advise --device {meta['advise_device']}` on each model's config.json with the same overrides.", "",
        f"Models: random Llama-shaped configs ({'; '.join(meta['shapes'])}), fp32 weights under "
        f"{meta['precision']}; batch {BATCH} sequences (dpo: {BATCH} pairs), the last row padded by a quarter; "
        "accelerate prepares model and optimizer as `tunelab train` does. Peak: `torch.cuda.max_memory_allocated()` "
        "over the second step (absolute: weights, optimizer states and inputs included). Time: median of steps "
        f"3-5; MFU: advise's flops per step (with checkpointing: the recomputed forward included) / measured "
        f"seconds, {unit}.", "",
        "## Summary", "",
        f"- cells: {len(done)} measured of {len(rows)}"
        + (f" ({len(rows) - len(done)} failed or skipped: see the table)" if len(done) < len(rows) else "") + "; "
        f"weights, gradients, optimizer states, extras and trainable counts exact in "
        f"{sum(all(r['exact'].values()) for r in done)}.",
    ]
    if peaks:
        lines.append(f"- peak estimate / measured: median {median(peaks):.3f} (range {peaks[0]:.3f}-{peaks[-1]:.3f}).")
    if times:
        lines += [f"- step time estimate / measured: median {median(times):.2f} (range {times[0]:.2f}-"
                  f"{times[-1]:.2f}).",
                  f"- measured MFU: median {median(mfus):.3f} (range {mfus[0]:.3f}-{mfus[-1]:.3f}); advise assumes "
                  f"{adv.GPU_MFU}."]
    lines += [
        "", "## Every cell", "",
        "| cell | weights / grad / optimizer exact | peak GiB est / measured | ratio | step s est / measured | ratio "
        "| MFU |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "exact" not in r:
            lines.append(f"| {label(r)} | {r.get('error', 'not run').replace('|', '/')} | | | | | |")
            continue
        e, g, x = r["estimated"], r["measured"], r["exact"]
        exact = " / ".join("yes" if x[k] else "no" for k in ("weights", "gradients", "optimizer"))
        extra = [k for k in ("extras", "trainable") if not x[k]]
        lines.append(
            f"| {label(r)} | {exact}{' (' + ', '.join(extra) + ' differ)' if extra else ''} | {gib(e['peak'])} / "
            f"{gib(g['peak'])} | {num(r['peak_ratio'], '.3f')} | {e['seconds']:.3f} / {g['seconds']:.3f} | "
            f"{r['time_ratio']:.2f} | {r['mfu']:.3f} |")
    (out / "advise-gpu.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only llama-1b lora sft 512")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="hidden 64, 2 blocks, vocabulary 512 (a CPU smoke test)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"), help="folder for advise-gpu.json / .md")
    ap.add_argument("--budget-s", type=float, default=330.0, help="start no cell after this many seconds")
    ap.add_argument("--estimate-only", action="store_true", help="print advise's estimates, measure nothing")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available() and not args.estimate_only:
        sys.exit("--device cuda: no CUDA device (use --device cpu --tiny)")
    cells = CELLS[:1] if args.quick else CELLS
    cpu_rate = adv.cpu_flops_per_second(0.5) if args.device == "cpu" else None
    out = Path(args.out)
    cuda = args.device == "cuda"
    meta = {"command": " ".join(["python bench/advise_gpu.py", *sys.argv[1:]]), "device": args.device,
            "gpu": torch.cuda.get_device_name() if cuda and torch.cuda.is_available() else f"CPU, {platform.machine()}",
            "advise_device": GPU if cuda else "cpu", "torch": torch.__version__,
            "transformers": transformers.__version__, "python": sys.version.split()[0], "tiny": args.tiny,
            "shapes": [describe(s, args.tiny) for s in dict.fromkeys(c[0] for c in cells)],
            "precision": "bf16 autocast" if mixed_precision(args.device) == "bf16" else "fp32",
            "cpu_gemm_flops_per_second": cpu_rate, "budget_s": args.budget_s, "seconds": 0.0}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for cell in cells:
            seq = TINY_SEQ[cell[3]] if args.tiny else cell[3]
            cfg_dir = Path(tmp) / cell[0]
            if not cfg_dir.is_dir():
                shape_config(cell[0], args.tiny).save_pretrained(str(cfg_dir))
            if args.estimate_only:
                e = advised(cell_row(cell, seq), cfg_dir, args.device, cpu_rate)
                print(f"{label(cell_row(cell, seq)):<36} peak {gib(e['peak'])} GiB ({e['phase']})  "
                      f"step {e['seconds']:.3f} s  flops {e['flops']:.3g}", flush=True)
                continue
            if time.perf_counter() - T0 > args.budget_s:
                rows.append({**cell_row(cell, seq), "error": "not run (--budget-s spent)"})
                continue
            rows.append(run_cell(cell, cfg_dir, args.device, seq, cpu_rate))
            print(line(rows[-1]), flush=True)
            meta["seconds"] = time.perf_counter() - T0
            write(out, meta, rows)  # after every cell: an interrupted run keeps what it finished
    if args.estimate_only:
        return
    meta["seconds"] = time.perf_counter() - T0
    write(out, meta, rows)
    print(f"wrote {out / 'advise-gpu.json'} and {out / 'advise-gpu.md'} ({meta['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
