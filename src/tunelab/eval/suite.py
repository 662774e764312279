"""One entry point for every evaluation: a TinyWorld task, the forgetting probe or a dataset file,
dispatched to its task kind (eval/tasks.py) or the probe (eval/probe.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from tunelab.config import ICLConfig, RAGConfig
from tunelab.data.sources import read_all, resolve_source
from tunelab.errors import TunelabError
from tunelab.eval.probe import run_probe
from tunelab.eval.tasks import (
    MAX_NEW_TOKENS,
    evaluate_records,
    infer_kind,
    load_model_or_run,
    parse_spec,
)
from tunelab.nonparametric import augment
from tunelab.world import SPLITS


def evaluate_task(
    model_or_run: str | Path | tuple[nn.Module, Any], spec: str, *, limit: int | None = None, batch_size: int = 32,
    kind: str | None = None, icl: ICLConfig | None = None, rag: RAGConfig | None = None,
) -> dict[str, Any]:
    """Metrics of a model (run dir, model dir, adapter dir, hub id or a (model, tokenizer) pair) on a
    task: `tinyworld:<task>[@<split>]`, `tinyworld:probe`, or a dataset file (kind from its records,
    or `kind`). `limit`: the first N records only. `icl` / `rag`: answer each question with shots /
    retrieved passages in its prompt (nonparametric/augment.py); their counts join the metrics."""
    parsed = parse_spec(spec)
    if parsed == ("probe", ""):
        return run_probe(*load_model_or_run(model_or_run), limit=limit, batch_size=batch_size)
    path = resolve_source(spec.split("@")[0] + f"@{parsed[1]}") if parsed else spec
    records = read_all(path)
    kind = kind or infer_kind(records, str(path))
    if parsed and kind == "cloze" and parsed[0] != "probe":
        kind = "generative"  # TinyWorld's other prompt+answer records (prefs prompts) are chat questions
    labels = sorted({str(r["label"]) for r in records}) if kind == "classification" else None
    if limit is not None:
        records = records[:limit]
    tech = technique_for(icl, rag, spec=spec, parsed=parsed, kind=kind)  # its errors come before a model loads
    model, tok = load_model_or_run(model_or_run)
    if not tech.active:
        return evaluate_records(model, tok, records, kind=kind, batch_size=batch_size, labels=labels)
    records, counts = augment.apply(records, tok, tech, budget=tech.budget(model, MAX_NEW_TOKENS), where=str(path))
    return {**evaluate_records(model, tok, records, kind=kind, batch_size=batch_size), **counts,
            "technique": tech.name}


def technique_for(icl: ICLConfig | None, rag: RAGConfig | None, *, spec: str = "the prompt",
                  parsed: tuple[str, str] | None = None, kind: str = "generative") -> augment.Technique:
    """The ICL/RAG technique of an evaluation (or of a prompt); ICL's pool defaults to the train split of
    the TinyWorld task evaluated (`parsed`)."""
    wanted = (icl is not None and icl.k > 0) or (rag is not None and rag.index is not None)
    if wanted and kind != "generative":
        raise TunelabError(f"{spec}: in-context learning and RAG answer questions; this is a {kind} task",
                           fix="evaluate them on question records (messages, instruction or prompt+answer)")
    pool, name = None, None
    if icl is not None and icl.k:
        name = icl.pool
        if name is None and parsed and "train" in SPLITS[parsed[0]]:
            name = f"tinyworld:{parsed[0]}@train"
        if name is None:
            raise TunelabError(f"{spec}: in-context learning needs a pool of solved examples",
                               fix="set icl.pool (--icl pool=FILE): a dataset of solved questions")
        pool = read_all(resolve_source(name))
    return augment.technique(icl, rag, pool=pool, pool_name=name or "")
