"""One entry point for every evaluation: a TinyWorld task, the forgetting probe or a dataset file,
dispatched to its task kind (eval/tasks.py) or the probe (eval/probe.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from tunelab.data.sources import resolve_source
from tunelab.eval.probe import run_probe
from tunelab.eval.tasks import evaluate_records, infer_kind, load_model_or_run, parse_spec, read_eval_records


def evaluate_task(
    model_or_run: str | Path | tuple[nn.Module, Any], spec: str, *, limit: int | None = None, batch_size: int = 32,
    kind: str | None = None,
) -> dict[str, Any]:
    """Metrics of a model (run dir, model dir, adapter dir, hub id or a (model, tokenizer) pair) on a
    task: `tinyworld:<task>[@<split>]`, `tinyworld:probe`, or a dataset file (kind from its records,
    or `kind`). `limit`: the first N records only."""
    parsed = parse_spec(spec)
    model, tok = load_model_or_run(model_or_run)
    if parsed == ("probe", ""):
        return run_probe(model, tok, limit=limit, batch_size=batch_size)
    path = resolve_source(spec.split("@")[0] + f"@{parsed[1]}") if parsed else spec
    records = read_eval_records(path)
    kind = kind or infer_kind(records, str(path))
    if parsed and kind == "cloze" and parsed[0] != "probe":
        kind = "generative"  # TinyWorld's other prompt+answer records (prefs prompts) are chat questions
    labels = sorted({str(r["label"]) for r in records}) if kind == "classification" else None
    if limit is not None:
        records = records[:limit]
    return evaluate_records(model, tok, records, kind=kind, batch_size=batch_size, labels=labels)
