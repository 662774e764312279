"""Atomic checkpoints: temp dir -> fsync -> manifest (sha256 of each file) written last -> rename.

A checkpoint directory `step-N` exists only once complete; `latest()` additionally verifies the
manifest, so a checkpoint torn by a crash or a bad disk is never loaded. Nested state (optimizer,
scheduler, RNG) is stored as safetensors plus a JSON skeleton: nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tunelab.errors import TunelabError
from tunelab.faults import fault_point
from tunelab.owned import fsync

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tmp_dir(root: Path, step: int, pid: int) -> Path:
    """Where checkpoint `step` is written before it commits (`clean_stale` removes leftovers)."""
    return root / f".tmp-step-{step}-{pid}"


def fresh(folder: Path) -> None:
    """An empty `folder` (its parents made), whatever a crashed write left there."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()


def commit(root: Path, step: int, write: Callable[[Path], None], keep_last: int, tmp: Path | None = None) -> Path:
    """Write a checkpoint with `write(tmp_dir)` and publish it atomically as `root/step-N`. `tmp`: a temp
    folder other processes already wrote into (sharded state, in subfolders); the manifest covers them."""
    root.mkdir(parents=True, exist_ok=True)
    if tmp is None:
        tmp = tmp_dir(root, step, os.getpid())
        fresh(tmp)
    write(tmp)
    fault_point("save", step)
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    for f in files:
        fsync(f)
    for sub in {f.parent for f in files} - {tmp}:
        fsync(sub)
    manifest = {"step": step, "files": {f.relative_to(tmp).as_posix(): _sha256(f) for f in files}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    fsync(tmp / MANIFEST)
    final = root / f"step-{step}"
    if final.is_symlink():
        raise TunelabError(f"{final} is a link, not a checkpoint tunelab wrote: it will not replace it",
                           fix=f"move {final} away, then continue with --resume")
    if final.exists():  # a stale copy of this step (e.g. from before a resume): replace it
        try:
            shutil.rmtree(final)
        except OSError as e:
            raise TunelabError(f"{final}: cannot replace this stale checkpoint ({e.strerror})",
                               fix=f"move {final} away (or fix its permissions), then continue with --resume") from None
    os.rename(tmp, final)
    fsync(root)
    _prune(root, keep_last)
    return final


def verify(ckpt: Path) -> bool:
    return why_not_verified(ckpt) is None


def why_not_verified(ckpt: Path) -> str | None:
    """Why a checkpoint cannot be trusted (None when its manifest verifies every file)."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict) or not files:
            return f"{MANIFEST} lists no files"
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} unreadable ({type(e).__name__})"
    for name, digest in files.items():
        try:
            if _sha256(ckpt / name) != digest:
                return f"{name} does not match its sha256"
        except FileNotFoundError:
            return f"{name} is missing"
        except (OSError, TypeError) as e:
            return f"{name} unreadable ({getattr(e, 'strerror', None) or type(e).__name__})"
    return None


def resume_point(root: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies, and one message per newer one that did not: each is
    renamed aside (`step-N.rejected`: never loaded, pruned or replaced) so the run can reach its
    step again and the evidence stays."""
    notes = []
    for _, path in step_dirs(root):
        why = why_not_verified(path)
        if why is None:
            return path, notes
        aside = path.with_name(f"{path.name}.rejected")
        n = 1
        while aside.exists() or aside.is_symlink():
            n += 1
            aside = path.with_name(f"{path.name}.rejected-{n}")
        try:
            os.rename(path, aside)
            notes.append(f"{path.name} failed verification ({why}): kept aside as {aside.name}")
        except OSError as e:
            notes.append(f"{path.name} failed verification ({why}) and cannot be moved aside ({e.strerror})")
    return None, notes


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """The `step-N` folders, newest first; a link is never one of ours (never loaded, never deleted)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and p.is_dir() and not p.is_symlink()]
    return sorted(found, reverse=True)


def latest(root: Path) -> Path | None:
    """The newest checkpoint whose manifest verifies."""
    for _, path in step_dirs(root):
        if verify(path):
            return path
    return None


def _prune(root: Path, keep_last: int) -> None:
    for _, path in step_dirs(root)[keep_last:]:
        shutil.rmtree(path, ignore_errors=True)
    clean_stale(root)


def clean_stale(root: Path) -> None:
    """Remove the temp folders of checkpoints that never committed (a crash, a full disk): they are
    never loaded, and a run start or a commit clears them."""
    if root.is_dir():
        for stale in root.glob(".tmp-step-*"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)


# ----------------------------------------------------------------------------- nested state


def save_tree(obj: Any, path_stem: Path) -> None:
    """Store nested dicts/lists of tensors, arrays and JSON scalars as `stem.safetensors` + `stem.json`."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any) -> Any:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x.copy())
        if isinstance(x, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = x.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x):
                return {"__dict__": {k: enc(v) for k, v in x.items()}}
            return {"__items__": [[enc(k), enc(v)] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v) for v in x]}
        if isinstance(x, list):
            return [enc(v) for v in x]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot store {type(x).__name__} in a checkpoint")

    skeleton = enc(obj)
    save_file(tensors, str(path_stem) + ".safetensors")
    Path(str(path_stem) + ".json").write_text(json.dumps(skeleton), encoding="utf-8")


def load_tree(path_stem: Path) -> Any:
    tensors = load_file(str(path_stem) + ".safetensors")
    skeleton = json.loads(Path(str(path_stem) + ".json").read_text(encoding="utf-8"))

    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if isinstance(x, dict):
            if "__tensor__" in x:
                return tensors[x["__tensor__"]]
            if "__dict__" in x:
                return {k: dec(v) for k, v in x["__dict__"].items()}
            if "__items__" in x:
                return {dec(k): dec(v) for k, v in x["__items__"]}
            if "__tuple__" in x:
                return tuple(dec(v) for v in x["__tuple__"])
        return x

    return dec(skeleton)
