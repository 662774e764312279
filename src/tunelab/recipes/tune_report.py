"""What `tunelab tune` leaves in its folder: best.yaml (the base config with the best trial's values,
a config `tunelab train` runs), trials.csv, report.md, and plots (history, importance, intermediate
values). Every worker of a shared study rewrites them when it stops; each file is replaced atomically."""

from __future__ import annotations

import csv
import io
import math
import os
import re
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from tunelab import owned
from tunelab.recipes.tune_space import Param, with_params
from tunelab.runconfig import build_config


def redact(url: str) -> str:
    """A database URL without its password."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def write_outputs(st: optuna.Study, out: Path, base: dict[str, Any], params: dict[str, Param], goal: Any,
                  url: str, say: Any) -> None:
    trials = [t for t in st.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]  # never run
    best = best_trial(st, trials)
    notes: list[str] = []
    if best is not None:
        _write_best(out, base, params, best, st, goal)
    owned.write_atomic(out / "trials.csv", _csv(trials, params))
    importances = _importances(st, trials, notes)
    plots = _plots(st, out, str(goal), importances, notes)
    owned.write_atomic(out / "report.md", _report(st, trials, best, params, goal, url, importances, plots, notes))
    say(f"tune: {out}/report.md" + (f", best {goal} {best.value:.4f} (trial {best.number}) in {out}/best.yaml"
                                    if best else ", no trial completed"))


def best_trial(st: optuna.Study, trials: list[FrozenTrial] | None = None) -> FrozenTrial | None:
    """The completed trial with the best value, None before any completes."""
    trials = st.get_trials(deepcopy=False) if trials is None else trials
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    if not done:
        return None
    return (min if st.direction == optuna.study.StudyDirection.MINIMIZE else max)(done, key=lambda t: t.value)


def baseline(trials: list[FrozenTrial]) -> FrozenTrial | None:
    return next((t for t in trials if t.user_attrs.get("baseline")), None)


def values(t: FrozenTrial, params: dict[str, Param]) -> dict[str, Any]:
    return {k: params[k].value(v) for k, v in t.params.items() if k in params}


def _write_best(out: Path, base: dict[str, Any], params: dict[str, Param], best: FrozenTrial, st: optuna.Study,
                goal: Any) -> None:
    raw = with_params(base, values(best, params))
    raw = {**raw, "output": {**raw["output"], "dir": str(out / "best")}}
    cfg = build_config(raw, "best.yaml")  # the trial ran with it: it builds
    head = (f"# tunelab tune, study {st.study_name}: the best trial ({best.number}), {goal} {best.value:.6g}.\n"
            f"# Its values: {', '.join(f'{k}={_yaml(v)}' for k, v in values(best, params).items())}\n"
            f"# Train it: tunelab train {out / 'best.yaml'}\n")
    owned.write_atomic(out / "best.yaml", head + yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _yaml(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("\n...")


def _cell(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else _yaml(v)


def _csv(trials: list[FrozenTrial], params: dict[str, Param]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["number", "state", "value", "seconds", "baseline", *params, "note"])
    for t in trials:
        v = values(t, params)
        w.writerow([t.number, t.state.name.lower(), "" if t.value is None else repr(t.value), _secs(t),
                    int(bool(t.user_attrs.get("baseline"))), *(_yaml(v[k]) if k in v else "" for k in params),
                    _note(t)])
    return buf.getvalue()


def _secs(t: FrozenTrial) -> str:
    return f"{t.duration.total_seconds():.1f}" if t.duration is not None else ""


def _note(t: FrozenTrial) -> str:
    if t.state == TrialState.PRUNED:
        return f"pruned at {t.user_attrs.get('pruned_at', '?')}"
    if t.state == TrialState.FAIL:
        why = t.user_attrs.get("error") or t.user_attrs.get("interrupted")
        return why or "its worker stopped before it finished (killed?): not counted, replaced"
    if t.state == TrialState.RUNNING:
        return "running"
    return ""


def _importances(st: optuna.Study, trials: list[FrozenTrial], notes: list[str]) -> dict[str, float]:
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    varying = {k for k in {k for t in done for k in t.params} if len({repr(t.params.get(k)) for t in done}) > 1}
    if len(done) < 2 or not varying:
        notes.append(f"importance: skipped ({len(done)} completed trial{'s' if len(done) != 1 else ''}"
                     f"{', no value varies' if len(done) >= 2 else ''}; needs 2 with different values)")
        return {}
    try:
        return optuna.importance.get_param_importances(
            st, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
    except Exception as e:  # too few trials for the evaluator's quantile, a degenerate space
        notes.append(f"importance: skipped ({type(e).__name__}: {' '.join(str(e).split())[:200]})")
        return {}


def _plots(st: optuna.Study, out: Path, goal: str, importances: dict[str, float], notes: list[str]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        notes.append("plots: skipped (matplotlib is not installed: pip install 'tunelab[plot]')")
        return []
    from optuna.visualization import matplotlib as vis

    done = [t for t in st.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    made = []
    charts = [("history.png", lambda: vis.plot_optimization_history(st, target_name=goal), bool(done)),
              ("intermediate.png", lambda: vis.plot_intermediate_values(st),
               any(t.intermediate_values for t in st.get_trials(deepcopy=False))),
              ("importance.png", lambda: vis.plot_param_importances(
                  st, evaluator=optuna.importance.PedAnovaImportanceEvaluator()), bool(importances))]
    for name, draw, ok in charts:
        if not ok:
            continue
        try:
            with matplotlib.rc_context():  # optuna's plots switch the style to ggplot: not for the rest
                ax = draw()
                fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
                fig.set_size_inches(8, 5)
                fig.tight_layout()
                tmp = out / f".{name}.tmp-{os.getpid()}"
                fig.savefig(tmp, format="png", dpi=100)
                plt.close(fig)
            os.replace(tmp, out / name)
            made.append(name)
        except Exception as e:  # a plot is a convenience: its failure never costs the report
            notes.append(f"{name}: skipped ({type(e).__name__}: {' '.join(str(e).split())[:200]})")
    return made


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.4f}" if math.isfinite(v) and abs(v) >= 1e-3 else f"{v:.3g}"


def _report(st: optuna.Study, trials: list[FrozenTrial], best: FrozenTrial | None, params: dict[str, Param],
            goal: Any, url: str, importances: dict[str, float], plots: list[str], notes: list[str]) -> str:
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    direction = st.direction.name.lower()
    lines = [f"# tunelab tune: study {st.study_name}", "",
             f"Storage `{redact(url)}`; objective {goal} ({direction}); {len(trials)} trials: "
             + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ".", "", "## Best", ""]
    base = baseline(trials)
    if best is None:
        lines += ["No trial completed yet.", ""]
    else:
        lines += [f"Trial {best.number}: {goal} **{_fmt(best.value)}**"
                  + (f"; the config's own values (trial {base.number}): {_fmt(base.value)}"
                     if base is not None and base.state == TrialState.COMPLETE else "") + ".", "",
                  "| key | best | the config's own |", "|---|---|---|"]
        own = values(base, params) if base is not None else {}
        lines += [f"| {k} | {_cell(v)} | {_cell(own[k]) if k in own else ''} |"
                  for k, v in values(best, params).items()]
        lines += ["", "`best.yaml` is the base config with these values: `tunelab train best.yaml`.", ""]
    if importances:
        lines += ["## Importance (PED-ANOVA, over completed trials)", "", "| key | importance |", "|---|---:|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in importances.items()] + [""]
    lines += [f"![{p}]({p})" for p in plots] + ([""] if plots else [])
    lines += ["## Trials", "", "| # | state | value | seconds | " + " | ".join(params) + " | note |",
              "|---:|---|---:|---:|" + "---|" * len(params) + "---|"]
    for t in trials:
        v = values(t, params)
        mark = " (config's own)" if t.user_attrs.get("baseline") else ""
        lines.append(f"| {t.number} | {t.state.name.lower()}{mark} | {_fmt(t.value)} | {_secs(t)} | "
                     + " | ".join(_cell(v[k]) if k in v else "" for k in params) + f" | {_note(t)} |")
    failed = [t for t in trials if t.state == TrialState.FAIL]
    if failed:
        lines += ["", "## Failed trials", ""] + [f"- trial {t.number}: {_note(t)}" for t in failed]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
