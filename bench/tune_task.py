"""`tunelab tune` on a TinyWorld task with room above the default: the tables of docs/results/tune.md.

    python bench/tune_task.py --task skills [--trials 30] [--steps 60] [--batch-size 16]
    python bench/tune_task.py --task new-facts [--trials 30] [--steps 150] [--batch-size 32] [--eval-every 25]

`--task new-facts` (knowledge injection): trains on `tinyworld:new-facts`, chooses by exact match on
its `validation` split (a fifth of the train people, asked in wordings train never uses) with the
median pruner on the validation loss, and tests the config's own values and the best trial once, on
`@paraphrases` (the other four fifths). `--task skills`: TinyWorld's `skills` task (arithmetic,
reversal, sorting, lookup, counting as chat questions) has a
train and a test split; the search needs a validation split, so every 10th training record (by a
hash of its question) is held out as `validation.jsonl` and the rest is trained on. The base config
is the shipped `sft-lora` (LoRA r16 alpha 32 all-linear, lr 1e-3, 60 steps, warmup 6) on that data,
with `--batch-size` 16 instead of 32 so that 30 trials fit two CPU cores, and an evaluation every
`--eval-every` steps for the pruner; the space is the shipped `tune-lora`. Torch runs one thread per
process (`OMP_NUM_THREADS=1`, unless set): on two shared cores a second thread costs far more than
it gains. Each trial is scored by exact match on the
validation file (`--metric FILE:exact_match`, maximized); the median pruner stops trials on their
earlier validation losses. Only after the search, the config's own values (the study's first
trial) and the best trial are evaluated on `tinyworld:skills@test`.
Prints the command, its wall time and a markdown table; writes JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def split_validation(out: Path) -> tuple[Path, Path]:
    from tunelab.data.sources import resolve_source

    train, val = [], []
    for line in Path(resolve_source("tinyworld:skills@train")).read_text(encoding="utf-8").splitlines():
        question = json.loads(line)["messages"][0]["content"]
        (val if int(hashlib.sha1(question.encode()).hexdigest(), 16) % 10 == 0 else train).append(line)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.jsonl", out / "validation.jsonl"
    for path, lines in zip(paths, (train, val), strict=True):
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", choices=("skills", "new-facts"), default="skills")
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--out", default=None, help="default: runs/bench-tune-<task>")
    ap.add_argument("--json", default=None, help="default: docs/results/tune-<task>.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=10)
    args = ap.parse_args()
    out = Path(args.out or f"runs/bench-tune-{args.task}")
    json_path = Path(args.json or f"docs/results/tune-{args.task}.json")
    if args.task == "skills":
        train, val = split_validation(out / "data")
        metric, test_task = f"{val}:exact_match", "tinyworld:skills@test"
    else:
        train, val = "tinyworld:new-facts", "tinyworld:new-facts@validation"
        metric, test_task = f"{val}:exact_match", "tinyworld:new-facts@paraphrases"
    cmd = ["tunelab", "tune", "sft-lora", f"data.train={train}", f"data.eval={val}", f"train.max_steps={args.steps}",
           f"train.batch_size={args.batch_size}", f"train.warmup={max(1, args.steps // 10)}",
           f"train.eval_every={args.eval_every}", "--space", "tune-lora", "--trials", str(args.trials),
           "--out", str(out / "study"), "--metric", metric, "--seed", str(args.seed)]
    print("$ " + shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tunelab", *cmd[1:]], check=True,
                   env={"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - t0

    import optuna
    import torch

    from tunelab.recipes.evaluate import evaluate_task

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    st = optuna.load_study(study_name="tune-sft-lora", storage=f"sqlite:///{(out / 'study' / 'study.db').resolve()}")
    done = [t for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE]
    own = next(t for t in st.trials if t.user_attrs.get("baseline"))
    best = max(done, key=lambda t: t.value)
    rows = {}
    t1 = time.perf_counter()
    for name, t in (("the config's own values", own), ("best of the search", best)):
        run = out / "study" / "trials" / f"trial-{t.number:04d}"
        loss = json.loads((run / "summary.json").read_text())["eval_loss"]
        test = evaluate_task(run, test_task)["exact_match"]  # test: once, after the search
        rows[name] = {"trial": t.number, "params": t.params, "validation_loss": loss, "validation": t.value,
                      "test": test}
    states = {s.name.lower(): sum(t.state == s for t in st.trials) for s in optuna.trial.TrialState}
    result = {"command": shlex.join(cmd), "wall_seconds": round(wall, 1),
              "eval_seconds": round(time.perf_counter() - t1, 1), "trials": {k: v for k, v in states.items()
              if v}, "rows": rows, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "python": platform.python_version()}
    result["task"], result["test"] = args.task, test_task
    json_path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"\nwall time {wall / 60:.1f} min; trials {result['trials']}\n")
    print(f"| model | trial | validation loss | validation exact match | {test_task} exact match |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['trial']} | {r['validation_loss']:.4f} | {r['validation']:.3f} | {r['test']:.3f} |")


if __name__ == "__main__":
    main()
