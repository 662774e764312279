"""One training run: the run dir claimed (owned.py), data validated and tokenized, the base loaded
(or taken in memory), the method applied, the one loop run, the final artifact saved.

Continual stages, a search or a compare driver call `train` with a config (or a dict) per run;
`model=` hands it a base already in memory, `on_event=` watches the loop (training/events.py).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from tunelab import owned
from tunelab.artifacts import save_artifact
from tunelab.config import DataConfig, deep_merge, parse_overrides, read_yaml
from tunelab.data.mixture import load_mixture
from tunelab.data.pipeline import load_tokenized
from tunelab.data.report import check_report
from tunelab.data.streamed import open_streamed
from tunelab.data.types import TokenizedData
from tunelab.errors import ResumeError, TunelabError
from tunelab.faults import fault_point
from tunelab.methods import METHODS, count_parameters
from tunelab.modeling.load import load_model, load_tokenizer
from tunelab.nonparametric import augment
from tunelab.objectives import OBJECTIVES
from tunelab.runconfig import RunConfig, build_config, load_config, save_config
from tunelab.training import checkpoint
from tunelab.training.dist import processes
from tunelab.training.events import EventHook
from tunelab.training.guards import StopSignal, disk_full_guard, peer_lost_guard
from tunelab.training.loop import Loop, TrainResult
from tunelab.training.progress import Reporter
from tunelab.training.state import read_meta, seed_everything

# Keys that may change between a run and its resume without changing what is computed.
RESUME_SAFE = {
    "train.eval_every", "train.save_every", "train.keep_last", "train.log_every", "train.tensorboard",
    "train.nonfinite", "train.max_consecutive_skips", "output.dir", "model.trust_remote_code", "model.allow_pickle",
    # the speed switches compute what the plain path does (training/speed.py, modeling/attention.py)
    "train.fused_optimizer", "train.liger", "train.compile", "model.attn_implementation",
}

ConfigLike = RunConfig | str | Path | dict[str, Any] | None


def resolve_config(config: ConfigLike, overrides: list[str] | None = None) -> RunConfig:
    """A RunConfig, a dict, a YAML path or a run directory (its config.yaml), plus overrides."""
    if isinstance(config, RunConfig):
        config = config.to_dict()
    if isinstance(config, dict):
        return build_config(deep_merge(config, parse_overrides(overrides or [])))
    if config is not None and Path(config).is_dir():  # a run dir: its settings never grant code or pickle
        raw = read_yaml(Path(config) / "config.yaml")
        if isinstance(raw.get("model", {}), dict):  # anything else is reported by validation
            raw["model"] = {**raw.get("model", {}), "trust_remote_code": False, "allow_pickle": False}
        return build_config(deep_merge(raw, parse_overrides(overrides or [])), str(Path(config) / "config.yaml"))
    return load_config(config, overrides)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys whose values differ. The old config is completed with today's defaults first: a key
    added to tunelab after the run was written is not a change when it holds its default."""
    try:
        old = build_config(old).to_dict()
    except TunelabError:
        pass  # not valid today: compare as written, the differing keys are still named
    a, b = _flat(old), _flat(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in RESUME_SAFE)


# Everything tunelab writes at the top of a run dir: `--overwrite` deletes these and nothing else.
ABSURD_EPOCHS = 1000  # a plan with more passes over the data than this is warned about

RUN_ENTRIES = frozenset({"config.yaml", "metrics.jsonl", "summary.json", "tensorboard", "checkpoints", "final",
                         "final.tmp-save", "final.old-save", "rollouts.jsonl", "reward_curve.png", "demo.json",
                         "rag-data"})


def _prepare_run_dir(cfg: RunConfig, resume: bool, allow_changed: bool, overwrite: bool,
                     force: bool = False, resume_from: str | None = None) -> Path | None:
    """Returns the checkpoint to resume from (None for a fresh run). A fresh run claims its folder
    (owned.claim): an earlier run there is deleted only with `overwrite`, and only its own entries.

    In a multi-process run every process makes the same checks (so all stop together on a bad
    folder), then only the main process writes, and the others wait for it."""
    dist = processes()
    if dist.num_processes == 1:
        return _check_and_claim(cfg, resume, allow_changed, overwrite, force, resume_from, claim=True)
    ckpt = _check_and_claim(cfg, resume, allow_changed, overwrite, force, resume_from, claim=False)
    dist.wait_for_everyone()
    if dist.is_main_process and ckpt is None:
        _check_and_claim(cfg, resume, allow_changed, overwrite, force, resume_from, claim=True)
    dist.wait_for_everyone()
    return ckpt


