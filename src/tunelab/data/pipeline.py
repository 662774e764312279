"""The data pipeline's entry point: a dataset file in, tokenized and masked examples out.

read (sources) -> validate -> render through the chat template and tokenize with labels (formats,
templates) -> over-length policy -> drop examples with nothing to train. Every bad record of the
file is collected before anything is raised, so one run lists them all.

The pass runs in batches and writes Arrow (`build`, data/firstpass.py); its result is cached
(data/cache.py) and read back memory-mapped (data/table.py). `build_per_record` is the same pass one
record at a time, the reference it is tested against.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import fields
from typing import Any, Literal

from tunelab.config import DataConfig
from tunelab.data import cache
from tunelab.data.built import Built, check_format, keep, split_path
from tunelab.data.firstpass import build
from tunelab.data.formats import FORMATS, EncodeContext, detect_format, resolve_format
from tunelab.data.sources import read_records
from tunelab.data.templates import ChatTemplate, resolve_template
from tunelab.data.types import Example, TokenizedData
from tunelab.data.validate import RecordError
from tunelab.errors import DataError

__all__ = ["load_tokenized", "read_records", "detect_format", "render_example", "fingerprint", "split_path", "build",
           "build_per_record", "Built"]

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


def build_per_record(
    path: str, cfg: DataConfig, tokenizer: Any, mask_prompt: bool, formats: Iterable[str], log: Log,
    labels: Sequence[str] | None = None,
) -> Built:
    """`build` one record at a time, the whole file in memory: the plain reference the batched first pass
    (data/firstpass.py) is tested against, and the baseline of bench/scale.py."""
    records = list(read_records(path))
    fmt = resolve_format(cfg.format, records, path)
    check_format(path, fmt, formats)
    out = Built(path, fmt, n_records=len(records))
    spec = FORMATS[fmt]
    if spec.no_packing and cfg.packing and tokenizer is not None:
        raise DataError(f"data.packing cannot be used with {spec.no_packing}", fix="set data.packing=false")
    if spec.label_order is not None and tokenizer is not None:  # one label order for every split: the train file's
        train = split_path(cfg, "train") if cfg.train is not None else path
        out.labels = spec.label_order(records if train == path else read_records(train), labels)
    template = resolve_template(cfg.chat_template, tokenizer, log) if spec.chat and tokenizer is not None else None
    ctx = EncodeContext(tokenizer, template, mask_prompt, out.labels)
    kept: list[Example] = []
    for where, record in records:
        _one(out, kept, where, record, cfg, ctx)
    out.kept = kept
    return out


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
        check_format(path, meta["fmt"], formats)  # what the objective accepts is not part of the entry
        for line in meta["said"]:
            log(line)
        kept = {f.name: meta[f.name] for f in fields(Built) if f.name not in ("path", "kept", "bad")}
        return Built(path, **kept, kept=examples, bad=[(w, k, r) for w, k, r in meta["bad"]])
    say, said = cache.recorder(log)
    with cache.new_entry(key) as entry:
        try:
            out = build(path, cfg, tokenizer, mask_prompt, formats, say, labels,
                        arrow=entry.arrow if entry is not None else None)
        except OSError:
            if entry is None:
                raise
            # the cache folder cannot take the entry (a full disk): this run goes on without it, its messages
            # said once already
            entry = None
            out = build(path, cfg, tokenizer, mask_prompt, formats, lambda _line: None, labels)
        if entry is not None:
            entry.commit({**{f.name: getattr(out, f.name) for f in fields(Built) if f.name not in ("path", "kept")},
                          "said": said, "n_examples": len(out.kept)})
    return out


def _one(out: Built, kept: list[Example], where: str, record: Any, cfg: DataConfig, ctx: EncodeContext) -> None:
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
        ex = keep(out, ex, cfg)
        if ex is not None:
            kept.append(ex)


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
    return {
        "source": out.path,
        "format": out.fmt,
        "n_records": out.n_records,
        "n_bad": len(out.bad),
        "bad_by_reason": dict(Counter(kind for _, kind, _ in out.bad)),
        "n_examples": len(out.kept),
        "n_tokens": out.n_tokens,
        "n_trainable_tokens": out.n_trained,
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
    return TokenizedData(out.kept, out.fingerprint or fingerprint(out.kept), s)
