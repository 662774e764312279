"""Data at scale: the first pass over a large alpaca file, and the second run that starts from its cache.

    python bench/scale.py [--rows 1000000] [--num-proc N] [--reference-rows 100000] [--out runs/bench-scale]
                          [--json docs/results/scale.json]

Writes `--rows` synthetic alpaca records (seeded, bench/data_cache.py's generator, ~140 tokens a record
with the embedded base's tokenizer), then measures, each in a fresh process with its own empty cache:
(a) the fast tokenizer alone, batched, over the same texts the pass tokenizes (every record rendered
    through the chat template first, untimed): the bound for any pass, tokens/s;
(b) tunelab's first pass (`load_tokenized`, cold cache) with `data.num_proc` = N (default: the automatic
    choice) and with 1: tokens/s, its ratio to (a), peak RSS of the process and of the whole process tree
    (workers included; sampled every 0.1 s);
(c) the second run: `tunelab train` of 1 step on that cache, seconds from the command's start to the first
    optimizer step (the first line of metrics.jsonl), and its peak RSS;
(d) the pipeline before issue #15 on the first `--reference-rows` records: the record-by-record pass into
    Python lists (`pipeline.build_per_record` + fingerprint, what `load_tokenized` ran), and a second run
    whose loop reads the examples as Python lists (what a cache hit gave).
Goals (issue #15): (b) >= 0.5 x (a) in the same run, peak RSS <= 2 GB, (c) <= 10 s. Prints a table,
writes JSON (`--json`); docs/results/scale.md holds the command and the table.
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
MAX_LENGTH = 512

BASELINE = """
import json, sys, time
from tunelab.data.formats.instruction import instruction_messages
from tunelab.data.sources import read_records
from tunelab.data.templates import resolve_template
from tunelab.modeling.load import ModelConfig, load_tokenizer
tok = load_tokenizer(ModelConfig())
template = resolve_template(None, tok)
chunk, seconds, cpu, tokens = [], 0.0, 0.0, 0
def tokenize(chats):
    global seconds, cpu, tokens
    texts = tok.apply_chat_template(chats, tokenize=False, chat_template=template.source)  # untimed
    t0, c0 = time.perf_counter(), time.process_time()
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    seconds += time.perf_counter() - t0
    cpu += time.process_time() - c0
    tokens += sum(map(len, ids))
for _, record in read_records(sys.argv[1]):
    chunk.append(instruction_messages(record))
    if len(chunk) == 10000:
        tokenize(chunk)
        chunk = []
if chunk:
    tokenize(chunk)
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "tokens": tokens}))
"""

FIRST_PASS = """
import json, os, resource, sys, time
from tunelab.config import DataConfig
from tunelab.data.pipeline import load_tokenized
from tunelab.modeling.load import ModelConfig, load_tokenizer
tok = load_tokenizer(ModelConfig())
num_proc = None if sys.argv[2] == "auto" else int(sys.argv[2])
cfg = DataConfig(train=sys.argv[1], max_length=int(sys.argv[3]), num_proc=num_proc)
t0, c0 = time.perf_counter(), sum(os.times()[:4])
data = load_tokenized(cfg, "train", tok, mask_prompt=True, formats=("instruction", "chat", "text"), log=lambda _: None)
seconds, cpu = time.perf_counter() - t0, sum(os.times()[:4]) - c0  # this process and its (joined) workers
from tunelab.data.firstpass import num_procs
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "tokens": data.stats["n_tokens"],
                  "examples": len(data.examples), "num_proc": num_procs(cfg, sys.argv[1], tok),
                  "self_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""

