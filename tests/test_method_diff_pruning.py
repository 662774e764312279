"""M07 Diff pruning: hard-concrete gates (sampled and deterministic) and the expected-L0 penalty
against the formulas written out here; train + projection changes exactly the recorded number of
weights; train -> load round trip; meta-device build."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

import tunelab
from tests import tiny
from tests.test_train_loop import run_cfg
from tunelab.errors import ConfigError
from tunelab.methods import METHODS
from tunelab.runconfig import build_config

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1
EPS = 1e-6  # the method clamps u to [EPS, 1 - EPS]


def _apply(model, **kw):
    cfg = build_config({"method": {"name": "diff_pruning", **kw}}).method
    return METHODS["diff_pruning"].apply(model, cfg), cfg


def _randomise(model, seed: int = 0) -> None:
    """Nonzero w and spread-out log_alpha (log_alpha = alpha_lr_scale * log_alpha_p), so gates vary."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".w"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif n.endswith("log_alpha_p"):
                p.copy_(3.0 * torch.randn(p.shape, generator=g) / 100.0)


def _layer():
    torch.manual_seed(0)
    model, cfg = _apply(AutoModelForCausalLM.from_config(tiny.config("llama", 400)))
    _randomise(model)
    layer = model.model.layers[0].self_attn.q_proj
    return model, cfg, layer, layer.parametrizations.weight[0]


def _reference(W, w, la, x, u=None):
    """x @ (W + z ⊙ w).T with z the hard-concrete gate: sampled from u, or deterministic."""
    if u is None:
        s = torch.sigmoid(la)
    else:
        s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + la) / BETA)
    z = torch.clamp(s * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)
    return x @ (W + z * w).T, z


@pytest.mark.parametrize("training", [True, False])
def test_gate_forward_and_gradients_match_the_formulas(training):
    model, _, layer, gate = _layer()
    layer.train(training)
    W = layer.parametrizations.weight.original.detach()
    x = torch.randn(3, 5, W.shape[1])
    torch.manual_seed(123)
    out = layer(x)
    torch.manual_seed(123)
    u = torch.rand(W.shape).clamp(EPS, 1 - EPS) if training else None
    w = gate.w.detach().clone().requires_grad_(True)
    la_p = gate.log_alpha_p.detach().clone().requires_grad_(True)
    ref, z = _reference(W, w, (100.0 * la_p).view(W.shape), x, u)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    assert 0 < int((z == 0).sum()) and 0 < int((z == 1).sum()) and bool(((z > 0) & (z < 1)).any())

    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (gate.w, gate.log_alpha_p), g)
    want = torch.autograd.grad(ref, (w, la_p), g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_l0_penalty_matches_the_formula():
    model, cfg, _, _ = _layer()
    cfg = cfg.model_copy(update={"lambda_l0": 0.3})
    got = METHODS["diff_pruning"].penalty(model, cfg)
    las = [100.0 * p for n, p in model.named_parameters() if n.endswith("log_alpha_p")]
    assert len(las) == 14
    n = sum(la.numel() for la in las)
    want = 0.3 * sum(torch.sigmoid(la - BETA * math.log(-GAMMA / ZETA)).sum() for la in las) / n
    torch.testing.assert_close(got, want)
    got.backward()  # the penalty trains log_alpha
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith("log_alpha_p"))


def test_identity_at_init_and_meta_build():
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny.config("gpt2", 400)).eval()  # Conv1D weights (in, out)
    ids = torch.randint(3, 400, (2, 9))
    with torch.no_grad():
        want = base(input_ids=ids).logits
        model, _ = _apply(base)
        assert all(int(p.count_nonzero()) == 0 for n, p in model.named_parameters() if n.endswith(".w"))
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, want, atol=0.0, rtol=0.0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=2048)
    with torch.device("meta"):
        meta, _ = _apply(AutoModelForCausalLM.from_config(cfg), target_modules="attention")
    assert sum(p.numel() for p in meta.parameters() if p.requires_grad) == 2 * 4 * (4 * 256 * 256)


def test_projection_needs_both_keys():
    with pytest.raises(ConfigError, match="density and project_at_step"):
        build_config({"method": {"name": "diff_pruning", "density": 0.01}})


def _cfg(llama_dir, chat_data, out, steps: int = 4) -> dict:
    # constant lr: a run stopped and resumed must match one that was not
    cfg = run_cfg(llama_dir, chat_data, out, max_steps=steps, scheduler="constant", weight_decay=0.1)
    cfg["method"] = {"name": "diff_pruning", "density": 0.01, "project_at_step": 2}  # then fixed-mask tuning
    del cfg["data"]["eval"]  # no evaluation needed: keeps the runs short
    return cfg


@pytest.fixture(scope="module")
def trained(llama_dir, chat_data, tmp_path_factory):
    """A 4-step run, projected after step 2, with the in-memory model caught by a spy on apply."""
    spec = METHODS["diff_pruning"]
    built = []
    run = tmp_path_factory.mktemp("diff_pruning") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(METHODS, "diff_pruning",
                   dataclasses.replace(spec, apply=lambda m, c: built.append(spec.apply(m, c)) or built[-1]))
        result = tunelab.train(_cfg(llama_dir, chat_data, run), quiet=True)
    assert result.status == "completed" and "penalty" in result.metrics
    return run, built[0]


def test_train_project_merge_and_load(llama_dir, trained):
    spec = METHODS["diff_pruning"]
    run, model = trained
    model.eval()
    gates = [p for n, p in model.named_parameters() if n.endswith("log_alpha_p")]
    eligible = sum(p.numel() for p in gates)
    expected = round(0.01 * eligible)
    z = torch.cat([torch.clamp(torch.sigmoid(100.0 * p) * (ZETA - GAMMA) + GAMMA, 0, 1) for p in gates])
    assert int((z == 1).sum()) == expected and int((z == 0).sum()) == eligible - expected  # pinned gates

    recorded = int(load_file(str(run / "final" / "method.safetensors"))["tunelab_changed"])
    loaded, _ = tunelab.load(run)
    ids = torch.randint(3, 400, (2, 11))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, want, atol=1e-6, rtol=1e-6)
    merged = spec.merge(loaded, None)
    base = load_file(str(llama_dir / "model.safetensors"))
    params = dict(merged.named_parameters())
    assert sorted(params) == sorted(base)
    changed = sum(int((params[n] != t).sum()) for n, t in base.items())
    assert changed == recorded == expected
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)


def test_resume_after_the_projection_is_exact(llama_dir, chat_data, trained, tmp_path):
    """Stopped after step 3 (gates pinned at step 2) and resumed to 4 equals the uninterrupted run."""
    tunelab.train(_cfg(llama_dir, chat_data, tmp_path / "b", steps=3), quiet=True)
    tunelab.train(_cfg(llama_dir, chat_data, tmp_path / "b"), quiet=True, resume=True, allow_changed=True)
    a, b = (load_file(str(r / "final" / "method.safetensors")) for r in (trained[0], tmp_path / "b"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)
