"""`tinyworld:<task>[@<split>]` names -> jsonl files, generated into a cache on first use.

The cache is `$TUNELAB_CACHE/tinyworld/v<VERSION>/<seed>/` (default `~/.cache/tunelab`); it is
written to a temporary directory and renamed into place, so concurrent first uses are safe.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.world.tasks import SPLITS, VERSION, write_tasks

PREFIX = "tinyworld:"


def is_tinyworld(spec: str) -> bool:
    return spec.startswith(PREFIX)


def cache_root() -> Path:
    """tunelab's cache: `$TUNELAB_CACHE`, default `~/.cache/tunelab`."""
    return Path(os.environ.get("TUNELAB_CACHE") or Path.home() / ".cache" / "tunelab")


def cache_dir(seed: int = 0) -> Path:
    return cache_root() / "tinyworld" / f"v{VERSION}" / str(seed)


def resolve_task(spec: str, seed: int = 0) -> Path:
    """Path of the jsonl file named by `tinyworld:qa` (the task's first split: train for most)
    or `tinyworld:qa@test`, generating the suite for `seed` if it is not cached yet."""
    task, split = _parse(spec)
    directory = ensure_generated(seed)
    return directory / task / f"{split}.jsonl"


def ensure_generated(seed: int = 0) -> Path:
    target = cache_dir(seed)
    if (target / "manifest.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{seed}-", dir=target.parent))
    try:
        write_tasks(tmp, seed)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "manifest.json").is_file():  # not another process winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _parse(spec: str) -> tuple[str, str]:
    if not is_tinyworld(spec):
        raise TunelabError(f"not a TinyWorld task name: {spec!r}", fix="write tinyworld:<task>[@<split>]")
    task, _, split = spec[len(PREFIX):].partition("@")
    if task not in SPLITS:
        raise TunelabError(
            f"unknown TinyWorld task {task!r} in {spec!r}; known tasks: {', '.join(SPLITS)}",
            fix=f"use one of: {', '.join(PREFIX + t for t in SPLITS)}",
        )
    split = split or SPLITS[task][0]
    if split not in SPLITS[task]:
        raise TunelabError(
            f"unknown split {split!r} of TinyWorld task {task!r}; known splits: {', '.join(SPLITS[task])}",
            fix=f"write {PREFIX}{task}@<split> with one of those splits",
        )
    return task, split
