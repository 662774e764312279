"""The data pipeline's entry point: a dataset file in, tokenized and masked examples out.

read (sources) -> validate -> render through the chat template and tokenize with labels (formats,
templates) -> over-length policy -> drop examples with nothing to train. Every bad record of the
file is collected before anything is raised, so one run lists them all.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from tunelab.config import DataConfig
from tunelab.data import cache
from tunelab.data.formats import FORMATS, EncodeContext, detect_format, resolve_format
from tunelab.data.sources import read_records, resolve_source
from tunelab.data.templates import ChatTemplate, resolve_template
from tunelab.data.types import IGNORE, Example, TokenizedData
from tunelab.data.validate import RecordError
from tunelab.errors import DataError

__all__ = ["load_tokenized", "read_records", "detect_format", "render_example", "fingerprint", "split_path"]

Log = Callable[[str], Any]


def render_example(
    record: dict[str, Any], fmt: str, tokenizer: Any, *, mask_prompt: bool, chat_template: str | ChatTemplate | None
) -> tuple[list[int], list[int]]:
    """Token ids and labels (IGNORE where not trained) of one record of format `fmt`.

    `chat_template`: built-in name, .jinja path, Jinja source, or None for the tokenizer's own.
    Raises RecordError (a DataError) when the record is unusable.
    """
    spec = FORMATS.get(fmt)
    if spec is None or not spec.rendered:
        rendered = ", ".join(name for name, s in FORMATS.items() if s.rendered)
        raise DataError(f"format {fmt!r} is not turned into tokens here; renderable: {rendered}")
    problem = spec.validate(record)
    if problem is not None:
        raise RecordError(problem.kind, problem.reason)
    template = resolve_template(chat_template, tokenizer) if spec.chat else None
    (ex,) = spec.encode(record, "", EncodeContext(tokenizer, template, mask_prompt))
    return ex.input_ids, ex.labels


@dataclass
class Built:
    """Everything learned from one pass over a file, before the error policy is applied."""

    path: str
    fmt: str
    n_records: int = 0
    bad: list[tuple[str, str, str]] = field(default_factory=list)  # (where, kind, reason)
    zero_trainable: list[str] = field(default_factory=list)  # "where: reason"
    kept: list[Example] = field(default_factory=list)
    n_overlength: int = 0
    n_truncated: int = 0
    n_dropped_overlength: int = 0
    tokens_before: int = 0  # of every rendered example, before truncation
    tokens_lost: int = 0
    trained_before: int = 0  # trained (labelled) tokens of every rendered example, before truncation
    trained_lost: int = 0
    cut_replies: list[str] = field(default_factory=list)  # chat formats: examples whose reply end was cut
    labels: list[str] = field(default_factory=list)  # classification: the label order (class id = position)


def split_path(cfg: DataConfig, split: str) -> str:
    path = cfg.train if split == "train" else cfg.eval
    if path is None:
        raise DataError(f"data.{split} is not set", fix=f"set data.{split} to a dataset file or folder")
    return resolve_source(path)


def build(
    path: str, cfg: DataConfig, tokenizer: Any, mask_prompt: bool, formats: Iterable[str], log: Log,
    labels: Sequence[str] | None = None,
) -> Built:
    """One pass over `path`: read, validate, render, tokenize and apply the over-length policy."""
    records = list(read_records(path))
    fmt = resolve_format(cfg.format, records, path)
    _check_format(path, fmt, formats)
    out = Built(path, fmt, n_records=len(records))
    spec = FORMATS[fmt]
    if spec.no_packing and cfg.packing and tokenizer is not None:
        raise DataError(f"data.packing cannot be used with {spec.no_packing}", fix="set data.packing=false")
    if spec.label_order is not None and tokenizer is not None:  # one label order for every split: the train file's
        train = split_path(cfg, "train") if cfg.train is not None else path
        out.labels = spec.label_order(records if train == path else read_records(train), labels)
    template = resolve_template(cfg.chat_template, tokenizer, log) if spec.chat and tokenizer is not None else None
    ctx = EncodeContext(tokenizer, template, mask_prompt, out.labels)
    for where, record in records:
        _one(out, where, record, cfg, ctx)
    return out


def _check_format(path: str, fmt: str, formats: Iterable[str]) -> None:
    if fmt not in formats:
        accepted = ", ".join(formats)
        raise DataError(
            f"{path}: dataset format {fmt!r} is not accepted by this objective (accepted: {accepted})",
            fix="use a dataset in an accepted format, or an objective that takes this one (set data.format if "
            "auto-detection guessed wrong)",
        )


def cached_build(
    path: str, cfg: DataConfig, tokenizer: Any, mask_prompt: bool, formats: Iterable[str], log: Log,
    labels: Sequence[str] | None = None,
) -> Built:
    """`build`, through the cache of tokenized data (data/cache.py): a second pass over the same bytes with
    the same settings and tokenizer reads the stored result and says again what the first pass said."""
    train = split_path(cfg, "train") if cfg.train is not None else None
    key = cache.cache_key(path, cfg, tokenizer, mask_prompt, labels, train)
    hit = cache.load(key) if key is not None else None
    if hit is not None:
        examples, meta = hit
        _check_format(path, meta["fmt"], formats)  # what the objective accepts is not part of the entry
        for line in meta["said"]:
            log(line)
        kept = {f.name: meta[f.name] for f in fields(Built) if f.name not in ("path", "kept", "bad")}
        return Built(path, **kept, kept=examples, bad=[(w, k, r) for w, k, r in meta["bad"]])
    say, said = cache.recorder(log)
    out = build(path, cfg, tokenizer, mask_prompt, formats, say, labels)
    if key is not None:
        meta = {f.name: getattr(out, f.name) for f in fields(Built) if f.name not in ("path", "kept")}
        cache.store(key, out.kept, {**meta, "said": said})
    return out


def _one(out: Built, where: str, record: Any, cfg: DataConfig, ctx: EncodeContext) -> None:
    if isinstance(record, RecordError):
        out.bad.append((where, record.kind, record.reason))
        return
    spec = FORMATS[out.fmt]
    problem = spec.validate(record)
    if problem is not None:
        out.bad.append((where, problem.kind, problem.reason))
        return
    if ctx.tokenizer is None:  # validation only (data check without a tokenizer)
        return
    try:
        examples = spec.encode(record, where, ctx)
    except RecordError as e:
        out.bad.append((where, e.kind, e.reason))
        return
    for ex in examples:
        _keep(out, ex, cfg)


def _keep(out: Built, ex: Example, cfg: DataConfig) -> None:
    limit = cfg.max_length
    n = max(len(ex.input_ids), len(ex.rejected.input_ids) if ex.rejected else 0)
    out.tokens_before += n
    pair = [e for e in (ex, ex.rejected) if e is not None]
    out.trained_before += sum(_trained(e.labels) for e in pair)
    truncated = n > limit
    if truncated:
        out.n_overlength += 1
        if cfg.overlength == "raise":
            out.bad.append((ex.where, "over-length", f"{n} tokens > max_length {limit}"))
            return
        if cfg.overlength == "drop":
            out.n_dropped_overlength += 1
            return
        out.n_truncated += 1
        out.tokens_lost += n - limit
        lost = sum(_trained(e.labels[limit:]) for e in pair)
        out.trained_lost += lost
        if lost and FORMATS[out.fmt].chat:  # a trained token past the limit: the reply's last one is among them
            out.cut_replies.append(f"{ex.where}: {n} tokens, {lost} trained past max_length {limit}")
        rejected = ex.rejected and replace(ex.rejected, input_ids=ex.rejected.input_ids[:limit],
                                           labels=ex.rejected.labels[:limit])
        ex = replace(ex, input_ids=ex.input_ids[:limit], labels=ex.labels[:limit], rejected=rejected)
    if any(all(label == IGNORE for label in e.labels) for e in (ex, ex.rejected) if e is not None):
        after = f" left after truncation to {limit} tokens" if truncated else ""
        out.zero_trainable.append(f"{ex.where}: no trainable tokens{after}")
        return
    out.kept.append(ex)


def _trained(labels: Sequence[int]) -> int:
    return sum(label != IGNORE for label in labels)


def truncation_problem(out: Built, cfg: DataConfig) -> DataError | None:
    """Why truncation would spoil a run (replies that lose their end, or too large a share of the
    trained tokens cut), or None. A run raises it; `data check` reports it."""
    share = out.trained_lost / out.trained_before if out.trained_before else 0.0
    fix = (f"raise data.max_length (now {cfg.max_length}), or set data.overlength: drop to skip the long examples; "
           "to train on them cut anyway set data.{key}")
    if out.cut_replies and not cfg.allow_cut_replies:
        n = len(out.cut_replies)
        return DataError(
            f"{out.path}: truncation to max_length {cfg.max_length} cuts the end of {n} repl{'y' if n == 1 else 'ies'}"
            f" (their end-of-turn token; {share:.1%} of the trained tokens): the model would learn not to stop",
            fix=fix.format(key="allow_cut_replies: true"), problems=out.cut_replies)
    if share > cfg.max_truncated_share:
        return DataError(
            f"{out.path}: truncation to max_length {cfg.max_length} cuts {share:.1%} of the trained tokens "
            f"({out.trained_lost} of {out.trained_before}), above data.max_truncated_share={cfg.max_truncated_share}",
            fix=fix.format(key="max_truncated_share (a share from 0 to 1)"))
    return None


def enforce(out: Built, cfg: DataConfig, log: Log) -> None:
    """Apply `on_error` / `max_bad_fraction`; log what was dropped and why."""
    lines = [f"{where}: {reason}" for where, _, reason in out.bad]
    n_bad, total = len(out.bad), out.n_records
    if n_bad and cfg.on_error == "raise":
        raise DataError(
            f"{out.path}: {n_bad} bad record(s) of {total}",
            fix="fix the records listed, or set data.on_error=skip to drop them",
            problems=lines + out.zero_trainable,
        )
    if n_bad:
        counts = Counter(kind for _, kind, _ in out.bad)
        log(f"data: skipped {n_bad} bad record(s) of {total} in {out.path}: " + _counts(counts))
        if n_bad / max(total, 1) > cfg.max_bad_fraction:
            raise DataError(
                f"{out.path}: {n_bad} of {total} records are bad ({n_bad / total:.1%}), "
                f"above data.max_bad_fraction={cfg.max_bad_fraction}",
                fix="fix the records listed, or raise data.max_bad_fraction",
                problems=lines,
            )
    if out.zero_trainable:
        n = len(out.zero_trainable)
        log(f"data: dropped {n} example(s) with no trainable tokens, e.g. {out.zero_trainable[0]}")
    if out.n_truncated or out.n_dropped_overlength:
        log(f"data: {out.n_overlength} example(s) over max_length {cfg.max_length}: " + _overlength_note(out))
    problem = truncation_problem(out, cfg)
    if problem is not None:
        raise problem


def _counts(counts: Counter[str]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in counts.most_common())


def _overlength_note(out: Built) -> str:
    if out.n_dropped_overlength:
        return f"{out.n_dropped_overlength} dropped"
    trained = f", {out.trained_lost / out.trained_before:.2%} of trained tokens" if out.trained_before else ""
    return f"{out.n_truncated} truncated, {lost_share(out):.2%} of tokens lost{trained}"


def lost_share(out: Built) -> float:
    return out.tokens_lost / out.tokens_before if out.tokens_before else 0.0


def fingerprint(examples: Iterable[Example]) -> str:
    """sha256 over every example's ids and labels, in order (little-endian int32, length-prefixed)."""
    h = hashlib.sha256()
    for ex in examples:
        pair = (ex.rejected.input_ids, ex.rejected.labels) if ex.rejected else ()
        for seq in (ex.input_ids, ex.labels, *pair):
            a = array("i", [len(seq), *seq])
            if sys.byteorder == "big":
                a.byteswap()
            h.update(a.tobytes())
    return h.hexdigest()


