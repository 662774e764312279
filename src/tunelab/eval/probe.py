"""The forgetting probe: what a fine-tune made the model forget of its pretraining.

Two measurements on TinyWorld's `probe` task: cloze accuracy on facts the corpus states
(`probe/facts`, raw-text continuation, see `tasks.cloze_correct`) and perplexity of held-out
corpus-like text (`probe/heldout`). `forgetting` runs them on a tuned model and on its base and
reports the drop: accuracy points lost and perplexity gained (positive = forgot).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peft import PeftModel
from torch import nn

from tunelab.config import read_yaml
from tunelab.data.sources import read_all, resolve_source
from tunelab.errors import TunelabError
from tunelab.eval.tasks import evaluate_records, load_model_or_run
from tunelab.modeling.load import resolve_path
from tunelab.owned import write_atomic
from tunelab.world.resolve import cache_root


def run_probe(
    model: nn.Module, tokenizer: Any, *, limit: int | None = None, batch_size: int = 32,
    facts: str | Path | None = None, heldout: str | Path | None = None,
) -> dict[str, float]:
    """Probe metrics; `facts` / `heldout` replace TinyWorld's probe files, `limit` caps each."""
    fact_records = read_all(facts or resolve_source("tinyworld:probe@facts"), limit)
    text_records = read_all(heldout or resolve_source("tinyworld:probe@heldout"), limit)
    cloze = evaluate_records(model, tokenizer, fact_records, kind="cloze", batch_size=batch_size)
    text = evaluate_records(model, tokenizer, text_records, kind="text", batch_size=batch_size)
    return {
        "probe_cloze_accuracy": cloze["accuracy"], "probe_facts": cloze["n"],
        "probe_heldout_perplexity": text["perplexity"], "probe_heldout_loss": text["loss"],
        "probe_heldout_tokens": text["tokens"],
    }


def run_config(path: str | Path) -> dict[str, Any] | None:
    """The raw config.yaml of a run directory (read as untrusted YAML), else None."""
    config = Path(path) / "config.yaml"
    return read_yaml(config) if config.is_file() else None


def run_base(path: str | Path) -> str | None:
    """The base model of a run directory (its config.yaml's model.name_or_path), else None."""
    cfg = run_config(path)
    return None if cfg is None else cfg.get("model", {}).get("name_or_path")


def base_for(
    model: nn.Module, source: str | Path | tuple[nn.Module, Any], base: str | Path | None
) -> str | Path | None:
    """The base to load for `forgetting`, or None where the model's disabled adapter is the base.
    Raises, before any work, when there is none."""
    if base is not None or isinstance(model, PeftModel):
        return base
    found = None if isinstance(source, tuple) else run_base(source)
    if found is None:
        raise TunelabError(
            "forgetting needs the base model to compare with, and this model is neither a run nor a peft adapter",
            fix="pass the base model: --base PATH (forgetting(..., base=PATH))",
        )
    return found


def forgetting(
    model_or_run: str | Path | tuple[nn.Module, Any], base: str | Path | None = None, *, limit: int | None = None,
    batch_size: int = 32, facts: str | Path | None = None, heldout: str | Path | None = None,
) -> dict[str, dict[str, float]]:
    """The probe on the model and on its base, and the drop between them.

    The base is, in this order: `base` (loaded), the adapter-disabled model of a peft model (no
    second load), the `model.name_or_path` of a run directory's config.yaml. Returns
    {"model": probe, "base": probe, "drop": {"cloze_accuracy_points": 100 * (base - model),
    "heldout_perplexity_change": model - base}}."""
    model, tok = load_model_or_run(model_or_run)
    if not hasattr(model, "generate"):
        raise TunelabError("the forgetting probe needs a language model; this one has a task head instead of "
                           "its LM head", fix="evaluate head models on their task only (drop --forgetting)")
    base = base_for(model, model_or_run, base)
    kw: dict[str, Any] = {"limit": limit, "batch_size": batch_size, "facts": facts, "heldout": heldout}
    ours = run_probe(model, tok, **kw)
    if base is not None:
        key = _cache_key(str(base), "loaded", kw)
        theirs = _cached(key, lambda: run_probe(*load_model_or_run(base), **kw))
    else:
        base_path = getattr(next(iter(model.peft_config.values())), "base_model_name_or_path", None)
        inner = model.get_base_model()
        quant = getattr(inner.config, "quantization_config", None)
        variant = f"adapter-disabled {type(inner).__name__} {inner.dtype} {quant}"
        key = _cache_key(base_path, variant, kw) if base_path else None

        def on_disabled() -> dict[str, float]:
            with model.disable_adapter():
                return run_probe(model, tok, **kw)
        theirs = _cached(key, on_disabled)
    return {
        "model": ours, "base": theirs,
        "drop": {
            "cloze_accuracy_points": 100 * (theirs["probe_cloze_accuracy"] - ours["probe_cloze_accuracy"]),
            "heldout_perplexity_change": ours["probe_heldout_perplexity"] - theirs["probe_heldout_perplexity"],
        },
    }


def _cache_key(base: str, variant: str, kw: dict[str, Any]) -> str | None:
    """What the base's probe scores depend on: its weight files (name, size, mtime: a base rewritten
    in place gets a new key), how it is run, and the probe's records. None (no caching) for a base
    that is not a local folder."""
    try:
        path = Path(resolve_path(base))
    except TunelabError:
        return None
    if not path.is_dir():
        return None
    h = hashlib.sha256(f"{path.resolve()}\n{variant}\n{kw['limit']}\n".encode())
    for f in sorted(path.iterdir()):
        if f.is_file() and f.suffix in (".safetensors", ".bin", ".json", ".model"):
            st = f.stat()
            h.update(f"{f.name} {st.st_size} {st.st_mtime_ns}\n".encode())
    for records in (kw["facts"] or resolve_source("tinyworld:probe@facts"),
                    kw["heldout"] or resolve_source("tinyworld:probe@heldout")):
        h.update(hashlib.sha256(Path(records).read_bytes()).digest())
    return h.hexdigest()[:32]


def _cached(key: str | None, compute: Callable[[], dict[str, float]]) -> dict[str, float]:
    """The base's probe from `$TUNELAB_CACHE/probe/<key>.json`, else computed and stored there: a
    base is probed once, not on every `--forgetting` of every run tuned from it."""
    if key is None:
        return compute()
    file = cache_root() / "probe" / f"{key}.json"
    try:
        cached = json.loads(file.read_text(encoding="utf-8"))
        if isinstance(cached, dict) and all(isinstance(v, (int, float)) for v in cached.values()):
            return cached
    except (OSError, ValueError):
        pass
    out = compute()
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(file, json.dumps(out))
    except OSError:
        pass  # a read-only cache costs time, not correctness
    return out
