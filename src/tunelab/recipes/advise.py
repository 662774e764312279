"""`tunelab advise`: the memory and time a training run will take, from the model's config alone.

The model is built on the meta device with the method applied (no weight is read or allocated: a
70B config takes seconds), and its tensors are counted: weights by dtype (4-bit layers in NF4 with
their constants), trainable parameters, gradients, optimizer states. Activations come from the
closed form of training/activations.py, the peak from the step's order of allocations
(training/memory.py), the objective's extra models from `objective_plan` (advise_objectives.py),
the time from the step's flops (training/flops.py) at an assumed throughput (`DEVICES`). With a
memory budget it finds the largest batch and sequence length that fit; without a method, which
methods fit. docs/advise.md explains the output; docs/results/advise.md measures it.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from tunelab.config import deep_merge, did_you_mean, parse_overrides
from tunelab.errors import ConfigError, TunelabError
from tunelab.methods import METHODS
from tunelab.methods.qlora import QLoraConfig, quantizable
from tunelab.modeling.load import keep_layers, model_config
from tunelab.objectives import OBJECTIVES
from tunelab.objectives.rewards import RewardChoice
from tunelab.recipes.advise_objectives import Context, Plan, objective_plan
from tunelab.runconfig import RunConfig, build_config
from tunelab.training.activations import Activations, Decoder, Precision, activations
from tunelab.training.flops import step_flops
from tunelab.training.memory import Counts, count_tensors, optimizer_bytes, peak, read_decoder

# Peak dense TFLOP/s from the vendors' data sheets (no sparsity): (bf16/fp16 tensor cores, fp32), and
# whether bf16 autocast is available. Training sustains a fraction of it: MFU below (an assumption).
DEVICES: dict[str, tuple[float, float, bool]] = {
    "t4": (65.0, 8.1, False), "l4": (121.0, 30.3, True), "rtx4090": (165.0, 82.6, True),
    "a100": (312.0, 19.5, True), "h100": (989.0, 67.0, True), "h200": (989.0, 67.0, True),
}
# Model-flops utilisation of a tunelab training step on a GPU: measured on an H200, 0.08-0.38 (median 0.24;
# 0.29-0.38 for 8B-shaped models at 2,048 tokens), docs/results/advise-gpu.md. 0.3: large models, long sequences.
GPU_MFU = 0.3
CPU_EFFICIENCY = 0.5  # share of this machine's measured fp32 GEMM rate a CPU step sustains (docs/results/advise.md)
UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
         "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_memory(text: str) -> int:
    """'24GiB', '80 GB', '1.5TiB', '512MiB', '1000000' -> bytes (GB = 10^9, GiB = 2^30)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in UNITS or float(m.group(1)) <= 0:
        raise ConfigError(f"--memory {text!r}: not a memory size", fix="write a number and a unit, e.g. 24GiB, "
                          "80GB or 512MiB")
    return int(float(m.group(1)) * UNITS[unit])


def read_model_config(model: str, trust_remote_code: bool = False) -> Any:
    """A transformers config from a config.json file, a model folder, a run dir, or a cached hub id."""
    p = Path(model).expanduser()
    if p.is_file():
        try:
            raw = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TunelabError(f"{p}: not a JSON model config ({e})", fix="pass a model's config.json") from None
        if not isinstance(raw, dict) or "model_type" not in raw:
            raise TunelabError(f"{p}: a model config needs a model_type", fix="pass a model's config.json")
        try:
            return AutoConfig.for_model(**raw)
        except ValueError as e:
            raise TunelabError(f"{p}: {str(e).splitlines()[0]}", fix="pass the config.json of a transformers "
                               "model") from None
    if p.is_dir() and not (p / "config.json").is_file() and (p / "final" / "config.json").is_file():
        p = p / "final"  # a finished tunelab run of a full model
    return model_config(str(p) if p.is_dir() else model, trust_remote_code)


