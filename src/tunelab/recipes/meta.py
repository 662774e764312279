"""Meta-learning (O09): MAML, first-order MAML and Reptile over a method's trainable parameters,
then few-shot adaptation of the learned initialisation on unseen tasks.

A task family is a dataset whose records carry `task` (its name) and `split` (`support` or
`query`), e.g. `tinyworld:meta`. θ is what the method trains (LoRA's A and B, a prompt's
embeddings); the base stays frozen. U_k(θ; S) is k steps of SGD on a task's support S:
φ ← φ − α ∇L_S(φ), with L the token NLL of the replies.

- MAML (Finn et al., arXiv:1703.03400): minimise Σ_i L_Qi(U_k(θ; S_i)). Its meta-gradient
  ∇_θ L_Q(U_k(θ)) = Π_j (I − α H_j) ∇L_Q(φ) (H_j: the support Hessian at inner step j) is taken by
  differentiating through the inner loop: `torch.func.functional_call` over θ,
  `torch.autograd.grad(create_graph=True)` in it.
- First-order MAML (same paper, §5.2): the Jacobian product dropped, g = ∇_φ L_Q(φ) at φ = U_k(θ).
- Reptile (Nichol et al., arXiv:1803.02999): θ ← θ + ε · mean_i(φ_i − θ), φ_i = U_k(θ; task i).

Where the code departs from the papers:
- the outer step of maml/fomaml is Adam (`outer_lr`) on the mean meta-gradient of `tasks_per_step`
  tasks, clipped to `train.max_grad_norm`; Reptile's ε (`outer_lr`) is constant, not annealed;
- Reptile's inner loop trains on a task's support and query records together (the paper has no
  split); MAML's inner loop sees the support, its outer loss the query;
- the second-order pass runs attention on SDPA's math kernel: the fused kernels (CPU flash, CUDA
  flash / memory-efficient) have no double backward;
- a method that acts between steps or adds a penalty (AdaLoRA, DyLoRA, masks) is refused: its
  hooks would not run in the functional inner loop.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
from peft import set_peft_model_state_dict
from peft.utils import load_peft_weights
from pydantic import Field, ValidationError, field_validator
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from tunelab import owned
from tunelab.artifacts import STATE_FILE
from tunelab.config import Section, config_path, deep_merge, explain, parse_overrides, read_yaml
from tunelab.data.collate import collate
from tunelab.data.formats import resolve_format
from tunelab.data.pipeline import render_example
from tunelab.data.sources import read_all, resolve_source
from tunelab.data.types import IGNORE, Example
from tunelab.errors import ConfigError, DataError, NonFiniteError, TunelabError
from tunelab.eval.tasks import evaluate_records
from tunelab.inference.generation import pad_id
from tunelab.inference.logits import token_nll_sum
from tunelab.methods import METHODS
from tunelab.methods.registry import MethodSpec, is_peft_dir, load_trainable
from tunelab.modeling.load import load_model, load_tokenizer
from tunelab.recipes.compare.stats import summarize
from tunelab.runconfig import RunConfig, build_config
from tunelab.training.loop import mixed_precision
from tunelab.training.progress import Reporter

Params = dict[str, torch.Tensor]
Batch = dict[str, torch.Tensor]
LossFn = Callable[[Params, Any], torch.Tensor]
Say = Callable[[str], Any]

KIND = "meta"
META_FILE, INIT_FILE = "meta.json", "init.safetensors"
ENTRIES = [META_FILE, INIT_FILE]
OUTER_LR = {"maml": 1e-3, "fomaml": 1e-3, "reptile": 0.5}  # Adam's lr / Reptile's ε


class MetaConfig(Section):
    """The top-level `meta:` section of a meta config; the rest of the file is a run config."""

    algorithm: Literal["maml", "fomaml", "reptile"] = "maml"
    inner_steps: int = Field(3, gt=0, le=1000, description="SGD steps of the inner loop (k)")
    inner_lr: float = Field(0.1, gt=0, le=100, description="the inner loop's SGD step size (α)")
    outer_lr: float | None = Field(
        None, gt=0, le=100, description="maml/fomaml: Adam's lr on the meta-gradient (default 1e-3); reptile: ε, "
        "the step towards the adapted weights (default 0.5)")
    tasks_per_step: int = Field(4, gt=0, le=10_000, description="tasks averaged in one outer step")
    outer_steps: int = Field(100, gt=0, description="outer (meta) steps")
    seed: int = Field(0, ge=0, description="the method's initialisation and the task draws")
    tasks: str = Field("tinyworld:meta@train", description="the task family meta-training draws from")
    val_tasks: int = Field(8, ge=0, description="tasks of `tasks` held out of meta-training; the curve's "
                           "query loss after inner_steps on their support is measured on them")
    eval_every: int = Field(10, gt=0, description="outer steps between measurements of the curve")
    eval_tasks: str = Field("tinyworld:meta@test", description="the unseen tasks `meta-eval` adapts to")
    limit: int | None = Field(None, gt=0, description="evaluate the first N eval tasks only")
    adapt_steps: list[int] = Field([1, 5, 20], description="adaptation steps at which eval measures")
    adapt_lr: float | None = Field(None, gt=0, le=100, description="eval's adaptation lr (default inner_lr)")
    adapt_optimizer: Literal["sgd", "adam"] = Field("sgd", description="eval's adaptation optimizer")

    @field_validator("adapt_steps")
    @classmethod
    def _steps(cls, v: list[int]) -> list[int]:
        if not v or any(s < 0 or s > 100_000 for s in v):
            raise ValueError("give one or more step counts, each from 0 to 100000")
        return sorted(set(v))

    @property
    def step_size(self) -> float:
        return self.outer_lr if self.outer_lr is not None else OUTER_LR[self.algorithm]


# ----------------------------------------------------------------------------- the algorithms (pure)


def adapt(params: Params, loss_fn: LossFn, data: Any, steps: int, lr: float, *, create_graph: bool = False,
          losses: list[float] | None = None) -> Params:
    """`steps` SGD steps from `params`: φ ← φ − lr ∇L(φ; data). `create_graph`: φ stays a function of
    `params` (which must require grad), for MAML's second order; else no graph is kept between steps.
    `losses` collects the loss before each step."""
    phi = params if create_graph else _leaves(params)
    for _ in range(steps):
        loss = loss_fn(phi, data)
        if losses is not None:
            losses.append(loss.item())
        grads = torch.autograd.grad(loss, list(phi.values()), create_graph=create_graph, materialize_grads=True)
        phi = {n: p - lr * g for (n, p), g in zip(phi.items(), grads, strict=True)}
        phi = phi if create_graph else _leaves(phi)
    return phi


def meta_gradient(params: Params, loss_fn: LossFn, support: Any, query: Any, inner_steps: int, inner_lr: float,
                  order: int) -> tuple[Params, float]:
    """(∇_θ L_query(U_k(θ)), L_query(U_k(θ))) with U_k: `inner_steps` SGD steps on `support`.
    order 2: exact, through the inner loop (MAML); order 1: ∇_φ L_query(φ) at φ = U_k(θ) (FOMAML)."""
    if order not in (1, 2):
        raise ValueError(f"order is 1 or 2, not {order}")
    theta = _leaves(params)
    with _double_backward_attention(order == 2):
        phi = adapt(theta, loss_fn, support, inner_steps, inner_lr, create_graph=order == 2)
        phi = phi if order == 2 else _leaves(phi)
        loss = loss_fn(phi, query)
        grads = torch.autograd.grad(loss, list((theta if order == 2 else phi).values()), materialize_grads=True)
    return dict(zip(theta, grads, strict=True)), loss.item()


def reptile_update(params: Params, adapted: list[Params], outer_lr: float) -> Params:
    """θ + ε · mean_i(φ_i − θ)."""
    return {n: p.detach() + outer_lr * torch.stack([phi[n].detach() - p.detach() for phi in adapted]).mean(0)
            for n, p in params.items()}


def reptile_step(params: Params, loss_fn: LossFn, datas: list[Any], inner_steps: int, inner_lr: float,
                 outer_lr: float) -> tuple[Params, float]:
    """One Reptile step over tasks `datas`; also the mean loss of the tasks' first inner step."""
    before: list[float] = []
    adapted = []
    for data in datas:
        losses: list[float] = []
        adapted.append(adapt(params, loss_fn, data, inner_steps, inner_lr, losses=losses))
        before.append(losses[0])
    return reptile_update(params, adapted, outer_lr), sum(before) / len(before)


