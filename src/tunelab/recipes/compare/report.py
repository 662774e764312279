"""A compare's output folder: report.md, results.csv (one row per cell), results.json (cells and
per-variant aggregates), and PNG plots per task: score against trainable parameters, peak memory
and wall time with the Pareto front marked, score against forgetting, and learning curves."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from tunelab.owned import write_atomic
from tunelab.recipes.compare.stats import Summary, Test, paired, pareto, summarize

CSV_FIELDS = ("variant", "task", "seed", "status", "metric", "score", "forgetting_points", "trainable", "total",
              "steps", "train_seconds", "wall_seconds", "peak_rss_mb", "error")


def aggregate(cells: list[dict[str, Any]], base_variant: str | None) -> dict[str, dict[str, Any]]:
    """Per task: per variant {score Summary, seeds' scores, costs, tests vs base and best}."""
    by_task: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for c in cells:
        by_task[c["task"]][c["variant"]].append(c)
    out: dict[str, dict[str, Any]] = {}
    for task, variants in by_task.items():
        rows: dict[str, dict[str, Any]] = {}
        for name, group in variants.items():
            done = [c for c in group if c["status"] == "done"]
            row: dict[str, Any] = {"cells": len(group), "done": len(done),
                                   "problems": sorted({c["error"] for c in group if c.get("error")})}
            if done:
                row.update(
                    metric=done[0]["metric"], lower_is_better=done[0]["lower_is_better"],
                    scores={c["seed"]: c["score"] for c in done}, summary=summarize([c["score"] for c in done]),
                    trainable=done[0]["trainable"], total=done[0]["total"],
                    peak_rss_mb=_mean([c["peak_rss_mb"] for c in done]),
                    wall_seconds=_mean([c["wall_seconds"] for c in done]),
                    forgetting=_mean([c["forgetting_points"] for c in done if c.get("forgetting_points") is not None]),
                    curve=_mean_curve([c.get("curve") or [] for c in done]),
                )
            rows[name] = row
        scored = {k: r for k, r in rows.items() if "summary" in r}
        best = None
        if scored:
            sign = -1 if next(iter(scored.values()))["lower_is_better"] else 1
            best = max(scored, key=lambda k: sign * scored[k]["summary"].mean)
        for name, r in scored.items():
            if base_variant in scored and name != base_variant:
                r["vs_base"] = paired(r["scores"], scored[base_variant]["scores"])
            if best is not None and name != best:
                r["vs_best"] = paired(r["scores"], scored[best]["scores"])
        out[task] = {"variants": rows, "best": best, "base": base_variant if base_variant in scored else None}
    return out


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _mean_curve(curves: list[list[list[float]]]) -> list[tuple[int, float]]:
    by_step: dict[int, list[float]] = defaultdict(list)
    for curve in curves:
        for step, value in curve:
            by_step[int(step)].append(float(value))
    return [(s, sum(v) / len(v)) for s, v in sorted(by_step.items()) if len(v) == len(curves)]


def write_outputs(out: Path, cells: list[dict[str, Any]], agg: dict[str, Any], header: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(cells)
    write_atomic(out / "results.json", json.dumps({**header, "cells": cells, "tasks": _jsonable(agg)}, indent=1))
    plots = _plots(out, agg)
    write_atomic(out / "report.md", markdown(agg, header, plots))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (Summary, Test)):
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in obj.__dict__.items()}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return None if isinstance(obj, float) and math.isnan(obj) else obj


def markdown(agg: dict[str, Any], header: dict[str, Any], plots: dict[str, list[str]]) -> str:
    lines = [f"# Compare: {header.get('spec', '')}", "",
             f"Cells: {header['counts']}. Seeds: {header['seeds']}. Each score is the mean over seeds ± the half-width "
             "of its 95 % confidence interval (Student t); `vs base` / `vs best` are paired t-tests over seeds, in "
             "points (x100) for scores in [0, 1]; p >= 0.05 is said to be within noise.", ""]
    if header.get("budget"):
        lines += [f"Budget (every trained cell): `{header['budget']}`", ""]
    for task, t in agg.items():
        lines += [f"## {task}", "", _task_table(t), ""]
        problems = [(name, p) for name, r in t["variants"].items() for p in r["problems"]]
        if problems:
            lines += ["Cells that did not finish:", ""] + [f"- **{name}**: {p}" for name, p in problems] + [""]
        lines += [f"![{task}: {what}]({file})" for what, file in plots.get(task, [])] + [""]
    return "\n".join(lines)


