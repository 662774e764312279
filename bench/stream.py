"""A streamed run over a file too large to tokenize first: memory over the steps, and when training starts.

    python bench/stream.py [--rows 10000000] [--steps 100] [--windows 10000 200] [--out runs/bench-stream]
                           [--json docs/results/stream.json] [--plot docs/results/stream-rss.png]

Writes `--rows` synthetic alpaca records (seeded, bench/data_cache.py's generator: the records of
bench/scale.py, ~140 tokens each with the embedded base's tokenizer), then for each `--windows` size runs
`tunelab train` of `--steps` steps with `data.streaming: true` (sft, LoRA r8 on the embedded base, batch 16,
max_length 512) in a fresh process, sampling every 0.2 s its RSS (the whole process tree) and the steps it
has logged (metrics.jsonl). Reports, per window size: seconds from the command to the first optimizer step,
RSS at the first and last step, peak RSS, and the RSS slope over the steps after the first tenth (MB per 100
steps: flat is ~0); the plot shows RSS against the step. A window of 200 records makes the 100 steps cross
several windows (each read, tokenized and dropped); the default 10,000 reads one.

Issue #15's goal: a streamed 10M-row run trains 100 steps with RSS flat. The first pass over the same file
(bench/scale.py's measure, 1M rows) is the comparison: it tokenizes every record before the first step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_cache import write_alpaca  # noqa: E402  (a sibling bench script, not a package)

ROOT = Path(__file__).resolve().parents[1]


def tree_rss(root: psutil.Process) -> int:
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def steps_logged(metrics: Path) -> int:
    try:
        return metrics.read_bytes().count(b"\n")
    except OSError:
        return 0


def streamed_run(data: Path, window: int, steps: int, tmp: Path) -> dict:
    run_dir = tmp / f"run-{window}"
    cfg = tmp / f"stream-{window}.yaml"
    cfg.write_text(yaml.safe_dump({
        "data": {"train": str(data), "max_length": 512, "streaming": True, "stream_window": window},
        "method": {"name": "lora", "r": 8},
        "objective": {"name": "sft"},
        "train": {"max_steps": steps, "batch_size": 16, "tensorboard": False, "log_every": 1},
        "output": {"dir": str(run_dir)},
    }))
    env = {**os.environ, "TUNELAB_DATA_CACHE": str(tmp / "cache")}
    log = (tmp / f"stream-{window}.log").open("w")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(cfg)], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    root = psutil.Process(proc.pid)
    series: list[tuple[float, int, int]] = []  # (seconds, steps done, RSS bytes)
    first_step = None
    while proc.poll() is None:
        done = steps_logged(run_dir / "metrics.jsonl")
        now = time.perf_counter() - t0
        if done and first_step is None:
            first_step = now
        rss = tree_rss(root)
        if rss:
            series.append((round(now, 2), done, rss))
        time.sleep(0.2)
    log.close()
    seconds = time.perf_counter() - t0
    text = (tmp / f"stream-{window}.log").read_text()
    if proc.returncode != 0:
        sys.exit(f"the streamed run (window {window}) failed ({proc.returncode}):\n{text[-3000:]}")
    windows_read = text.count("data: streamed lines")
    peaks = per_step_peak(series, steps)
    training = [(t, s, r) for t, s, r in series if 1 <= s < steps]
    late = [(s, r) for s, r in peaks if s >= max(1, steps // 10)]
    slope = 0.0
    if len(late) >= 2:  # least squares of each step's peak RSS (MB) on the step
        xs, ys = [s for s, _ in late], [r / 2**20 for _, r in late]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    return {
        "window": window, "steps": steps, "windows_read": windows_read, "command_s": round(seconds, 1),
        "to_first_step_s": round(first_step or seconds, 1),
        "rss_first_step_mb": round(training[0][2] / 2**20) if training else None,
        "rss_last_step_mb": round(training[-1][2] / 2**20) if training else None,
        "peak_rss_mb": round(max(r for _, _, r in series) / 2**20),
        "peak_rss_first_step_mb": round(peaks[0][1] / 2**20) if peaks else None,
        "peak_rss_last_step_mb": round(peaks[-1][1] / 2**20) if peaks else None,
        "rss_slope_mb_per_100_steps": round(100 * slope, 1),
        "series": [[t, s, round(r / 2**20)] for t, s, r in series],
    }


def per_step_peak(series: list, steps: int) -> list[tuple[int, int]]:
    """(step, the highest RSS sampled while that step ran) for steps 1 .. steps - 1: within a step RSS swings
    by the activations allocated and freed; its peak from step to step is what would show a leak."""
    peak: dict[int, int] = {}
    for _, s, r in series:
        if 1 <= s < steps:
            peak[s] = max(peak.get(s, 0), r)
    return sorted(peak.items())


def plot(results: list[dict], rows: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        pts = [(s, m) for _, s, m in r["series"] if 1 <= s < r["steps"]]
        low: dict[int, int] = {}
        for s, m in pts:
            low[s] = min(low.get(s, m), m)
        peaks = per_step_peak(r["series"], r["steps"])
        line, = ax.plot([s for s, _ in peaks], [m for _, m in peaks], marker=".", linewidth=1,
                        label=f"window {r['window']:,} records ({r['windows_read']} read): peak in each step")
        ax.fill_between(sorted(low), [low[s] for s in sorted(low)], [dict(peaks)[s] for s in sorted(low)],
                        color=line.get_color(), alpha=0.15)
    ax.set_xlabel("optimizer steps done")
    ax.set_ylabel("RSS of the run, MB")
    ax.set_ylim(bottom=0)
    ax.set_title(f"tunelab train, data.streaming over {rows:,} alpaca records")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(results: list[dict]) -> None:
    print("| window (records) | windows read | to first step, s | whole command, s | peak RSS in step 1 / in the "
          "last step, MB | peak RSS, MB | slope of the per-step peak, MB per 100 steps |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['window']:,} | {r['windows_read']} | {r['to_first_step_s']} | {r['command_s']} | "
              f"{r['peak_rss_first_step_mb']} / {r['peak_rss_last_step_mb']} | {r['peak_rss_mb']} | "
              f"{r['rss_slope_mb_per_100_steps']} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--windows", type=int, nargs="+", default=[10_000, 200])
    ap.add_argument("--out", default="runs/bench-stream")
    ap.add_argument("--json", default="docs/results/stream.json")
    ap.add_argument("--plot", default="docs/results/stream-rss.png")
    args = ap.parse_args()
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"alpaca-{args.rows}.jsonl"
    if not data.is_file():
        t0 = time.perf_counter()
        write_alpaca(data, args.rows)
        size = data.stat().st_size / 2**30
        print(f"wrote {args.rows:,} records ({size:.2f} GiB) in {time.perf_counter() - t0:.0f} s")
    results = []
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        for window in args.windows:
            r = streamed_run(data, window, args.steps, Path(tmp))
            results.append(r)
    print(f"\n{args.rows:,} records, {data.stat().st_size / 2**30:.2f} GiB; {args.steps} steps of batch 16\n")
    table(results)
    meta = {"rows": args.rows, "file_bytes": data.stat().st_size, "steps": args.steps,
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
                        "load_average": os.getloadavg()},
            "command": "python bench/stream.py " + " ".join(sys.argv[1:])}
    Path(ROOT / args.json).write_text(json.dumps({**meta, "runs": results}, indent=1) + "\n")
    plot(results, args.rows, ROOT / args.plot)
    print(f"\nwrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
