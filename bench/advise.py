"""`tunelab advise` against measurement: the table of docs/results/advise.md.

    python bench/advise.py [--quick] [--out docs/results/advise.json]

For every cell of methods x objectives x model sizes x sequence lengths (small random Llama
configs, hidden 128 / 256 / 512, 4 blocks, GQA 4:2 heads, vocab 4096; batch 2, every batch padded
in one row) this builds the model for real on CPU (fp32), applies the method, and runs the steps
`tunelab train` runs (the objective's runtime loss, backward, clip, AdamW, zero_grad), then compares
with `tunelab.recipes.advise` run on the model's config.json (meta device):
- weights, trainable parameters, gradients, optimizer states: the tensors themselves, counted after
  a step (unique storages; 4-bit layers with their quantisation state);
- activations: the bytes autograd saved in the second step (`saved_tensors_hooks`, each storage once,
  parameters excluded) and, for the checkpointed cells, the bytes the forward left allocated;
- peak: the bytes alive when the second step starts (counted) plus the largest growth of torch's
  CPU allocator during the step (torch.profiler with profile_memory: every allocation and free is
  recorded, so this is the allocator's exact high-water mark, not the process RSS);
- time: the third step's wall time against the estimate from flops.
Writes JSON and the markdown table next to it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import AutoModelForCausalLM, LlamaConfig

from tunelab.data.types import IGNORE
from tunelab.methods import METHODS
from tunelab.objectives import OBJECTIVES
from tunelab.objectives.registry import RunContext
from tunelab.recipes import advise as adv
from tunelab.training.optim import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
METHOD_CELLS = {  # name -> overrides
    "full": [], "lora": ["r=8"], "qlora": ["r=8"], "bitfit": [], "adapters": [], "prefix": [],
}
EXTRA_CELLS = {"prompt": [], "partial": ["last_k=2"]}  # measured in the bf16 slice only (shared CPU: time)
OBJECTIVE_CELLS = ("sft", "dpo")
SIZES = (128, 256, 512)
SEQS = (64, 256)
BATCH, LAYERS, VOCAB = 2, 4, 4096
CHECKPOINTED = ("full", "lora")  # measured again with gradient checkpointing (sft)
AUTOCAST = ("full", "lora", "adapters", "prompt", "partial")  # under bf16 autocast (largest size and length)


def llama(hidden: int) -> LlamaConfig:
    return LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=LAYERS,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=1024,
                       tie_word_embeddings=False)


def make_batch(rows: int, seq: int, pairs: bool, vocab: int = VOCAB, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Random ids, the first quarter a prompt (untrained), the last row right-padded by a quarter."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (rows, seq), generator=g)
    mask = torch.ones(rows, seq, dtype=torch.long)
    mask[-1, seq - seq // 4:] = 0
    ids[mask == 0] = 0
    labels = ids.clone()
    labels[:, : seq // 4] = IGNORE
    labels[mask == 0] = IGNORE
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if pairs:
        batch["n_pairs"] = torch.tensor(rows // 2)
    return {k: v.to(device) for k, v in batch.items()}  # as the loop moves each micro-batch


def storages(tensors) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}


def weight_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters, buffers and the 4-bit layers' quantisation state."""
    out = [*model.parameters(), *model.buffers()]
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            out += [qs.absmax, qs.code]
            if qs.nested:
                out += [qs.state2.absmax, qs.state2.code, qs.offset]
    return out


def step(model, runtime, opt, batch, params, saved: dict | None = None, autocast: bool = False,
         device: str = "cpu") -> int:
    """One optimizer step as training/loop.py runs it; returns the gradient bytes before the update."""
    with record_function("tunelab::forward"), torch.autocast(device, torch.bfloat16, enabled=autocast):
        if saved is None:
            loss_sum, n = runtime.loss(model, batch)
        else:
            def pack(t):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in saved["exclude"]:
                    saved["bytes"][ptr] = t.untyped_storage().nbytes()
                return t
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss_sum, n = runtime.loss(model, batch)
    with record_function("tunelab::backward"):
        (loss_sum / max(int(n), 1)).backward()
    grads = sum(storages(p.grad for p in params).values())
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return grads


def allocator_trace(prof, out: Path) -> tuple[int, int]:
    """(largest bytes allocated during the window, bytes allocated when backward started)."""
    prof.export_chrome_trace(str(out))
    events = json.loads(out.read_text())["traceEvents"]
    bwd = min(e["ts"] for e in events if e.get("name") == "tunelab::backward")
    mem = sorted((e["ts"], e["args"]["Total Allocated"]) for e in events if e.get("name") == "[memory]")
    before = [a for ts, a in mem if ts < bwd]
    return max(a for _, a in mem), before[-1] if before else 0