def run_config(model: str, method: str, overrides: list[str], objective: str | None) -> tuple[RunConfig, list[str]]:
    """The run's config from the command's overrides; a bare `key=value` is a method key. Paths an
    objective needs (a teacher, a reward model) default to the model itself, said in a note."""
    items = [o if "." in o.partition("=")[0] else f"method.{o}" for o in overrides]
    raw = deep_merge({"model": {"name_or_path": model}, "method": {"name": method}}, parse_overrides(items))
    if objective is not None:
        raw["objective"] = {**raw.get("objective", {}), "name": objective}
    notes = []
    obj = raw.get("objective", {"name": "sft"})
    spec = OBJECTIVES.get(obj.get("name")) if isinstance(obj, dict) else None
    if spec is not None:
        for key, f in spec.config_cls.model_fields.items():
            if f.is_required() and key not in obj and key != "name":
                raw["objective"] = {**obj, key: model}
                obj = raw["objective"]
                notes.append(f"objective.{key}: not given; taken as the model itself (set objective.{key}=PATH)")
        if issubclass(spec.config_cls, RewardChoice) and spec.config_cls.default_reward is None \
                and obj.get("reward") is None and obj.get("reward_model") is None:  # ppo: one of the two
            raw["objective"] = {**obj, "reward_model": model}
            notes.append("objective.reward_model: not given; taken as the model itself (set objective.reward_model="
                         "PATH, or objective.reward=exact_match for a verifiable reward: no reward model)")
    return build_config(raw, "<advise>"), notes


# ----------------------------------------------------------------------------- the model as trained


@dataclass
class Setup:
    """Everything that does not depend on batch and sequence length."""

    cfg: RunConfig
    hf: Any
    model: nn.Module  # on the meta device, method applied
    counts: Counts
    decoder: Decoder
    precision: Precision
    precision_label: str
    optimizer: str
    device: str
    plan: Plan
    notes: list[str]


def _weights_dtype(cfg: RunConfig) -> torch.dtype:
    # model.dtype auto trains fp32 master weights (modeling/load.py); autocast gives the bf16 matmuls
    return {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
            "float16": torch.float16}[cfg.model.dtype]


def _precision(cfg: RunConfig, device: str, dtype: torch.dtype) -> tuple[Precision, str]:
    """As the loop's accelerate settings: precision auto is bf16 autocast where the device has bf16."""
    kind = cfg.train.precision
    if kind == "auto":
        kind = "bf16" if device != "cpu" and DEVICES[device][2] else "fp32"
    size, cpu = (4 if dtype == torch.float32 else 2), device == "cpu"
    if kind == "fp32" or size == 2:
        return Precision(weights=size, cpu=cpu), str(dtype).removeprefix("torch.")
    return Precision(weights=4, autocast=True, cpu=cpu), f"float32 weights, {kind} autocast"


def _optimizer(cfg: RunConfig, device: str, override: str | None) -> str:
    """The optimizer the loop builds (the method's hook), as on the target device: paged optimizers need CUDA."""
    if override is not None:
        return override
    asked = getattr(cfg.method, "optimizer", None)
    if device != "cpu" and isinstance(asked, str):
        return asked
    return METHODS[cfg.method.name].optimizer(cfg.method) if device == "cpu" else "adamw"


