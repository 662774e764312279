"""`tunelab compare SPEC.yaml`: variants x tasks x seeds, each cell trained and scored in a process
of its own, aggregated into a report with confidence intervals, paired tests and plots.

Cells live in a database (compare/store.py): a killed compare resumes without rerunning finished
cells, `workers` cells run at once, and several machines share one compare through `--db URL`.
The spec format is in compare/spec.py; docs/compare.md shows it in use.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab import owned
from tunelab.config import SHIPPED_CONFIGS
from tunelab.data.sources import resolve_source
from tunelab.errors import ConfigError, TunelabError
from tunelab.recipes.compare.report import aggregate, write_outputs
from tunelab.recipes.compare.spec import Cell, CompareSpec, TaskSpec, cells, load_spec, nest, spec_digest
from tunelab.recipes.compare.store import DONE, FAILED, INVALID, PENDING, RUNNING, Store

__all__ = ["compare", "SUITES"]

ENTRIES = ["cells", "data", "plots", "compare.db", "compare.json", "report.md", "results.csv", "results.json"]
SUITES = {"tinyworld": SHIPPED_CONFIGS / "compare-tinyworld.yaml"}
HEARTBEAT_S = 10.0


def compare(spec_path: str | Path, *, out: str | Path | None = None, workers: int = 1, db: str | None = None,
            report_only: bool = False, retry_failed: bool = False, force: bool = False,
            variants: list[str] | None = None, tasks: list[str] | None = None,
            say: Callable[[str], Any] = print) -> dict[str, Any]:
    """Run (or resume) the compare of `spec_path` into `out` and write its report; returns the
    aggregate. `db`: an SQLAlchemy URL (default `sqlite:///<out>/compare.db`). `variants` /
    `tasks`: only these of the spec (a part of a large suite; the same --out collects the rest later)."""
    if str(spec_path) in SUITES:
        spec_path = SUITES[str(spec_path)]
    spec, root = load_spec(spec_path)
    digest = spec_digest(spec)  # of the whole spec: parts run with --variants/--tasks share one compare
    spec = _only(spec, variants, tasks)
    out = Path(out or Path("runs") / f"compare-{Path(spec_path).stem}")
    _claim_out(out, digest, force)
    store = Store(db or f"sqlite:///{(out / 'compare.db').resolve()}", digest)
    grid = cells(spec, root, lambda task: _subset(task, spec, root, out))
    for cell in grid:
        store.add(cell.key, INVALID if cell.error else PENDING, cell.error)
    if retry_failed:
        store.retry_failed()
    by_key = {c.key: c for c in grid}
    if not report_only:
        _run(store, by_key, out, max(1, workers), say)
    return _report(store, spec, by_key, out, Path(spec_path), say)


def _only(spec: CompareSpec, variants: list[str] | None, tasks: list[str] | None) -> CompareSpec:
    for kind, wanted, known in (("variant", variants, [v.name for v in spec.variants]),
                                ("task", tasks, [t.name for t in spec.tasks])):
        unknown = [w for w in wanted or [] if w not in known]
        if unknown:
            raise ConfigError(f"unknown {kind}(s) {', '.join(unknown)}; the spec has: {', '.join(known)}")
    keep_t = [t for t in spec.tasks if tasks is None or t.name in tasks]
    dropped = {t.name for t in spec.tasks} - {t.name for t in keep_t}
    keep_v = [v if v.tasks is None else v.model_copy(update={"tasks": [t for t in v.tasks if t not in dropped]})
              for v in spec.variants if variants is None or v.name in variants]
    return spec.model_copy(update={"variants": keep_v, "tasks": keep_t})


def _claim_out(out: Path, digest: str, force: bool) -> None:
    marker = out / "compare.json"
    if owned.state(out, "compare") == "owned":
        found = json.loads(marker.read_text(encoding="utf-8")).get("spec") if marker.is_file() else None
        if found not in (None, digest):
            raise TunelabError(f"--out {out} holds a compare of another spec (the spec changed since)",
                               fix="choose a new --out, or restore the spec to resume that compare")
    else:
        owned.claim(out, "compare", ENTRIES, what="--out", replace=False, force=force)
    owned.write_atomic(marker, json.dumps({"spec": digest}))


def _subset(task: TaskSpec, spec: CompareSpec, root: Path, out: Path) -> dict[str, Any]:
    """`train_examples: N`: the first N records of data.train after a fixed shuffle, as a file."""
    if task.train_examples is None:
        return {}
    train = nest(task.overrides).get("data", {}).get("train")
    if train is None:
        raise ConfigError(f"task {task.name}: train_examples needs the task's overrides to set data.train")
    source = Path(resolve_source(str(train) if str(train).startswith("tinyworld:") else str(root / train)))
    if source.suffix != ".jsonl":
        raise ConfigError(f"task {task.name}: train_examples reads .jsonl files; {source} is not one")
    lines = [x for x in source.read_text(encoding="utf-8").splitlines() if x.strip()]
    if task.train_examples > len(lines):
        raise ConfigError(f"task {task.name}: train_examples {task.train_examples} > the {len(lines)} records of "
                          f"{source}")
    random.Random(0).shuffle(lines)
    file = out / "data" / f"{task.name}-{task.train_examples}.jsonl"
    file.parent.mkdir(parents=True, exist_ok=True)
    owned.write_atomic(file, "\n".join(lines[: task.train_examples]) + "\n")
    return {"data": {"train": str(file.resolve())}}


def _run(store: Store, by_key: dict[str, Cell], out: Path, workers: int, say: Callable[[str], Any]) -> None:
    back = store.reclaim()
    if back:
        say(f"compare: {len(back)} cell(s) of a stopped worker go back to the queue: {', '.join(back)}")
    stop = threading.Event()
    progress = _Progress(store, workers, say)
    env = cell_env(workers)
    threads = [threading.Thread(target=_worker, args=(store, by_key, out, stop, progress, env), daemon=True)
               for _ in range(workers)]
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def on_signal(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        say("compare: stopping - running cells are stopped and go back to the queue; run the same command to "
            "resume (a second signal stops at once)")
        stop.set()

    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        for s in previous:
            signal.signal(s, on_signal)
    try:
        progress.start()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(timeout=0.5)
    finally:
        if in_main:
            for s, handler in previous.items():
                signal.signal(s, handler)
    if stop.is_set():
        raise TunelabError("the compare was stopped; finished cells are kept",
                           fix="run the same command again to resume it")


class _Progress:
    """One line per finished cell: counts, the cell's score and time, an ETA."""

    def __init__(self, store: Store, workers: int, say: Callable[[str], Any]):
        self.store, self.workers, self.say = store, workers, say
        self.walls: list[float] = []
        self.lock = threading.Lock()

    def start(self) -> None:
        rows = self.store.rows()
        todo = sum(r["status"] in (PENDING, RUNNING) for r in rows.values())
        self.say(f"compare: {len(rows)} cells, {todo} to run, {self.workers} worker(s)")

    def done(self, key: str, result: dict[str, Any]) -> None:
        with self.lock:
            self.walls.append(result.get("wall_seconds") or 0.0)
            rows = self.store.rows().values()
            n = {s: sum(r["status"] == s for r in rows) for s in (DONE, RUNNING, PENDING, FAILED, INVALID)}
            left = n[PENDING] + n[RUNNING]
            eta = sum(self.walls) / len(self.walls) * left / self.workers
            what = (f"{result['metric']} {result['score']:.4g}" if result.get("status") == "done"
                    else f"FAILED: {result.get('error')}")
            self.say(f"[{n[DONE]} done, {n[RUNNING]} running, {n[PENDING]} pending, {n[FAILED]} failed] {key}: "
                     f"{what} ({result.get('wall_seconds', 0):.0f} s); eta {_clock(eta)}")


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def cell_env(workers: int, environ: dict[str, str] | None = None, cores: int | None = None) -> dict[str, str]:
    """The environment of a cell's process: the machine's cores shared among the workers (each cell's torch
    gets cores // workers threads, at least 1), unless the user set OMP_NUM_THREADS. Two cells of two
    threads each on two cores spin against each other (bench/nonparametric.py's full fine-tuning cell:
    435 s so, ~48 s with one thread per cell)."""
    env = dict(os.environ if environ is None else environ)
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (cores or os.cpu_count() or 1) // max(1, workers)))
    return env