def build(cfg_dir: Path, method: str, objective: str, checkpointing: bool, over: list[str], device: str = "cpu"):
    """(model, objective runtime, optimizer, trainable parameters) in training/loop.py's order: the
    model (fp32, built on `device`) with the method applied, the runtime, checkpointing, AdamW."""
    cfg, _ = adv.run_config(str(cfg_dir), method, over, objective)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig.from_pretrained(str(cfg_dir)), attn_implementation="sdpa",
                                                 dtype=torch.float32)
        model = METHODS[method].apply(model, cfg.method).train()
    runtime = OBJECTIVES[objective].make_runtime(RunContext(cfg, model, None, torch.device(device), lambda _: None))
    if checkpointing:  # as training/loop.py turns it on
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    opt = build_optimizer(model, cfg.train, METHODS[method].optimizer(cfg.method))
    return model, runtime, opt, [p for p in model.parameters() if p.requires_grad]


def counted(model, runtime, opt, batch) -> dict[str, dict[int, int]]:
    """Storages (pointer -> bytes) alive between steps: weights, extra models, optimizer states, inputs."""
    reference = getattr(getattr(runtime, "reference", None), "model", None)
    return {"weights": storages(weight_tensors(model)),
            "extras": storages(weight_tensors(reference)) if reference is not None else {},
            "optimizer": storages(t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)),
            "inputs": storages(batch.values())}


def measure(cfg_dir: Path, method: str, objective: str, seq: int, checkpointing: bool, tmp: Path,
            autocast: bool = False) -> dict:
    model, runtime, opt, params = build(cfg_dir, method, objective, checkpointing, overrides(method, autocast))
    batch = make_batch(BATCH * (2 if objective == "dpo" else 1), seq, objective == "dpo")
    step(model, runtime, opt, batch, params, autocast=autocast)  # allocates the optimizer states
    c = counted(model, runtime, opt, batch)
    weights, extras, states = c["weights"], c["extras"], c["optimizer"]
    static = sum(sum(v.values()) for v in c.values())
    saved = {"exclude": set(weights) | set(extras), "bytes": {}}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        grads = step(model, runtime, opt, batch, params, None if checkpointing else saved, autocast)
    growth, kept = allocator_trace(prof, tmp / "trace.json")
    t0 = time.perf_counter()
    step(model, runtime, opt, batch, params, autocast=autocast)
    wall = time.perf_counter() - t0
    return {"weights": sum(weights.values()), "extras": sum(extras.values()),
            "trainable": sum(p.numel() for p in params), "gradients": grads, "optimizer": sum(states.values()),
            "activations_hooks": sum(saved["bytes"].values()) if not checkpointing else None,
            "activations_kept": kept, "peak": static + growth, "seconds": wall}


def overrides(method: str, autocast: bool) -> list[str]:
    return {**METHOD_CELLS, **EXTRA_CELLS}[method] + (["train.precision=bf16"] if autocast else [])


def estimate(cfg_dir: Path, method: str, objective: str, seq: int, checkpointing: bool, rate: float,
             autocast: bool = False, *, device: str = "cpu", batch: int = BATCH, over: list[str] | None = None) -> dict:
    """`tunelab advise` for one cell (`over`: the overrides, default this bench's for the method)."""
    over = overrides(method, autocast) if over is None else over
    s = adv.prepare(str(cfg_dir), method, over, objective=objective, device=device)
    e = adv.estimate(s, batch, seq, checkpointing)
    t = adv.step_time(s, batch, seq, checkpointing, rate=rate)
    return {"weights": e.weights, "extras": e.extras, "trainable": s.counts.trainable, "gradients": e.grads,
            "optimizer": e.optimizer, "activations": e.act.total(checkpointing), "peak": e.peak, "phase": e.phase,
            "seconds": t["seconds_per_step"], "flops": t["flops_per_step"], "notes": s.notes}


def cells(quick: bool) -> list[tuple[int, int, str, str, bool, bool]]:
    """(hidden, seq, method, objective, checkpointing, bf16 autocast)."""
    sizes, seqs = ((128, 256), (64,)) if quick else (SIZES, SEQS)
    out = [(h, t, m, o, False, False) for h in sizes for t in seqs for o in OBJECTIVE_CELLS for m in METHOD_CELLS]
    out += [(h, t, m, "sft", True, False) for h in sizes for t in seqs for m in CHECKPOINTED]
    return out + [(sizes[-1], seqs[-1], m, o, False, True) for o in OBJECTIVE_CELLS for m in AUTOCAST]


def ratio(est: float, got: float | None) -> float | None:
    return None if not got else est / got


