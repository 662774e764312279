"""The whole run's config: the sections of config.py plus the `method` and `objective` sections,
each validated by the config class its registry registers under the section's `name`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, SerializeAsAny, ValidationError, field_validator, model_validator

from tunelab.config import (
    DataConfig,
    ICLConfig,
    MethodConfig,
    ModelConfig,
    ObjectiveConfig,
    OutputConfig,
    RAGConfig,
    Section,
    TrainConfig,
    config_path,
    deep_merge,
    explain,
    parse_overrides,
    pick_config,
    read_yaml,
)
from tunelab.errors import ConfigError
from tunelab.methods import METHODS
from tunelab.objectives import OBJECTIVES
from tunelab.owned import write_atomic


class RunConfig(Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    method: SerializeAsAny[MethodConfig] = Field(default_factory=lambda: method_config({"name": "lora"}))
    objective: SerializeAsAny[ObjectiveConfig] = Field(
        default_factory=lambda: objective_config({"name": "sft"})
    )
    train: TrainConfig = TrainConfig()
    output: OutputConfig = OutputConfig()
    icl: ICLConfig = ICLConfig()
    rag: RAGConfig = RAGConfig()

    @field_validator("method", mode="before")
    @classmethod
    def _pick_method(cls, v: Any) -> MethodConfig:
        return v if isinstance(v, MethodConfig) else method_config(v)

    @field_validator("objective", mode="before")
    @classmethod
    def _pick_objective(cls, v: Any) -> ObjectiveConfig:
        return v if isinstance(v, ObjectiveConfig) else objective_config(v)

    @model_validator(mode="after")
    def _objective_fits(self) -> RunConfig:
        self.objective.check_run(self)
        return self

    @model_validator(mode="after")
    def _mixture_fits(self) -> RunConfig:
        if not self.data.tasks():
            return self
        if self.objective.name not in MIXING_OBJECTIVES:
            raise ValueError(f"data.train: a multi-task list mixes {', '.join(MIXING_OBJECTIVES)} data; objective "
                             f"{self.objective.name} takes one source (merge its files into one)")
        if self.rag.train:
            raise ValueError("rag.train augments one training source; a multi-task list is not supported with it")
        return self

    @model_validator(mode="after")
    def _streaming_fits(self) -> RunConfig:
        if not self.data.streaming:
            return self
        if self.objective.name not in STREAMING_OBJECTIVES:
            raise ValueError(f"data.streaming trains {' and '.join(STREAMING_OBJECTIVES)} on a file read as the run "
                             f"goes; objective {self.objective.name} reads its whole data first: set "
                             "data.streaming=false")
        if self.data.tasks() or self.rag.train:
            raise ValueError("data.streaming reads one training file; a multi-task list or rag.train is not supported "
                             "with it")
        if self.train.max_steps is None:
            raise ValueError("data.streaming: a streamed file's length is not known before it is read; set "
                             "train.max_steps instead of train.epochs")
        return self

    @model_validator(mode="after")
    def _select_best_needs_eval(self) -> RunConfig:
        if self.train.select_best and self.data.eval is None and not any(t.eval for t in self.data.tasks()):
            raise ValueError("train.select_best needs evaluation data to select by: set data.eval (e.g. a "
                             "validation split), or train.select_best=false")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def digest(self, *sections: str) -> str:
        """sha256 of the named sections (all when none), for refusing a resume under a changed config."""
        d = self.to_dict()
        part = {k: d[k] for k in (sections or d)}
        return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()


MIXING_OBJECTIVES = ("lm", "sft", "distill")  # objectives whose data a multi-task list may mix
STREAMING_OBJECTIVES = ("lm", "sft")  # objectives that can train on data.streaming (no pass over the whole data)


def method_config(value: Any) -> MethodConfig:
    return pick_config("method", value, METHODS)


def objective_config(value: Any) -> ObjectiveConfig:
    return pick_config("objective", value, OBJECTIVES)


def build_config(raw: dict[str, Any], source: str = "<config>") -> RunConfig:
    raw = dict(raw)
    problems: list[str] = []
    for kind, pick in (("method", method_config), ("objective", objective_config)):
        if kind in raw:
            try:
                raw[kind] = pick(raw[kind])
            except ConfigError as e:
                problems += e.message.splitlines()
                del raw[kind]  # reported; validate the other sections with the default
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        problems += explain(e, RunConfig).splitlines()
    if problems:
        raise ConfigError("\n".join(f"{source}: {line}" for line in problems))
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    path = config_path(path) if path is not None else None
    raw = read_yaml(path) if path is not None else {}
    raw = deep_merge(raw, parse_overrides(overrides or []))
    return build_config(raw, str(path) if path is not None else "<overrides>")


def save_config(cfg: RunConfig, path: str | Path) -> None:
    write_atomic(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
