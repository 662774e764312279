"""The tokenized-data cache: the first and the second `tunelab data check` / `load_tokenized` on one file.

    python bench/data_cache.py [--rows 100000] [--out runs/bench-data] [--json docs/results/data-cache.json]

Writes an alpaca file of `--rows` synthetic records (seeded; instruction / input / output of
varied lengths, ~115 tokens a record with the embedded base's tokenizer), then, each in a fresh
process with its own empty cache folder (`TUNELAB_DATA_CACHE`): `tunelab data check` twice (cold,
then warm), and `load_tokenized` twice for its seconds and peak RSS. The baseline in the same run:
the same records through the tokenizer alone, batched (`tokenizer(texts)` on the rendered prompts
and replies), the bound for any tokenization pass. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the a river stone cloud lamp chair road seed boat bell door kite red blue green amber violet city "
         "market teacher garden winter summer quickly slowly bright quiet old new small large").split()


def write_alpaca(path: Path, rows: int) -> None:
    rng = random.Random(0)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    with path.open("w", encoding="utf-8") as f:
        for _ in range(rows):
            f.write(json.dumps({"instruction": text(5, 20), "input": text(0, 15) if rng.random() < 0.4 else "",
                                "output": text(10, 80)}) + "\n")


CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from tunelab.config import DataConfig
from tunelab.data.pipeline import load_tokenized
from tunelab.modeling.load import ModelConfig, load_tokenizer
tok = load_tokenizer(ModelConfig())
t1 = time.perf_counter()
data = load_tokenized(DataConfig(train=sys.argv[1], max_length=512), "train", tok, mask_prompt=True,
                      log=lambda _: None)
t2 = time.perf_counter()
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": t2 - t1, "startup": t1 - t0, "examples": len(data.examples),
                  "tokens": data.stats["n_tokens"], "peak_rss_mb": rss}))
"""

BASELINE = """
import json, sys, time
from tunelab.modeling.load import ModelConfig, load_tokenizer
tok = load_tokenizer(ModelConfig())
rows = [json.loads(x) for x in open(sys.argv[1], encoding="utf-8")]
t0 = time.perf_counter()
prompts = [r["instruction"] + ("\\n\\n" + r["input"] if r["input"] else "") for r in rows]
n = sum(len(x) for x in tok(prompts)["input_ids"]) + sum(len(x) for x in tok([r["output"] for r in rows])["input_ids"])
print(json.dumps({"seconds": time.perf_counter() - t0, "tokens": n}))
"""


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode not in (0,):
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return time.perf_counter() - t0, done.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--out", default="runs/bench-data")
    ap.add_argument("--json", default="docs/results/data-cache.json")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"alpaca-{args.rows}.jsonl"
    if not data.is_file():
        write_alpaca(data, args.rows)
    cfg = out / "check.yaml"
    cfg.write_text(f"data: {{train: {data.resolve()}, max_length: 512}}\n", encoding="utf-8")
    py = sys.executable
    rows = {}
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        env = {**os.environ, "TUNELAB_DATA_CACHE": a}
        for run in ("cold", "warm"):
            wall, _ = timed([py, "-m", "tunelab", "data", "check", str(cfg)], env)
            rows[f"tunelab data check ({run})"] = {"wall_seconds": round(wall, 2)}
        env = {**os.environ, "TUNELAB_DATA_CACHE": b}
        for run in ("cold", "warm"):
            wall, stdout = timed([py, "-c", CHILD, str(data)], env)
            got = json.loads(stdout.strip().splitlines()[-1])
            rows[f"load_tokenized ({run})"] = {"wall_seconds": round(wall, 2), "seconds": round(got["seconds"], 2),
                                               "peak_rss_mb": round(got["peak_rss_mb"]), "tokens": got["tokens"]}
        wall, stdout = timed([py, "-c", BASELINE, str(data)], env)
        got = json.loads(stdout.strip().splitlines()[-1])
        rows["the tokenizer alone, batched (baseline)"] = {"wall_seconds": round(wall, 2),
                                                            "seconds": round(got["seconds"], 2),
                                                            "tokens": got["tokens"]}
    print(f"\n{args.rows:,} alpaca records ({data.stat().st_size / 1e6:.1f} MB)\n")
    print("| what | wall s (process) | s (the pass) | peak RSS MB | tokens |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['wall_seconds']} | {r.get('seconds', '')} | {r.get('peak_rss_mb', '')} | "
              f"{r.get('tokens', '')} |")
    result = {"rows": args.rows, "file_mb": round(data.stat().st_size / 1e6, 1), "results": rows,
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "load_average": os.getloadavg()},
              "bench_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    (ROOT / args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
