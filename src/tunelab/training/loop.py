"""The one training loop, on accelerate. Recipes that need more compose its parts; none copies it.

One optimizer step = `grad_accum` micro-batches. Their losses are summed over tokens and divided
by the trainable tokens of the whole accumulated batch (all processes), so batch B x accum k
gives the same update as batch kB. Before the step: gradient clipping (pre-clip norm logged) and
the non-finite guard. After it: the method's `on_step` hook, eval, checkpoint, stop signals.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab.data.mixture import Mixture
from tunelab.data.stream import BatchStream, MicroBatch, MixtureStream
from tunelab.data.streamed import StreamedBatchStream, StreamedSource
from tunelab.data.types import Example
from tunelab.errors import EXIT_RESUMABLE
from tunelab.inference.loss import evaluate_loss
from tunelab.methods import METHODS
from tunelab.methods.registry import load_trainable
from tunelab.objectives import OBJECTIVES
from tunelab.objectives.registry import RunContext, Runtime
from tunelab.runconfig import RunConfig
from tunelab.training import checkpoint
from tunelab.training.backends import backend_for
from tunelab.training.dist import processes
from tunelab.training.events import Event, EventHook, Kind
from tunelab.training.guards import NonFiniteGuard, StopSignal, agreed, is_oom, oom_error
from tunelab.training.optim import build_optimizer, build_scheduler
from tunelab.training.progress import Reporter
from tunelab.training.speed import apply_switches
from tunelab.training.state import save_run_state, save_training_state


def _digest(group: list[MicroBatch]) -> str:
    """Short id of the samples in a step: lets a resumed run prove it saw the same order."""
    return hashlib.sha1("|".join(w for mb in group for w in mb.where).encode()).hexdigest()[:12]


BEST_FILE = "best.safetensors"  # select_best: the best eval's trained weights, in each checkpoint
AUX_FILE = "method_aux.safetensors"  # the method's state beside its weights (MethodSpec.aux_state)

@dataclass
class TrainResult:
    run_dir: Path
    status: str  # "completed" | "interrupted"
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 0 if self.status == "completed" else EXIT_RESUMABLE


def mixed_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


@dataclass
class Loop:
    """Everything one run's steps need; built by `recipes.run.train`. Its public parts (`train_step`,
    `evaluate`, `save`, `restore`, `run`) are what recipes compose."""

    cfg: RunConfig
    run_dir: Path
    model: nn.Module
    # a memory-mapped ExampleTable (data/table.py) in a run: indexed, never copied; or data.streaming's source
    train_data: Sequence[Example] | StreamedSource
    eval_data: Sequence[Example] | None
    pad_id: int
    data_fingerprint: str
    reporter: Reporter
    tokenizer: Any = None
    on_event: EventHook | None = None  # training/events.py: watch the run (recipes, compare, UI)
    stop: StopSignal | None = None  # the command's signal handler, when it installed one before the loop
    mixture: Mixture | None = None  # multi-task runs (data/mixture.py): tasks, probabilities, per-task eval
    # a regularizer of the model added to every step's loss (continual learning's EWC), beside the method's own
    penalty: Callable[[nn.Module], torch.Tensor] | None = None
    accelerator: Accelerator = field(init=False)

    def __post_init__(self) -> None:
        t = self.cfg.train
        # accelerate keeps one state per process and refuses a second run with another precision;
        # runs in one process (tune's trials, continual stages, the API called twice) each start
        # their own. The distributed part (PartialState) stays.
        AcceleratorState._reset_state(reset_partial_state=False)
        mixed = mixed_precision(t.precision)
        self.backend = backend_for(self.cfg, self.run_dir, processes().num_processes, mixed)  # DDP / FSDP2
        self.accelerator = Accelerator(
            mixed_precision=mixed,
            cpu=not torch.cuda.is_available(),
            log_with="tensorboard" if t.tensorboard else None,
            project_dir=str(self.run_dir),
        )
        self.method = METHODS[self.cfg.method.name]
        self.objective = OBJECTIVES[self.cfg.objective.name]
        mix = self.mixture
        self.runtime = self.objective.make_runtime(
            RunContext(self.cfg, self.model, self.tokenizer, self.accelerator.device, self.reporter.say,
                       self.train_data, self.pad_id, mix.names if mix else []))
        kw: dict[str, Any] = dict(
            batch_size=t.batch_size, packing=self.cfg.data.packing, max_length=self.cfg.data.max_length, seed=t.seed,
            pad_id=self.pad_id, rank=self.accelerator.process_index, world=self.accelerator.num_processes)
        self.stream = self.runtime.stream(
            StreamedBatchStream(self.train_data, **kw) if isinstance(self.train_data, StreamedSource)
            else MixtureStream(self.train_data, task_of=mix.task_of, probs=mix.probs, **kw) if mix is not None
            else BatchStream(self.train_data, **kw))
        self.total_steps = self._total_steps()
        if t.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(self.model, "enable_input_require_grads"):
                self.model.enable_input_require_grads()
        optimizer = self.method.optimizer(self.cfg.method)
        apply_switches(self.model, t, optimizer, self.reporter.say)  # liger, torch.compile (training/speed.py)
        self.model, self.opt = self.backend.prepare(
            self.accelerator, self.model, lambda m: build_optimizer(m, t, optimizer))
        self.sched = build_scheduler(self.opt.optimizer, t, self.total_steps)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.guard = NonFiniteGuard(t.nonfinite, t.max_consecutive_skips, self.run_dir)
        self.step = 0
        self.tokens_seen = 0
        if self.accelerator.is_main_process:
            checkpoint.clean_stale(self.ckpt_root)
        # select_best: (eval loss, step, that eval's metrics, the trained weights) of the best eval so far
        self.best: tuple[float, int, dict[str, float], dict[str, torch.Tensor]] | None = None

    def planned_epochs(self) -> float:
        """Passes over the training data the run will make (max_steps and grad_accum decide it)."""
        per_step = self.cfg.train.grad_accum * self.accelerator.num_processes
        return self.total_steps * per_step / max(self.stream.micro_batches_per_epoch(), 1)

    def _total_steps(self) -> int:
        t = self.cfg.train
        if t.max_steps:
            return t.max_steps
        per_step = t.grad_accum * self.accelerator.num_processes
        steps_per_epoch = -(-self.stream.micro_batches_per_epoch() // per_step)
        return max(1, round((t.epochs or 1.0) * steps_per_epoch))

    # ------------------------------------------------------------------ checkpoints

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def meta(self) -> dict[str, Any]:
        return {
            "step": self.step, "total_steps": self.total_steps, "data_cursor": self.stream.state(),
            "tokens_seen": self.tokens_seen, "skipped_steps": self.guard.skipped,
            "config_digest": self.cfg.digest(), "data_fingerprint": self.data_fingerprint,
            "objective_state": self.runtime.state_dict(),
            # select_best: the best eval so far (its weights are best.safetensors beside): a resumed run keeps it
            "best": None if self.best is None else {"loss": self.best[0], "step": self.best[1], "evals": self.best[2]},
        }

    def save(self) -> Path | None:
        self.accelerator.wait_for_everyone()
        model = self.accelerator.unwrap_model(self.model)
        path = self.backend.save(self.ckpt_root, self.step, model, self.opt, self.accelerator.is_main_process,
                                 lambda d: self._write_state(d, model), self.cfg.train.keep_last)
        if path is not None:  # the main process
            self._emit("checkpoint", checkpoint=path)
        return path

    def _write_state(self, d: Path, model: nn.Module) -> None:
        if self.backend.sharded:  # the weights and optimizer moments are in the shards every process wrote
            return save_run_state(d, self.sched, self.meta())
        save_training_state(d, self.method.state(model), self.opt, self.sched, self.meta())
        if self.best is not None:
            save_file(self.best[3], str(d / BEST_FILE))
        aux = self.method.aux_state(model)
        if aux:
            save_file({k: v.detach().contiguous().cpu() for k, v in aux.items()}, str(d / AUX_FILE))

    def _emit(self, kind: Kind, metrics: dict[str, Any] | None = None, **extra: Any) -> None:
        if self.on_event is not None and self.accelerator.is_main_process:
            numeric = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
            self.on_event(Event(kind, self.step, self.total_steps, self.run_dir, numeric, **extra))

    def restore(self, ckpt: Path) -> None:
        model = self.accelerator.unwrap_model(self.model)
        meta = self.backend.restore(ckpt, model, self.opt, self.sched)
        self.step, self.tokens_seen = meta["step"], meta["tokens_seen"]
        self.guard.skipped = meta["skipped_steps"]
        self.stream.restore(meta["data_cursor"])
        self.runtime.load_state_dict(meta.get("objective_state", {}))
        if (ckpt / AUX_FILE).is_file():
            self.method.load_aux_state(model, load_file(str(ckpt / AUX_FILE)))
        best = meta.get("best")
        if best is not None and (ckpt / BEST_FILE).is_file():
            self.best = (best["loss"], best["step"], best["evals"], load_file(str(ckpt / BEST_FILE)))

    # ------------------------------------------------------------------ steps

    def _micro_loss(self, mb: MicroBatch, n_total: int, with_penalty: bool) -> tuple[float, float]:
        batch = {k: v.to(self.accelerator.device) for k, v in mb.tensors.items()}
        with self.accelerator.autocast():
            loss_sum, _ = self.runtime.loss(self.model, batch)
        # DDP averages gradients over processes: scale so the result is sum / global tokens.
        scale = self.accelerator.num_processes / max(n_total, 1)
        loss = loss_sum * scale
        penalty = self._penalty() if with_penalty else None
        if penalty is not None:  # once per optimizer step, with the last micro-batch (DDP syncs there)
            loss = loss + penalty
        self.accelerator.backward(loss)
        return float(loss_sum.detach()), float(penalty.detach()) if penalty is not None else 0.0

    def _penalty(self) -> torch.Tensor | None:
        """The method's penalty plus the run's (`penalty`), or None when there is neither."""
        terms = [p for p in (self.method.penalty(self.model, self.cfg.method),
                             self.penalty(self.accelerator.unwrap_model(self.model)) if self.penalty else None)
                 if p is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def train_step(self) -> dict[str, float]:
        t = self.cfg.train
        group = self.stream.next_group(t.grad_accum)
        local = torch.tensor(sum(mb.n_trained for mb in group), device=self.accelerator.device)
        n_total = int(self.accelerator.reduce(local, reduction="sum"))
        loss_sum, penalty = 0.0, 0.0
        for i, mb in enumerate(group):
            last = i == len(group) - 1
            with contextlib.nullcontext() if last else self.backend.no_sync(self.accelerator, self.model):
                part, pen = self._micro_loss(mb, n_total, with_penalty=last)
            loss_sum += part
            penalty += pen
        if self.accelerator.num_processes > 1:  # the logged loss is the whole batch's, over every process
            loss_sum = float(self.accelerator.reduce(torch.tensor(loss_sum, device=self.accelerator.device), "sum"))
        loss = loss_sum / max(n_total, 1) + penalty
        clip = t.max_grad_norm if t.max_grad_norm is not None else float("inf")
        grad_norm = float(self.accelerator.clip_grad_norm_(self.params, clip))
        lr = self.sched.get_last_lr()[0]
        applied = self.guard.check(self.step, loss, grad_norm, [w for mb in group for w in mb.where])
        if applied:  # a skipped step is not counted: the run still applies every step asked for
            self.opt.step()
            self.guard.check_weights(self.step + 1, self.params)
            self.sched.step()
            self.step += 1
            self.method.on_step(self.accelerator.unwrap_model(self.model), self.cfg.method, self.step)
            if self.method.restarts_optimizer(self.cfg.method, self.step):  # a new phase trains from fresh moments
                self.opt.optimizer.state.clear()
        self.opt.zero_grad(set_to_none=True)
        n_tokens = sum(mb.n_real for mb in group)
        self.tokens_seen += n_tokens
        padded = sum(mb.tensors["input_ids"].numel() for mb in group)
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "trained_tokens": n_total, "tokens": n_tokens,
                "padded_tokens": padded, "skipped": float(not applied), "batch": _digest(group),
                **({"penalty": penalty} if penalty else {}), **self.runtime.stats()}

    def _guarded_step(self) -> dict[str, float]:
        try:
            return self.train_step()
        except Exception as e:
            if not is_oom(e):
                raise
            t = self.cfg.train
            raise oom_error(e, step=self.step, batch_size=t.batch_size, grad_accum=t.grad_accum,
                            seq_len=self.cfg.data.max_length) from None

    def evaluate(self) -> dict[str, float]:
        if not self.eval_data:
            return {}
        if self.mixture is not None and self.mixture.eval:
            out = self._evaluate_tasks(self.mixture.eval)
        else:
            out = self._evaluate(self.eval_data)
        self._emit("eval", out)
        return out

    def _evaluate(self, examples: Sequence[Example]) -> dict[str, float]:
        own = self.runtime.evaluate(self.accelerator.unwrap_model(self.model), examples)
        if own is not None:
            self.model.train()
            return {f"eval_{k}": v for k, v in own.items()}
        d = self.cfg.data
        world = self.accelerator.num_processes
        # several processes share a plain loss's eval set (its statistics are sums); an objective's own
        # statistics (means), and FSDP (every forward gathers in every process), use the whole set everywhere
        shared = world > 1 and type(self.runtime) is Runtime and not self.backend.sharded
        part = examples[self.accelerator.process_index :: world] if shared else examples
        loss = evaluate_loss(
            self.accelerator.unwrap_model(self.model), part, batch_size=self.cfg.train.batch_size,
            pad_id=self.pad_id, packing=d.packing, max_length=d.max_length, autocast=self.accelerator.autocast,
            loss=self.runtime.loss,
        )
        if shared:
            sums = torch.tensor([loss["loss"] * loss["tokens"], loss["tokens"]], dtype=torch.float64,
                                device=self.accelerator.device)
            total, tokens = (float(x) for x in self.accelerator.reduce(sums, "sum"))
            mean = total / max(tokens, 1.0)
            loss = {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": tokens}
        return {f"eval_{k}": v for k, v in {**loss, **self.runtime.stats()}.items()}

    def _evaluate_tasks(self, sets: dict[str, Sequence[Example]]) -> dict[str, float]:
        """Each task's eval set alone (`eval_loss_<task>`, `eval_tokens_<task>`); `eval_loss` is their mean per
        token over all of them, `eval_loss_task_mean` the mean over tasks."""
        out: dict[str, float] = {}
        for name, examples in sets.items():
            m = self._evaluate(examples)
            out[f"eval_loss_{name}"], out[f"eval_tokens_{name}"] = m["eval_loss"], m["eval_tokens"]
        tokens = sum(out[f"eval_tokens_{n}"] for n in sets)
        loss = sum(out[f"eval_loss_{n}"] * out[f"eval_tokens_{n}"] for n in sets) / max(tokens, 1.0)
        out.update(eval_loss=loss, eval_perplexity=math.exp(min(loss, 50.0)), eval_tokens=tokens,
                   eval_loss_task_mean=sum(out[f"eval_loss_{n}"] for n in sets) / len(sets))
        return out

    def run(self) -> TrainResult:
        t = self.cfg.train
        if t.tensorboard:
            self.accelerator.init_trackers("tensorboard")
        self.model.train()
        last_metrics: dict[str, float] = {}
        status = "completed"
        start = time.perf_counter()
        self._emit("start")
        stops = contextlib.nullcontext(self.stop) if self.stop is not None else StopSignal()
        with stops as stop, self.reporter.progress(self.total_steps, self.step) as bar:
            while self.step < self.total_steps:
                if self.step == 0 and agreed(stop, self.accelerator):  # a signal during start-up: checkpoint it
                    status = "interrupted"
                    self.reporter.say(f"{stop.requested} before the first step: checkpointing; `--resume` continues")
                    break
                t0 = time.perf_counter()
                m = self._guarded_step()
                m["step_time"] = time.perf_counter() - t0
                m["tokens_per_s"] = m["tokens"] / max(m["step_time"], 1e-9)
                m["elapsed"] = time.perf_counter() - start
                if t.eval_every and self.step % t.eval_every == 0 and self.step < self.total_steps:
                    m.update(self.evaluate())
                    self._remember_if_best(m)
                    self.model.train()
                self._log(m, bar)
                self._emit("step", m)
                last_metrics = m
                checkpoint.fault_point("step", self.step)
                if t.save_every and self.step % t.save_every == 0 and self.step < self.total_steps:
                    self.save()
                if agreed(stop, self.accelerator):  # every process stops at the same step
                    status = "interrupted"
                    self.reporter.say(f"{stop.requested}: checkpointing step {self.step}; `--resume` continues")
                    break
        final = self.evaluate() if status == "completed" else {}
        if final:
            self._log({"step": self.step, **final}, None)
        self.save()
        if status == "completed":  # FSDP: the whole model, gathered (in the main process) for the final save
            self.model = self.backend.final_model(self.model, self.accelerator.is_main_process)
        if status == "completed" and t.select_best:
            final = self._restore_best(final)
        if status == "completed":
            self.runtime.finish(self.accelerator.unwrap_model(self.model), self.run_dir)
        for tracker in self.accelerator.trackers:  # not end_training(): the process group is the command's (it
            tracker.finish()  # may run more, e.g. continual stages), and ends with it
        result = TrainResult(self.run_dir, status, self.step, {**last_metrics, **final})
        self._emit("end", result.metrics, status=status)
        return result

    # ------------------------------------------------------------------ best-of-evals selection

    def _remember_if_best(self, m: dict[str, float]) -> None:
        """Keep a copy of the trained weights when this eval's loss is the lowest so far (select_best)."""
        loss = m.get("eval_loss")
        if not self.cfg.train.select_best or loss is None or (self.best is not None and loss >= self.best[0]):
            return
        state = self.method.state(self.accelerator.unwrap_model(self.model))
        evals = {k: v for k, v in m.items() if k.startswith("eval_")}
        self.best = (loss, self.step, evals, {k: v.detach().to("cpu", copy=True) for k, v in state.items()})

    def _restore_best(self, final: dict[str, float]) -> dict[str, float]:
        """Put the best eval's weights back (the checkpoints keep the last step's, for --resume, and
        the best so far in best.safetensors)."""
        if self.best is None or ("eval_loss" in final and final["eval_loss"] < self.best[0]):
            self.reporter.say(f"select_best: the final step {self.step} has the lowest eval loss")
            return {**final, "best_step": float(self.step)}
        loss, step, evals, weights = self.best
        load_trainable(self.accelerator.unwrap_model(self.model), weights)
        self.reporter.say(f"select_best: final model = step {step} (eval loss {loss:.4f} < "
                          f"{final.get('eval_loss', float('nan')):.4f} at step {self.step})")
        return {**evals, "best_step": float(step)}

    def _log(self, m: dict[str, float], bar: Any) -> None:
        m = {"step": self.step, **m}
        self.reporter.metrics(m)
        if self.cfg.train.tensorboard:
            numeric = {k: v for k, v in m.items() if k != "step" and isinstance(v, (int, float))}
            self.accelerator.log(numeric, step=self.step)
        if bar is not None:
            bar.update(self.step, m)