def _leaves(params: Params) -> Params:
    return {n: p.detach().requires_grad_() for n, p in params.items()}


def _double_backward_attention(on: bool) -> contextlib.AbstractContextManager:
    return sdpa_kernel(SDPBackend.MATH) if on else contextlib.nullcontext()


def lm_loss(model: nn.Module) -> LossFn:
    """Token-mean NLL of a batch's trained tokens, the model run with `params` in place of its own."""
    def loss(params: Params, batch: Batch) -> torch.Tensor:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
        out = functional_call(model, params, (), {**inputs, "use_cache": False})
        logits = out.logits[:, -batch["input_ids"].shape[1]:]  # (B, T, V): prompt methods prepend positions
        total, count = token_nll_sum(logits, batch["labels"])
        return total / count.clamp(min=1)
    return loss


# ----------------------------------------------------------------------------- config, tasks, model


def load_meta_config(config: str | Path | dict[str, Any], overrides: list[str] | None = None
                     ) -> tuple[RunConfig, MetaConfig]:
    """A run config with a top-level `meta:` section (a path, a shipped name or a dict), plus
    overrides (`meta.inner_lr=0.1`, `method.r=4`)."""
    source = "<config>" if isinstance(config, dict) else str(config_path(config))
    raw = dict(config) if isinstance(config, dict) else read_yaml(source)
    return split_config(deep_merge(raw, parse_overrides(overrides or [])), source)