def run(quick: bool, tmp: Path) -> tuple[list[dict], float]:
    rate = adv.cpu_flops_per_second(1.0)
    rows = []
    for hidden, seq, method, objective, ckpt, bf16 in cells(quick):
        cfg_dir = tmp / f"llama-h{hidden}"
        if not cfg_dir.is_dir():
            llama(hidden).save_pretrained(str(cfg_dir))
        got = measure(cfg_dir, method, objective, seq, ckpt, tmp, bf16)
        est = estimate(cfg_dir, method, objective, seq, ckpt, rate * adv.CPU_EFFICIENCY, bf16)
        act_got = got["activations_kept"] if ckpt else got["activations_hooks"]
        row = {"hidden": hidden, "seq": seq, "method": method, "objective": objective, "checkpointing": ckpt,
               "autocast": bf16, "measured": got, "estimated": est,
               "exact": {k: est[k] == got[k] for k in ("weights", "extras", "trainable", "gradients", "optimizer")},
               "activations_ratio": ratio(est["activations"], act_got), "peak_ratio": ratio(est["peak"], got["peak"]),
               "time_ratio": ratio(est["seconds"], got["seconds"]),
               "efficiency": est["flops"] / got["seconds"] / rate}
        rows.append(row)
        print(f"h{hidden:<4} T{seq:<4} {method:<9} {objective:<4} {'gc' if ckpt else '  '} {'bf16' if bf16 else 'fp32'}"
              f" exact {'yes' if all(row['exact'].values()) else row['exact']}  act {row['activations_ratio']:.3f}  "
              f"peak {row['peak_ratio']:.3f}  time {row['time_ratio']:.2f}", flush=True)
        gc.collect()
    return rows, rate


def pct(r: float | None) -> str:
    return "-" if r is None else f"{100 * (r - 1):+.1f}"


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def summary(rows: list[dict]) -> list[str]:
    exact = sum(all(r["exact"].values()) for r in rows)
    act = [r for r in rows if r["activations_ratio"] is not None]
    worst_act = max(act, key=lambda r: abs(r["activations_ratio"] - 1))
    worst_peak = max(rows, key=lambda r: abs(r["peak_ratio"] - 1))
    out_act = [r for r in act if abs(r["activations_ratio"] - 1) > 0.10]
    out_peak = [r for r in rows if abs(r["peak_ratio"] - 1) > 0.15]
    times = sorted(r["time_ratio"] for r in rows)
    eff = sorted(r["efficiency"] for r in rows)

    def cell(r: dict) -> str:
        mode = ("checkpointed " if r["checkpointing"] else "") + ("bf16 autocast" if r["autocast"] else "fp32")
        return f"{r['method']} / {r['objective']} / hidden {r['hidden']} / seq {r['seq']} ({mode})"
    return [
        f"- cells: {len(rows)}; parameters, weights, gradients, optimizer states and extra models counted exactly "
        f"in {exact} of {len(rows)}.",
        f"- activations: worst miss {pct(worst_act['activations_ratio'])} % ({cell(worst_act)}); "
        f"{len(out_act)} cells outside ±10 %.",
        f"- peak: worst miss {pct(worst_peak['peak_ratio'])} % ({cell(worst_peak)}); {len(out_peak)} cells outside "
        "±15 %.",
        f"- time: estimate / measured median {times[len(times) // 2]:.2f} (range {times[0]:.2f}-{times[-1]:.2f}); "
        f"a step sustains {eff[len(eff) // 2]:.2f} of the measured GEMM rate (median, range {eff[0]:.2f}-"
        f"{eff[-1]:.2f}): `CPU_EFFICIENCY` in recipes/advise.py.",
    ]


