"""What training leaves on disk, and loading it back: a run dir (its `final/`), a method's artifact,
a model folder or a hub id -> (model, tokenizer).

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

from tunelab.config import ModelConfig, pick_config, read_yaml
from tunelab.errors import TunelabError
from tunelab.methods import METHODS
from tunelab.methods.registry import load_trainable
from tunelab.modeling.load import check_adapter_weights, check_weight_files, load_model, load_tokenizer, resolve_path
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
    return pick_config("method", json.loads((path / METHOD_FILE).read_text(encoding="utf-8"))["method"], METHODS)


def load_delta(path: Path, training: bool = False, trust: ModelConfig | None = None) -> nn.Module:
    """Base model + the method applied + its saved state. The artifact names its base; whether code
    or pickle may run comes from `trust` (the current command), never from the artifact's file."""
    meta = json.loads((path / METHOD_FILE).read_text(encoding="utf-8"))
    cfg = load_delta_config(path)
    base = untrusted(ModelConfig.model_validate(meta["base_model"]), trust)
    model = METHODS[cfg.name].apply(load_model(base, training=training), cfg)
    load_trainable(model, load_file(str(path / STATE_FILE)))
    return model


def merge(model: nn.Module, method_name: str, method_cfg: Any) -> nn.Module:
    return METHODS[method_name].merge(model, method_cfg)


def load(
    path: str | Path, *, allow_pickle: bool = False, trust_remote_code: bool = False, training: bool = False,
) -> tuple[nn.Module, Any]:
    """A run dir (its final model), a peft adapter dir, a model dir or a hub id -> (model, tokenizer)."""
    p = Path(path)
    trust = ModelConfig(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if (p / "config.yaml").is_file() and (p / "final").is_dir():
        model_cfg = untrusted(run_model_config(p), trust)
        final = p / "final"
        if model_cfg.keep_layers is not None and not is_delta(final) and not (final / "adapter_config.json").is_file():
            model_cfg = model_cfg.model_copy(update={"keep_layers": None})  # a saved full model has only those layers
        return _load_model_dir(final, model_cfg, training)
    if (p / "config.yaml").is_file():
        raise TunelabError(f"{p}: the run has no final model yet", fix="finish it with tunelab train RUN --resume")
    cfg = ModelConfig(name_or_path=str(path), allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    return _load_model_dir(p, cfg, training)


def untrusted(cfg: ModelConfig, trust: ModelConfig | None) -> ModelConfig:
    """`cfg` read from a file someone may have shared (a run's config.yaml, an artifact's json), with
    `trust_remote_code` and `allow_pickle` taken from the current command (`trust`), never the file."""
    grant = trust or ModelConfig()
    return cfg.model_copy(update={"trust_remote_code": grant.trust_remote_code, "allow_pickle": grant.allow_pickle})


def run_model_config(run_dir: Path) -> ModelConfig:
    """The `model` section of a run dir's config.yaml."""
    return ModelConfig.model_validate(read_yaml(run_dir / "config.yaml").get("model", {}))


def _load_model_dir(p: Path, cfg: ModelConfig, training: bool) -> tuple[nn.Module, Any]:
    check_weight_files(p)
    if is_delta(p):
        return load_delta(p, training, cfg), load_tokenizer(cfg, str(p))
    adapter = p / "adapter_config.json"
    if adapter.is_file():
        check_adapter_weights(p, cfg.allow_pickle)
        base_name = json.loads(adapter.read_text(encoding="utf-8"))["base_model_name_or_path"]
        base_cfg = cfg.model_copy(update={"name_or_path": base_name}) if cfg.name_or_path == str(p) else cfg
        base = load_model(base_cfg, training=training)
        model = PeftModel.from_pretrained(base, str(p), is_trainable=training)
        return model, load_tokenizer(base_cfg, str(p))
    path = resolve_path(str(p)) if p.exists() else resolve_path(cfg.name_or_path)
    return load_model(cfg, path, training=training), load_tokenizer(cfg, path)