def _check_and_claim(cfg: RunConfig, resume: bool, allow_changed: bool, overwrite: bool, force: bool,
                     resume_from: str | None, claim: bool) -> Path | None:
    run_dir = Path(cfg.output.dir)
    ckpt_root = run_dir / "checkpoints"
    if resume:
        ckpt, notes = (_chosen_checkpoint(ckpt_root, resume_from), []) if resume_from is not None else \
            checkpoint.resume_point(ckpt_root)
        for note in notes:
            sys.stderr.write(f"resume: {note}\n")
        if ckpt is None:
            raise ResumeError(f"{run_dir}: no complete checkpoint to resume" + (f" ({notes[-1]})" if notes else ""),
                              fix="start it over with --overwrite (only the run's own files are replaced), or set "
                              "output.dir elsewhere")
        changed = changed_keys(read_yaml(run_dir / "config.yaml"), cfg.to_dict())
        if changed and not allow_changed:
            raise ResumeError(
                f"{run_dir}: the config differs from the run's in {', '.join(changed)}; resuming would not "
                "continue the same run",
                fix="resume with the run's own config (tunelab train RUN_DIR --resume), or pass --allow-changed",
            )
        return ckpt
    holds_run = owned.state(run_dir, "run", RUN_ENTRIES) == "owned" and any(
        (run_dir / e).exists() for e in owned.owned_entries(run_dir, RUN_ENTRIES))
    if holds_run and not overwrite:
        raise ResumeError(
            f"{run_dir} already holds a run",
            fix="pass --resume to continue it, --overwrite to start over, or set output.dir elsewhere",
        )
    if claim:
        owned.claim(run_dir, "run", sorted(RUN_ENTRIES), what="output.dir", replace=True, force=force,
                    legacy=RUN_ENTRIES)
    return None


def _chosen_checkpoint(root: Path, name: str) -> Path:
    """`--resume-from step-N` (or N): that checkpoint, verified."""
    ckpt = root / (name if str(name).startswith("step-") else f"step-{name}")
    why = checkpoint.why_not_verified(ckpt) if ckpt.is_dir() and not ckpt.is_symlink() else "no such checkpoint"
    if why is not None:
        found = ", ".join(p.name for p in sorted(root.glob("step-*"))) or "none"
        raise ResumeError(f"{ckpt}: cannot resume from it ({why})", fix=f"choose one of: {found}")
    return ckpt


def train(
    config: ConfigLike, overrides: list[str] | None = None, *, resume: bool = False,
    allow_changed: bool = False, overwrite: bool = False, quiet: bool = False, force: bool = False,
    model: nn.Module | None = None, on_event: EventHook | None = None, resume_from: str | None = None,
    apply_method: bool = True, penalty: Callable[[nn.Module], Tensor] | None = None,
) -> TrainResult:
    """Train per the config; returns the run directory, its status and final metrics.

    `force`: write the run into a non-empty folder tunelab did not make, beside its files (none is
    deleted). `model`: the base model in memory (e.g. the previous stage's), instead of loading
    `model.name_or_path` (still the tokenizer's source and what the artifact names as its base); the
    method is applied to it in place. `on_event`: called with every training/events.py Event.
    `resume_from`: resume from this checkpoint (`step-N`) rather than the newest, e.g. one before a
    divergence; the later checkpoints are replaced as the run reaches their steps again.
    `apply_method=False`: `model` already has the method applied (a continual stage training the same
    adapter further). `penalty(model)`: a term added to every step's loss (continual learning's EWC).

    SIGTERM/SIGINT anywhere in the command: before the loop or during a step, the run checkpoints
    and returns "interrupted" (exit 75, `--resume` continues); once every step is done, the final
    model is still written and the run returns "completed" (exit 0); a second signal stops at once."""
    with StopSignal() as stop:
        return _train(config, overrides, resume or resume_from is not None, allow_changed, overwrite, quiet, force,
                      model, on_event, stop, resume_from, apply_method, penalty)


