"""The method registry as users see it: each method's trainable parameters on a model, from its
config alone (built on the meta device)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM

from tunelab.config import deep_merge, parse_overrides
from tunelab.errors import TunelabError
from tunelab.methods import METHODS, count_parameters
from tunelab.modeling.load import model_config
from tunelab.runconfig import build_config


def method_cost(model: str, method: str, overrides: list[str] | None = None) -> dict[str, int]:
    """Trainable and total parameters of `method` on `model`, from the model's config alone: the
    model is built on the meta device, so no weight is downloaded or allocated (a 7B config takes
    seconds). `overrides` set method keys, e.g. `method.r=4`."""
    raw = deep_merge({"model": {"name_or_path": model}, "method": {"name": method}}, parse_overrides(overrides or []))
    cfg = build_config(raw, "<command line>")
    hf_cfg = model_config(cfg.model.name_or_path, cfg.model.trust_remote_code)
    with torch.device("meta"):
        built = METHODS[cfg.method.name].apply(AutoModelForCausalLM.from_config(hf_cfg), cfg.method)
    trainable, total = count_parameters(built)
    return {"trainable": trainable, "total": total}


def methods(model: str | None = "tunelab-tiny") -> list[dict[str, Any]]:
    """The registry; with `model`, each method's trainable parameters on it at default settings."""
    rows = []
    for s in sorted(METHODS.values(), key=lambda s: s.name):
        row = {"name": s.name, "family": s.family, "backend": s.backend, "mergeable": s.mergeable,
               "paper": s.paper, "summary": s.summary}
        if model is not None:
            try:
                row["trainable"] = method_cost(model, s.name)["trainable"]
            except TunelabError:
                row["trainable"] = None
        rows.append(row)
    return rows
