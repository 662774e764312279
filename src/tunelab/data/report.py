"""`tunelab data check`: what the pipeline would make of a dataset, without training anything.

`check_report` never stops at bad records: it lists them, says whether the configured policy
would stop a run, gives token statistics and shows one rendered example with its trained tokens.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from tunelab.config import DataConfig
from tunelab.data.formats import FORMATS
from tunelab.data.pipeline import Built, cached_build, lost_share, truncation_problem
from tunelab.data.sources import resolve_source
from tunelab.data.table import lengths_of
from tunelab.data.types import IGNORE, Example

MAX_LISTED = 50


def check_report(cfg: DataConfig, tokenizer: Any, mask_prompt: bool) -> dict[str, Any]:
    """A JSON-able report on `cfg.train` (with one rendered example) and `cfg.eval` when set; for a
    multi-task list, one `train:<task>` (and `eval:<task>`) entry per task."""
    report: dict[str, Any] = {}
    parts = [(f"{split}:{t.name()}", cfg.for_task(t), split) for t in cfg.tasks() for split in ("train", "eval")] \
        or [(split, cfg, split) for split in ("train", "eval")]
    for key, part, split in parts:
        path = part.train if split == "train" else part.eval
        if path is None:
            continue
        out = cached_build(resolve_source(path), part, tokenizer, mask_prompt, FORMATS, log=lambda _msg: None)
        report[key] = _split_report(out, part)
        if split == "train":
            report[key]["example"] = _example_view(out.kept[0], tokenizer) if out.kept else None
    if not report:
        report["note"] = "data.train and data.eval are both unset"
    return report


def _split_report(out: Built, cfg: DataConfig) -> dict[str, Any]:
    n_bad = len(out.bad)
    frac = n_bad / out.n_records if out.n_records else 0.0
    stops = bool(n_bad) and (cfg.on_error == "raise" or frac > cfg.max_bad_fraction)
    truncation = truncation_problem(out, cfg)
    return {
        "source": out.path,
        "format": out.fmt,
        "validation": {
            "records": out.n_records,
            "bad": n_bad,
            "by_reason": dict(Counter(kind for _, kind, _ in out.bad)),
            "problems": [f"{where}: {reason}" for where, _, reason in out.bad],
            "zero_trainable": out.zero_trainable,
            "on_error": cfg.on_error,
            "run_would_stop": stops or not out.kept or truncation is not None,
            "truncation": None if truncation is None else {"message": truncation.message, "fix": truncation.fix,
                                                             "problems": truncation.problems[:MAX_LISTED]},
        },
        "tokens": _token_stats(out, cfg) if out.kept else None,
    }


def _token_stats(out: Built, cfg: DataConfig) -> dict[str, Any]:
    lengths = np.sort(lengths_of(out.kept))
    return {
        "examples": len(lengths),
        "tokens": out.n_tokens,
        "trainable_tokens": out.n_trained,
        "mean_length": out.n_tokens / len(lengths),
        "p50_length": _percentile(lengths, 0.50),
        "p95_length": _percentile(lengths, 0.95),
        "max_length": int(lengths[-1]),
        "limit": cfg.max_length,
        "overlength_policy": cfg.overlength,
        "overlength": out.n_overlength,
        "truncated": out.n_truncated,
        "dropped_overlength": out.n_dropped_overlength,
        "truncated_token_share": lost_share(out),
        "truncated_trained_share": out.trained_lost / out.trained_before if out.trained_before else 0.0,
        "cut_replies": len(out.cut_replies),
    }


def _percentile(sorted_values: np.ndarray, q: float) -> int:
    """Nearest-rank percentile of an ascending array."""
    rank = max(1, -(-len(sorted_values) * q // 1))
    return int(sorted_values[int(rank) - 1])


def _example_view(ex: Example, tokenizer: Any) -> dict[str, Any]:
    """The example's text, its tokens, and its spans: runs of tokens that are all trained or all
    not, each decoded as a whole (a character split over byte-level tokens decodes whole only so)."""
    trained = [lab != IGNORE for lab in ex.labels]
    spans: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(trained) + 1):
        if i == len(trained) or trained[i] != trained[start]:
            spans.append((tokenizer.decode(ex.input_ids[start:i], skip_special_tokens=False), trained[start]))
            start = i
    return {
        "where": ex.where,
        "text": tokenizer.decode(ex.input_ids, skip_special_tokens=False),
        "tokens": [
            (tokenizer.decode([t], skip_special_tokens=False), t_trained)
            for t, t_trained in zip(ex.input_ids, trained, strict=True)
        ],
        "spans": spans,
    }


def format_check_report(report: dict[str, Any]) -> str:
    """Human-readable text of `check_report`; trained tokens are shown inside [[ ]]."""
    lines: list[str] = []
    if "note" in report:
        lines.append(report["note"])
    for key, part in report.items():
        if key != "note":
            lines += _format_split(key, part)
    return "\n".join(lines)


def _format_split(split: str, r: dict[str, Any]) -> list[str]:
    v = r["validation"]
    lines = [f"{split}: {r['source']} (format {r['format']})"]
    reasons = ", ".join(f"{k} {n}" for k, n in v["by_reason"].items())
    lines.append(f"  records {v['records']}, bad {v['bad']}" + (f" ({reasons})" if reasons else ""))
    lines += [f"    {p}" for p in v["problems"][:MAX_LISTED]]
    if len(v["problems"]) > MAX_LISTED:
        lines.append(f"    ... and {len(v['problems']) - MAX_LISTED} more")
    if v["zero_trainable"]:
        lines.append(f"  dropped, nothing to train: {len(v['zero_trainable'])}")
        lines += [f"    {p}" for p in v["zero_trainable"][:MAX_LISTED]]
    verdict = "a run would STOP here" if v["run_would_stop"] else "a run would proceed"
    lines.append(f"  on_error={v['on_error']}: {verdict}")
    if v["truncation"]:
        lines.append(f"  STOP: {v['truncation']['message']}")
        lines.append(f"    fix: {v['truncation']['fix']}")
    t = r["tokens"]
    if t:
        lines.append(
            f"  examples {t['examples']}, tokens {t['tokens']} ({t['trainable_tokens']} trained); length mean "
            f"{t['mean_length']:.1f}, p50 {t['p50_length']}, p95 {t['p95_length']}, max {t['max_length']}"
        )
        lines.append(
            f"  over max_length {t['limit']}: {t['overlength']} (policy {t['overlength_policy']}: truncated "
            f"{t['truncated']}, dropped {t['dropped_overlength']}, {t['truncated_token_share']:.2%} of tokens lost, "
            f"{t['truncated_trained_share']:.2%} of trained tokens; {t['cut_replies']} replies cut before their end)"
        )
    if r.get("example"):
        lines += _format_example(r["example"])
    return lines


def _format_example(ex: dict[str, Any]) -> list[str]:
    marked = [f"[[{text}]]" if trained else text for text, trained in ex["spans"]]
    return [
        f"  example {ex['where']}, rendered:",
        _indent(ex["text"]),
        "  trained tokens in [[ ]]:",
        _indent("".join(marked)),
    ]


def _indent(text: str) -> str:
    return "\n".join("    | " + line for line in text.split("\n"))