def _worker(store: Store, by_key: dict[str, Cell], out: Path, stop: threading.Event, progress: _Progress,
            env: dict[str, str]) -> None:
    order = list(by_key)
    while not stop.is_set():
        key = store.claim(order)
        if key is None:
            return
        result = _run_cell(store, by_key[key], out, stop, env)
        if stop.is_set() and result.get("status") != "done":
            store.finish(key, PENDING, None)  # stopped by the user, not failed: it reruns on resume
            return
        store.finish(key, DONE if result.get("status") == "done" else FAILED, result, result.get("error"))
        progress.done(key, result)


def _run_cell(store: Store, cell: Cell, out: Path, stop: threading.Event, env: dict[str, str]) -> dict[str, Any]:
    folder = out / "cells" / cell.key
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads(json.dumps(cell.config))
    config["output"] = {**config.get("output", {}), "dir": str((folder / "run").resolve())}
    job, result_file = folder / "job.json", folder / "result.json"
    owned.write_atomic(job, json.dumps({"config": config, "task": cell.scoring, "train": cell.train}))
    result_file.unlink(missing_ok=True)
    with open(folder / "log.txt", "w", encoding="utf-8") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tunelab.recipes.compare.cell", str(job), str(result_file)],
                                stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent, env=env)
        while proc.poll() is None:
            if stop.wait(HEARTBEAT_S):
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                proc.wait()
                break
            store.beat(cell.key)
    if result_file.is_file():
        return json.loads(result_file.read_text(encoding="utf-8"))
    how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
    hint = " (SIGKILL: the OS may have run out of memory)" if proc.returncode == -signal.SIGKILL else ""
    return {"status": "failed", "error": f"the cell's process died ({how}){hint}; its log: {folder / 'log.txt'}"}


