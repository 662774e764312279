"""What a run folder says about its run, read from the files training writes (docs/training.md).

Status, from the folder alone (a run the UI started also has its process, which decides while it lives):
- finished: `summary.json` is there (written after the final model);
- running: `metrics.jsonl` or a checkpoint changed in the last ACTIVE_S seconds;
- interrupted: the newest checkpoint holds the last logged step (SIGTERM / Ctrl-C checkpoint there):
  `tunelab train RUN --resume` continues exactly;
- failed: it stopped after its newest checkpoint (a crash, a non-finite loss, a kill), or never logged.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import yaml

from tunelab.training import checkpoint

ACTIVE_S = 60.0
MAX_CHUNK = 1 << 20  # metrics bytes one poll returns at most
TAIL = 64 << 10
MAX_TEXT = 1 << 20  # config.yaml / summary.json shown at most


def read_text(path: Path, limit: int = MAX_TEXT) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return None


def _json(path: Path) -> dict[str, Any] | None:
    text = read_text(path)
    try:
        value = json.loads(text) if text is not None else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def config(run: Path) -> dict[str, Any]:
    text = read_text(run / "config.yaml")
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        return {}
    return value if isinstance(value, dict) else {}


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    """JSON cannot hold NaN or inf (a diverged run logs them): they travel as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def metrics_after(run: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """The complete rows of metrics.jsonl from byte `offset` on (at most MAX_CHUNK bytes), and the offset
    after them; a half-written last line waits for the next poll."""
    try:
        with open(run / "metrics.jsonl", "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if offset > size:  # the run was started over: read it again from the top
                offset = 0
            f.seek(offset)
            chunk = f.read(MAX_CHUNK)
    except OSError:
        return [], 0
    end = chunk.rfind(b"\n") + 1
    return _rows(chunk[:end].splitlines()), offset + end


def _tail_rows(run: Path) -> list[dict[str, Any]]:
    try:
        with open(run / "metrics.jsonl", "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - TAIL))
            chunk = f.read(TAIL)
    except OSError:
        return []
    return _rows(chunk.splitlines()[1 if size > TAIL else 0:])


def _rows(lines: list[bytes]) -> list[dict[str, Any]]:
    """The JSON objects among metrics.jsonl lines (a partial or bad line is skipped)."""
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(_finite(row))
    return rows


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def status(run: Path, rows: list[dict[str, Any]]) -> str:
    if (run / "summary.json").is_file():
        return "finished"
    touched = max(_mtime(run / "metrics.jsonl"), _mtime(run / "checkpoints"), _mtime(run / "config.yaml"))
    if time.time() - touched < ACTIVE_S:
        return "running"
    steps = checkpoint.step_dirs(run / "checkpoints")  # newest first, never links, temp or rejected ones
    last = max((int(r.get("step", 0)) for r in rows), default=0)
    return "interrupted" if steps and steps[0][0] >= last else "failed"


def summary(run: Path) -> dict[str, Any]:
    """One row of the runs page."""
    rows = _tail_rows(run)
    cfg = config(run)
    train = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    done = _json(run / "summary.json") or {}
    last_eval = {k: v for k, v in (evals[-1] if evals else done).items() if k.startswith("eval_")}
    method = cfg.get("method", {}).get("name") if isinstance(cfg.get("method"), dict) else None
    return {
        "status": status(run, rows),
        "step": int(rows[-1].get("step", 0)) if rows else int(done.get("steps", 0)),
        "max_steps": train.get("max_steps") or done.get("steps"),
        "loss": steps[-1]["loss"] if steps else done.get("loss"),
        "eval": {k: v for k, v in last_eval.items() if k in ("eval_loss", "eval_perplexity") or "exact" in k
                 or "accuracy" in k},
        "method": method,
        "updated": max(_mtime(run / "metrics.jsonl"), _mtime(run / "config.yaml")),
    }


def plots(folder: Path) -> list[Path]:
    """The PNG files a run or compare folder holds at its top and in plots/ (no links)."""
    found = []
    for sub in (folder, folder / "plots"):
        try:
            found += [Path(e.path) for e in sorted(os.scandir(sub), key=lambda e: e.name)
                      if e.name.endswith(".png") and e.is_file(follow_symlinks=False)]
        except OSError:
            continue
    return found