def _train(
    config: ConfigLike, overrides: list[str] | None, resume: bool, allow_changed: bool, overwrite: bool,
    quiet: bool, force: bool, model: nn.Module | None, on_event: EventHook | None, stop: StopSignal,
    resume_from: str | None = None, apply_method: bool = True, penalty: Callable[[nn.Module], Tensor] | None = None,
) -> TrainResult:
    cfg = resolve_config(config, overrides)
    if cfg.data.train is None:
        raise TunelabError("data.train is not set", fix="set data.train to a dataset path")
    processes(cfg.train.dist_timeout)  # the first call of a process starts its group, with the run's timeout
    ckpt = _prepare_run_dir(cfg, resume, allow_changed, overwrite, force, resume_from)
    run_dir = Path(cfg.output.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    main = processes().is_main_process  # a multi-process run: the main process writes and talks
    reporter = Reporter(run_dir if main else None, quiet=quiet or not main, log_every=cfg.train.log_every)
    seed_everything(cfg.train.seed)

    objective = OBJECTIVES[cfg.objective.name]
    tokenizer = load_tokenizer(cfg.model)
    kw = {"mask_prompt": objective.mask_prompt, "formats": objective.formats, "log": reporter.say}
    if getattr(cfg.objective, "labels", None) is not None:  # classification: the class order
        kw["labels"] = cfg.objective.labels
    mixture = load_mixture(cfg.data, tokenizer, **kw) if cfg.data.tasks() else None
    if mixture is not None:
        train_data = TokenizedData(mixture.examples, mixture.fingerprint)
        held = [ex for examples in mixture.eval.values() for ex in examples]
        eval_data = TokenizedData(held, "") if held else None
    else:
        data = _with_passages(cfg, run_dir, tokenizer, reporter.say)
        if cfg.data.streaming:
            source = open_streamed(data, tokenizer, **kw)
            train_data = TokenizedData(source, source.fingerprint)  # type: ignore[arg-type]
        else:
            train_data = load_tokenized(data, "train", tokenizer, **kw)
        eval_data = load_tokenized(data, "eval", tokenizer, **kw) if cfg.data.eval else None

    if model is None or apply_method:
        model = METHODS[cfg.method.name].apply(model if model is not None else load_model(cfg.model), cfg.method)
    trainable, total = count_parameters(model)
    reporter.say(
        f"{cfg.method.name} on {cfg.model.name_or_path}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.3f}%); " + ("training examples streamed" if cfg.data.streaming
                                                 else f"{len(train_data.examples):,} training examples")
    )
    if main:
        save_config(cfg, run_dir / "config.yaml")
    loop = Loop(cfg, run_dir, model, train_data.examples, eval_data.examples if eval_data else None,
                tokenizer.pad_token_id, train_data.fingerprint, reporter, tokenizer, on_event, stop, mixture, penalty)
    if not cfg.data.streaming and loop.planned_epochs() > ABSURD_EPOCHS:
        reporter.say(f"warning: this run makes {loop.planned_epochs():,.0f} passes over {len(train_data.examples):,} "
                     f"training examples ({loop.total_steps:,} steps x grad_accum {cfg.train.grad_accum}); check "
                     "train.max_steps / train.epochs / train.grad_accum")
    if ckpt is not None:
        if read_meta(ckpt)["data_fingerprint"] != train_data.fingerprint and not allow_changed:
            raise ResumeError(
                f"{ckpt}: the training data changed since this checkpoint; resuming would replay or skip samples",
                fix="restore the original data, or pass --allow-changed",
            )
        loop.restore(ckpt)
        reporter.say(f"resumed from {ckpt} (step {loop.step} of {loop.total_steps})")
    fault_point("start", 0)
    last_good = functools.partial(checkpoint.latest, run_dir / "checkpoints")
    with disk_full_guard(run_dir, last_good), peer_lost_guard(loop.accelerator.num_processes, run_dir, last_good):
        result = loop.run()
        if result.status == "completed" and main:  # a signal from here on is answered once this is written
            fault_point("final", 0)
            save_artifact(loop.accelerator.unwrap_model(loop.model), tokenizer, cfg.method, cfg.model,
                          run_dir / "final")
            owned.write_atomic(run_dir / "summary.json", json.dumps(
                {"steps": result.steps, "trainable": trainable, "total": total, **result.metrics}, indent=1))
        processes().wait_for_everyone()  # a multi-process run returns once the main process wrote the result
    if result.status == "completed":
        reporter.say(f"done: {run_dir}/final  " + _fmt(result.metrics))
    return result


def _with_passages(cfg: RunConfig, run_dir: Path, tokenizer: Any, say: Callable[[str], None]) -> DataConfig:
    """The data section to train on: with `rag.train`, the train/eval records with their retrieved
    passages in the prompt, written to RUN/rag-data/ (what the model learns to use at evaluation)."""
    if not cfg.rag.train:
        return cfg.data
    tech = augment.technique(rag=cfg.rag)
    updates = {}
    dist = processes()
    for split in ("train", "eval"):
        source = getattr(cfg.data, split)
        if source is not None:
            out = run_dir / "rag-data" / f"{split}.jsonl"
            if dist.is_main_process:  # one process writes the file every process then reads
                out.parent.mkdir(exist_ok=True)
                counts = augment.augment_file(source, out, tokenizer, tech, budget=cfg.data.max_length)
                say(f"rag: {split} prompts carry {counts['passages']:.2f} passages each from {cfg.rag.index} "
                    f"(recall@{cfg.rag.k} {counts['retrieval_recall']:.3f}, {counts['passages_dropped']:.0f} "
                    "dropped to fit data.max_length)")
            updates[split] = str(out)
    dist.wait_for_everyone()
    return cfg.data.model_copy(update=updates)


def _fmt(m: dict[str, float]) -> str:
    keys = ("loss", "eval_loss", "eval_perplexity")
    return "  ".join(f"{k} {m[k]:.4f}" for k in keys if k in m)


def data_check(config: ConfigLike, overrides: list[str] | None = None) -> dict[str, Any]:
    cfg = resolve_config(config, overrides)
    tokenizer = load_tokenizer(cfg.model)
    return check_report(cfg.data, tokenizer, OBJECTIVES[cfg.objective.name].mask_prompt)