REFERENCE = """
import json, resource, sys, time
from tunelab.config import DataConfig
from tunelab.data.pipeline import build_per_record, fingerprint
from tunelab.modeling.load import ModelConfig, load_tokenizer
tok = load_tokenizer(ModelConfig())
cfg = DataConfig(train=sys.argv[1], max_length=int(sys.argv[3]))
t0, c0 = time.perf_counter(), time.process_time()
out = build_per_record(sys.argv[1], cfg, tok, True, ("instruction", "chat", "text"), lambda _: None)
digest = fingerprint(out.kept)
seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "tokens": out.n_tokens, "examples": len(out.kept),
                  "self_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

LISTS_TRAIN = """
import sys
import tunelab
from tunelab.data.types import TokenizedData
from tunelab.recipes import run
real = run.load_tokenized
run.load_tokenized = lambda *a, **k: (lambda d: TokenizedData(list(d.examples), d.fingerprint, d.stats))(real(*a, **k))
tunelab.train(sys.argv[1], quiet=True)
"""


class Watch:
    """A child process run to its end: wall seconds, the peak RSS of its main process and of its whole
    tree (sampled), and (optionally) when a file first holds a line."""

    def __init__(self, cmd: list[str], env: dict[str, str], first_line: Path | None = None):
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.peak_main = self.peak_tree = 0
        self.stopped_s = 0.0  # seconds some process of the tree was seen stopped (SIGSTOP from outside)
        self.first_line_s: float | None = None
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                self.peak_main = max(self.peak_main, root.memory_info().rss)
                self.peak_tree = max(self.peak_tree, sum(_rss(p) for p in tree))
                if any(_status(p) == psutil.STATUS_STOPPED for p in tree):
                    self.stopped_s += 0.1
            except psutil.Error:
                pass
            if first_line is not None and self.first_line_s is None and _has_line(first_line):
                self.first_line_s = time.perf_counter() - t0
            time.sleep(0.1)
        out, err = proc.communicate()
        self.seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}")
        self.stdout = out

    def result(self) -> dict:
        if self.stopped_s:
            print(f"warning: a process was stopped from outside for ~{self.stopped_s:.0f} s: its seconds are not "
                  "its own", file=sys.stderr)
        return {**json.loads(self.stdout.strip().splitlines()[-1]), "stopped_s": round(self.stopped_s, 1)}


def _rss(p: psutil.Process) -> int:
    try:
        return p.memory_info().rss
    except psutil.Error:
        return 0


def _status(p: psutil.Process) -> str:
    try:
        return p.status()
    except psutil.Error:
        return ""


def _has_line(path: Path) -> bool:
    try:
        return "\n" in path.read_text(encoding="utf-8")
    except OSError:
        return False


def mb(n: int) -> int:
    return round(n / 2**20)


def train_config(path: Path, data: Path, out: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "data": {"train": str(data), "max_length": MAX_LENGTH},
        "method": {"name": "lora", "r": 8},
        "objective": {"name": "sft"},
        "train": {"max_steps": 1, "batch_size": 8, "tensorboard": False, "log_every": 1},
        "output": {"dir": str(out)},
    }), encoding="utf-8")
    return path


def second_run(cmd: list[str], cfg: Path, run_dir: Path, env: dict[str, str]) -> dict:
    cache = Path(env["TUNELAB_DATA_CACHE"])
    before = sorted(p.name for p in cache.iterdir())
    w = Watch([*cmd, str(cfg)], env, first_line=run_dir / "metrics.jsonl")
    assert sorted(p.name for p in cache.iterdir()) == before, "the second run tokenized again (cache miss)"
    return {"to_first_step_s": round(w.first_line_s or w.seconds, 2), "command_s": round(w.seconds, 2),
            "peak_rss_mb": mb(w.peak_tree), "stopped_s": round(w.stopped_s, 1)}


def first_pass(code: str, data: Path, num_proc: str, env: dict[str, str]) -> dict:
    w = Watch([sys.executable, "-c", code, str(data), num_proc, str(MAX_LENGTH)], env)
    r = w.result()
    # the process's own high-water mark (exact), and the sum over it and its workers (sampled)
    return {**r, "seconds": round(r["seconds"], 2), "tokens_per_s": round(r["tokens"] / r["seconds"]),
            "tokens_per_cpu_s": round(r["tokens"] / r["cpu_seconds"]),
            "peak_rss_mb": round(max(r["self_peak_rss_mb"], mb(w.peak_main))), "peak_tree_rss_mb": mb(w.peak_tree)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--num-proc", default="auto", help="data.num_proc of the first pass (auto: tunelab's choice)")
    ap.add_argument("--reference-rows", type=int, default=100_000,
                    help="rows for the record-by-record pipeline (it holds every token as Python ints)")
    ap.add_argument("--out", default="runs/bench-scale")
    ap.add_argument("--json", default="docs/results/scale.json")
    args = ap.parse_args()
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"alpaca-{args.rows}.jsonl"
    if not data.is_file():
        write_alpaca(data, args.rows)
    ref_rows = min(args.rows, args.reference_rows)
    ref_data = out / f"alpaca-{args.rows}-head-{ref_rows}.jsonl"
    if not ref_data.is_file():
        with data.open("rb") as src:
            ref_data.write_bytes(b"".join(line for _, line in zip(range(ref_rows), src, strict=False)))
    py = sys.executable
    res: dict = {}
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        t = Path(tmp)
        env = {**os.environ, "TUNELAB_DATA_CACHE": str(t / "cache-one")}
        base = res["tokenizer_alone"] = Watch([py, "-c", BASELINE, str(data)], env).result()
        base["tokens_per_s"] = round(base["tokens"] / base["seconds"])
        base["tokens_per_cpu_s"] = round(base["tokens"] / base["cpu_seconds"])
        res["first_pass_1proc"] = first_pass(FIRST_PASS, data, "1", env)
        env = {**os.environ, "TUNELAB_DATA_CACHE": str(t / "cache")}
        res["first_pass"] = first_pass(FIRST_PASS, data, args.num_proc, env)
        cfg = train_config(t / "train.yaml", data, t / "run")
        res["second_run"] = second_run([py, "-m", "tunelab", "train", "-q"], cfg, t / "run", env)
        env = {**os.environ, "TUNELAB_DATA_CACHE": str(t / "cache-ref")}
        res["reference_first_pass"] = first_pass(REFERENCE, ref_data, "1", env)
        first_pass(FIRST_PASS, ref_data, "1", env)  # fills the cache the reference second run reads
        cfg = train_config(t / "train-ref.yaml", ref_data, t / "run-ref")
        res["reference_second_run"] = second_run([py, "-c", LISTS_TRAIN], cfg, t / "run-ref", env)
    report(args, data, ref_rows, res)


def report(args: argparse.Namespace, data: Path, ref_rows: int, res: dict) -> None:
    base = res["tokenizer_alone"]["tokens_per_s"]
    base_cpu = res["tokenizer_alone"]["tokens_per_cpu_s"]
    for key in ("first_pass", "first_pass_1proc", "reference_first_pass"):
        res[key]["ratio_to_tokenizer"] = round(res[key]["tokens_per_s"] / base, 3)
        res[key]["cpu_ratio_to_tokenizer"] = round(res[key]["tokens_per_cpu_s"] / base_cpu, 3)
    fp, one, ref = res["first_pass"], res["first_pass_1proc"], res["reference_first_pass"]
    sr, rsr = res["second_run"], res["reference_second_run"]
    goals = {"first pass >= 0.5 x tokenizer": fp["ratio_to_tokenizer"] >= 0.5,
             "first pass peak RSS <= 2 GB": max(fp["peak_tree_rss_mb"], fp["peak_rss_mb"]) <= 2048,
             "second run to first step <= 10 s": sr["to_first_step_s"] <= 10}
    at = f", {ref_rows:,} rows"

    def speed(r: dict) -> str:
        return f"{r['tokens_per_s']:,} ({r['ratio_to_tokenizer']:.2f}x)"

    def cpu(r: dict) -> str:
        return f"{r['tokens_per_cpu_s']:,} ({r['cpu_ratio_to_tokenizer']:.2f}x)"

    rows = [
        ("(a) fast tokenizer alone, batched: tokens/s", f"{base:,}", ""),
        (f"(b) first pass: tokens/s (x tokenizer), num_proc={fp['num_proc']}", speed(fp), speed(ref)[:-1] + at + ")"),
        ("(b) first pass: tokens/s (x tokenizer), num_proc=1", speed(one), ""),
        ("(a) fast tokenizer alone: tokens per CPU-second", f"{base_cpu:,}", ""),
        (f"(b) first pass: tokens per CPU-second (x tokenizer's), num_proc={fp['num_proc']} / 1",
         f"{cpu(fp)} / {cpu(one)}", cpu(ref)[:-1] + at + ")"),
        (f"(b) first pass: seconds, num_proc={fp['num_proc']} (num_proc=1)", f"{fp['seconds']} ({one['seconds']})",
         f"{ref['seconds']} ({ref_rows:,} rows)"),
        ("(b) first pass: peak RSS MB, main process / with workers (num_proc=1)",
         f"{fp['peak_rss_mb']:,} / {fp['peak_tree_rss_mb']:,} ({one['peak_rss_mb']:,})",
         f"{ref['peak_rss_mb']:,} ({ref_rows:,} rows)"),
        ("(c) second run: seconds to the first optimizer step (whole command)",
         f"{sr['to_first_step_s']} ({sr['command_s']})", f"{rsr['to_first_step_s']} ({rsr['command_s']}{at})"),
        ("(c) second run: peak RSS MB", f"{sr['peak_rss_mb']:,}", f"{rsr['peak_rss_mb']:,} ({ref_rows:,} rows)"),
    ]
    print(f"\n{args.rows:,} alpaca records ({data.stat().st_size / 1e6:.0f} MB), {fp['tokens']:,} tokens\n")
    print("| measure | tunelab now | before (record by record, Python lists) |")
    print("|---|---:|---:|")
    for name, now, before in rows:
        print(f"| {name} | {now} | {before} |")
    print()
    for goal, met in goals.items():
        print(f"- {goal}: {'met' if met else 'NOT met'}")
    stopped = {k: r["stopped_s"] for k, r in res.items() if r.get("stopped_s")}
    if stopped:
        print(f"- WARNING: processes were stopped from outside during {stopped} (seconds): those times are not theirs")
    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
               "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "load_average_after": os.getloadavg()}
    result = {"rows": args.rows, "reference_rows": ref_rows, "file_mb": round(data.stat().st_size / 1e6, 1),
              "max_length": MAX_LENGTH, "num_proc": args.num_proc, "results": res, "goals": goals, "machine": machine}
    (ROOT / args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