def split_config(raw: dict[str, Any], source: str = "<config>") -> tuple[RunConfig, MetaConfig]:
    raw = dict(raw)
    section = raw.pop("meta", None) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: meta: a mapping of meta-learning settings, not {type(section).__name__}")
    try:
        meta = MetaConfig.model_validate(section)
    except ValidationError as e:
        raise ConfigError("\n".join(f"{source}: {line}" for line in explain(e, MetaConfig, "meta").splitlines())
                          ) from None
    cfg = build_config(raw, source)
    if cfg.objective.name != "sft":
        raise ConfigError(f"{source}: objective {cfg.objective.name}: meta-learning trains the replies' token NLL",
                          fix="set objective.name: sft (or leave the objective section out)")
    return cfg, meta


@dataclass(frozen=True)
class Task:
    name: str
    support: Batch
    query: Batch
    both: Batch  # support then query: Reptile's inner data
    query_records: list[dict[str, Any]]


def group_tasks(records: list[dict[str, Any]], where: str) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """{task: {"support": records, "query": records}}, in file order; every task needs both."""
    fix = 'give every record "task": <name> and "split": "support" or "query" (as tinyworld:meta has)'
    if not records:
        raise DataError(f"{where}: no records", fix=fix)
    groups: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for i, r in enumerate(records, 1):
        if "task" not in r or "split" not in r:
            missing = [f"'{k}'" for k in ("task", "split") if k not in r]
            raise DataError(f"{where}: record {i} has no {' and '.join(missing)} field{'s' * (len(missing) > 1)}: "
                            "meta-learning needs records grouped into tasks with support and query splits", fix=fix)
        if r["split"] not in ("support", "query"):
            raise DataError(f"{where}: record {i} has split {r['split']!r}; a task's splits are support and query",
                            fix=fix)
        groups.setdefault(str(r["task"]), {"support": [], "query": []})[r["split"]].append(r)
    for name, g in groups.items():
        for split in ("support", "query"):
            if not g[split]:
                raise DataError(f"{where}: task {name!r} has no {split} records", fix=fix)
    return groups


