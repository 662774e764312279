"""A compare spec: a base config, variants x tasks x seeds, and how each cell is scored.

```yaml
base: sft-lora                 # a config file or shipped name (every variant starts from it)
budget: {train.max_steps: 100} # overrides every trained cell gets (the stated budget)
seeds: [0, 1, 2]
tasks:
  - name: qa
    overrides: {data.train: "tinyworld:qa", data.eval: "tinyworld:qa@validation"}
    eval: tinyworld:qa@test    # a tinyworld task or an eval file (tunelab eval --task)
    metric: exact_match        # default: the task's first metric
    forgetting: true           # also the forgetting probe
    train_examples: 100        # optional: the first N records of data.train (seeded shuffle)
variants:
  - {name: zero-shot, train: false}
  - {name: icl-8, train: false, overrides: {icl.k: 8, icl.select: similar}}   # shots, no training
  - {name: lora, overrides: {method.name: lora, train.lr: 1e-3}}
  - {name: full, config: sft-full, tasks: [qa]}
```

An untrained variant is one cell (it is deterministic), unless in-context learning draws its shots
(`icl.select` random or fixed, or `icl.order` random): then one per seed, the seed drawing them.
The first untrained variant is the base the others are tested against.
Overrides are `{dotted.key: value}` maps (or `["key=value", ...]` lists, as on the command line).
Every cell's config is built before anything runs: a cell whose config is invalid is reported
with its one-line reason and the rest go on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from tunelab.config import Section, config_path, deep_merge, explain, parse_overrides, read_yaml
from tunelab.errors import ConfigError, TunelabError
from tunelab.runconfig import build_config

Overrides = dict[str, Any] | list[str]


def nest(overrides: Overrides) -> dict[str, Any]:
    """`{"train.lr": 1e-3}` or `["train.lr=1e-3"]` -> `{"train": {"lr": 1e-3}}`."""
    if isinstance(overrides, list):
        return parse_overrides([str(x) for x in overrides])
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        node = out
        *parents, leaf = str(key).split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with another override of {p!r}")
        node[leaf] = deep_merge(node[leaf], value) if isinstance(value, dict) and isinstance(
            node.get(leaf), dict) else value
    return out


class TaskSpec(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.@:-]+$")
    overrides: dict[str, Any] | list[str] = Field(default_factory=dict)
    eval: str = Field(description="what scores a cell: a tinyworld task (tinyworld:qa@test) or an eval file")
    metric: str | None = Field(None, description="the metric compared (default: the task's first)")
    forgetting: bool = False
    train_examples: int | None = Field(None, gt=0, description="train on the first N records (seeded shuffle)")
    limit: int | None = Field(None, gt=0, description="evaluate the first N records")


class VariantSpec(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$")
    config: str | None = Field(None, description="start from this config instead of the spec's base")
    overrides: dict[str, Any] | list[str] = Field(default_factory=dict)
    train: bool = Field(True, description="false: evaluate the base model as it is (zero-shot)")
    tasks: list[str] | None = Field(None, description="only these tasks (default: all)")


class CompareSpec(Section):
    base: str | None = Field(None, description="the config every variant starts from")
    budget: dict[str, Any] | list[str] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    tasks: list[TaskSpec] = Field(min_length=1)
    variants: list[VariantSpec] = Field(min_length=1)

    @field_validator("tasks", "variants")
    @classmethod
    def _unique(cls, items: list[Any]) -> list[Any]:
        names = [x.name for x in items]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"names must be unique; repeated: {', '.join(dupes)}")
        return items


@dataclass(frozen=True)
class Cell:
    """One (variant, task, seed): its config (None when invalid, with `error`)."""

    variant: str
    task: str
    seed: int
    config: dict[str, Any] | None
    train: bool
    scoring: dict[str, Any]  # the task's eval, metric, forgetting, limit
    error: str | None = None

    @property
    def key(self) -> str:
        return f"{self.variant}/{self.task}/seed-{self.seed}"


def load_spec(path: str | Path) -> tuple[CompareSpec, Path]:
    """The spec and the folder its relative paths are read from."""
    file = config_path(path)
    raw = read_yaml(file)
    try:
        return CompareSpec.model_validate(raw), file.parent
    except ValidationError as e:
        raise ConfigError("\n".join(f"{file}: {line}" for line in explain(e, CompareSpec).splitlines())) from None


def spec_digest(spec: CompareSpec) -> str:
    """Names the compare in its database: same spec, same cells."""
    return hashlib.sha256(json.dumps(spec.model_dump(), sort_keys=True).encode()).hexdigest()[:16]


def _read_config(name: str | None, root: Path) -> dict[str, Any]:
    if name is None:
        return {}
    local = root / name
    return read_yaml(config_path(local if local.is_file() else name))


def cells(spec: CompareSpec, root: Path, data_for: Any) -> list[Cell]:
    """Every cell, its config built and validated (an invalid one carries its reason).
    `data_for(task) -> overrides` supplies the subset files of `train_examples` tasks."""
    base = _read_config(spec.base, root)
    budget = nest(spec.budget)
    out = []
    for variant in spec.variants:
        unknown = sorted(set(variant.tasks or []) - {t.name for t in spec.tasks})
        for task in spec.tasks:
            if variant.tasks is not None and task.name not in variant.tasks:
                continue
            first = _cell(variant, task, spec.seeds[0], base, budget, root, data_for, unknown)
            out.append(first)
            # An untrained cell is deterministic (one seed) unless in-context learning draws its shots.
            if variant.train or _draws_shots(first.config):
                out += [_cell(variant, task, seed, base, budget, root, data_for, unknown) for seed in spec.seeds[1:]]
    return out


def _draws_shots(config: dict[str, Any] | None) -> bool:
    icl = (config or {}).get("icl") or {}
    return bool(icl.get("k")) and (icl.get("select") != "similar" or icl.get("order") == "random")


def _cell(variant: VariantSpec, task: TaskSpec, seed: int, base: dict[str, Any], budget: dict[str, Any],
          root: Path, data_for: Any, unknown: list[str]) -> Cell:
    where = f"variant {variant.name}, task {task.name}"
    scoring = task.model_dump(include={"name", "eval", "metric", "forgetting", "limit"})
    try:
        if unknown:
            raise ConfigError(f"unknown task(s) {', '.join(unknown)} in variant {variant.name}'s tasks")
        raw = _read_config(variant.config, root) if variant.config else base
        for extra in (budget if variant.train else {}, nest(task.overrides), data_for(task), nest(variant.overrides),
                      {"train": {"seed": seed}, "icl": {"seed": seed}}):
            raw = deep_merge(raw, extra)
        cfg = build_config(raw, where).to_dict()
    except TunelabError as e:
        return Cell(variant.name, task.name, seed, None, variant.train, scoring, error=" ".join(str(e).split())[:400])
    return Cell(variant.name, task.name, seed, cfg, variant.train, scoring)
