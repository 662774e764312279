"""Every method on the embedded base, same task, same budget: the table of docs/results/methods.md.

    python bench/methods.py [--steps 300] [--eval-every 25] [--only lora,bitfit] [--out docs/results/methods.json]

Each method trains from its `configs/<name>.yaml` (tunelab-tiny, tinyworld:qa; sentiment for the
head methods) for `--steps` optimizer steps in a child process, so its peak memory (max RSS) and
wall time are its own, evaluating on the config's validation split every `--eval-every` steps and
keeping the weights of the lowest validation loss (`train.select_best`: the base already answers
most held-out questions, so a method must not be judged at the point where it has overfitted);
then the run is evaluated on the held-out test split with the forgetting probe.
Prints a markdown table and writes JSON (and the markdown next to it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# method id -> (config file, held-out task, metric)
QA = ("tinyworld:qa@test", "exact_match")
SENTIMENT = ("tinyworld:sentiment@test", "accuracy")
METHODS: dict[str, tuple[str, tuple[str, str]]] = {
    "full": ("sft-full.yaml", QA),
    "partial": ("partial.yaml", QA),
    "bitfit": ("bitfit.yaml", QA),
    "ltsft": ("ltsft.yaml", QA),
    "diff_pruning": ("diff-pruning.yaml", QA),
    "threshold_mask": ("threshold-mask.yaml", QA),
    "adapters-houlsby": ("adapters-houlsby.yaml", QA),
    "adapters-pfeiffer": ("adapters-pfeiffer.yaml", QA),
    "prefix": ("prefix.yaml", QA),
    "prompt": ("prompt-tuning.yaml", QA),
    "ptuning": ("ptuning.yaml", QA),
    "lora": ("sft-lora.yaml", QA),
    "qlora": ("qlora.yaml", QA),
    "krona": ("krona.yaml", QA),
    "dylora": ("dylora.yaml", QA),
    "adalora": ("adalora.yaml", QA),
    "dora (peft pass-through)": ("dora.yaml", QA),
    "head": ("head-sentiment.yaml", SENTIMENT),
    "features": ("features-sentiment.yaml", SENTIMENT),
}


# Runs the tunelab CLI in a child that reports its own peak RSS (ru_maxrss, KiB on Linux) at exit.
_CHILD = ("import atexit, resource, sys\n"
          "atexit.register(lambda: print(f'PEAK_RSS_KB={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}',"
          " file=sys.stderr))\n"
          "from tunelab.cli import main\nmain(sys.argv[1:])")


def run(args: list[str]) -> tuple[subprocess.CompletedProcess, float, int]:
    """Run `tunelab ARGS` in a child; returns its result, wall seconds and peak RSS in bytes."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    peaks = [int(line.split("=")[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB=")]
    return proc, wall, (peaks[-1] * 1024 if peaks else 0)


# Method keys that are step numbers inside the run: scaled with the bench's --steps, so that a schedule
# written for the config's max_steps keeps its shape (LT-SFT's dense phase, diff pruning's projection,
# AdaLoRA's budget schedule) instead of falling outside a shorter run.
STEP_KEYS = ("phase1_steps", "project_at_step", "tinit", "tfinal", "total_step")


def scaled_schedule(cfg: str, steps: int) -> list[str]:
    """`method.KEY=N` overrides of the config's step-numbered method keys, scaled to `steps`."""
    config = yaml.safe_load((ROOT / "configs" / cfg).read_text(encoding="utf-8"))
    own = config.get("train", {}).get("max_steps")
    method = config.get("method", {})
    if not own or own == steps:
        return []
    return [f"method.{k}={max(1, round(method[k] * steps / own))}" for k in STEP_KEYS if isinstance(method.get(k), int)]


