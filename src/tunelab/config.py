"""Config sections (pydantic, every one forbids unknown keys) and the YAML / override plumbing.

The bottom layer: it imports nothing of tunelab but errors. The whole run's config, whose
`method` and `objective` sections the registries choose, is `runconfig.RunConfig`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tunelab.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Section):
    name_or_path: str = Field("tunelab-tiny", description="local dir, hub id, or `tunelab-tiny`")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    allow_pickle: bool = Field(False, description="load .bin/.pt weights (runs pickle code: trust the source)")
    revision: str | None = None
    attn_implementation: Literal["sdpa", "eager"] | None = "sdpa"
    keep_layers: list[int] | None = Field(
        None, description="keep only these decoder layers (0-based, in order): a smaller student initialised from "
        "the model's own layers, as DistilBERT does; use with method full (the saved model has the kept layers only)")


class DataConfig(Section):
    train: str | None = Field(None, description="path: .jsonl/.json/.csv/.parquet or a saved datasets dir")
    eval: str | None = None
    format: str = Field("auto", description="auto (detected), or a registered format (data/formats/): text, "
                        "instruction, chat, preference, ranking, prompt, classification")
    max_length: int = Field(512, gt=1)
    packing: bool = False
    on_error: Literal["raise", "skip"] = "raise"
    max_bad_fraction: float = Field(0.1, ge=0.0, le=1.0)
    overlength: Literal["truncate", "drop", "raise"] = "truncate"
    chat_template: str | None = Field(
        None, description="built-in template name or a .jinja file; default: the tokenizer's own"
    )


class MethodConfig(Section):
    """Base of every method's config; subclasses live next to their method."""

    name: str


class ObjectiveConfig(Section):
    """Base of every objective's config; subclasses live next to their objective."""

    name: str


class TrainConfig(Section):
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; overrides epochs")
    epochs: float | None = Field(None, gt=0)
    batch_size: int = Field(8, gt=0, description="sequences (packed rows when packing) per micro-batch")
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(2e-4, gt=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup: int | float = Field(0, ge=0, description="steps (int) or a fraction of all steps (float < 1)")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="final lr / peak lr for cosine and linear")
    weight_decay: float = Field(0.0, ge=0.0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, description="clip threshold; null disables clipping")
    seed: int = 42
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    eval_every: int = Field(0, ge=0, description="steps between evals; 0: only at the end")
    select_best: bool = Field(
        False, description="the final model is the weights of the evaluation (every eval_every steps and at the "
        "end) with the lowest eval loss: early stopping by selection, needs data.eval")
    save_every: int = Field(0, ge=0, description="steps between checkpoints; 0: only at the end")
    keep_last: int = Field(2, ge=2)
    nonfinite: Literal["halt", "skip"] = "halt"
    max_consecutive_skips: int = Field(5, gt=0)
    log_every: int = Field(1, gt=0)
    tensorboard: bool = True

    @field_validator("warmup")
    @classmethod
    def _warmup_fraction(cls, v: int | float) -> int | float:
        if isinstance(v, float) and v >= 1:
            raise ValueError("a float warmup is a fraction of all steps and must be < 1; use an int for steps")
        return v


class OutputConfig(Section):
    dir: str = "runs/run"


# ----------------------------------------------------------------------------- loading


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["train.lr=1e-3", "method.target_modules=[q_proj,v_proj]"]` -> nested dict (values as YAML)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"bad override {item!r}", fix="write overrides as section.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {p!r}")
        node[leaf] = value
    return nested


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


SHIPPED_CONFIGS = Path(__file__).resolve().parent / "assets" / "configs"


def shipped_configs() -> list[str]:
    """Names of the configs shipped with the package (`tunelab train sft-lora` finds one by name)."""
    return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))


def config_path(path: str | Path) -> Path:
    """A config file: `path` itself when it exists, else a shipped config of that name (`sft-lora`,
    `sft-lora.yaml`); a name that is neither is an error listing the shipped ones."""
    p = Path(path)
    if p.exists() or p.parent != Path("."):
        return p
    shipped = SHIPPED_CONFIGS / (p.name if p.suffix in (".yaml", ".yml") else f"{p.name}.yaml")
    if shipped.is_file():
        return shipped
    raise ConfigError(f"{p}: no such config file, and no shipped config of that name",
                      fix="pass the path of a YAML file, or a shipped config: " + ", ".join(shipped_configs()))


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file", fix="pass the path of a YAML file, e.g. configs/sft-lora.yaml")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections (model, data, method, ...)")
    return raw


def pick_config(kind: str, value: Any, registry: dict[str, Any]) -> Any:
    """Validate one `method`/`objective` section with the config class its `name` selects."""
    names = ", ".join(sorted(registry))
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or "name" not in value:
        raise ConfigError(f"{kind}.name: missing; registered {kind}s: {names}")
    spec = registry.get(value["name"])
    if spec is None:
        raise ConfigError(f"{kind}.name: unknown {kind} {value['name']!r}; registered: {names}")
    try:
        return spec.config_cls.model_validate(value)
    except ValidationError as e:
        raise ConfigError(explain(e, spec.config_cls, prefix=kind)) from None


def explain(e: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """A pydantic error as `key: problem` lines, unknown keys with the allowed ones."""
    lines = []
    for err in e.errors():
        parts = [prefix] if prefix else []
        parts += [str(p) for p in err["loc"] if not str(p).startswith("function-")]
        loc = ".".join(parts) or "config"  # a cross-section check of the whole config has no key
        if err["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown key; allowed: {_allowed(model, err['loc'])}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
            lines.append(f"{loc}: {msg}{shown}")
    return "\n".join(lines)


def _allowed(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if ann is not None and isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return "see docs/config.md"
    return ", ".join(model.model_fields)