def write_markdown(meta: dict, rows: list[dict], path: Path) -> None:
    small = sorted(r["measured"]["seconds"] for r in rows if r["hidden"] == min(SIZES))
    eff = " / ".join(f"{median([r['efficiency'] for r in rows if r['hidden'] == h]):.2f}" for h in SIZES)
    lines = [
        "# `tunelab advise` against measurement", "",
        f"Command: `{meta['command']}` ({meta['machine']}, shared with other work; torch {meta['torch']} CPU, "
        f"Python {meta['python']}; {meta['seconds']:.0f} s). Raw numbers: `advise.json`.", "",
        f"Models: random Llama configs, {meta['layers']} blocks, 4 query / 2 key-value heads, vocabulary "
        f"{meta['vocab']}, hidden 128 / 256 / 512 (MLP 11/4 of it); batch {meta['batch']} sequences (dpo: "
        f"{meta['batch']} pairs, {2 * meta['batch']} rows), every batch padded in one row; fp32 weights. Each cell "
        "builds the model on CPU, applies the method, runs the objective's loss, backward, clipping and AdamW as "
        "`tunelab train` does, and compares with `tunelab advise` on the model's config.json (meta device).", "",
        "What is measured: weights, trainable parameters, gradients and optimizer states are the tensors "
        "themselves after a step (unique storages; 4-bit layers with their quantisation state); activations are "
        "the bytes autograd saved in the second step (`torch.autograd.graph.saved_tensors_hooks`, each storage "
        "once, parameters excluded) — for checkpointed cells, whose saved tensors the hooks cannot see, the bytes "
        "the forward left allocated; the peak is the bytes alive as the step starts (counted) plus the largest "
        "growth of torch's CPU allocator during it (`torch.profiler` with `profile_memory`: every allocation and "
        "free, so the allocator's exact high-water mark — not the process RSS, which also holds the Python "
        "runtime, libraries and freed-but-cached pages); time is the third step's wall clock.", "",
        "## Summary", "", *summary(rows), "",
        "## Where the estimate misses", "",
        "- Peak, full fine-tuning (up to +6 % on the smallest model, less as the model grows): the estimate's "
        "start-of-backward phase holds every saved tensor, both log-softmax gradients and the head's gradient at "
        "once; autograd frees some of them a little earlier. An over-estimate, on the safe side.",
        f"- Time: unreliable on this machine. Its cores were shared with other jobs for the whole run: the "
        f"smallest model's steps took {small[0]:.2f}-{small[-1]:.2f} s; the estimate divides flops by the GEMM rate "
        f"measured once at the start ({meta['gemm_flops_per_second'] / 1e9:.1f} GFLOP/s) x `CPU_EFFICIENCY` "
        f"({adv.CPU_EFFICIENCY}). Models this small are also bound by per-op overhead rather than flops: the "
        f"median step sustains {eff} of the GEMM rate at hidden {', '.join(map(str, SIZES))}. On GPUs the "
        "estimate rests on an assumed 40 % MFU that no GPU here has measured.",
        "- Not measured here: the paged / 8-bit optimizers' bytes on CUDA (their formula is checked against "
        "bitsandbytes' CPU optimizers in tests), CUDA's dropout mask (1 byte instead of the input's dtype on "
        "CPU), PPO's rollout phase, architectures other than Llama's.", "",
        f"The run took {meta['seconds'] / 60:.0f} minutes (over the 10 the bench aims for, because of the shared "
        "cores); `--quick` runs 2 sizes x 1 length.", "",
        "## Every cell", "",
        "| hidden | seq | method | objective | mode | trainable | counts exact | activations MiB est / measured | "
        "err % | peak MiB est / measured | err % | step s est / measured |",
        "|---:|---:|---|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        e, g = r["estimated"], r["measured"]
        act_got = g["activations_kept"] if r["checkpointing"] else g["activations_hooks"]
        mode = ("ckpt " if r["checkpointing"] else "") + ("bf16" if r["autocast"] else "fp32")
        wrong = [k for k, ok in r["exact"].items() if not ok]
        lines.append(
            f"| {r['hidden']} | {r['seq']} | {r['method']} | {r['objective']} | {mode} | {g['trainable']:,} | "
            f"{'yes' if not wrong else 'no: ' + ', '.join(wrong)} | {mib(e['activations'])} / {mib(act_got)} | "
            f"{pct(r['activations_ratio'])} | {mib(e['peak'])} / {mib(g['peak'])} | {pct(r['peak_ratio'])} | "
            f"{e['seconds']:.3f} / {g['seconds']:.3f} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 sizes x 1 sequence length")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "advise.json"))
    ap.add_argument("--markdown-only", action="store_true", help="rewrite the markdown from --out's JSON")
    args = ap.parse_args()
    if args.markdown_only:
        data = json.loads(Path(args.out).read_text())
        write_markdown(data["meta"], data["cells"], Path(args.out).with_suffix(".md"))
        return
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows, rate = run(args.quick, Path(tmp))
    meta = {"command": "python bench/advise.py" + (" --quick" if args.quick else ""),
            "machine": f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}",
            "torch": torch.__version__, "python": sys.version.split()[0], "gemm_flops_per_second": rate,
            "seconds": time.perf_counter() - t0, "batch": BATCH, "layers": LAYERS, "vocab": VOCAB}
    out = Path(args.out)
    out.write_text(json.dumps({"meta": meta, "cells": rows}, indent=1))
    write_markdown(meta, rows, out.with_suffix(".md"))
    print("\n".join(summary(rows)))
    print(f"wrote {out} and {out.with_suffix('.md')} ({meta['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
