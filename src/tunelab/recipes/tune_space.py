"""The search space of `tunelab tune`: a YAML mapping of config keys to what a trial may set them to.

    train.lr: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}
    method.r: {type: int, low: 2, high: 64, log: true}
    method.alpha: {choices: [8, 16, 32]}
    method.target_modules: {choices: [[q_proj, v_proj], all-linear]}
    method.dropout: [0.0, 0.05, 0.1]          # a plain list is a list of choices

The whole space is checked before any trial: each key is set to each of its bounds (or choices) on
the base config, which must still build (so an unknown key gets the config's own "did you mean"),
and every problem is one line. Optuna stores categorical values only as None/bool/int/float/str, so
a choice that is a list or a mapping is stored as its YAML text (`[q_proj, v_proj]`) and turned back
into the value for the trial's config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml

from tunelab.config import SHIPPED_CONFIGS, deep_merge, did_you_mean, read_yaml
from tunelab.errors import ConfigError
from tunelab.runconfig import build_config

SPEC_KEYS = ("type", "low", "high", "log", "step", "choices")
TYPES = ("float", "int", "categorical")
# Set by tune itself for every trial: a space may not choose them.
RESERVED = {"output.dir": "each trial's folder is set by tune (--out)"}


@dataclass(frozen=True)
class Param:
    """One searched config key. `choices` holds config values; `labels` what optuna stores for them."""

    key: str
    kind: str  # float | int | categorical
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    labels: tuple[Any, ...] = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        """The trial's value for this key, as a config value."""
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return self.value(trial.suggest_categorical(self.key, self.labels))

    def value(self, stored: Any) -> Any:
        """The config value of what optuna stored (a categorical label back to its choice)."""
        return self.choices[self.labels.index(stored)] if self.kind == "categorical" else stored

    def stored(self, value: Any) -> Any | None:
        """What optuna would store for a config value, None where the space cannot hold it."""
        if self.kind == "categorical":
            return next((lab for lab, c in zip(self.labels, self.choices, strict=True) if _same(c, value)), None)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.low <= value <= self.high:
            return None
        if self.kind == "int" and not float(value).is_integer():
            return None
        if self.step and not math.isclose((value - self.low) / self.step % 1, 0, abs_tol=1e-9):
            return None  # off the grid: optuna would sample another value
        return int(value) if self.kind == "int" else float(value)

    def samples(self) -> list[Any]:
        """The values a check of the space sets the key to."""
        if self.kind == "categorical":
            return list(self.choices)
        cast = int if self.kind == "int" else float
        return [cast(self.low), cast(self.high)]

    def describe(self) -> str:
        if self.kind == "categorical":
            return "one of " + ", ".join(str(lab) for lab in self.labels)
        return f"{self.kind} in [{self.low:g}, {self.high:g}]" + (" (log)" if self.log else "") + \
            (f" step {self.step:g}" if self.step else "")


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b or (isinstance(a, (int, float)) and not isinstance(a, bool)
                                               and isinstance(b, (int, float)) and not isinstance(b, bool) and a == b)


def label(choice: Any) -> Any:
    """What optuna stores for a choice: the choice itself when optuna can, else its YAML text."""
    if choice is None or isinstance(choice, (bool, int, float, str)):
        return choice
    return yaml.safe_dump(choice, default_flow_style=True, width=10**6).strip()


def nested(key: str, value: Any) -> dict[str, Any]:
    """`method.r`, 8 -> {"method": {"r": 8}}."""
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def with_params(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """The base config (a dict) with each dotted key set."""
    out = base
    for key, v in values.items():
        out = deep_merge(out, nested(key, v))
    return out


SHIPPED_SPACES = SHIPPED_CONFIGS / "spaces"


def space_path(path: str | Path) -> Path:
    """A space file: `path` itself when it exists, else a shipped space of that name (`tune-lora`)."""
    p = Path(path)
    if p.exists() or p.parent != Path("."):
        return p
    shipped = SHIPPED_SPACES / (p.name if p.suffix in (".yaml", ".yml") else f"{p.name}.yaml")
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(s.stem for s in SHIPPED_SPACES.glob("*.yaml")))
    raise ConfigError(f"{p}: no such space file, and no shipped space of that name",
                      fix=f"pass the path of a space YAML (docs/tune.md), or a shipped space: {names}")


