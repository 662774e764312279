"""`tunelab tune`: a hyperparameter search over any config key, on Optuna.

Each trial is the base config with the values the sampler (TPE) chose for the space's keys
(tune_space.py), trained by `recipes.run.train` into `<out>/trials/trial-NNNN`. Its evaluations
(`train.eval_every`) report the eval loss to the pruner (median or successive halving / ASHA), which
may stop a trial early: the event hook raises `optuna.TrialPruned` and the run ends there. The value
of a finished trial is its final validation loss, or a task metric on a validation split
(`--metric tinyworld:qa@validation:exact_match`). A trial that fails (a NaN loss, out of memory, a
config the combination makes invalid) is recorded as failed with its one-line reason; the study
goes on.

The study lives in an Optuna RDB storage: `sqlite:///<out>/study.db` by default, or any database
URL that many workers (processes, machines) share. `--trials N` is the study's total, counted
across workers: finished, pruned and failed trials and the ones running now. A rerun of the same
command resumes the study; a trial whose worker died (killed, its machine lost) is found by its
missing heartbeat, marked failed and not counted, so the study still reaches N.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tunelab import owned
from tunelab.errors import EXIT_RESUMABLE, TunelabError
from tunelab.eval.tasks import parse_spec
from tunelab.faults import fault_point
from tunelab.recipes.evaluate import evaluate_task
from tunelab.recipes.run import ConfigLike, resolve_config, train
from tunelab.recipes.tune_report import best_trial, redact, write_outputs
from tunelab.recipes.tune_space import Param, load_space, with_params
from tunelab.training.events import Event
from tunelab.training.progress import Reporter

PRUNERS = ("median", "asha", "none")
TUNE_ENTRIES = ["tune.json", "study.db", "trials", "best.yaml", "trials.csv", "report.md", "history.png",
                "importance.png", "intermediate.png"]


@dataclass(frozen=True)
class Metric:
    """What a trial is scored by: a final metric of the run (`eval_loss`), or `metric` of `task`."""

    name: str
    task: str | None = None
    direction: str = "minimize"

    def __str__(self) -> str:  # a file is named by its file name: a progress line stays short
        if self.task is None:
            return self.name
        return f"{self.task if self.task.startswith('tinyworld:') else Path(self.task).name}:{self.name}"


def parse_metric(spec: str, direction: str | None = None) -> Metric:
    """`eval_loss` (a final metric of the run) or `TASK:METRIC` (e.g. tinyworld:qa@validation:exact_match).
    Direction: given, else minimize for losses and perplexities, maximize for the rest."""
    task, _, name = spec.rpartition(":") if ":" in spec.removeprefix("tinyworld:") else ("", "", spec)
    if not name:
        raise TunelabError(f"--metric {spec}: no metric name", fix="write TASK:METRIC, e.g. "
                           "tinyworld:qa@validation:exact_match, or a run metric such as eval_loss")
    if not task and not name.startswith("eval_"):
        raise TunelabError(f"--metric {spec}: not a metric a search can choose by",
                           fix="pass eval_loss (or another eval_* metric of the run, on data.eval), or TASK:METRIC, "
                           "e.g. tinyworld:qa@validation:exact_match")
    if task:
        parse_spec(task)  # an unknown task or split fails here, before any trial
        if task.endswith("@test") or (task.startswith("tinyworld:") and "@" not in task):
            raise TunelabError(f"--metric {spec}: a search chooses on a validation split, never on test",
                               fix="name the validation split, e.g. tinyworld:qa@validation (test once, at the end)")
    if direction is None:
        direction = "minimize" if "loss" in name or "perplexity" in name else "maximize"
    if direction not in ("minimize", "maximize"):
        raise TunelabError(f"--direction {direction}: must be minimize or maximize")
    return Metric(name, task or None, direction)


@dataclass
class TuneResult:
    out: Path
    study: str
    storage: str  # with any password hidden
    status: str  # "completed" | "interrupted"
    best_value: float | None
    best_params: dict[str, Any]
    counts: dict[str, int] = field(default_factory=dict)  # trial state -> trials

    @property
    def exit_code(self) -> int:
        return 0 if self.status == "completed" else EXIT_RESUMABLE


class _Surplus(Exception):
    """A trial started after the study was full: not run."""


class _Interrupted(Exception):
    """A trial's run was stopped by SIGTERM/SIGINT: the tune stops (rerun to resume)."""