def _die_with_parent() -> None:
    """In the child: die with the compare (Linux), so a killed compare leaves no orphan cell."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _report(store: Store, spec: CompareSpec, by_key: dict[str, Cell], out: Path, spec_path: Path,
            say: Callable[[str], Any]) -> dict[str, Any]:
    rows = store.rows()
    table = []
    for key, cell in by_key.items():
        r = rows.get(key, {})
        result = json.loads(r["result"]) if r.get("result") else {}
        table.append({"variant": cell.variant, "task": cell.task, "seed": cell.seed, "status": r.get("status"),
                      **result, "error": r.get("error") or result.get("error")})
    base = next((v.name for v in spec.variants if not v.train), None)
    agg = aggregate(table, base)
    counts = {s: sum(c["status"] == s for c in table) for s in (DONE, FAILED, INVALID, PENDING, RUNNING)}
    header = {"spec": _shown(spec_path), "seeds": spec.seeds, "budget": spec.budget,
              "counts": ", ".join(f"{n} {s}" for s, n in counts.items() if n)}
    write_outputs(out, table, agg, header)
    say(f"compare: report in {out / 'report.md'} ({header['counts']})")
    return agg


def _shown(spec_path: Path) -> str:
    """The spec's path as a report names it: a shipped spec as `configs/<name>`, one under the working
    folder relative to it (a report holds no machine path it need not)."""
    path = spec_path.resolve()
    for root, prefix in ((SHIPPED_CONFIGS.resolve(), "configs/"), (Path.cwd().resolve(), "")):
        if path.is_relative_to(root):
            return prefix + str(path.relative_to(root))
    return str(spec_path)
