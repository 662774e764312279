"""Folders tunelab owns, and the only way it deletes or replaces anything in them.

tunelab deletes only what it can prove it wrote. A folder it writes as a whole (a run, an export,
a built base model) carries `.tunelab-owned.json`: the kind of folder and the top-level entries
tunelab wrote there. Starting over in such a folder removes those entries and nothing else. A
non-empty folder without the marker is refused, unless the user passes `force`: then tunelab
writes beside the files already there and refuses any name it would replace. `/`, the home
folder, the working folder (or a folder above it) and a folder holding a `.git` are refused
outright.

Exports and built models are written beside their target (`<out>.tmp-<pid>`) and renamed into
place, so a killed export leaves the previous one intact.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Literal

from tunelab.errors import TunelabError
from tunelab.faults import fault_point

MARKER = ".tunelab-owned.json"
State = Literal["absent", "empty", "owned", "foreign"]


def _same_or_above(path: Path, other: Path) -> bool:
    return path == other or path in other.parents


def refuse_dangerous(path: Path, what: str) -> None:
    """No tunelab folder may be `/`, the home folder, the working folder (or above it), or a checkout."""
    p = path.expanduser().resolve()
    bad = None
    if p == Path(p.anchor):
        bad = "the file system root"
    elif p == Path.home().resolve():
        bad = "your home folder"
    elif _same_or_above(p, Path.cwd().resolve()):
        bad = "the working folder" if p == Path.cwd().resolve() else "a folder above the working folder"
    elif (p / ".git").exists():
        bad = "a source checkout (it holds .git)"
    if bad:
        raise TunelabError(f"{what} {path} is {bad}: tunelab writes only into a folder of its own",
                           fix=f"set {what} to a new folder, e.g. runs/my-run")


def _read_marker(path: Path) -> dict | None:
    """The marker's content, checked: a marker is a file anyone can edit, so its entries must be
    plain names inside the folder."""
    f = path / MARKER
    if not f.is_file() or f.is_symlink():
        return None
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("kind"), str) or not isinstance(meta.get("entries"), list):
        return None
    entries = meta["entries"]
    if not all(isinstance(e, str) and e and e not in (".", "..", MARKER) and "/" not in e and "\\" not in e
               for e in entries):
        return None
    return meta


def state(path: Path, kind: str, legacy: frozenset[str] = frozenset()) -> State:
    """What `path` is for a `kind` folder. `legacy`: the entry names of a `kind` folder written before
    markers existed; a folder holding only such names (and some of them) counts as owned."""
    if not path.exists():
        return "absent"
    if not path.is_dir():
        return "foreign"
    names = {p.name for p in path.iterdir()}
    if not names:
        return "empty"
    meta = _read_marker(path)
    if meta is not None and meta["kind"] == kind:
        return "owned"
    if meta is None and legacy and names <= legacy and "config.yaml" in names and len(names) > 1:
        return "owned"
    return "foreign"


def owned_entries(path: Path, legacy: frozenset[str] = frozenset()) -> list[str]:
    meta = _read_marker(path)
    return list(meta["entries"]) if meta is not None else sorted(n for n in legacy if (path / n).exists())


def mark(path: Path, kind: str, entries: list[str]) -> None:
    """Write the marker (atomically: a half-written marker would make the folder foreign)."""
    write_atomic(path / MARKER, json.dumps({"tunelab": 1, "kind": kind, "entries": sorted(set(entries))}, indent=1))


def write_atomic(path: Path, text: str) -> None:
    """Replace a file tunelab rewrites (a run's config.yaml, summary.json, a marker) so that a kill
    at any moment leaves the old content or the new, never a truncated file: temp file beside it,
    fsync, rename, fsync of the folder."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    fault_point(f"write-{path.name}", 0)
    os.replace(tmp, path)
    fsync(path.parent)


def fsync(path: Path) -> None:
    """Flush a file, or a folder's entries (a rename in it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Delete one file, link or folder (a link is removed, never followed)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def remove_owned(path: Path, legacy: frozenset[str] = frozenset()) -> None:
    """Delete the entries the marker lists; every other file in the folder stays."""
    for name in owned_entries(path, legacy):
        remove(path / name)


def _foreign_refusal(path: Path, what: str, flag: str) -> TunelabError:
    return TunelabError(f"{what} {path} is not empty and tunelab did not write it (no {MARKER}): refusing to "
                        "delete or replace anything in it",
                        fix=f"choose a new {what}, or pass {flag} to write beside its files (none is deleted)")


def _collisions(path: Path, entries: list[str], what: str) -> None:
    taken = sorted(e for e in entries if (path / e).exists() or (path / e).is_symlink())
    if taken:
        raise TunelabError(f"{what} {path}: {', '.join(taken)} would be replaced, and tunelab did not write "
                           f"{'it' if len(taken) == 1 else 'them'}", fix=f"move {'it' if len(taken) == 1 else 'them'} "
                           f"away, or choose a new {what}")


def claim(path: Path, kind: str, entries: list[str], *, what: str, replace: bool, force: bool,
          flag: str = "--force", legacy: frozenset[str] = frozenset()) -> None:
    """Make `path` a `kind` folder tunelab may write `entries` into, losing nothing it did not write.

    An owned folder is started over only with `replace` (its owned entries removed); a foreign
    non-empty one only with `force`, and then none of `entries` may exist there yet."""
    found = _target(path, kind, what, legacy)
    if found == "owned":
        if not replace:
            raise TunelabError(f"{what} {path} already holds a {kind}", fix="pass --overwrite to start it over")
        remove_owned(path, legacy)
    elif found == "foreign":
        if not force:
            raise _foreign_refusal(path, what, flag)
        _collisions(path, entries, what)
    path.mkdir(parents=True, exist_ok=True)
    mark(path, kind, entries)


def _target(path: Path, kind: str, what: str, legacy: frozenset[str] = frozenset()) -> State:
    """The state of a folder tunelab is about to write, refusing a dangerous one or a file."""
    refuse_dangerous(path, what)
    found = state(path, kind, legacy)
    if found == "foreign" and not path.is_dir():
        raise TunelabError(f"{what} {path} is a file, not a folder", fix=f"choose a new {what}")
    return found


def preflight(out: Path, kind: str, *, what: str, force: bool, flag: str = "--force") -> State:
    """Refuse early, before long work, a target `install` would refuse; returns its state."""
    found = _target(out, kind, what)
    if found == "foreign" and not force:
        raise _foreign_refusal(out, what, flag)
    return found


def _exchange(a: Path, b: Path) -> bool:
    """Exchange two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where the
    system or the file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap(tmp: Path, out: Path, tag: str | None = None) -> Path:
    """Replace the folder `out` (tunelab's own) by `tmp`: exchanged atomically where Linux can, else
    the old one is renamed aside (`<out>.old-<tag>`, or a new `<out>.old-<pid>`) first; it is
    deleted only once the new one is in place, so a kill at any moment leaves one of them whole."""
    if not out.exists():
        os.rename(tmp, out)
        return out
    if _exchange(tmp, out):  # atomic: no moment without a whole `out`
        shutil.rmtree(tmp)  # now the old one
        return out
    old = out.with_name(f"{out.name}.old-{tag}") if tag else _new_sibling(out, "old")
    remove(old)  # a leftover of ours, or the empty folder just made
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old)
    return out