def _build(cfg: RunConfig, hf: Any) -> tuple[nn.Module, set[int]]:
    """The model on the meta device, as `tunelab train` would hold it; ids of weights stored in 4 bits."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf, dtype=_weights_dtype(cfg))
        if cfg.model.keep_layers is not None:
            keep_layers(model, cfg.model.keep_layers)
        quantized = {id(m.weight) for _, m in quantizable(model)} if isinstance(cfg.method, QLoraConfig) else set()
        model = METHODS[cfg.method.name].apply(model, cfg.method)
    return model, quantized


def prepare(model: str, method: str, overrides: list[str] | None = None, *, objective: str | None = None,
            device: str = "cpu", optimizer: str | None = None) -> Setup:
    if device not in DEVICES and device != "cpu":
        raise ConfigError(f"--device {device!r}: unknown{did_you_mean(device, [*DEVICES, 'cpu'])}",
                          fix="choose one of: cpu, " + ", ".join(DEVICES))
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise ConfigError(f"--optimizer {optimizer!r}: unknown", fix="choose one of: " + ", ".join(OPTIMIZERS))
    cfg, notes = run_config(model, method, overrides or [], objective)
    hf = read_model_config(model, cfg.model.trust_remote_code)
    built, quantized = _build(cfg, hf)
    counts = count_tensors(built, quantized, getattr(cfg.method, "double_quant", True))
    decoder, more = read_decoder(built, hf, quantized)
    precision, label = _precision(cfg, device, _weights_dtype(cfg))
    bf16_gpu = device != "cpu" and DEVICES[device][2]
    plan = objective_plan(Context(cfg, built, counts, hf, frozen_bytes=2 if bf16_gpu else 4))
    return Setup(cfg, hf, built, counts, decoder, precision, label, _optimizer(cfg, device, optimizer), device,
                 plan, notes + more + plan.notes)


OPTIMIZERS = ("adamw", "paged_adamw_8bit", "paged_adamw_32bit")  # what training/optim.py builds


# ----------------------------------------------------------------------------- one estimate


@dataclass(frozen=True)
class Estimate:
    act: Activations
    weights: int
    grads: int
    optimizer: int
    extras: int
    peak: int
    phase: str


def estimate(s: Setup, batch: int, seq: int, checkpointing: bool) -> Estimate:
    rows = batch * s.plan.rows
    act = activations(s.decoder, rows, seq, s.precision, s.plan.loss)
    if s.plan.loss_extra is not None:
        saved, transient = s.plan.loss_extra(rows, seq)
        act = replace(act, saved=act.saved + saved, head=act.head + saved, checkpointed=act.checkpointed + saved,
                      ckpt_head=act.ckpt_head + saved, fwd_transient=act.fwd_transient + transient)
    trainable = s.counts.trainable_tensors + s.plan.trainable
    opt = optimizer_bytes(trainable, s.optimizer)
    grads = s.counts.grad_bytes + sum(n * b for n, b in s.plan.trainable)
    extras = sum(e.bytes for e in s.plan.extras)
    static = s.counts.weight_bytes + opt + extras
    foreach = s.device != "cpu" and s.optimizer == "adamw"  # torch's multi-tensor AdamW on CUDA
    pk = peak(static, s.counts, act, checkpointing, foreach)
    best = (pk.bytes, pk.phase)
    if s.plan.side_phase is not None:
        label, extra = s.plan.side_phase(seq)
        best = max(best, (static + extra, label))
    return Estimate(act, s.counts.weight_bytes, grads, opt, extras, best[0], best[1])


def _largest(fits: Any, top: int) -> int:
    """The largest n in [1, top] with fits(n) (fits is monotone), 0 if none."""
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= top and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, top + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def fit(s: Setup, budget: int, batch: int, seq: int, checkpointing: bool) -> dict[str, Any]:
    max_pos = getattr(s.hf, "max_position_embeddings", None) or 2**20
    return {
        "memory": budget,
        "fits": estimate(s, batch, seq, checkpointing).peak <= budget,
        "max_batch": _largest(lambda b: estimate(s, b, seq, checkpointing).peak <= budget, 2**20),
        "max_seq": _largest(lambda t: estimate(s, batch, t, checkpointing).peak <= budget, max_pos),
        "max_seq_limit": max_pos,
    }


# ----------------------------------------------------------------------------- time


def cpu_flops_per_second(seconds: float = 0.25) -> float:
    """This machine's fp32 matrix-multiply rate, measured (a 512 x 512 GEMM, repeated)."""
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return n * 2 * 512**3 / (time.perf_counter() - t0)


def step_time(s: Setup, batch: int, seq: int, checkpointing: bool, rate: float | None = None) -> dict[str, Any]:
    """Flops of one optimizer step and the seconds at the device's assumed throughput."""
    rows = batch * s.plan.rows
    accum = s.cfg.train.grad_accum
    train = step_flops(s.decoder, rows, seq).total(checkpointing) * accum
    extra = 2.0 * s.plan.forward_params * rows * seq * accum
    if s.device == "cpu":
        rate = rate or cpu_flops_per_second() * CPU_EFFICIENCY
        basis = f"this CPU's measured fp32 GEMM rate x {CPU_EFFICIENCY}"
    else:
        bf16, fp32, _ = DEVICES[s.device]
        rate = (fp32 if s.precision_label.startswith("float32") and not s.precision.autocast else bf16) * 1e12 * GPU_MFU
        basis = f"{s.device} data-sheet peak x {GPU_MFU} MFU (measured on an H200)"
    seconds = (train + extra) / rate
    return {"flops_per_step": train + extra, "assumed_flops_per_second": rate, "basis": basis,
            "seconds_per_step": seconds, "tokens_per_second": batch * seq * accum / seconds}


# ----------------------------------------------------------------------------- the command


