"""Continual learning (O08): an ordered list of tasks (`stages:`), trained one after another, every task
evaluated after every stage.

A continual config is a run config (model, data settings, method, objective, train) plus `stages:` and
`continual:`. Each stage is an ordinary run (recipes/run.train) in OUT/stage-<k>; what carries over
between stages is the strategy's:

- naive: the same trainable parameters (the method is applied once, at stage 1), trained further on
  each task in turn: sequential fine-tuning, the forgetting baseline.
- replay: naive, with a reservoir buffer of earlier stages' training records (OUT/replay.jsonl, at
  most `buffer_size`; Algorithm R, so every record seen so far is in it with the same chance) mixed
  into each later stage at `replay_share` (a multi-task mixture by weight, data/mixture.py).
- ewc: naive plus, after each stage k, the diagonal empirical Fisher F_k of the trainable parameters
  on that stage's data and their values theta*_k (OUT/ewc/stage-<k>.safetensors); later stages add
  lambda/2 * sum_k sum_i F_k,i (theta_i - theta*_k,i)^2 to every step's loss.
- lwf: naive, with the `distill` objective from stage 2 on: the previous stage's model is the
  frozen teacher on the new task's inputs (hard_weight = 1 - lwf_weight).
- adapters: a fresh adapter per stage on the base; at evaluation each task is answered by its own
  stage's adapter (routed by task id), a task not yet trained by the base.

After every stage each task's evaluation data is scored (`metric`, exact match by default): row k of
the accuracy matrix R (R[k][j]: task j after stage k), with b_j the base's score. Then
ACC = mean_j R[T][j], BWT = mean_{j<T} (R[T][j] - R[j][j]), FWT = mean_{j>1} (R[j-1][j] - b_j)
(Lopez-Paz & Ranzato 2017). OUT/continual.json holds everything measured so far, written after each
stage: a failure in stage k loses nothing of stages 1..k-1, and `--resume` continues in stage k (its
own run resumed from its checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab import owned
from tunelab.config import Section, deep_merge, explain, parse_overrides, read_yaml
from tunelab.data.pipeline import load_tokenized
from tunelab.data.sources import read_all, resolve_source
from tunelab.errors import ConfigError, DataError, TunelabError
from tunelab.eval.suite import evaluate_task
from tunelab.eval.tasks import load_model_or_run
from tunelab.methods import METHODS
from tunelab.methods.registry import load_trainable
from tunelab.modeling.load import load_model, load_tokenizer
from tunelab.objectives import OBJECTIVES
from tunelab.recipes.continual_math import diagonal_fisher, ewc_penalty, reservoir_add, transfer_metrics
from tunelab.recipes.run import resolve_config, train
from tunelab.runconfig import RunConfig
from tunelab.training import checkpoint
from tunelab.training.loop import TrainResult

STRATEGIES = ("naive", "replay", "ewc", "lwf", "adapters")
REPLAY_TASK = "replay"


class Stage(Section):
    task: str = Field(description="the task's name (unique): the accuracy matrix's row and column")
    train: str = Field(description="its training data (file, datasets dir or tinyworld: task)")
    eval: str = Field(description="its evaluation data, scored after every stage")
    max_steps: int | None = Field(None, gt=0, le=10**9, description="this stage's budget (default: train.max_steps)")


class ContinualConfig(Section):
    strategy: Literal["naive", "replay", "ewc", "lwf", "adapters"] = "naive"
    replay_share: float = Field(0.2, gt=0, lt=1, description="replay: share of a later stage's draws from the buffer")
    buffer_size: int = Field(1000, gt=0, le=10**7, description="replay: records kept from earlier stages")
    ewc_lambda: float = Field(10000.0, gt=0, le=1e12, description="ewc: the penalty's weight lambda (10,000 halves "
                              "forgetting on configs/continual-skills.yaml at no cost in ACC; 100 barely acts)")
    fisher_samples: int = Field(200, gt=0, le=10**6, description="ewc: examples the Fisher is averaged over")
    lwf_weight: float = Field(0.5, gt=0, lt=1, description="lwf: weight of the distillation from the previous stage")
    lwf_temperature: float = Field(2.0, gt=0, le=100)
    metric: str = Field("exact_match", description="the score of each task's evaluation (a key of `tunelab eval`)")
    eval_limit: int | None = Field(None, gt=0, description="score only the first N records of each task's eval")


class ContinualSpec(Section):
    stages: list[Stage]
    continual: ContinualConfig = ContinualConfig()

    @model_validator(mode="after")
    def _stages(self) -> ContinualSpec:
        if len(self.stages) < 2:
            raise ValueError("continual learning needs at least 2 stages")
        names = [s.task for s in self.stages]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"task {', '.join(map(repr, twice))} names more than one stage; give each stage its own "
                             "task name")
        if self.continual.strategy == "replay" and REPLAY_TASK in names:
            raise ValueError(f"task name {REPLAY_TASK!r} is the replay buffer's; rename that stage")
        return self


def read_spec(config: str | Path | dict[str, Any], overrides: list[str] | None = None) -> tuple[ContinualSpec,
                                                                                                 dict[str, Any]]:
    """(the stages and strategy, the run config shared by every stage) of a continual config file or dict."""
    raw = dict(config) if isinstance(config, dict) else read_yaml(config)
    raw = deep_merge(raw, parse_overrides(overrides or []))
    source = str(config) if not isinstance(config, dict) else "<config>"
    if "stages" not in raw:
        raise ConfigError(f"{source}: no `stages:`; a continual config lists its tasks in order",
                          fix="add stages: [{task: NAME, train: DATA, eval: DATA}, ...] (docs/regimes.md)")
    try:
        spec = ContinualSpec.model_validate({"stages": raw.pop("stages"), "continual": raw.pop("continual", {})})
    except ValidationError as e:
        raise ConfigError("\n".join(f"{source}: {line}" for line in explain(e, ContinualSpec).splitlines())) from None
    run = resolve_config(raw)  # every section checked once, before anything trains
    if run.data.tasks() or run.data.train is not None:
        raise ConfigError(f"{source}: data.train is set; each stage names its own data",
                          fix="move the training data into stages: [{task, train, eval}]")
    strategy = spec.continual.strategy
    if strategy in ("lwf", "ewc") and run.objective.name not in ("sft", "lm"):
        why = "distils the previous stage's next-token distributions" if strategy == "lwf" else \
            "weighs parameters by the Fisher of the next-token likelihood"
        raise ConfigError(f"{source}: {strategy} {why}: use objective sft or lm (not {run.objective.name})")
    return spec, raw


def check_stage_data(spec: ContinualSpec) -> None:
    """Every stage's data exists and holds records, before the first stage trains."""
    for i, stage in enumerate(spec.stages, 1):
        for what in ("train", "eval"):
            path = resolve_source(getattr(stage, what))
            try:
                n = len(read_all(path))
            except DataError as e:
                raise DataError(f"stage {i} ({stage.task}): {what} data {e.message}", fix=e.fix) from None
            if n == 0:
                raise DataError(f"stage {i} ({stage.task}): its {what} data {path} holds no records",
                                fix=f"point stages[{i - 1}].{what} at a file with records")


