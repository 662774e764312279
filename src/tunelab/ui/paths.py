"""The roots `tunelab ui` may read, and the only way a request names a file: a *ref*, `<label>/<relative path>`.

A root's label is its folder's name (`runs`; a second root of the same name is `runs-2`), so the ref of
`runs/demo` reads like the path it is. `resolve` refuses what points outside the roots: `..` parts,
absolute paths, and links that lead out (the path is resolved before it is compared).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError

# Folders a listing never walks into: a run's own internals and what tools leave around.
SKIP = {"checkpoints", "final", "tensorboard", "rag-data", "__pycache__", "node_modules"}
MAX_DEPTH = 6


class Refused(Exception):
    """A ref that points outside the roots (403) or at nothing (404)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Roots:
    by_label: dict[str, Path]

    @classmethod
    def of(cls, folders: list[str]) -> Roots:
        by_label: dict[str, Path] = {}
        for folder in folders:
            path = Path(folder).expanduser().resolve()
            if not path.is_dir():
                raise TunelabError(f"--runs {folder}: no such folder", fix="pass a folder that holds run dirs")
            label = path.name or "root"
            n = 2
            while label in by_label:
                label, n = f"{path.name or 'root'}-{n}", n + 1
            by_label[label] = path
        return cls(by_label)

    def resolve(self, ref: str, *, kind: str = "any") -> Path:
        """The path a ref names, inside a root. kind: "dir", "file", "any" (it must exist) or "path" (it may not)."""
        label, _, rel = ref.replace("\\", "/").partition("/")
        root = self.by_label.get(label)
        if root is None:
            raise Refused(404, f"{ref}: not under a root; roots: {', '.join(self.by_label)}")
        parts = [p for p in rel.split("/") if p not in ("", ".")]
        if rel.startswith("/") or any(p == ".." for p in parts) or "\x00" in rel:
            raise Refused(403, f"{ref}: only paths inside {label}/ are served")
        path = (root / Path(*parts)).resolve() if parts else root
        if not path.is_relative_to(root):
            raise Refused(403, f"{ref}: leads outside {label}/ (a link out of the root)")
        exists = {"dir": path.is_dir, "file": path.is_file, "any": path.exists, "path": lambda: True}[kind]()
        if not exists:
            raise Refused(404, f"{ref}: no such {'folder' if kind == 'dir' else 'file'}")
        return path

    def ref(self, path: Path) -> str:
        """The ref of a path inside a root (resolved)."""
        path = path.resolve()
        for label, root in self.by_label.items():
            if path.is_relative_to(root):
                rel = path.relative_to(root).as_posix()
                return label if rel == "." else f"{label}/{rel}"
        raise Refused(403, f"{path}: not under a root")

    def walk(self) -> Iterator[Path]:
        """Every folder under the roots (depth-limited, hidden and internal folders skipped, links never
        followed), a run or compare folder's own insides not walked."""
        for root in self.by_label.values():
            yield from _walk(root, 0)


def _walk(folder: Path, depth: int) -> Iterator[Path]:
    yield folder
    if depth >= MAX_DEPTH or is_run(folder) or is_compare(folder):
        return
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return
    for e in entries:
        if e.name.startswith(".") or e.name in SKIP or not e.is_dir(follow_symlinks=False):
            continue
        yield from _walk(Path(e.path), depth + 1)


def is_run(folder: Path) -> bool:
    return (folder / "config.yaml").is_file() and any(
        (folder / f).exists() for f in ("metrics.jsonl", "summary.json", "checkpoints", ".tunelab-owned.json"))


def is_compare(folder: Path) -> bool:
    return (folder / "report.md").is_file() and (folder / "results.json").is_file()


def configs(roots: Roots, limit: int = 200) -> list[str]:
    """Refs of the YAML files under the roots outside run folders (for the start and data-check forms)."""
    found = []
    for folder in roots.walk():
        if is_run(folder) or is_compare(folder):
            continue
        try:
            names = sorted(e.name for e in os.scandir(folder) if e.is_file(follow_symlinks=False))
        except OSError:
            continue
        found += [roots.ref(folder / n) for n in names if n.endswith((".yaml", ".yml"))]
        if len(found) >= limit:
            break
    return found[:limit]
