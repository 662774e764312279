"""Learning rates for the technique suite, chosen per method family by `tunelab tune` on validation.

    python bench/suite_lrs.py [--families lora,full,...] [--parallel 2] [--out runs/suite-lrs]

`tunelab compare --suite tinyworld` trains every method for one budget (150 steps x 32). A method's
shipped config has a learning rate chosen for `qa`; the suite's numbers must not depend on that
accident. For each method family, one representative config is trained at every learning rate of a
grid (`tunelab tune --sampler grid`, half-decade steps around its shipped value), on the suite's
budget and on the task where methods differ most: `new-facts` for the generative families, scored by
exact match on `tinyworld:new-facts@validation` (train people's facts in wordings train never uses,
about people the suite's score, `@paraphrases`, never asks); `sentiment@validation` accuracy for the
two classification families. Test splits are never read. One seed per learning rate. While the best
rate is the grid's highest (or lowest) and scores above zero, one more rate a grid step beyond it
is tried (at most 3): a best on the edge of a grid is not a best. Where no rate scores above zero,
the shipped rate is kept (nothing to choose by). The family's choice is written into
configs/compare-tinyworld.yaml by hand, for every member of the family. A rerun reuses every rate
already scored (the studies in --out) and tries only what is missing.

Each family's searches run in their own processes with `OMP_NUM_THREADS=1` (`--parallel` families at
once). Prints a markdown table and the chosen rates; writes JSON (with the tune commands).
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


def command(family: str, values: list[float], out: Path, part: int) -> tuple[list[str], Path]:
    """The tune command that scores `values` for `family`: part 0 is the grid, parts 1.. the rates added
    beyond its edge (each its own study: a study keeps the space it was made with)."""
    config, _, _, (task, metric) = FAMILIES[family]
    name = family if part == 0 else f"{family}-{part}"
    space = out / f"{name}-space.yaml"
    space.write_text(yaml.safe_dump({"train.lr": values}), encoding="utf-8")
    cmd = ["tunelab", "tune", config, *task, *BUDGET, "--space", str(space), "--sampler", "grid",
           "--trials", str(len(values)), "--pruner", "none", "--metric", metric, "--out", str(out / name),
           "--study", f"suite-lr-{name}", "--quiet"]
    return cmd, out / name


def scored(family: str, out: Path) -> tuple[dict[float, float | None], int]:
    """Every learning rate tried for `family` so far (its studies' values; None: failed) and the parts."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    found: dict[float, float | None] = {}
    parts = 0
    while (out / (name := family if parts == 0 else f"{family}-{parts}") / "study.db").is_file():
        url = f"sqlite:///{(out / name / 'study.db').resolve()}"
        st = optuna.load_study(study_name=f"suite-lr-{name}", storage=url)
        for t in st.trials:
            if t.state.is_finished():
                ok = t.state == optuna.trial.TrialState.COMPLETE
                found[float(t.params["train.lr"])] = t.value if ok else None
        parts += 1
    return found, parts


def best_of(found: dict[float, float | None]) -> float | None:
    done = {lr: v for lr, v in found.items() if v is not None}
    # Ties go to the smaller rate: it moves the base least (less forgetting for the same score).
    return min(done, key=lambda lr: (-done[lr], lr)) if done else None


def run(family: str, out: Path, max_extend: int = 3) -> dict:
    """The family's grid, then, while the best rate is the highest (lowest) one tried and scores above
    zero, one more rate a grid step beyond it (at most `max_extend`): a best on the edge is not a best."""
    config, members, grid, (_, metric) = FAMILIES[family]
    t0 = time.perf_counter()
    commands, codes = [], []
    values = list(grid)
    for _ in range(max_extend + 1):
        found, parts = scored(family, out)
        todo = [v for v in values if v not in found]
        if todo:
            cmd, _ = command(family, todo, out, parts)
            commands.append(shlex.join(cmd))
            with (out / f"{family}.log").open("a") as f:
                codes.append(subprocess.run([sys.executable, "-m", "tunelab", *cmd[1:]], stdout=f,
                                            stderr=subprocess.STDOUT, env={"OMP_NUM_THREADS": "1", **os.environ,
                                                                           "PYTHONUNBUFFERED": "1"}).returncode)
            found, parts = scored(family, out)
        best, lrs = best_of(found), sorted(found)
        step = grid[-1] / grid[-2]
        if best is None or not found[best] or best not in (lrs[0], lrs[-1]):
            break
        values.append(float(f"{best * step:.2g}") if best == lrs[-1] else float(f"{best / step:.2g}"))
    wall = time.perf_counter() - t0
    shipped = _shipped_lr(config)
    if best is not None and not found[best]:  # no rate scores above zero: nothing to choose by
        best = shipped
    print(f"{family}: {wall:.0f} s, chosen lr {best} (shipped {shipped})", flush=True)
    return {"family": family, "config": config, "members": members, "metric": metric, "grid": grid,
            "scores": {str(k): v for k, v in sorted(found.items())}, "best_lr": best, "shipped_lr": shipped,
            "wall_seconds": round(wall, 1), "exit_codes": codes, "commands": commands}


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