def default_device() -> str:
    """This machine: its GPU's kind when it has one that `DEVICES` knows (else a100), or cpu."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower().replace(" ", "")
    return next((k for k in DEVICES if k in name), "a100")


def _bytes(e: Estimate, other: Estimate, ckpt: bool, s: Setup) -> dict[str, Any]:
    a = e.act
    return {
        "weights": dict(s.counts.weights), "weights_total": e.weights, "gradients": e.grads, "optimizer": e.optimizer,
        "activations": {"used": a.total(ckpt), "without_checkpointing": a.saved, "with_checkpointing": a.checkpointed,
                        "recompute": a.recompute, "autocast_weight_copies": a.weight_copies,
                        "forward_transient": a.fwd_transient, "backward_transient": a.bwd_transient},
        "extras": [{"name": x.name, "bytes": x.bytes, "note": x.note} for x in s.plan.extras],
        "peak": e.peak, "peak_phase": e.phase, "peak_other_checkpointing": other.peak,
    }


def advise(model: str = "tunelab-tiny", method: str | None = "lora", overrides: list[str] | None = None, *,
           objective: str | None = None, batch: int | None = None, seq: int | None = None,
           memory: str | int | None = None, checkpointing: bool | None = None, device: str | None = None,
           optimizer: str | None = None) -> dict[str, Any]:
    """Memory and time of training `method` on `model` (a config.json, model folder or cached hub id),
    from its config alone. `memory` (bytes or '24GiB'): does it fit, and the largest batch and
    sequence length that do. `method=None`: every registered method at its defaults."""
    device = device or default_device()
    budget = parse_memory(memory) if isinstance(memory, str) else memory
    if method is None:
        return advise_methods(model, overrides, objective=objective, batch=batch, seq=seq, memory=budget,
                              checkpointing=checkpointing, device=device, optimizer=optimizer)
    s = prepare(model, method, overrides, objective=objective, device=device, optimizer=optimizer)
    batch = batch or s.cfg.train.batch_size
    seq = seq or s.cfg.data.max_length
    ckpt = s.cfg.train.gradient_checkpointing if checkpointing is None else checkpointing
    e, other = estimate(s, batch, seq, ckpt), estimate(s, batch, seq, not ckpt)
    c = s.counts
    trainable = c.trainable + sum(n for n, _ in s.plan.trainable)
    return {
        "model": {"name": model, "type": getattr(s.hf, "model_type", "?"), "parameters": c.params,
                  "layers": len(s.decoder.blocks), "hidden": s.decoder.hidden, "vocab": s.decoder.vocab},
        "method": s.cfg.method.model_dump(mode="json"), "objective": s.cfg.objective.model_dump(mode="json"),
        "batch": batch, "seq": seq, "rows": batch * s.plan.rows, "device": device, "precision": s.precision_label,
        "optimizer": s.optimizer, "gradient_checkpointing": ckpt,
        "parameters": {"total": c.params, "trainable": trainable},
        "bytes": _bytes(e, other, ckpt, s),
        "time": step_time(s, batch, seq, ckpt),
        "fit": fit(s, budget, batch, seq, ckpt) if budget is not None else None,
        "notes": s.notes,
    }


def advise_methods(model: str, overrides: list[str] | None = None, *, objective: str | None = None,
                   batch: int | None = None, seq: int | None = None, memory: int | None = None,
                   checkpointing: bool | None = None, device: str = "cpu",
                   optimizer: str | None = None) -> dict[str, Any]:
    """Every registered method at its defaults (section overrides apply; bare method keys do not)."""
    shared = [o for o in overrides or [] if "." in o.partition("=")[0] and not o.startswith("method.")]
    rows = []
    for name in sorted(METHODS):
        try:
            s = prepare(model, name, shared, objective=objective, device=device, optimizer=optimizer)
        except TunelabError as e:
            rows.append({"method": name, "error": e.message.splitlines()[-1].removeprefix("<advise>: ")})
            continue
        b, t = batch or s.cfg.train.batch_size, seq or s.cfg.data.max_length
        ckpt = s.cfg.train.gradient_checkpointing if checkpointing is None else checkpointing
        e = estimate(s, b, t, ckpt)
        row = {"method": name, "trainable": s.counts.trainable, "weights": e.weights, "gradients": e.grads,
               "optimizer": e.optimizer, "activations": e.act.total(ckpt), "extras": e.extras, "peak": e.peak}
        if memory is not None:
            row.update(fits=e.peak <= memory,
                       max_batch=_largest(lambda n, s=s, t=t, c=ckpt: estimate(s, n, t, c).peak <= memory, 2**20))
        rows.append(row)
    notes = [f"{r['method']}: needs settings ({r['error']}); try --method {r['method']} with them"
             for r in rows if "error" in r]
    return {"model": model, "device": device, "memory": memory, "methods": rows, "notes": notes}
