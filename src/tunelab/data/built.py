"""What one pass over a data file learns (`Built`), and the per-example over-length policy both passes apply.

The batched first pass (data/firstpass.py) and the per-record reference (`pipeline.build_per_record`)
fill the same `Built`; `keep` decides what becomes of each encoded example, so the two cannot differ there.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from tunelab.config import DataConfig
from tunelab.data.formats import FORMATS
from tunelab.data.sources import resolve_source
from tunelab.data.types import IGNORE, Example
from tunelab.errors import DataError


@dataclass
class Built:
    """Everything learned from one pass over a file, before the error policy is applied."""

    path: str
    fmt: str
    n_records: int = 0
    bad: list[tuple[str, str, str]] = field(default_factory=list)  # (where, kind, reason)
    zero_trainable: list[str] = field(default_factory=list)  # "where: reason"
    kept: Sequence[Example] = field(default_factory=list)  # an ExampleTable (data/table.py) from the first pass
    n_overlength: int = 0
    n_truncated: int = 0
    n_dropped_overlength: int = 0
    tokens_before: int = 0  # of every rendered example, before truncation
    tokens_lost: int = 0
    trained_before: int = 0  # trained (labelled) tokens of every rendered example, before truncation
    trained_lost: int = 0
    cut_replies: list[str] = field(default_factory=list)  # chat formats: examples whose reply end was cut
    labels: list[str] = field(default_factory=list)  # classification: the label order (class id = position)
    n_tokens: int = 0  # of the kept examples
    n_trained: int = 0  # trained tokens of the kept examples
    fingerprint: str = ""  # pipeline.fingerprint of the kept examples

    def add(self, part: Built) -> None:
        """Take in the counts and messages of the pass over a later part of the same file (not its examples)."""
        for name in ("n_overlength", "n_truncated", "n_dropped_overlength", "tokens_before", "tokens_lost",
                     "trained_before", "trained_lost", "n_tokens", "n_trained"):
            setattr(self, name, getattr(self, name) + getattr(part, name))
        self.bad += part.bad
        self.zero_trainable += part.zero_trainable
        self.cut_replies += part.cut_replies


def split_path(cfg: DataConfig, split: str) -> str:
    path = cfg.train if split == "train" else cfg.eval
    if path is None:
        raise DataError(f"data.{split} is not set", fix=f"set data.{split} to a dataset file or folder")
    return resolve_source(path)


def check_format(path: str, fmt: str, formats: Iterable[str]) -> None:
    if fmt not in formats:
        accepted = ", ".join(formats)
        raise DataError(
            f"{path}: dataset format {fmt!r} is not accepted by this objective (accepted: {accepted})",
            fix="use a dataset in an accepted format, or an objective that takes this one (set data.format if "
            "auto-detection guessed wrong)",
        )


def keep(out: Built, ex: Example, cfg: DataConfig) -> Example | None:
    """Apply the over-length policy to one encoded example and count it; the example to keep (truncated
    or not), or None when it is dropped or refused (then `out` says why)."""
    limit = cfg.max_length
    n = max(len(ex.input_ids), len(ex.rejected.input_ids) if ex.rejected else 0)
    out.tokens_before += n
    pair = [e for e in (ex, ex.rejected) if e is not None]
    out.trained_before += sum(trained(e.labels) for e in pair)
    truncated = n > limit
    if truncated:
        out.n_overlength += 1
        if cfg.overlength == "raise":
            out.bad.append((ex.where, "over-length", f"{n} tokens > max_length {limit}"))
            return None
        if cfg.overlength == "drop":
            out.n_dropped_overlength += 1
            return None
        out.n_truncated += 1
        out.tokens_lost += n - limit
        lost = sum(trained(e.labels[limit:]) for e in pair)
        out.trained_lost += lost
        if lost and FORMATS[out.fmt].chat:  # a trained token past the limit: the reply's last one is among them
            out.cut_replies.append(f"{ex.where}: {n} tokens, {lost} trained past max_length {limit}")
        rejected = ex.rejected and replace(ex.rejected, input_ids=ex.rejected.input_ids[:limit],
                                           labels=ex.rejected.labels[:limit])
        ex = replace(ex, input_ids=ex.input_ids[:limit], labels=ex.labels[:limit], rejected=rejected)
    if any(trained(e.labels) == 0 for e in (ex, ex.rejected) if e is not None):
        after = f" left after truncation to {limit} tokens" if truncated else ""
        out.zero_trainable.append(f"{ex.where}: no trainable tokens{after}")
        return None
    out.n_tokens += len(ex.input_ids)
    out.n_trained += trained(ex.labels)
    return ex


def trained(labels: list[int]) -> int:
    """How many of `labels` are trained (not IGNORE)."""
    return len(labels) - labels.count(IGNORE)