def load_space(space: str | Path | dict[str, Any], base: dict[str, Any]) -> dict[str, Param]:
    """The space (a file, a shipped space's name or a dict), checked against the base config (a
    resolved config's dict); every problem is one line of one ConfigError."""
    if not isinstance(space, dict):
        space = space_path(space)
    where = str(space) if not isinstance(space, dict) else "<space>"
    raw = read_yaml(space) if not isinstance(space, dict) else space
    if not raw:
        raise ConfigError(f"{where}: the search space is empty", fix="map config keys to ranges, e.g. "
                          "train.lr: {type: float, low: 1.0e-5, high: 1.0e-2, log: true} (docs/tune.md)")
    problems: list[str] = []
    params: dict[str, Param] = {}
    for key, spec in raw.items():
        try:
            params[str(key)] = parse_param(str(key), spec)
        except ConfigError as e:
            problems.append(f"{where}: {e.message}")
    problems += _overlaps(list(params), where)
    for p in params.values():
        problems += [line for line in _check_on_base(p, base, where) if line not in problems]
    if problems:
        raise ConfigError("\n".join(problems), fix="see docs/tune.md for the space format")
    return params


def parse_param(key: str, spec: Any) -> Param:
    if key in RESERVED:
        raise ConfigError(f"{key}: cannot be searched ({RESERVED[key]})")
    if len(key.split(".")) < 2 or any(not p for p in key.split(".")):
        raise ConfigError(f"{key}: not a config key; write section.key, e.g. train.lr or method.r")
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"{key}: expected {{type: float|int, low, high}} or {{choices: [...]}}, got {spec!r}")
    for k in spec:
        if k not in SPEC_KEYS:
            raise ConfigError(f"{key}: unknown setting {k!r}{did_you_mean(k, SPEC_KEYS)}; allowed: "
                              + ", ".join(SPEC_KEYS))
    kind = spec.get("type", "categorical" if "choices" in spec else None)
    if kind not in TYPES:
        raise ConfigError(f"{key}: type must be one of {', '.join(TYPES)}" + (f", got {kind!r}" if kind else
                          " (or give choices)") + did_you_mean(kind, TYPES))
    return _categorical(key, spec) if kind == "categorical" else _numeric(key, kind, spec)


def _categorical(key: str, spec: dict[str, Any]) -> Param:
    extra = sorted(set(spec) - {"type", "choices"})
    if extra:
        raise ConfigError(f"{key}: {', '.join(extra)} do not apply to choices")
    choices = spec.get("choices")
    if not isinstance(choices, list) or not choices:
        raise ConfigError(f"{key}: choices must be a non-empty list")
    labels = tuple(label(c) for c in choices)
    if len(set(map(repr, labels))) < len(labels):
        raise ConfigError(f"{key}: a choice is listed twice")
    return Param(key, "categorical", choices=tuple(choices), labels=labels)


def _numeric(key: str, kind: str, spec: dict[str, Any]) -> Param:
    if "choices" in spec:
        raise ConfigError(f"{key}: choices do not go with type {kind} (drop type, or use low/high)")
    missing = [k for k in ("low", "high") if k not in spec]
    if missing:
        raise ConfigError(f"{key}: type {kind} needs {' and '.join(missing)}")
    low, high, step = (_number(spec.get(k)) for k in ("low", "high", "step"))
    log = spec.get("log", False)
    ok = int if kind == "int" else (int, float)
    for name, v in (("low", low), ("high", high), ("step", step)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, ok) or not math.isfinite(v)):
            raise ConfigError(f"{key}: {name} must be {'an integer' if kind == 'int' else 'a finite number'}, "
                              f"got {v!r}")
    if not isinstance(log, bool):
        raise ConfigError(f"{key}: log must be true or false, got {log!r}")
    if low >= high:
        raise ConfigError(f"{key}: low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise ConfigError(f"{key}: a log range needs low > 0, got {low}")
    if step is not None and (step <= 0 or log):
        raise ConfigError(f"{key}: step must be > 0 and cannot go with log")
    if step is not None and kind == "float" and not math.isclose(((high - low) / step) % 1, 0, abs_tol=1e-9):
        raise ConfigError(f"{key}: high - low must be a multiple of step")
    return Param(key, kind, low=low, high=high, log=log, step=step)


def _number(v: Any) -> Any:
    """YAML reads `1e-5` (no dot) as a string: take it as the number it means."""
    if isinstance(v, str):
        try:
            f = float(v)
        except ValueError:
            return v
        return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f
    return v


def _overlaps(keys: list[str], where: str) -> list[str]:
    return [f"{where}: {a} and {b}: one key holds the other; search one of them"
            for a in keys for b in keys if b.startswith(a + ".")]


def _check_on_base(p: Param, base: dict[str, Any], where: str) -> list[str]:
    """Each sample value set on the base config, alone: the lines of what does not build."""
    lines: list[str] = []
    for v in p.samples():
        try:
            build_config(with_params(base, {p.key: v}), where)
        except ConfigError as e:
            shown = yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("\n...")
            lines += [f"{line} (as {p.key}={shown})" for line in e.message.splitlines()
                      if f"{line} (as {p.key}={shown})" not in lines]
            if any("unknown key" in line for line in e.message.splitlines()):
                break  # the other values would say the same
    return lines