def load_tasks(source: str, tokenizer: Any, cfg: RunConfig, *, limit: int | None = None,
               device: torch.device | str = "cpu") -> list[Task]:
    """The tasks of `source` (the first `limit`), tokenized as the loop would: replies trained."""
    path = resolve_source(source)
    records = read_all(path)
    groups = list(group_tasks(records, source).items())[:limit]
    fmt = resolve_format(cfg.data.format, [(f"{source}:{i}", r) for i, r in enumerate(records, 1)], source)

    def batch(name: str, rs: list[dict[str, Any]]) -> Batch:
        try:
            examples = [_encode(r, fmt, tokenizer, cfg) for r in rs]
        except DataError as e:
            raise DataError(f"{source}: task {name!r}: {e.message}", fix=e.fix) from None
        return {k: v.to(device) for k, v in collate([[e] for e in examples], pad_id(tokenizer), False).items()}

    return [Task(name, batch(name, g["support"]), batch(name, g["query"]), batch(name, g["support"] + g["query"]),
                 g["query"]) for name, g in groups]


def _encode(record: dict[str, Any], fmt: str, tokenizer: Any, cfg: RunConfig) -> Example:
    ids, labels = render_example(record, fmt, tokenizer, mask_prompt=True, chat_template=cfg.data.chat_template)
    if any(x != IGNORE for x in labels[cfg.data.max_length:]):
        raise DataError(f"{len(ids)} tokens: data.max_length {cfg.data.max_length} would cut the reply",
                        fix="raise data.max_length")
    return Example(ids[:cfg.data.max_length], labels[:cfg.data.max_length])


def _default_hook(name: str) -> Any:
    return next(f.default for f in fields(MethodSpec) if f.name == name)


def build_model(cfg: RunConfig, seed: int, device: torch.device | str = "cpu") -> nn.Module:
    """The base with the method applied (its initialisation drawn from `seed`), in train mode."""
    spec = METHODS[cfg.method.name]
    for hook in ("on_step", "penalty"):
        if getattr(spec, hook) is not _default_hook(hook):
            raise TunelabError(f"method {spec.name} acts between steps or adds a penalty ({hook}); meta-learning's "
                               "functional inner loop would skip it", fix="use a method without hooks, e.g. lora, "
                               "prompt, bitfit")
    torch.manual_seed(seed)
    model = spec.apply(load_model(cfg.model), cfg.method).to(device)
    model.train()
    return model