def staging(out: Path, tag: str | None = None) -> Path:
    """A new folder beside `out` to write into before `install` or `swap` renames it into place:
    `<out>.tmp-<pid>[-n]`, never an existing one (nothing is deleted to make room). `tag` names a
    fixed `<out>.tmp-<tag>` instead, for folders inside one tunelab owns (a leftover is removed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if tag is not None:
        tmp = out.with_name(f"{out.name}.tmp-{tag}")
        remove(tmp)
        tmp.mkdir()
        return tmp
    return _new_sibling(out, "tmp")


def _new_sibling(out: Path, what: str) -> Path:
    for n in range(1000):
        tmp = out.with_name(f"{out.name}.{what}-{os.getpid()}" + (f"-{n}" if n else ""))
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue
    raise TunelabError(f"{out.parent}: cannot make a folder beside {out.name}", fix="clean up its .tmp folders")


def install(tmp: Path, out: Path, kind: str, *, what: str, force: bool, flag: str = "--force") -> Path:
    """Put the fully written `tmp` in place of `out`, marked as a `kind` folder.

    `out` absent, empty or a previous `kind` folder holding nothing else: swapped by renames (the
    old one is deleted only once the new one is in place). A folder with files tunelab did not
    write: with `force`, the new entries are moved in beside them (the previous export's entries
    replaced, nothing else touched); without it, refused."""
    entries = sorted(p.name for p in tmp.iterdir() if p.name != MARKER)
    mark(tmp, kind, entries)
    try:
        found = preflight(out, kind, what=what, force=force, flag=flag)
    except TunelabError:
        remove(tmp)
        raise
    if found == "empty":
        out.rmdir()
    previous = set(owned_entries(out)) if found == "owned" else set()
    if found in ("absent", "empty") or (found == "owned" and {p.name for p in out.iterdir()} <= previous | {MARKER}):
        return swap(tmp, out)
    try:
        _collisions(out, [e for e in entries if e not in previous], what)
    except TunelabError:
        remove(tmp)
        raise
    for name in previous:
        remove(out / name)
    for name in entries:
        os.replace(tmp / name, out / name)
    mark(out, kind, entries)
    remove(tmp)
    return out
