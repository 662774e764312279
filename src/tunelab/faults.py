"""The crash-test hook: `TUNELAB_FAULT=<kill|term>@<point>:<n>` sends SIGKILL / SIGTERM to this
process when it reaches `<point>` with `<n>` (`step:N` after an optimizer step, `save:N` mid-checkpoint,
`write-<file>:0` between writing a file's new content and putting it in place). Tests use it to prove
that a process killed anywhere leaves something resumable. With `TUNELAB_FAULT_RANK=<r>` only the
process of that global rank (torchrun's `RANK`) is hit: one process of a multi-process run dying."""

from __future__ import annotations

import os
import signal


def fault_point(point: str, n: int) -> None:
    spec = os.environ.get("TUNELAB_FAULT")
    rank = os.environ.get("TUNELAB_FAULT_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    if spec and spec.partition("@")[2] == f"{point}:{n}":
        os.kill(os.getpid(), signal.SIGKILL if spec.startswith("kill") else signal.SIGTERM)