def trainable_params(model: nn.Module, method: str) -> Params:
    """θ: the parameters the method trains, by name."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise TunelabError(f"method {method} leaves no trainable parameter: nothing to meta-learn",
                           fix="choose a method that trains parameters, e.g. lora or prompt")
    return params


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast(cfg: RunConfig, dev: torch.device) -> contextlib.AbstractContextManager:
    mp = mixed_precision(cfg.train.precision)
    if mp == "no":
        return contextlib.nullcontext()
    return torch.autocast(dev.type, dtype=torch.bfloat16 if mp == "bf16" else torch.float16)


# ----------------------------------------------------------------------------- meta-training


def meta_train(config: str | Path | dict[str, Any], overrides: list[str] | None = None,
               out_dir: str | Path | None = None, *, say: Say | None = None, quiet: bool = False,
               overwrite: bool = False, force: bool = False) -> dict[str, Any]:
    """Meta-train the method's trainable parameters over `meta.tasks`; writes `out_dir`/meta.json
    (config, curve) and init.safetensors (θ by parameter name). Returns meta.json's content.
    `overwrite`: start over a folder an earlier meta run wrote; `force`: write into a non-empty
    folder tunelab did not make, beside its files."""
    cfg, meta = load_meta_config(config, overrides)
    say = say or Reporter(None, quiet=quiet).say
    out = Path(out_dir) if out_dir is not None else Path(f"runs/meta-{meta.algorithm}")
    owned.preflight(out, KIND, what="--out", force=force)
    dev = device()
    tokenizer = load_tokenizer(cfg.model)
    tasks = load_tasks(meta.tasks, tokenizer, cfg, device=dev)
    if len(tasks) <= meta.val_tasks:
        raise TunelabError(f"meta.tasks {meta.tasks}: {len(tasks)} tasks, and meta.val_tasks holds out "
                           f"{meta.val_tasks}", fix="lower meta.val_tasks, or give more tasks")
    held = set(random.Random(meta.seed).sample(range(len(tasks)), meta.val_tasks))
    train_tasks = [t for i, t in enumerate(tasks) if i not in held]
    val = [t for i, t in enumerate(tasks) if i in held]
    model = build_model(cfg, meta.seed, dev)
    theta = {n: p.detach().clone() for n, p in trainable_params(model, cfg.method.name).items()}
    n_params = sum(p.numel() for p in theta.values())
    _claim(out, overwrite, force)
    say(f"meta {meta.algorithm}: {cfg.method.name} on {cfg.model.name_or_path}, {n_params:,} meta-parameters; "
        f"{len(train_tasks)} tasks ({len(val)} held out for the curve), {meta.outer_steps} outer "
        f"steps of {meta.tasks_per_step} tasks, {meta.inner_steps} inner steps at lr {meta.inner_lr}")
    t0 = time.perf_counter()
    with _autocast(cfg, dev):
        curve = _meta_loop(theta, lm_loss(model), train_tasks, val, meta, cfg.train.max_grad_norm, say)
    result = {"algorithm": meta.algorithm, "config": {**cfg.to_dict(), "meta": meta.model_dump(mode="json")},
              "meta_parameters": n_params, "train_tasks": len(train_tasks),
              "val_tasks": [t.name for t in val], "seconds": round(time.perf_counter() - t0, 1), "curve": curve}
    tmp = out / f".{INIT_FILE}.tmp-{os.getpid()}"
    save_file({n: p.detach().cpu().contiguous() for n, p in theta.items()}, str(tmp))
    os.replace(tmp, out / INIT_FILE)
    owned.write_atomic(out / META_FILE, json.dumps(result, indent=1))
    last = next((c["val_query_loss"] for c in reversed(curve) if "val_query_loss" in c), None)
    say(f"done: {out}/{INIT_FILE}" + (f"  val query loss {curve[0]['val_query_loss']:.4f} -> {last:.4f}"
                                      if last is not None else ""))
    return result


def _claim(out: Path, overwrite: bool, force: bool) -> None:
    """Like a run dir: a folder holding an earlier meta run's files is started over only with `overwrite`."""
    if owned.state(out, KIND) == "owned" and any((out / e).exists() for e in owned.owned_entries(out)) \
            and not overwrite:
        raise TunelabError(f"--out {out} already holds a meta-learned init",
                           fix="pass --overwrite to start it over, or choose another --out")
    owned.claim(out, KIND, ENTRIES, what="--out", replace=True, force=force)


