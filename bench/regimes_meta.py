"""Meta-learning (O09, #17): few-shot adaptation to unseen tasks of TinyWorld's `meta` family from a
meta-learned LoRA initialisation, against a fresh LoRA on the base and a multi-task-trained LoRA.

    python bench/regimes_meta.py [--quick] [--seeds 0 1 2] [--algorithms fomaml reptile]
                                 [--outer-steps N] [--out runs/bench-meta] [--json docs/results/regimes-meta.json]
    python bench/regimes_meta.py --support-check-only    # step 4 alone, on the inits of a finished run

Per seed, on the shipped configs/meta-lora.yaml (LoRA r8 all-linear on tunelab-tiny):
1. `meta_train` with each algorithm over `tinyworld:meta@train` (8 of its 200 tasks held out for the curve);
2. a multi-task LoRA: plain SFT (`recipes.run.train`, Adam lr 1e-3) on every record of
   `tinyworld:meta@train` (support and query of all 200 tasks), as many records as meta-training
   drew (outer steps x tasks per step x 10 records);
3. `adapt_eval` on the 50 unseen tasks of `tinyworld:meta@test` from each init: k steps on a task's 6
   support records, exact match of greedy replies and the token NLL on its 4 query records, at
   k = 0, 1, 5, 20. Every init adapts with SGD at the meta-training inner lr (what the meta inits were
   trained for); the fresh and multi-task LoRAs also with Adam (lr 3e-3), their better optimizer;
4. the support check (seed 0, 10 tasks): exact match on the support records themselves after 20 steps,
   i.e. whether adapting fits the examples it trains on, apart from generalising to the query.

Means over tasks per seed; the table shows the mean over seeds and its 95 % CI (Student t over the
seeds). Torch runs one thread (OMP_NUM_THREADS=1 unless set). Prints a markdown table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from tunelab.data.sources import read_all, resolve_source  # noqa: E402
from tunelab.recipes.compare.stats import summarize  # noqa: E402
from tunelab.recipes.meta import adapt_eval, load_meta_config, meta_train  # noqa: E402
from tunelab.recipes.run import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "meta-lora"
RECORDS_PER_TASK = 10  # tinyworld:meta: 6 support + 4 query
SFT = {"batch_size": 32, "lr": 1.0e-3, "warmup": 0.1, "precision": "fp32", "eval_every": 0, "save_every": 0,
       "tensorboard": False}
ADAM_LR = 3.0e-3


def multitask(out: Path, seed: int, examples: int) -> Path:
    """A LoRA trained with plain SFT on every record of meta@train, `examples` records in all."""
    cfg, _ = load_meta_config(CONFIG)
    raw = cfg.to_dict()
    raw["data"] = {**raw["data"], "train": resolve_source("tinyworld:meta@train"), "eval": None}
    raw["train"] = {**raw["train"], **SFT, "seed": seed, "max_steps": max(1, math.ceil(examples / SFT["batch_size"]))}
    raw["output"] = {"dir": str(out)}
    train(raw, overwrite=True, quiet=True)
    return out


def evaluate(init: Path | str, seed: int, steps: list[int], limit: int | None, optimizer: str,
             lr: float | None) -> dict:
    config = None if isinstance(init, Path) and (init / "meta.json").is_file() else CONFIG
    got = adapt_eval(init, config, steps, overrides=[f"meta.seed={seed}"] if config else None, limit=limit,
                     optimizer=optimizer, lr=lr, quiet=True)
    return {key: {k: v["mean"] for k, v in got[key].items()} for key in ("exact_match", "query_loss")} | {
        "n_tasks": got["n_tasks"], "lr": got["lr"]}


def rows_for(args: argparse.Namespace, out: Path, seed: int, curves: dict) -> dict[tuple[str, str], dict]:
    cfg, meta = load_meta_config(CONFIG)
    outer = args.outer_steps or meta.outer_steps
    inits: dict[str, Path | str] = {}
    for alg in args.algorithms:
        t0 = time.perf_counter()
        result = meta_train(CONFIG, [f"meta.algorithm={alg}", f"meta.seed={seed}", f"meta.outer_steps={outer}"],
                            out / f"seed-{seed}" / alg, overwrite=True, quiet=True)
        curves.setdefault(alg, {})[seed] = [[p["step"], round(p["val_query_loss"], 4)] for p in result["curve"]
                                            if "val_query_loss" in p]
        print(f"seed {seed}: {alg} meta-trained in {time.perf_counter() - t0:.0f} s", flush=True)
        inits[alg] = out / f"seed-{seed}" / alg
    inits["fresh LoRA (base)"] = "base"
    t0 = time.perf_counter()
    inits["multi-task LoRA"] = multitask(out / f"seed-{seed}" / "multitask", seed,
                                         outer * meta.tasks_per_step * RECORDS_PER_TASK)
    print(f"seed {seed}: multi-task LoRA trained in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = {}
    for name, init in inits.items():
        optimizers = [("sgd", None)] + ([("adam", ADAM_LR)] if name not in args.algorithms else [])
        for opt, lr in optimizers:
            t0 = time.perf_counter()
            rows[(name, opt)] = evaluate(init, seed, args.steps, args.limit, opt, lr)
            em = rows[(name, opt)]["exact_match"]
            print(f"seed {seed}: {name} ({opt}) exact match " + " ".join(f"@{k} {v:.3f}" for k, v in em.items())
                  + f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
    return rows


def support_check(args: argparse.Namespace, out: Path, seed: int, limit: int = 10) -> dict[str, dict]:
    """Exact match on the support records themselves after 20 steps (seed `seed`'s inits, the first
    `limit` unseen tasks): whether the steps fit the examples they train on, apart from generalising
    to the query. The tasks are meta@test's with every task's support records also as its query."""
    records = read_all(resolve_source("tinyworld:meta@test"))
    first = list(dict.fromkeys(r["task"] for r in records))[:limit]
    support = [r for r in records if r["task"] in first and r["split"] == "support"]
    path = out / "support-as-query.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in support + [{**r, "split": "query"} for r in support]),
                    encoding="utf-8")
    inits: dict[str, Path | str] = {alg: out / f"seed-{seed}" / alg for alg in args.algorithms}
    inits |= {"fresh LoRA (base)": "base", "multi-task LoRA": out / f"seed-{seed}" / "multitask"}
    found = {}
    for name, init in inits.items():
        for opt, lr in [("sgd", None)] + ([("adam", ADAM_LR)] if name not in args.algorithms else []):
            config = None if isinstance(init, Path) and (init / "meta.json").is_file() else CONFIG
            got = adapt_eval(init, config, [20], overrides=[f"meta.seed={seed}"] if config else None,
                             tasks=str(path), optimizer=opt, lr=lr, quiet=True)
            found[f"{name} ({opt})"] = {k: round(v["mean"], 4) for k, v in got["exact_match"].items()}
            print(f"support check: {name} ({opt}) exact match on the support @20 {found[f'{name} ({opt})']['20']:.3f}",
                  flush=True)
    return {"seed": seed, "tasks": len(first), "exact_match_on_support": found}


def aggregate(per_seed: dict[int, dict[tuple[str, str], dict]]) -> list[dict]:
    out = []
    for key in next(iter(per_seed.values())):
        seeds = {s: rows[key] for s, rows in per_seed.items()}
        row = {"init": key[0], "optimizer": key[1], "lr": next(iter(seeds.values()))["lr"],
               "n_tasks": next(iter(seeds.values()))["n_tasks"], "seeds": {str(s): v for s, v in seeds.items()}}
        for metric in ("exact_match", "query_loss"):
            steps = next(iter(seeds.values()))[metric]
            row[metric] = {k: _summary([v[metric][k] for v in seeds.values()]) for k in steps}
        out.append(row)
    return out


def _summary(values: list[float]) -> dict[str, float | None]:
    s = summarize(values)
    return {"mean": round(s.mean, 4), "ci95": None if math.isnan(s.half_width) else round(s.half_width, 4)}


def goal(rows: list[dict], algorithms: list[str]) -> dict[str, dict]:
    """Does a meta-learned init reach at 5 steps what the other inits reach at 20 (their best optimizer)?"""
    others = [r for r in rows if r["init"] not in algorithms]
    verdict = {}
    for r in (r for r in rows if r["init"] in algorithms):
        best_em = max(o["exact_match"]["20"]["mean"] for o in others)
        best_loss = min(o["query_loss"]["20"]["mean"] for o in others)
        verdict[r["init"]] = {
            "exact_match_at_5": r["exact_match"]["5"]["mean"], "others_best_exact_match_at_20": best_em,
            "query_loss_at_5": r["query_loss"]["5"]["mean"], "others_best_query_loss_at_20": best_loss,
            "exact_match_goal_met": r["exact_match"]["5"]["mean"] >= best_em and best_em + r["exact_match"]["5"][
                "mean"] > 0, "query_loss_goal_met": r["query_loss"]["5"]["mean"] <= best_loss}
    return verdict


def table(rows: list[dict]) -> str:
    steps = list(rows[0]["exact_match"])
    head = ("| init | adapts with | " + " | ".join(f"exact match @{k}" for k in steps) + " | "
            + " | ".join(f"query NLL @{k}" for k in steps) + " |")
    lines = [head, "|" + "---|" * (2 + 2 * len(steps))]
    for r in rows:
        cells = [_cell(r["exact_match"][k]) for k in steps] + [_cell(r["query_loss"][k], 2) for k in steps]
        lines.append(f"| {r['init']} | {r['optimizer']} lr {r['lr']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(s: dict, digits: int = 3) -> str:
    return f"{s['mean']:.{digits}f}" + (f" ± {s['ci95']:.{digits}f}" if s["ci95"] is not None else "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1 seed, 10 outer steps, 5 eval tasks, k = 1, 5")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--algorithms", nargs="+", default=["fomaml", "reptile"], choices=["maml", "fomaml", "reptile"])
    ap.add_argument("--outer-steps", type=int, default=None, help="default: the config's meta.outer_steps")
    ap.add_argument("--limit", type=int, default=None, help="evaluate the first N unseen tasks (default all 50)")
    ap.add_argument("--out", default="runs/bench-meta")
    ap.add_argument("--json", default=None, help="default: docs/results/regimes-meta.json (quick: runs/...)")
    ap.add_argument("--support-check-only", action="store_true",
                    help="only the support check, on the inits a finished run left in --out; added to --json")
    args = ap.parse_args()
    args.steps = [1, 5, 20]
    if args.quick:
        args.seeds, args.outer_steps, args.limit, args.steps = args.seeds[:1], args.outer_steps or 10, 5, [1, 5]
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    out = Path(args.out)
    path = Path(args.json or (out / "regimes-meta.json" if args.quick else ROOT / "docs/results/regimes-meta.json"))
    if args.support_check_only:
        result = json.loads(path.read_text(encoding="utf-8"))
        result["support_check"] = support_check(args, out, result["seeds"][0])
        path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        return
    t0 = time.perf_counter()
    curves: dict = {}
    per_seed = {seed: rows_for(args, out, seed, curves) for seed in args.seeds}
    rows = aggregate(per_seed)
    print("\n" + table(rows))
    verdict = goal(rows, args.algorithms) if "20" in rows[0]["exact_match"] else {}
    for alg, v in verdict.items():
        print(f"{alg}: exact match @5 {v['exact_match_at_5']:.3f} vs the others' best @20 "
              f"{v['others_best_exact_match_at_20']:.3f}; query NLL @5 {v['query_loss_at_5']:.2f} vs "
              f"{v['others_best_query_loss_at_20']:.2f}")
    _, meta = load_meta_config(CONFIG)
    result = {
        "command": shlex.join(["python", "bench/regimes_meta.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "seconds": round(time.perf_counter() - t0), "config": f"configs/{CONFIG}.yaml",
        "meta": {**meta.model_dump(mode="json"), **({"outer_steps": args.outer_steps} if args.outer_steps else {})},
        "seeds": args.seeds, "algorithms": args.algorithms, "multitask_sft": SFT, "adam_lr": ADAM_LR,
        "rows": rows, "goal": verdict, "meta_curves": curves,
        "support_check": support_check(args, out, args.seeds[0], limit=args.limit or 10),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"\nwrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} in {result['seconds']} s")


if __name__ == "__main__":
    main()