def measure(name: str, cfg: str, task: tuple[str, str], steps: int, runs: Path, eval_every: int) -> dict:
    run_dir = runs / name.split(" ")[0]
    select = [f"train.eval_every={eval_every}", "train.select_best=true"] if eval_every else []
    train, wall, peak = run(["train", str(ROOT / "configs" / cfg), f"train.max_steps={steps}", *select,
                             *scaled_schedule(cfg, steps),
                             f"output.dir={run_dir}", "--overwrite", "-q"])
    if train.returncode != 0:
        return {"method": name, "error": train.stderr.strip().splitlines()[-1:]}
    summary = json.loads((run_dir / "summary.json").read_text())
    probe = ["--forgetting"] if task is QA else []  # head models have no LM head to probe
    ev, _, _ = run(["eval", str(run_dir), "--task", task[0], *probe, "--json"])
    metrics = json.loads(ev.stdout) if ev.returncode == 0 else {}
    forget = metrics.get("forgetting", {})
    return {
        "method": name, "config": f"configs/{cfg}", "steps": summary["steps"],
        "best_step": summary.get("best_step"),
        "trainable": summary["trainable"], "total": summary["total"],
        "trainable_pct": 100 * summary["trainable"] / summary["total"],
        "train_seconds": round(wall, 1), "peak_rss_mb": round(peak / 2**20),
        "task": task[0], "metric": task[1], "score": metrics.get(task[0], {}).get(task[1]),
        "forgetting_points": forget.get("drop", {}).get("cloze_accuracy_points"),
        "eval_error": None if ev.returncode == 0 else [x for x in ev.stderr.splitlines() if "error" in x.lower()][-1:],
    }


def base_scores() -> dict[str, float]:
    ev, _, _ = run(["eval", "tunelab-tiny", "--task", QA[0], "--task", SENTIMENT[0], "--json"])
    m = json.loads(ev.stdout)
    return {QA[0]: m[QA[0]][QA[1]], SENTIMENT[0]: m[SENTIMENT[0]][SENTIMENT[1]]}


def markdown(rows: list[dict], base: dict[str, float], args: argparse.Namespace) -> str:
    lines = [
        f"Base model before tuning: {QA[0]} exact match {base[QA[0]]:.3f}; "
        f"{SENTIMENT[0]} accuracy {base[SENTIMENT[0]]:.3f} (label log-likelihood).", "",
        "| method | trainable | % | train s | peak RSS MB | selected step | held-out | score | vs base | "
        "forgetting (points) |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {' '.join(r['error'])} | | | | | | | | |")
            continue
        score = f"{r['score']:.3f}" if r["score"] is not None else "n/a"
        forget = f"{r['forgetting_points']:.1f}" if r["forgetting_points"] is not None else "n/a"
        delta = f"{100 * (r['score'] - base[r['task']]):+.1f}" if r["score"] is not None else "n/a"
        best = int(r["best_step"]) if r.get("best_step") is not None else r["steps"]
        lines.append(f"| {r['method']} | {r['trainable']:,} | {r['trainable_pct']:.2f} | {r['train_seconds']} | "
                     f"{r['peak_rss_mb']} | {best} | {r['task'].split(':')[1]} {r['metric']} | {score} | {delta} | "
                     f"{forget} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=25,
                    help="eval on data.eval every N steps, keep the best (train.select_best); 0: off")
    ap.add_argument("--only", default="", help="comma-separated method names")
    ap.add_argument("--runs", default="runs/bench-methods")
    ap.add_argument("--out", default="docs/results/methods.json")
    args = ap.parse_args()
    wanted = [m for m in METHODS if not args.only or m.split(" ")[0] in args.only.split(",")]
    runs = ROOT / args.runs
    base = base_scores()
    rows = []
    for name in wanted:
        cfg, task = METHODS[name]
        rows.append(measure(name, cfg, task, args.steps, runs, args.eval_every))
        print(json.dumps(rows[-1]), flush=True)
    table = markdown(rows, base, args)
    print(table)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "command": "python " + " ".join(sys.argv),
              "steps": args.steps, "eval_every": args.eval_every, "base": base, "rows": rows}
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    (out.parent / "methods.table.md").write_text(table)


if __name__ == "__main__":
    main()