def _task_table(t: dict[str, Any]) -> str:
    rows = t["variants"]
    metric = next((r["metric"] for r in rows.values() if "metric" in r), "score")
    head = (f"| variant | {metric} | vs base | vs best | trainable | peak RSS MB | wall s | forgetting (points) | "
            "seeds |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    order = sorted(rows, key=lambda k: (0 if "summary" in rows[k] else 1,
                                        -_signed(rows[k]) if "summary" in rows[k] else 0))
    body = []
    for name in order:
        r = rows[name]
        if "summary" not in r:
            what = "failed" if r["problems"] else "not run yet"
            body.append(f"| {name} | {what} | | | | | | | 0/{r['cells']} |")
            continue
        scale = 100.0 if 0 <= r["summary"].mean <= 1 and not r["lower_is_better"] else 1.0
        base = r["vs_base"].text(scale) if "vs_base" in r else ("base" if name == t["base"] else "")
        best = r["vs_best"].text(scale) if "vs_best" in r else ("**best**" if name == t["best"] else "")
        forget = f"{r['forgetting']:.1f}" if r["forgetting"] is not None else ""
        body.append(f"| {name} | {r['summary'].text()} | {base} | {best} | {r['trainable']:,} | "
                    f"{r['peak_rss_mb']:.0f} | {r['wall_seconds']:.1f} | {forget} | {r['done']}/{r['cells']} |")
    return "\n".join([head, *body])


def _signed(r: dict[str, Any]) -> float:
    return -r["summary"].mean if r["lower_is_better"] else r["summary"].mean


def _plots(out: Path, agg: dict[str, Any]) -> dict[str, list[str]]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    made: dict[str, list[str]] = {}
    (out / "plots").mkdir(exist_ok=True)
    for task, t in agg.items():
        rows = {k: r for k, r in t["variants"].items() if "summary" in r}
        if not rows:
            continue
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in task)
        made[task] = []
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        for ax, (key, label) in zip(axes, (("trainable", "trainable parameters"), ("peak_rss_mb", "peak RSS (MB)"),
                                           ("wall_seconds", "wall time per cell (s)")), strict=True):
            _scatter(ax, rows, key, label)
        fig.suptitle(f"{task}: score vs cost (red: the Pareto front)")
        fig.tight_layout()
        fig.savefig(out / "plots" / f"{safe}-cost.png", dpi=110)
        plt.close(fig)
        made[task].append(("score vs cost", f"plots/{safe}-cost.png"))
        if any(r["forgetting"] is not None for r in rows.values()):
            fig, ax = plt.subplots(figsize=(6, 4.5))
            pts = {k: r for k, r in rows.items() if r["forgetting"] is not None}
            for name, r in pts.items():
                ax.errorbar(r["forgetting"], r["summary"].mean, yerr=_err(r), fmt="o", capsize=3)
                ax.annotate(name, (r["forgetting"], r["summary"].mean), fontsize=8, xytext=(3, 3),
                            textcoords="offset points")
            ax.set_xlabel("forgetting: probe cloze accuracy lost (points)")
            ax.set_ylabel(next(iter(rows.values()))["metric"])
            ax.set_title(f"{task}: score vs forgetting")
            fig.tight_layout()
            fig.savefig(out / "plots" / f"{safe}-forgetting.png", dpi=110)
            plt.close(fig)
            made[task].append(("score vs forgetting", f"plots/{safe}-forgetting.png"))
        curves = {k: r["curve"] for k, r in rows.items() if r["curve"]}
        if curves:
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for name, curve in curves.items():
                ax.plot([s for s, _ in curve], [v for _, v in curve], marker=".", label=name)
            ax.set_xlabel("step")
            ax.set_ylabel("eval loss (mean over seeds)")
            ax.set_yscale("log")
            ax.legend(fontsize=7, ncol=2)
            ax.set_title(f"{task}: learning curves")
            fig.tight_layout()
            fig.savefig(out / "plots" / f"{safe}-curves.png", dpi=110)
            plt.close(fig)
            made[task].append(("learning curves", f"plots/{safe}-curves.png"))
    return made


def _err(r: dict[str, Any]) -> float:
    return 0.0 if math.isnan(r["summary"].half_width) else r["summary"].half_width


def _scatter(ax: Any, rows: dict[str, dict[str, Any]], key: str, label: str) -> None:
    names = list(rows)
    sign = -1 if next(iter(rows.values()))["lower_is_better"] else 1
    xs = [max(float(rows[n][key] or 0), 1e-9) for n in names]
    ys = [rows[n]["summary"].mean for n in names]
    front = pareto([(x, sign * y) for x, y in zip(xs, ys, strict=True)])
    for i, n in enumerate(names):
        ax.errorbar(xs[i], ys[i], yerr=_err(rows[n]), fmt="o", capsize=3, color="C3" if i in front else "C0")
        ax.annotate(n, (xs[i], ys[i]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    pts = sorted((xs[i], ys[i]) for i in front)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], color="C3", linewidth=1, drawstyle="steps-post")
    if key == "trainable":
        ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel(label)
    ax.set_ylabel(next(iter(rows.values()))["metric"])