# ----------------------------------------------------------------------------- the recipe


STATE = "continual.json"


def _entries(spec: ContinualSpec) -> list[str]:
    return [STATE, "config.yaml", "replay.jsonl", "ewc", "matrix.png", *(_stage_name(i) for i in
                                                                       range(1, len(spec.stages) + 1))]


def _stage_name(k: int) -> str:
    return f"stage-{k}"


def _digest(spec: ContinualSpec, raw: dict[str, Any]) -> str:
    blob = json.dumps({"spec": spec.model_dump(mode="json"), "run": raw}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def continual(config: str | Path | dict[str, Any], overrides: list[str] | None = None, *, out: str | Path,
              resume: bool = False, overwrite: bool = False, quiet: bool = False,
              say: Callable[[str], Any] = print) -> dict[str, Any]:
    """Train the stages in order under the strategy, scoring every task after every stage; returns (and
    writes to OUT/continual.json) the accuracy matrix and ACC / BWT / FWT."""
    spec, raw = read_spec(config, overrides)
    check_stage_data(spec)
    out = Path(out)
    digest = _digest(spec, raw)
    state = _open(out, spec, digest, resume, overwrite)
    c = spec.continual
    run = resolve_config(raw)
    tokenizer = load_tokenizer(run.model)
    names = [s.task for s in spec.stages]
    T = len(names)
    if state["base"] is None:
        say(f"continual: {T} stages ({', '.join(names)}), strategy {c.strategy}; scoring the base on every task")
        base_pair = load_model_or_run(run.model.name_or_path)
        state["base"] = [_score(base_pair, s, c) for s in spec.stages]
        _save(out, state)
    start = time.perf_counter()
    for k in range(state["done"] + 1, T + 1):
        stage = spec.stages[k - 1]
        t0 = time.perf_counter()
        eta = "" if k == state["done_at_start"] + 1 else \
            f", eta {_clock((time.perf_counter() - start) / (k - 1 - state['done_at_start']) * (T - k + 1))}"
        say(f"continual: stage {k}/{T} ({stage.task}){eta}")
        result = _train_stage(out, spec, raw, run, k, state, tokenizer, quiet)
        row = _evaluate_after(out, spec, run, k)
        state["R"].append(row)
        state["stages"].append({"task": stage.task, "steps": result.steps, "seconds": time.perf_counter() - t0,
                                "loss": result.metrics.get("loss")})
        state["done"] = k
        _after_stage(out, spec, run, k, state, tokenizer)
        _save(out, state)
        say(f"continual: after stage {k}: " + ", ".join(
            f"{n} {v:.3f}" for n, v in zip(names, row, strict=True)))
    state.update(transfer_metrics(state["R"], state["base"]))
    _save(out, state)
    _plot(out, state, say)
    say(f"continual: ACC {state['acc']:.3f}  BWT {state['bwt']:+.3f}  FWT {state['fwt']:+.3f}  ({out}/{STATE}, "
        f"{out}/matrix.png)")
    return state


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _open(out: Path, spec: ContinualSpec, digest: str, resume: bool, overwrite: bool) -> dict[str, Any]:
    """The state to continue from: a fresh one (the folder claimed), or the saved one (`resume`)."""
    found = owned.state(out, "continual")
    if resume:
        if found != "owned" or not (out / STATE).is_file():
            raise TunelabError(f"{out}: no continual run to resume", fix="start it without --resume")
        state = json.loads((out / STATE).read_text(encoding="utf-8"))
        if state.get("digest") != digest:
            raise TunelabError(f"{out}: the config differs from the one this continual run started with",
                               fix="resume with the same config and overrides, or start over with --overwrite")
        state["done_at_start"] = state["done"]
        return state
    if found == "owned" and (out / STATE).is_file() and not overwrite:
        raise TunelabError(f"{out} already holds a continual run", fix="pass --resume to continue it, --overwrite "
                           "to start over, or choose another --out")
    owned.claim(out, "continual", _entries(spec), what="--out", replace=True, force=False)
    state = {"version": 1, "digest": digest, "strategy": spec.continual.strategy, "metric": spec.continual.metric,
             "tasks": [s.task for s in spec.stages], "base": None, "R": [], "stages": [], "done": 0,
             "done_at_start": 0, "replay_seen": 0}
    _save(out, state)
    return state


def _save(out: Path, state: dict[str, Any]) -> None:
    owned.write_atomic(out / STATE, json.dumps(state, indent=1))


def _score(pair: tuple[nn.Module, Any], stage: Stage, c: ContinualConfig) -> float:
    m = evaluate_task(pair, stage.eval, limit=c.eval_limit)
    if c.metric not in m:
        raise TunelabError(f"{stage.eval}: its evaluation has no {c.metric!r}",
                           fix="set continual.metric to one of: " + ", ".join(k for k, v in m.items()
                                                                            if isinstance(v, float)))
    return float(m[c.metric])


def _stage_config(out: Path, spec: ContinualSpec, raw: dict[str, Any], k: int, state: dict[str, Any]) -> dict:
    c, stage = spec.continual, spec.stages[k - 1]
    d: dict[str, Any] = deep_merge(raw, {"data": {"train": stage.train, "eval": None},
                                         "output": {"dir": str(out / _stage_name(k))}})
    if stage.max_steps is not None:
        d = deep_merge(d, {"train": {"max_steps": stage.max_steps, "epochs": None}})
    if k > 1 and c.strategy == "replay":
        d["data"]["train"] = [{"source": stage.train, "task": stage.task, "weight": 1 - c.replay_share},
                              {"source": str(out / "replay.jsonl"), "task": REPLAY_TASK, "weight": c.replay_share}]
    if k > 1 and c.strategy == "lwf":
        teacher = out / _stage_name(k - 1)
        d["objective"] = {"name": "distill", "teacher": str(teacher), "temperature": c.lwf_temperature,
                          "hard_weight": 1 - c.lwf_weight}
    return d


def _required(path: Path, what: str, k: int) -> Path:
    if not path.exists():
        raise TunelabError(f"{path} is missing: stage {k} needs {what}",
                           fix="restore it, or start the continual run over with --overwrite")
    return path


def _train_stage(out: Path, spec: ContinualSpec, raw: dict[str, Any], run: RunConfig, k: int,
                 state: dict[str, Any], tokenizer: Any, quiet: bool) -> Any:
    c = spec.continual
    d = _stage_config(out, spec, raw, k, state)
    stage_dir = out / _stage_name(k)
    if c.strategy == "replay" and k > 1:
        _required(out / "replay.jsonl", "the replay buffer of the earlier stages", k)
    if c.strategy == "lwf" and k > 1:
        _required(out / _stage_name(k - 1) / "final", f"stage {k - 1}'s model as the teacher", k)
    penalty = None
    if c.strategy == "ewc" and k > 1:
        anchors = []
        for j in range(1, k):
            f = load_file(str(_required(out / "ewc" / f"stage-{j}.safetensors", f"the Fisher of stage {j}", k)))
            anchors.append(({n[7:]: t for n, t in f.items() if n.startswith("fisher.")},
                            {n[7:]: t for n, t in f.items() if n.startswith("anchor.")}))
        penalty = ewc_penalty(anchors, c.ewc_lambda)
    model = None
    if c.strategy != "adapters" and k > 1:  # the same trainable parameters, as the previous stage left them
        model = _continued_model(run, out / _stage_name(k - 1), k)
    if (stage_dir / "summary.json").is_file() and (stage_dir / "final").is_dir():  # trained, not yet scored
        summary = json.loads((stage_dir / "summary.json").read_text(encoding="utf-8"))
        return TrainResult(stage_dir, "completed", int(summary.get("steps", 0)), summary)
    resume = (stage_dir / "checkpoints").is_dir() and checkpoint.latest(stage_dir / "checkpoints") is not None
    return train(d, resume=resume, overwrite=not resume, quiet=quiet, model=model, apply_method=model is None,
                 penalty=penalty, allow_changed=False)


def _continued_model(run: RunConfig, prev: Path, k: int) -> nn.Module:
    ckpt = checkpoint.latest(prev / "checkpoints")
    if ckpt is None:
        raise TunelabError(f"{prev}/checkpoints: no complete checkpoint; stage {k} continues from stage {k - 1}'s "
                           "trained parameters", fix="start the continual run over with --overwrite")
    model = METHODS[run.method.name].apply(load_model(run.model), run.method)
    load_trainable(model, load_file(str(ckpt / "trainable.safetensors")))
    return model


def _evaluate_after(out: Path, spec: ContinualSpec, run: RunConfig, k: int) -> list[float]:
    """Row k of R: every task scored after stage k (adapters: task j by stage j's adapter, the base for
    tasks not trained yet)."""
    c = spec.continual
    if c.strategy != "adapters":
        pair = load_model_or_run(out / _stage_name(k))
        return [_score(pair, s, c) for s in spec.stages]
    row = []
    base = None
    for j, s in enumerate(spec.stages, 1):
        if j <= k:
            row.append(_score(load_model_or_run(out / _stage_name(j)), s, c))
        else:
            base = base or load_model_or_run(run.model.name_or_path)
            row.append(_score(base, s, c))
    return row


def _after_stage(out: Path, spec: ContinualSpec, run: RunConfig, k: int, state: dict[str, Any],
                 tokenizer: Any) -> None:
    """What the next stage needs from this one: the replay buffer, or the Fisher and anchor."""
    c, stage = spec.continual, spec.stages[k - 1]
    if k == len(spec.stages):
        return
    if c.strategy == "replay":
        buffer = read_all(out / "replay.jsonl") if k > 1 else []
        records = read_all(resolve_source(stage.train))
        seen = reservoir_add(buffer, state["replay_seen"], records, c.buffer_size,
                             random.Random(f"{run.train.seed}/replay/{k}"))
        owned.write_atomic(out / "replay.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in buffer))
        state["replay_seen"] = seen
    if c.strategy == "ewc":
        model = _continued_model(run, out / _stage_name(k), k + 1)
        d = run.data.model_copy(update={"train": stage.train, "eval": None})
        objective = OBJECTIVES[run.objective.name]
        data = load_tokenized(d, "train", tokenizer, mask_prompt=objective.mask_prompt, formats=objective.formats,
                              log=lambda _m: None)
        sample = random.Random(f"{run.train.seed}/fisher/{k}").sample(
            data.examples, min(c.fisher_samples, len(data.examples)))
        fisher = diagonal_fisher(model, sample, tokenizer.pad_token_id)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        tensors = {**{f"fisher.{n}": f.contiguous() for n, f in fisher.items()},
                   **{f"anchor.{n}": p.detach().float().contiguous() for n, p in params.items()}}
        (out / "ewc").mkdir(exist_ok=True)
        tmp = out / "ewc" / f".stage-{k}.tmp.safetensors"
        save_file(tensors, str(tmp))
        tmp.replace(out / "ewc" / f"stage-{k}.safetensors")


def _plot(out: Path, state: dict[str, Any], say: Callable[[str], Any] = print) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("continual: matrix.png skipped (matplotlib is not installed: pip install 'tunelab[plot]')")
        return

    R, names = state["R"], state["tasks"]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.0 * len(names) + 1.5))
    im = ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(R)), [f"after {n}" for n in names[:len(R)]])
    for i, row in enumerate(R):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=9)
    ax.set_title(f"{state['strategy']}: ACC {state.get('acc', math.nan):.3f}  BWT {state.get('bwt', math.nan):+.3f}")
    fig.colorbar(im, ax=ax, label=state["metric"])
    fig.tight_layout()
    fig.savefig(out / "matrix.png", dpi=110)
    plt.close(fig)
