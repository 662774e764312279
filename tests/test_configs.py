"""Every YAML in configs/ loads, validates and builds its model + method on the meta device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tunelab.methods import METHODS, count_parameters
from tunelab.modeling.load import resolve_path
from tunelab.recipes.build_base import load_recipe
from tunelab.recipes.compare.spec import cells, load_spec
from tunelab.recipes.continual import read_spec
from tunelab.recipes.meta import load_meta_config
from tunelab.runconfig import build_config, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def build_on_meta(cfg) -> tuple[int, int]:
    # recipes that start from an earlier recipe's output (runs/...) are built on the base it tuned
    name = "tunelab-tiny" if cfg.model.name_or_path.startswith("runs/") else cfg.model.name_or_path
    hf_cfg = AutoConfig.from_pretrained(resolve_path(name))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg)
        model = METHODS[cfg.method.name].apply(model, cfg.method)
    return count_parameters(model)


def test_there_are_configs():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_builds(path):
    if path.name == "tunelab-tiny.yaml":  # the base-model recipe: its `run` section is a run config
        recipe = load_recipe(path)
        cfg = build_config({**recipe["run"], "data": {**recipe["run"]["data"], "train": "corpus.jsonl"}})
        assert cfg.objective.name == "lm" and cfg.method.name == "full"
        return
    if path.name.startswith("compare-"):  # a compare spec: every cell's config builds
        spec, root = load_spec(path)
        built = cells(spec, root, lambda task: {})
        assert built and [c.key for c in built if c.error] == []
        return
    if path.name.startswith("meta-"):  # a meta-learning config: a run config plus its `meta:` section
        cfg, _ = load_meta_config(path)
        trainable, total = build_on_meta(cfg)
        assert 0 < trainable <= total
        return
    if path.name.startswith("continual-"):  # a continual config: its stages, strategy and shared run config
        spec, raw = read_spec(path)
        assert len(spec.stages) >= 2
        cfg = build_config(raw)
    else:
        cfg = load_config(path)
    trainable, total = build_on_meta(cfg)
    assert 0 < trainable <= total