def make_pruner(name: str | optuna.pruners.BasePruner) -> optuna.pruners.BasePruner:
    if isinstance(name, optuna.pruners.BasePruner):
        return name
    if name == "median":  # a trial's eval below the median of the trials before it at the same step
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
    if name == "asha":  # successive halving, asynchronous: the top 1/4 of each rung goes on
        return optuna.pruners.SuccessiveHalvingPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    raise TunelabError(f"--pruner {name}: unknown", fix="choose one of: " + ", ".join(PRUNERS))


def tune(
    config: ConfigLike, space: str | Path | dict[str, Any], *, trials: int, overrides: list[str] | None = None,
    out: str | Path | None = None, storage: str | None = None, study: str | None = None,
    pruner: str | optuna.pruners.BasePruner = "median", metric: str = "eval_loss", direction: str | None = None,
    seed: int | None = None, quiet: bool = False, heartbeat_s: int = 20, sampler: str = "tpe",
) -> TuneResult:
    """Search `space` around `config` (+ `overrides`) for `trials` trials in all; resumes the study
    when it exists. `heartbeat_s`: how often a running trial says it is alive; one silent for 3x
    that is taken for dead (its worker was killed). Writes best.yaml, trials.csv, report.md and
    plots into `out`. `sampler`: tpe (default), random, or grid (every combination of a space of
    choices once; `trials` is capped at their number)."""
    if trials < 1:
        raise TunelabError(f"--trials {trials}: must be at least 1")
    if sampler not in SAMPLERS:
        raise TunelabError(f"--sampler {sampler}: unknown", fix="choose one of: " + ", ".join(SAMPLERS))
    base_cfg = resolve_config(config, overrides)
    base = base_cfg.to_dict()
    params = load_space(space, base)
    goal = parse_metric(metric, direction)
    trials = _grid_trials(params, trials) if sampler == "grid" else trials
    _check_objective(base, goal, params)
    chosen_pruner = make_pruner(pruner)
    name = study or f"tune-{Path(config).stem if isinstance(config, (str, Path)) else 'config'}"
    out = Path(out or f"runs/{name}")
    url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    _claim_out(out, name, url)
    say = Reporter(None, quiet=quiet).say
    st = _open_study(url, name, goal, chosen_pruner, make_sampler(sampler, params, seed, trials), heartbeat_s)
    owned.write_atomic(out / "tune.json", json.dumps({"study": name, "storage": redact(url)}, indent=1))
    _check_same_study(st, base, params, goal)
    own = _maybe_baseline(st, base, params, say, enqueue=sampler != "grid")
    runner = _Runner(st, base, params, goal, out, trials, say, own)
    status = "completed"
    try:
        status = runner.loop(heartbeat_s)
    finally:
        write_outputs(st, out, base, params, goal, url, say)
    ran = [t for t in st.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
    counts = {s.name.lower(): n for s in TrialState if (n := sum(t.state == s for t in ran))}
    best = best_trial(st)
    return TuneResult(out, name, redact(url), status, best.value if best else None,
                      {k: params[k].value(v) for k, v in best.params.items()} if best else {}, counts)


def _check_objective(base: dict[str, Any], goal: Metric, params: dict[str, Param]) -> None:
    ev = base["data"].get("eval")
    if goal.task is None:
        if not ev:
            raise TunelabError(f"the objective {goal.name} is measured on data.eval, which the config does not set",
                               fix="set data.eval to a validation split (e.g. tinyworld:qa@validation), or pass "
                               "--metric TASK:METRIC")
        if "data.eval" in params:
            raise TunelabError("data.eval is searched, but the objective is measured on it: the values would not "
                               "compare", fix="search other keys, or pass --metric TASK:METRIC")
    if ev and str(ev).endswith("@test"):
        raise TunelabError(f"data.eval is {ev}: a search chooses on a validation split, never on test",
                           fix="set data.eval to a validation split (test once, after the search)")


def _claim_out(out: Path, name: str, url: str) -> None:
    """`out` is a tune folder of its own: absent or empty (claimed), or this study's (resumed). Which
    study it holds (tune.json) is written once the study opened."""
    found = owned.preflight(out, "tune", what="--out", force=False)
    meta_path = out / "tune.json"
    if found == "owned" and meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("study") != name or meta.get("storage") != redact(url):
            raise TunelabError(f"--out {out} holds study {meta.get('study')!r} ({meta.get('storage')})",
                               fix=f"resume it with --study {meta.get('study')} (and its --storage), or choose "
                               "another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    owned.mark(out, "tune", TUNE_ENTRIES)


SAMPLERS = ("tpe", "random", "grid")


def _grid_trials(params: dict[str, Param], trials: int) -> int:
    """A grid search runs each combination once: every key must be a list of choices."""
    ranged = [k for k, p in params.items() if p.kind != "categorical"]
    if ranged:
        raise TunelabError(f"--sampler grid: {', '.join(ranged)} {'is a range' if len(ranged) == 1 else 'are ranges'}"
                           ", not a list of choices", fix="give each key {choices: [...]} (or a plain list), or use "
                           "--sampler tpe")
    return min(trials, math.prod(len(p.labels) for p in params.values()))


def make_sampler(name: str, params: dict[str, Param], seed: int | None, trials: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(3, min(10, trials // 3)))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler({k: list(p.labels) for k, p in params.items()}, seed=seed)
    raise AssertionError(name)  # tune() checked it


def _open_study(url: str, name: str, goal: Metric, pruner: optuna.pruners.BasePruner,
                sampler: optuna.samplers.BaseSampler, heartbeat_s: int) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # tune prints its own line per trial
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}  # workers wait for the lock
    for attempt in range(5):
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat_s,
                                                 grace_period=3 * heartbeat_s)
            return optuna.create_study(storage=storage, sampler=sampler, pruner=pruner, study_name=name,
                                       direction=goal.direction, load_if_exists=True)
        except ImportError as e:
            raise TunelabError(f"--storage {redact(url)}: no driver for this database ({_one_line(e)})",
                               fix="install the driver its URL names, e.g. pip install psycopg2-binary for "
                               "postgresql://") from None
        except ValueError as e:
            raise TunelabError(f"--storage {redact(url)}: {_one_line(e)}",
                               fix="pass an SQLAlchemy database URL, e.g. sqlite:///runs/tune/study.db or "
                               "postgresql://user:password@host/db") from None
        except Exception as e:  # the database library's own errors (cannot connect, locked, bad schema)
            if type(e).__module__.split(".")[0] not in ("sqlalchemy", "optuna"):
                raise
            if attempt == 4:
                raise TunelabError(f"--storage {redact(url)}: cannot open the study ({_one_line(e)})") from None
            time.sleep(0.5 * (attempt + 1))  # workers starting together race to create the tables: one wins
    raise AssertionError("unreachable")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_same_study(st: optuna.Study, base: dict[str, Any], params: dict[str, Param], goal: Metric) -> None:
    """A resumed study must search the same space, on the same base, for the same metric."""
    base_no_out = {k: v for k, v in base.items() if k != "output"}
    mine = {"tunelab_space": {k: p.describe() for k, p in params.items()},
            "tunelab_metric": f"{goal.task or ''}:{goal.name}:{goal.direction}", "tunelab_base": _digest(base_no_out)}
    theirs = st.user_attrs
    if "tunelab_space" not in theirs:
        for k, v in mine.items():
            st.set_user_attr(k, v)
        st.set_user_attr("tunelab_base_config", base_no_out)
        return
    what = {"tunelab_space": "search space", "tunelab_metric": "metric", "tunelab_base": "base config"}
    changed = [what[k] for k in mine if theirs.get(k) != mine[k]]
    if changed:
        raise TunelabError(f"study {st.study_name!r} was made with another {' and '.join(changed)}: its trials would "
                           "not compare with new ones", fix="rerun with the study's own config, space and --metric, "
                           "or name a new study with --study")


def _maybe_baseline(st: optuna.Study, base: dict[str, Any], params: dict[str, Param], say: Any,
                    enqueue: bool = True) -> dict[str, Any] | None:
    """A new study tries the config's own values first (when the space holds them): the default to beat.
    Returns them as optuna stores them (a grid runs them in its turn: not enqueued)."""
    stored = {}
    for key, p in params.items():
        node: Any = base
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        stored[key] = p.stored(node)
    if any(v is None for v in stored.values()):
        outside = [k for k, v in stored.items() if v is None]
        if not st.get_trials(deepcopy=False):
            say(f"tune: the config's own {', '.join(outside)} lie outside the space: no baseline trial")
        return None
    if enqueue and not st.get_trials(deepcopy=False):
        st.enqueue_trial(stored, user_attrs={"baseline": True})
    return stored


def counted(t: FrozenTrial) -> bool:
    """Trials the budget counts: finished, pruned, failed with a reason, running. A trial whose worker
    died (failed by heartbeat, no reason) or that a signal stopped is replaced."""
    if t.state == TrialState.FAIL:
        return "error" in t.user_attrs
    return t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


def _one_line(e: BaseException) -> str:
    text = e.message if isinstance(e, TunelabError) else f"{type(e).__name__}: {e}"
    return " ".join(str(text).split())[:300]


class _Runner:
    """Runs trials one at a time in this worker until the study holds `trials` counted trials."""

    def __init__(self, st: optuna.Study, base: dict[str, Any], params: dict[str, Param], goal: Metric, out: Path,
                 trials: int, say: Any, own: dict[str, Any] | None = None):
        self.st, self.base, self.params, self.goal, self.out, self.own = st, base, params, goal, out, own
        self.trials, self.say = trials, say
        self.t0 = time.perf_counter()
        self.durations: list[float] = []
        self.stopped = False

    def loop(self, heartbeat_s: int) -> str:
        waiting = False
        while True:
            optuna.storages.fail_stale_trials(self.st)
            all_trials = self.st.get_trials(deepcopy=False)
            if sum(map(counted, all_trials)) < self.trials:
                self.st.optimize(self.objective, n_trials=1, catch=(Exception,), callbacks=[self.done],
                                 gc_after_trial=True)
                if self.stopped:
                    return "interrupted"
                continue
            running = [t.number for t in all_trials if t.state == TrialState.RUNNING]
            if not running:
                return "completed"
            if not waiting:  # another worker's, or a dead one's (failed once its heartbeat is missed)
                self.say(f"tune: waiting for trial{'s' if len(running) > 1 else ''} "
                         f"{', '.join(map(str, running))} running elsewhere")
                waiting = True
            time.sleep(1.0)

    def objective(self, trial: optuna.Trial) -> float:
        # Trial numbers come from the database, one at a time: this one is surplus when the trials before
        # it already fill the study (two workers counted N-1 at the same moment). It ends unrun, uncounted.
        before = sum(counted(t) for t in trial.study.get_trials(deepcopy=False) if t.number < trial.number)
        if before >= self.trials:
            trial.set_user_attr("surplus", True)
            raise _Surplus(f"the study already holds its {self.trials} trials")
        values = {k: p.suggest(trial) for k, p in self.params.items()}
        if self.own is not None and trial.params == self.own:  # a grid reaching the config's own values
            trial.set_user_attr("baseline", True)
        run_dir = self.out / "trials" / f"trial-{trial.number:04d}"
        raw = with_params(self.base, values)
        raw = {**raw, "output": {**raw["output"], "dir": str(run_dir)},
               # a trial is replaced, never resumed: no checkpoints along the way, no TensorBoard writer
               "train": {**raw["train"], "save_every": 0, "tensorboard": False}}
        sign = -1.0 if self.goal.direction == "maximize" else 1.0

        def on_event(e: Event) -> None:
            if e.kind == "step":
                fault_point("trial", trial.number)  # crash tests: TUNELAB_FAULT=kill@trial:N
            if e.kind == "eval" and math.isfinite(loss := e.metrics.get("eval_loss", math.nan)):
                trial.report(sign * loss, e.step)  # the pruner compares in the study's direction
                if e.step < e.total_steps and trial.should_prune():
                    trial.set_user_attr("pruned_at", f"step {e.step} of {e.total_steps}, eval_loss {loss:.4f}")
                    raise optuna.TrialPruned(f"eval_loss {loss:.4f} at step {e.step}")

        try:
            result = train(raw, quiet=True, on_event=on_event, overwrite=True)
            if result.status != "completed":
                trial.set_user_attr("interrupted", f"stopped by a signal at step {result.steps}")
                self.stopped = True
                raise _Interrupted(f"stopped by a signal at step {result.steps}")
            value = self._value(result.run_dir, result.metrics)
        except (optuna.TrialPruned, _Interrupted):
            raise
        except Exception as e:
            trial.set_user_attr("error", _one_line(e))
            if not isinstance(e, TunelabError):  # a bug, not the trial's settings: keep where it happened
                trial.set_user_attr("traceback", traceback.format_exc()[-4000:])
            raise
        finally:
            _drop_checkpoints(run_dir)
        return value

    def _value(self, run_dir: Path, metrics: dict[str, float]) -> float:
        if self.goal.task is None:
            if self.goal.name not in metrics:
                have = ", ".join(sorted(k for k in metrics if k.startswith("eval_"))) or "none"
                raise TunelabError(f"the run has no final {self.goal.name} (its eval metrics: {have})")
            value = metrics[self.goal.name]
        else:
            found = evaluate_task(run_dir, self.goal.task)
            if not isinstance(found.get(self.goal.name), (int, float)):
                have = ", ".join(k for k, v in found.items() if isinstance(v, (int, float)))
                raise TunelabError(f"{self.goal.task} has no metric {self.goal.name!r}; it has: {have}")
            value = float(found[self.goal.name])
        if not math.isfinite(value):
            raise TunelabError(f"{self.goal} is {value}")
        return float(value)

    def done(self, st: optuna.Study, t: FrozenTrial) -> None:
        """One line per finished trial: its state and value, params, the best so far, the ETA."""
        if t.user_attrs.get("surplus"):
            return
        if t.duration is not None:
            self.durations.append(t.duration.total_seconds())
        n = sum(counted(x) and x.state.is_finished() for x in st.get_trials(deepcopy=False))
        shown = "  ".join(f"{k}={_short(self.params[k].value(v))}" for k, v in t.params.items())
        if t.state == TrialState.COMPLETE:
            what = f"{self.goal} {t.value:.4f}"
        elif t.state == TrialState.PRUNED:
            what = f"pruned ({t.user_attrs.get('pruned_at', '')})"
        else:
            what = "failed: " + str(t.user_attrs.get("error") or t.user_attrs.get("interrupted") or "?")
        best = best_trial(st)
        left = max(self.trials - n, 0)  # the ETA assumes this worker runs them all
        eta = sum(self.durations) / len(self.durations) * left if self.durations else math.nan
        self.say(f"trial {t.number} ({n}/{self.trials}) {what} | {shown} | best "
                 + (f"{best.value:.4f} (trial {best.number})" if best else "-")
                 + f" | elapsed {_clock(time.perf_counter() - self.t0)} eta {_clock(eta)}")


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _drop_checkpoints(run_dir: Path) -> None:
    """A trial keeps its metrics and final model; its checkpoint (the loop saves one at the end) goes."""
    if owned.state(run_dir, "run") == "owned" and (run_dir / "checkpoints").is_dir():
        owned.remove(run_dir / "checkpoints")
