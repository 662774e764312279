"""Every registered method through `tunelab train` on a tiny Llama: it trains, its final artifact
reloads with `tunelab.load` to the trained model's logits, and (where mergeable) `export --merge`
writes a plain transformers model with the same logits. One parametrized test for the registry."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tunelab
from tests.test_methods_contract import REQUIRED
from tunelab.methods import METHODS

# Head methods train on classification data with the classify objective: tests/test_method_heads.py.
LM_METHODS = sorted(n for n, s in METHODS.items() if s.family != "head")
# QLoRA trains on a 4-bit base; its adapter reloads on the float base (see test_method_qlora.py).
RELOAD_ATOL = {"qlora": 0.25}


def capture_apply(monkeypatch, name: str) -> list:
    """Models built by the method during a run (the first is the one that trains)."""
    spec, built = METHODS[name], []

    def apply(model, cfg):
        built.append(spec.apply(model, cfg))
        return built[-1]

    monkeypatch.setitem(METHODS, name, dataclasses.replace(spec, apply=apply))
    return built


@pytest.mark.parametrize("name", LM_METHODS)
def test_train_reload_and_merged_export(name, llama_dir, chat_data, tmp_path, monkeypatch):
    built = capture_apply(monkeypatch, name)
    cfg = {
        "model": {"name_or_path": str(llama_dir)},
        "data": {"train": str(chat_data[0]), "eval": str(chat_data[1]), "max_length": 64},
        "method": {"name": name, **REQUIRED.get(name, {})},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "tensorboard": False, "precision": "fp32"},
        "output": {"dir": str(tmp_path / "run")},
    }
    result = tunelab.train(cfg, quiet=True)
    trained = built[0].eval()
    loaded, _ = tunelab.load(result.run_dir)
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    # start as a chat turn does: a method that adapts special tokens (PASTA) acts from there on
    ids[:, 0] = AutoTokenizer.from_pretrained(str(llama_dir)).convert_tokens_to_ids("<|im_start|>")
    atol = RELOAD_ATOL.get(name, 1e-5)
    def logits(model):  # the input's positions (prompt-learning models prepend virtual ones)
        return model(input_ids=ids).logits[:, -ids.shape[1]:]

    with torch.no_grad():
        want = logits(trained)
        torch.testing.assert_close(logits(loaded.eval()), want, atol=atol, rtol=1e-5)
        base = AutoModelForCausalLM.from_pretrained(str(llama_dir)).eval()
        assert not torch.allclose(logits(base), want), "training changed nothing"
        if METHODS[name].mergeable:
            merged_dir = tunelab.export(result.run_dir, tmp_path / "merged", merge=True)
            merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
            torch.testing.assert_close(logits(merged), want, atol=max(atol, 1e-4), rtol=1e-4)
