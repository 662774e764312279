"""Multi-task mixing and continual learning on TinyWorld skills (#17, must-shows 1 and 2).

    python bench/regimes.py multitask [--seeds 0 1 2] [--out runs/bench-regimes]
    python bench/regimes.py continual [--strategies naive replay ewc lwf adapters] [--seeds 0 1 2]
    python bench/regimes.py report       # docs/results/regimes.md tables from the JSON of both parts

Every run is LoRA r16 on the embedded base (tunelab-tiny), SFT, lr 3e-3, bf16, packed rows of 128 tokens;
scores are exact match on each skill's test split (100 questions, inputs reserved from training and
the corpus); forgetting of the base's own knowledge is the probe's cloze accuracy (tinyworld:probe).

multitask: (1) single-task LoRA on each of reversal, lookup, counting (STEPS each) vs one LoRA on their
mixture (3 x STEPS: the same number of examples), each scored on all three tasks and the probe;
(2) an imbalanced mix (reversal 500, lookup 100, counting 20 examples) sampled by size (T=1) vs
temperature T=5 (nearly uniform), the same budget.
continual: the stages of configs/continual-skills.yaml under each strategy; the accuracy matrix,
ACC, BWT, FWT per seed (each run's continual.json), mean and 95% CI over seeds in the report.

Parts write their JSON under --out, one file per run (so parts can run in parallel processes and
a killed part reruns only what is missing); `report` gathers them into docs/results/regimes.json and
prints the tables for docs/results/regimes.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path

from tunelab import api
from tunelab.data.sources import read_all, resolve_source
from tunelab.eval.suite import evaluate_task
from tunelab.eval.tasks import load_model_or_run
from tunelab.recipes.compare.stats import paired, summarize

ROOT = Path(__file__).resolve().parents[1]
SKILLS = ("reversal", "lookup", "counting")
STEPS = 100
PROBE_LIMIT = 200
IMBALANCED = {"reversal": 500, "lookup": 100, "counting": 20}
BASE = {
    "model": {"name_or_path": "tunelab-tiny"},
    "data": {"max_length": 128, "packing": True},
    "method": {"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"},
    "objective": {"name": "sft"},
    "train": {"batch_size": 16, "lr": 3.0e-3, "warmup": 10, "precision": "bf16", "tensorboard": False,
              "log_every": 50},
}


def skill(name: str, split: str) -> str:
    return f"tinyworld:skills@{name}-{split}"


def scores(run_dir: Path, probe: bool = True) -> dict[str, float]:
    pair = load_model_or_run(str(run_dir))
    out = {s: evaluate_task(pair, skill(s, "test"))["exact_match"] for s in SKILLS}
    if probe:
        out["probe"] = evaluate_task(pair, "tinyworld:probe", limit=PROBE_LIMIT)["probe_cloze_accuracy"]
    return out


def train_and_score(out: Path, name: str, data: dict, steps: int, seed: int) -> dict:
    result_file = out / f"{name}.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    cfg = json.loads(json.dumps(BASE))
    cfg["data"].update(data)
    cfg["train"].update(max_steps=steps, seed=seed)
    cfg["output"] = {"dir": str(out / "runs" / name)}
    t0 = time.perf_counter()
    api.train(cfg, overwrite=True, quiet=True)
    row = {"name": name, "seed": seed, "steps": steps, "train_seconds": round(time.perf_counter() - t0, 1),
           **scores(out / "runs" / name)}
    result_file.write_text(json.dumps(row, indent=1))
    print(json.dumps(row), flush=True)
    return row


def multitask(out: Path, seeds: list[int]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    base_file = out / "base.json"
    if not base_file.is_file():
        base_file.write_text(json.dumps(scores(Path("tunelab-tiny")), indent=1))
    subsets = out / "data"
    subsets.mkdir(exist_ok=True)
    for s, n in IMBALANCED.items():  # the first n training records after a fixed shuffle
        records = read_all(resolve_source(skill(s, "train")))
        random.Random(f"imbalanced/{s}").shuffle(records)
        (subsets / f"{s}-{n}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:n]))
    for seed in seeds:
        for s in SKILLS:
            train_and_score(out, f"single-{s}-s{seed}", {"train": skill(s, "train")}, STEPS, seed)
        mix = [{"source": skill(s, "train"), "task": s} for s in SKILLS]
        train_and_score(out, f"multi-s{seed}", {"train": mix}, STEPS * len(SKILLS), seed)
        for t in (1.0, 5.0):
            mix = [{"source": str(subsets / f"{s}-{n}.jsonl"), "task": s} for s, n in IMBALANCED.items()]
            train_and_score(out, f"imbalanced-T{t:g}-s{seed}", {"train": mix, "temperature": t},
                            STEPS * len(SKILLS) // 2, seed)


def continual(out: Path, strategies: list[str], seeds: list[int]) -> None:
    for seed in seeds:
        for strategy in strategies:
            name, _, value = strategy.partition("@")  # e.g. ewc@1000: that strategy with its knob set
            knob = {"ewc": "ewc_lambda", "replay": "replay_share", "lwf": "lwf_weight"}.get(name)
            extra = [f"continual.{knob}={value}"] if value and knob else []
            run = out / "continual" / f"{strategy}-s{seed}"
            done = run / "continual.json"
            if done.is_file() and "acc" in json.loads(done.read_text()):
                continue
            resume = done.is_file()
            t0 = time.perf_counter()
            state = api.continual(ROOT / "configs" / "continual-skills.yaml",
                                  [f"continual.strategy={name}", f"train.seed={seed}", *extra],
                                  out=run, resume=resume, overwrite=not resume, quiet=True)
            print(json.dumps({"strategy": strategy, "seed": seed, "seconds": round(time.perf_counter() - t0),
                              **{k: state[k] for k in ("acc", "bwt", "fwt")}, "R": state["R"]}), flush=True)


def report(out: Path) -> None:
    data: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "multitask": {}, "continual": {}}
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.name != "base.json"]
    base = json.loads((out / "base.json").read_text()) if (out / "base.json").is_file() else {}
    data["multitask"]["base"] = base
    groups: dict[str, dict[int, dict]] = {}
    for r in rows:
        groups.setdefault(r["name"].rsplit("-s", 1)[0], {})[r["seed"]] = r
    data["multitask"]["runs"] = groups
    cols = [*SKILLS, "probe"]
    print("| run | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    print("| base | " + " | ".join(f"{base.get(c, float('nan')):.3f}" for c in cols) + " |")
    for name, by_seed in groups.items():
        print(f"| {name} ({len(by_seed)} seeds) | " + " | ".join(
            summarize([r[c] for r in by_seed.values()]).text() for c in cols) + " |")
    singles = {s: groups.get(f"single-{s}", {}) for s in SKILLS}
    multi = groups.get("multi", {})
    if multi and all(singles.values()):
        print("\nmulti-task minus single-task, on each task (paired over seeds):")
        for s in SKILLS:
            t = paired({k: r[s] for k, r in multi.items()}, {k: r[s] for k, r in singles[s].items()})
            print(f"- {s}: {t.text(100, ' points')}")
        for s in SKILLS:
            t = paired({k: r["probe"] for k, r in multi.items()}, {k: r["probe"] for k, r in singles[s].items()})
            print(f"- probe, multi vs single-{s}: {t.text(100, ' points')}")
    t1, t5 = groups.get("imbalanced-T1", {}), groups.get("imbalanced-T5", {})
    if t1 and t5:
        print("\nimbalanced mix, T=5 minus T=1:")
        for s in SKILLS:
            print(f"- {s} ({IMBALANCED[s]} examples): "
                  f"{paired({k: r[s] for k, r in t5.items()}, {k: r[s] for k, r in t1.items()}).text(100, ' points')}")
    runs: dict[str, dict[int, dict]] = {}
    for p in sorted((out / "continual").glob("*/continual.json")):
        state = json.loads(p.read_text())
        if "acc" not in state:
            continue
        strategy, seed = p.parent.name.rsplit("-s", 1)
        runs.setdefault(strategy, {})[int(seed)] = {k: state[k] for k in ("acc", "bwt", "fwt", "R", "base", "tasks")}
    data["continual"] = runs
    if runs:
        print("\n| strategy | seeds | ACC | BWT | FWT | |BWT| vs naive |")
        print("|---|---:|---:|---:|---:|---:|")
        naive = runs.get("naive", {})
        for strategy, by_seed in runs.items():
            cut = ""
            if naive and strategy != "naive":
                nb = summarize([r["bwt"] for r in naive.values()]).mean
                sb = summarize([r["bwt"] for r in by_seed.values()]).mean
                cut = f"{abs(sb) / abs(nb):.2f}x" if nb else ""
            print(f"| {strategy} | {len(by_seed)} | " + " | ".join(
                summarize([r[k] for r in by_seed.values()]).text() for k in ("acc", "bwt", "fwt")) + f" | {cut} |")
        for strategy, by_seed in runs.items():
            if "naive" in runs and strategy != "naive":
                for k in ("acc", "bwt"):
                    t = paired({s: r[k] for s, r in by_seed.items()}, {s: r[k] for s, r in naive.items()})
                    print(f"- {strategy} minus naive, {k.upper()}: {t.text(100, ' points')}")
    (ROOT / "docs" / "results" / "regimes.json").write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=("multitask", "continual", "report"))
    ap.add_argument("--out", default="runs/bench-regimes")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--strategies", nargs="+", default=["naive", "replay", "ewc", "lwf", "adapters"],
                    help="strategies, each optionally @ its knob: ewc@LAMBDA, replay@SHARE, lwf@WEIGHT")
    a = ap.parse_args()
    out = Path(a.out)
    if a.part == "multitask":
        multitask(out, a.seeds)
    elif a.part == "continual":
        continual(out, a.strategies, a.seeds)
    else:
        report(out)


if __name__ == "__main__":
    main()
