"""Learning rates for the technique suite, chosen per method family by `tunelab tune` on validation.

    python bench/suite_lrs.py [--families lora,full,...] [--parallel 2] [--out runs/suite-lrs]

`tunelab compare --suite tinyworld` trains every method for one budget (150 steps x 32). A method's
shipped config has a learning rate chosen for `qa`; the suite's numbers must not depend on that
accident. For each method family, one representative config is trained at every learning rate of a
grid (`tunelab tune --sampler grid`, half-decade steps around its shipped value), on the suite's
budget and on the task where methods differ most: `new-facts` for the generative families, scored by
exact match on `tinyworld:new-facts@validation` (train people's facts in wordings train never uses,
about people the suite's score, `@paraphrases`, never asks); `sentiment@validation` accuracy for the
two classification families. Test splits are never read. One seed per learning rate. The family's
best is written into configs/compare-tinyworld.yaml by hand, for every member of the family.

Each family's search runs in its own process with `OMP_NUM_THREADS=1` (`--parallel` at once).
Prints the commands, a markdown table and the chosen rates; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

BUDGET = ["train.max_steps=150", "train.batch_size=32", "train.select_best=false", "train.eval_every=0"]
NEW_FACTS = (["data.train=tinyworld:new-facts", "data.eval=null"], "tinyworld:new-facts@validation:exact_match")
SENTIMENT = (["data.train=tinyworld:sentiment", "data.eval=tinyworld:sentiment@validation",
              "data.format=classification", "data.max_length=64"], "tinyworld:sentiment@validation:accuracy")

# family -> (representative config, members in the suite, learning-rate grid, task)
FAMILIES: dict[str, tuple[str, list[str], list[float], tuple[list[str], str]]] = {
    "weights": ("sft-full", ["full", "partial", "ltsft", "diff_pruning", "threshold_mask"],
                [3e-5, 1e-4, 3e-4, 1e-3, 3e-3], NEW_FACTS),
    "biases": ("bitfit", ["bitfit"], [3e-4, 1e-3, 3e-3, 1e-2, 3e-2], NEW_FACTS),
    "low-rank": ("sft-lora", ["lora", "qlora", "krona", "dylora", "adalora", "dora"],
                 [3e-4, 1e-3, 3e-3, 1e-2, 3e-2], NEW_FACTS),
    "adapters": ("adapters-houlsby", ["adapters-houlsby", "adapters-pfeiffer"],
                 [2e-4, 6e-4, 2e-3, 6e-3, 2e-2], NEW_FACTS),
    "soft-prompts": ("prompt-tuning", ["prompt", "prefix", "ptuning"], [1e-3, 3e-3, 1e-2, 3e-2, 1e-1], NEW_FACTS),
    "head": ("head-sentiment", ["head"], [3e-5, 1e-4, 3e-4, 1e-3, 3e-3], SENTIMENT),
    "features": ("features-sentiment", ["features"], [1e-3, 3e-3, 1e-2, 3e-2, 1e-1], SENTIMENT),
}


def command(family: str, out: Path) -> tuple[list[str], Path]:
    config, _, grid, (task, metric) = FAMILIES[family]
    space = out / f"{family}-space.yaml"
    space.write_text(yaml.safe_dump({"train.lr": grid}), encoding="utf-8")
    cmd = ["tunelab", "tune", config, *task, *BUDGET, "--space", str(space), "--sampler", "grid",
           "--trials", str(len(grid)), "--pruner", "none", "--metric", metric, "--out", str(out / family),
           "--study", f"suite-lr-{family}", "--quiet"]
    return cmd, out / family


def run(family: str, out: Path) -> dict:
    cmd, study_dir = command(family, out)
    t0 = time.perf_counter()
    log = out / f"{family}.log"
    with log.open("w") as f:
        code = subprocess.run([sys.executable, "-m", "tunelab", *cmd[1:]], stdout=f, stderr=subprocess.STDOUT,
                              env={"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    wall = time.perf_counter() - t0
    import optuna

    st = optuna.load_study(study_name=f"suite-lr-{family}",
                           storage=f"sqlite:///{(study_dir / 'study.db').resolve()}")
    scores = {t.params["train.lr"]: (t.value if t.state == optuna.trial.TrialState.COMPLETE else None)
              for t in st.trials}
    done = {lr: v for lr, v in scores.items() if v is not None}
    # Ties go to the smaller rate: it moves the base least (less forgetting for the same score).
    best = min(done, key=lambda lr: (-done[lr], lr)) if done else None
    config, members, grid, (_, metric) = FAMILIES[family]
    shipped = _shipped_lr(config)
    print(f"{family}: exit {code}, {wall:.0f} s, best lr {best} (shipped {shipped})", flush=True)
    return {"family": family, "config": config, "members": members, "metric": metric, "grid": grid,
            "scores": {str(k): v for k, v in sorted(scores.items())}, "best_lr": best, "shipped_lr": shipped,
            "wall_seconds": round(wall, 1), "exit_code": code, "command": shlex.join(cmd)}


def _shipped_lr(config: str) -> float:
    from tunelab.config import SHIPPED_CONFIGS

    return float(yaml.safe_load((SHIPPED_CONFIGS / f"{config}.yaml").read_text())["train"]["lr"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--out", default="runs/suite-lrs")
    ap.add_argument("--json", default="docs/results/compare-lrs.json")
    args = ap.parse_args()
    families = args.families.split(",")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        sys.exit(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for f in families:
        print("$ " + shlex.join(command(f, out)[0]), flush=True)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.parallel) as pool:
        rows = list(pool.map(lambda f: run(f, out), families))
    wall = time.perf_counter() - t0

    print(f"\n{len(families)} families in {wall / 60:.1f} min ({args.parallel} at once)\n")
    print("| family | representative | metric (validation) | lr: score | chosen | shipped |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = ", ".join(f"{float(lr):.0e}: {'-' if v is None else f'{v:.3f}'}" for lr, v in r["scores"].items())
        print(f"| {r['family']} ({', '.join(r['members'])}) | {r['config']} | {r['metric'].split(':', 1)[1]} | "
              f"{cells} | {r['best_lr']:.0e} | {r['shipped_lr']:.0e} |")
    result = {"wall_seconds": round(wall, 1), "parallel": args.parallel, "families": rows,
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()}}
    path = ROOT / args.json
    previous = json.loads(path.read_text()) if path.is_file() else {"families": []}
    kept = [r for r in previous.get("families", []) if r["family"] not in families]
    result["families"] = sorted(kept + rows, key=lambda r: list(FAMILIES).index(r["family"]))
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"\nwrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
