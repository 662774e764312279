"""What a run tells its user: a progress bar (loss, lr, tokens/s, ETA), messages, metrics.jsonl."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Bar:
    """The progress of a run: a live bar on a terminal; otherwise (a file, a pipe, a CI log) one
    line every `every` steps with the step total, elapsed time and ETA, never wrapped."""

    def __init__(self, progress: Progress | None, task: Any, console: Console, every: int, total: int = 0,
                 done: int = 0):
        self.progress, self.task, self.console, self.every = progress, task, console, every
        self.total, self.first, self.t0 = total, done, time.perf_counter()

    def update(self, step: int, m: dict[str, float]) -> None:
        text = f"loss {m['loss']:.4f} lr {m['lr']:.2e} {m['tokens_per_s']:,.0f} tok/s (non-padding tokens)"
        if self.progress is not None:
            self.progress.update(self.task, completed=step, stats=text)
        elif step % self.every == 0 or step == self.total:
            extra = "".join(f" {k} {_num(v)}" for k, v in m.items()
                            if k.startswith("eval_") and not k.startswith("eval_tokens"))  # counts: metrics.jsonl
            self.console.print(f"step {step}/{self.total}: {text}{extra} {self._times(step)}", highlight=False,
                               soft_wrap=True)

    def _times(self, step: int) -> str:
        elapsed = time.perf_counter() - self.t0
        done = step - self.first
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        return f"elapsed {_clock(elapsed)} eta {_clock(eta)}"


def _num(v: float) -> str:
    """A metric on the console: 4 decimals, or as an integer when it is one (counts)."""
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.4f}"


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Reporter:
    """Writes metrics.jsonl and talks to the user (stderr); quiet=True only writes."""

    def __init__(self, run_dir: Path | None, quiet: bool = False, log_every: int = 1):
        self.path = run_dir / "metrics.jsonl" if run_dir else None
        self.console = Console(stderr=True, quiet=quiet)
        self.quiet = quiet
        self.log_every = log_every

    def say(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True)  # a log line stays one line in a file

    def metrics(self, m: dict[str, Any]) -> None:
        if self.path is None:
            return
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in m.items()}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")

    @contextmanager
    def progress(self, total: int, done: int) -> Iterator[Bar]:
        if self.quiet or not sys.stderr.isatty():
            yield Bar(None, None, self.console, max(self.log_every, total // 20 or 1), total, done)
            return
        columns = (
            TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        )
        with Progress(*columns, console=self.console, transient=False) as p:
            task = p.add_task("train", total=total, completed=done, stats="")
            yield Bar(p, task, self.console, self.log_every)
