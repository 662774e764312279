"""Question by question against the base: which held-out answers each methods-bench run fixes / breaks.

    python bench/methods_sign.py [--runs runs/bench-methods] [METHOD ...]

Loads each run's final model (`tunelab.load`), greedy replies to every `tinyworld:qa@test` question,
counts questions right now and wrong for the base (fixed) and the reverse (broken), and a two-sided
sign test on those counts. Writes docs/results/methods-sign.json and prints a line per method.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tunelab.artifacts import load
from tunelab.data.qa import exact_match, prompt_and_gold
from tunelab.inference.generation import greedy
from tunelab.recipes.compare.stats import sign_test
from tunelab.world.resolve import resolve_task

TASK = "tinyworld:qa@test"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("methods", nargs="*", help="default: every run under --runs scored on qa@test")
    ap.add_argument("--runs", default="runs/bench-methods")
    ap.add_argument("--out", default="docs/results/methods-sign.json")
    args = ap.parse_args()
    records = [json.loads(line) for line in resolve_task(TASK).read_text(encoding="utf-8").splitlines()]
    pairs = [prompt_and_gold(r)[:2] for r in records]

    def right(path: str) -> list[bool]:
        model, tok = load(path)
        replies = greedy(model, tok, [p for p, _ in pairs], max_new_tokens=16, chat=True)
        return [exact_match(reply, gold) for reply, (_, gold) in zip(replies, pairs, strict=True)]

    runs = Path(args.runs)
    methods = args.methods or sorted(p.name for p in runs.iterdir() if (p / "final").is_dir()
                                     and "qa" in (p / "config.yaml").read_text(encoding="utf-8"))
    base = right("tunelab-tiny")
    out = {"task": TASK, "base": sum(base) / len(base), "methods": {}}
    print(f"base {out['base']:.3f}")
    for m in methods:
        mine = right(str(runs / m / "final"))
        fixed = sum(x and not b for x, b in zip(mine, base, strict=True))
        broken = sum(b and not x for x, b in zip(mine, base, strict=True))
        row = {"score": sum(mine) / len(mine), "fixed": fixed, "broken": broken, "p": sign_test(fixed, fixed + broken)}
        out["methods"][m] = row
        print(f"{m:20s} {row['score']:.3f}  fixed {fixed:3d}  broken {broken:3d}  p {row['p']:.3g}", flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
