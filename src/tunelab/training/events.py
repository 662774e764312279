"""The loop's event hook: how a recipe, a compare driver or a UI watches a run without reading its
files. The loop calls `on_event(Event)` at the start, after every step, after every evaluation and
checkpoint, and at the end; a hook that raises stops the run (as any error would)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Kind = Literal["start", "step", "eval", "checkpoint", "end"]


@dataclass(frozen=True)
class Event:
    kind: Kind
    step: int  # optimizer steps applied so far
    total_steps: int
    run_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)  # step: the logged metrics; eval: eval_*; end: final
    status: str | None = None  # end: "completed" | "interrupted"
    checkpoint: Path | None = None  # checkpoint: the committed folder


EventHook = Callable[[Event], None]