def _meta_loop(theta: Params, loss_fn: LossFn, tasks: list[Task], val: list[Task], meta: MetaConfig,
               max_norm: float | None, say: Say) -> list[dict[str, Any]]:
    rng = random.Random(meta.seed)
    opt = torch.optim.Adam(list(theta.values()), lr=meta.step_size) if meta.algorithm != "reptile" else None
    curve = [{"step": 0, **_validate(theta, loss_fn, val, meta)}]
    every = max(1, meta.outer_steps // 20)
    t0 = time.perf_counter()
    for step in range(1, meta.outer_steps + 1):
        chosen = rng.sample(tasks, min(meta.tasks_per_step, len(tasks)))
        point = {"step": step, **_outer_step(theta, opt, loss_fn, chosen, meta, max_norm)}
        if not math.isfinite(point[_LOGGED[meta.algorithm]]):
            raise NonFiniteError(f"meta step {step}: the loss is {point[_LOGGED[meta.algorithm]]}",
                                 fix="lower meta.inner_lr or meta.outer_lr")
        if step % meta.eval_every == 0 or step == meta.outer_steps:
            point.update(_validate(theta, loss_fn, val, meta))
        curve.append(point)
        if step % every == 0 or step == meta.outer_steps or "val_query_loss" in point:
            say(_progress(point, meta, time.perf_counter() - t0))
    return curve


# what an outer step logs: the query loss after adaptation (maml/fomaml), the loss before it (reptile)
_LOGGED = {"maml": "query_loss", "fomaml": "query_loss", "reptile": "task_loss"}


def _outer_step(theta: Params, opt: torch.optim.Optimizer | None, loss_fn: LossFn, tasks: list[Task],
                meta: MetaConfig, max_norm: float | None) -> dict[str, float]:
    """One meta-update of θ in place."""
    if meta.algorithm == "reptile":
        new, loss = reptile_step(theta, loss_fn, [t.both for t in tasks], meta.inner_steps, meta.inner_lr,
                                 meta.step_size)
        with torch.no_grad():
            for n, p in theta.items():
                p.copy_(new[n])
        return {"task_loss": loss}
    order = 2 if meta.algorithm == "maml" else 1
    grads, losses = zip(*(meta_gradient(theta, loss_fn, t.support, t.query, meta.inner_steps, meta.inner_lr, order)
                          for t in tasks), strict=True)
    for n, p in theta.items():
        p.grad = torch.stack([g[n] for g in grads]).mean(0)
    norm = torch.nn.utils.clip_grad_norm_(list(theta.values()), max_norm or math.inf)
    assert opt is not None
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {"query_loss": sum(losses) / len(losses), "grad_norm": norm.item()}


def _validate(theta: Params, loss_fn: LossFn, tasks: list[Task], meta: MetaConfig) -> dict[str, float]:
    """Mean query loss of held-out tasks after `inner_steps` SGD steps on their support."""
    if not tasks:
        return {}
    losses = []
    for t in tasks:
        phi = adapt(theta, loss_fn, t.support, meta.inner_steps, meta.inner_lr)
        with torch.no_grad():
            losses.append(loss_fn(phi, t.query).item())
    return {"val_query_loss": sum(losses) / len(losses)}


def _progress(point: dict[str, Any], meta: MetaConfig, elapsed: float) -> str:
    step, total = point["step"], meta.outer_steps
    key = _LOGGED[meta.algorithm]
    val = f" val query loss {point['val_query_loss']:.4f}" if "val_query_loss" in point else ""
    return (f"meta step {step}/{total}: {key.replace('_', ' ')} {point[key]:.4f}{val} elapsed {_clock(elapsed)} "
            f"eta {_clock(elapsed / step * (total - step))}")


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


# ----------------------------------------------------------------------------- few-shot adaptation


Init = str | Path | dict[str, torch.Tensor] | None


def adapt_eval(init: Init = "base", config: str | Path | dict[str, Any] | None = None,
               steps: list[int] | None = None, *, overrides: list[str] | None = None, tasks: str | None = None,
               limit: int | None = None, lr: float | None = None, optimizer: str | None = None,
               seed: int | None = None, say: Say | None = None, quiet: bool = False) -> dict[str, Any]:
    """Few-shot adaptation on unseen tasks: for each task of `tasks` (default meta.eval_tasks), θ
    starts at `init`, takes `steps` (default meta.adapt_steps) optimizer steps on the support
    records, and the query records are measured (exact match of greedy replies, token NLL) at step
    0 and at each of `steps`. Returns each step's mean and 95 % CI over tasks, and per-task values.

    `init`: "base" (the method's fresh initialisation, drawn from `seed`), a `meta_train` folder, a
    `tunelab train` run folder (its final adapter or delta), a .safetensors of θ by name, or such a
    dict. The model and method come from `init` when it carries a config, else from `config`; the
    meta section (what to adapt to, how) from `config`, else from the init's, else the defaults."""
    cfg, meta, load_state = resolve_init(init, config, overrides)
    marks = sorted({0, *(steps if steps is not None else meta.adapt_steps)})
    if any(s < 0 for s in marks):
        raise TunelabError(f"steps {marks}: a step count is 0 or more")
    lr = lr or meta.adapt_lr or meta.inner_lr
    optimizer = optimizer or meta.adapt_optimizer
    if optimizer not in ("sgd", "adam"):
        raise TunelabError(f"optimizer {optimizer}: unknown", fix="choose sgd or adam")
    say = say or Reporter(None, quiet=quiet).say
    dev = device()
    tokenizer = load_tokenizer(cfg.model)
    source = tasks or meta.eval_tasks
    found = load_tasks(source, tokenizer, cfg, limit=limit or meta.limit, device=dev)
    model = build_model(cfg, meta.seed if seed is None else seed, dev)
    params = trainable_params(model, cfg.method.name)
    if load_state is not None:
        load_state(model)
    start = {n: p.detach().clone() for n, p in params.items()}
    per_task, t0 = [], time.perf_counter()
    with _autocast(cfg, dev):
        for i, task in enumerate(found, 1):
            per_task.append(_adapt_one(model, params, start, task, marks, lr, optimizer, tokenizer))
            em = per_task[-1]["exact_match"]
            elapsed = time.perf_counter() - t0
            say(f"adapt {i}/{len(found)} {task.name}: exact match {em[0]:.2f} -> {em[-1]:.2f} ({marks[-1]} steps) "
                f"elapsed {_clock(elapsed)} eta {_clock(elapsed / i * (len(found) - i))}")
    return {"init": init if isinstance(init, str) or init is None else ("tensors" if isinstance(init, dict) else
            str(init)), "method": cfg.method.name, "tasks": source, "n_tasks": len(found), "optimizer": optimizer,
            "lr": lr, "steps": marks, **{key: _summary(per_task, key, marks) for key in ("exact_match", "query_loss")},
            "per_task": per_task}


def adapt_table(result: dict[str, Any]) -> str:
    """adapt_eval's result as text: one line per step, the mean and 95 % CI over tasks."""
    lines = [f"init {result['init']} ({result['method']}, {result['optimizer']} lr {result['lr']:g}) on "
             f"{result['tasks']}: {result['n_tasks']} tasks", f"{'steps':>5}  {'exact match':<16} query NLL"]
    for step in result["steps"]:
        em, nll = result["exact_match"][str(step)], result["query_loss"][str(step)]
        lines.append(f"{step:>5}  {_pm(em, 3):<16} {_pm(nll, 2)}")
    return "\n".join(lines)


def _pm(s: dict[str, Any], digits: int) -> str:
    return f"{s['mean']:.{digits}f}" + ("" if s["ci95"] is None else f" ± {s['ci95']:.{digits}f}")


def _adapt_one(model: nn.Module, params: Params, start: Params, task: Task, marks: list[int], lr: float,
               optimizer: str, tokenizer: Any) -> dict[str, Any]:
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(start[n])
    opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)(list(params.values()), lr=lr)
    loss_fn = lm_loss(model)
    out: dict[str, Any] = {"task": task.name, "exact_match": [], "query_loss": []}
    for step in range(marks[-1] + 1):
        if step in marks:
            model.eval()
            with torch.no_grad():
                out["query_loss"].append(loss_fn(params, task.query).item())
            out["exact_match"].append(evaluate_records(model, tokenizer, task.query_records, kind="generative",
                                                       with_loss=False)["exact_match"])
            model.train()
        if step < marks[-1]:
            opt.zero_grad(set_to_none=True)
            loss_fn(params, task.support).backward()
            opt.step()
    return out


