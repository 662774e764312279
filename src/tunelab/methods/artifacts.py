"""A method's final artifact on disk, and loading it back.

- peft methods: a plain peft adapter dir (`peft.PeftModel.from_pretrained` loads it);
- full fine-tuning: a plain transformers model dir;
- our own methods ("delta"): `tunelab_method.json` (the method config and the base model) plus
  `method.safetensors` (the method's state: trainable tensors and `tunelab_` buffers). Loading
  rebuilds the base, applies the method and puts the state back, checking every name.

Everything is safetensors + JSON; the tokenizer is saved beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab.config import ModelConfig
from tunelab.methods.registry import METHODS
from tunelab.owned import staging, swap

METHOD_FILE = "tunelab_method.json"
STATE_FILE = "method.safetensors"


def save_artifact(model: nn.Module, tokenizer: Any, method_cfg: Any, base: ModelConfig, out: Path) -> None:
    """Write atomically: `<out>.tmp-save` renamed into place (owned.swap). `out` is a folder of
    tunelab's own (a run's `final`), so a previous artifact there is replaced."""
    spec = METHODS[method_cfg.name]
    tmp = staging(out, tag="save")
    if isinstance(model, PeftModel) or spec.artifact in ("peft", "full"):
        model.save_pretrained(str(tmp), safe_serialization=True)
    else:
        save_file(spec.state(model), str(tmp / STATE_FILE))
        meta = {"method": method_cfg.model_dump(mode="json"), "base_model": base.model_dump(mode="json")}
        (tmp / METHOD_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    tokenizer.save_pretrained(str(tmp))
    swap(tmp, out, tag="save")


def is_delta(path: Path) -> bool:
    return (path / METHOD_FILE).is_file()


def load_delta_config(path: Path) -> Any:
    from tunelab.config import _method_config  # the registry-aware validator

    return _method_config(json.loads((path / METHOD_FILE).read_text(encoding="utf-8"))["method"])


def load_delta(path: Path, training: bool = False) -> nn.Module:
    """Base model + the method applied + its saved state."""
    from tunelab.models import load_model
    from tunelab.training.state import load_trainable

    meta = json.loads((path / METHOD_FILE).read_text(encoding="utf-8"))
    cfg = load_delta_config(path)
    model = METHODS[cfg.name].apply(load_model(ModelConfig(**meta["base_model"]), training=training), cfg)
    load_trainable(model, load_file(str(path / STATE_FILE)))
    return model


def merge(model: nn.Module, method_name: str, method_cfg: Any) -> nn.Module:
    return METHODS[method_name].merge(model, method_cfg)