def stats(out: Built, cfg: DataConfig) -> dict[str, object]:
    kept = out.kept
    return {
        "source": out.path,
        "format": out.fmt,
        "n_records": out.n_records,
        "n_bad": len(out.bad),
        "bad_by_reason": dict(Counter(kind for _, kind, _ in out.bad)),
        "n_examples": len(kept),
        "n_tokens": sum(len(ex.input_ids) for ex in kept),
        "n_trainable_tokens": sum(sum(label != IGNORE for label in ex.labels) for ex in kept),
        "max_length": cfg.max_length,
        "overlength_policy": cfg.overlength,
        "n_overlength": out.n_overlength,
        "n_truncated": out.n_truncated,
        "n_dropped_overlength": out.n_dropped_overlength,
        "truncated_token_share": lost_share(out),
        "truncated_trained_share": out.trained_lost / out.trained_before if out.trained_before else 0.0,
        "n_cut_replies": len(out.cut_replies),
        "n_dropped_zero_trainable": len(out.zero_trainable),
    }


def load_tokenized(
    cfg: DataConfig,
    split: Literal["train", "eval"],
    tokenizer: Any,
    *,
    mask_prompt: bool,
    formats: tuple[str, ...] = ("text", "instruction", "chat"),
    log: Log = print,
    labels: Sequence[str] | None = None,
) -> TokenizedData:
    """Read, validate, render, tokenize and mask `cfg.train` or `cfg.eval`.

    `formats`: the dataset formats the objective accepts; `labels`: the classification label order
    (default: the sorted labels of `cfg.train`, see data/classify.py). Raises DataError for bad records (per
    `cfg.on_error`), a format outside `formats`, or nothing left to train on.
    """
    path = split_path(cfg, split)
    out = cached_build(path, cfg, tokenizer, mask_prompt, formats, log, labels)
    enforce(out, cfg, log)
    if not out.kept:
        raise DataError(
            f"{path}: no examples left out of {out.n_records} records after validation and the over-length policy",
            fix="check data.format, data.max_length and data.overlength (see `tunelab data check`)",
        )
    s = stats(out, cfg)
    log(
        f"data: {split} {s['n_examples']} examples, {s['n_tokens']} tokens, {s['n_trainable_tokens']} trained "
        f"({out.fmt}, from {path})"
    )
    if out.labels:  # classification: show the class ids the head's outputs will mean
        s["labels"] = out.labels
        log("data: labels " + ", ".join(f"{i}={name}" for i, name in enumerate(out.labels)))
    return TokenizedData(out.kept, fingerprint(out.kept), s)