def _summary(per_task: list[dict[str, Any]], key: str, marks: list[int]) -> dict[str, dict[str, Any]]:
    out = {}
    for j, step in enumerate(marks):
        s = summarize([t[key][j] for t in per_task])
        out[str(step)] = {"mean": s.mean, "ci95": None if math.isnan(s.half_width) else s.half_width}
    return out


def resolve_init(init: Init, config: str | Path | dict[str, Any] | None, overrides: list[str] | None
                 ) -> tuple[RunConfig, MetaConfig, Callable[[nn.Module], None] | None]:
    """(run config, meta config, what loads θ into the built model) of an init; see adapt_eval."""
    user = {} if config is None else (dict(config) if isinstance(config, dict) else read_yaml(config_path(config)))
    carried, load_state = _init_source(init)
    if carried is None and config is None:
        raise TunelabError(f"init {init}: carries no config, so the model and method are unknown",
                           fix="pass a meta config (e.g. configs/meta-lora.yaml) as well")
    raw = dict(user)
    if carried is not None:
        raw = deep_merge(raw, {k: v for k, v in carried.items() if k != "meta"})
        raw["meta"] = user.get("meta", carried.get("meta", {}))
    cfg, meta = split_config(deep_merge(raw, parse_overrides(overrides or [])),
                             "<config>" if config is None or isinstance(config, dict) else str(config))
    return cfg, meta, load_state


def _init_source(init: Init) -> tuple[dict[str, Any] | None, Callable[[nn.Module], None] | None]:
    """(the config an init carries, the loader of its θ); None, None for the base."""
    if init is None or (isinstance(init, str) and init == "base"):
        return None, None
    if isinstance(init, dict):
        return None, _by_name(init, "the given tensors")
    p = Path(init)
    if p.is_dir() and (p / META_FILE).is_file():
        if not (p / INIT_FILE).is_file():
            raise TunelabError(f"init {init}: no {INIT_FILE} (the meta run did not finish)",
                               fix=f"run `tunelab meta` into {init} again")
        return json.loads((p / META_FILE).read_text(encoding="utf-8"))["config"], _by_name(load_file(
            str(p / INIT_FILE)), str(p))
    if p.is_dir() and (p / "config.yaml").is_file() and (p / "final").is_dir():
        raw = read_yaml(p / "config.yaml")  # a run's settings never grant code or pickle
        raw["model"] = {**raw.get("model", {}), "trust_remote_code": False, "allow_pickle": False}
        return raw, _from_run(p / "final")
    if p.is_file() and p.suffix == ".safetensors":
        return None, _by_name(load_file(str(p)), str(p))
    raise TunelabError(f"init {init}: not an initialisation", fix="pass base, a `tunelab meta` output folder, a "
                       "`tunelab train` run folder (with final/), or a .safetensors of trainable tensors")


def _by_name(tensors: dict[str, torch.Tensor], where: str) -> Callable[[nn.Module], None]:
    def load(model: nn.Module) -> None:
        try:
            load_trainable(model, tensors)
        except RuntimeError as e:
            raise TunelabError(f"{where}: {e}", fix="adapt with the model and method it was trained with") from None
    return load


def _from_run(final: Path) -> Callable[[nn.Module], None]:
    def load(model: nn.Module) -> None:
        if is_peft_dir(final):
            result = set_peft_model_state_dict(model, load_peft_weights(str(final)))
            if result.unexpected_keys:
                raise TunelabError(f"{final}: adapter weights {result.unexpected_keys[:3]} do not fit the method",
                                   fix="adapt with the method the run trained")
        elif (final / STATE_FILE).is_file():
            _by_name(load_file(str(final / STATE_FILE)), str(final))(model)
        else:
            raise TunelabError(f"{final}: a full model, not an adapter or delta to start from",
                               fix="set model.name_or_path to it and adapt a fresh method (init base)")
    return load
