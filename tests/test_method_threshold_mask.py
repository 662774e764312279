"""M08 Threshold-Mask: the mask and its straight-through gradient against the hand derivation,
identity at init, merge changes exactly the masked-out weights, train -> load round trip."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

import tunelab
from tests import tiny
from tests.test_train_loop import run_cfg
from tunelab.methods import METHODS
from tunelab.runconfig import build_config

TAU = 5e-3


def _apply(model, **kw):
    cfg = build_config({"method": {"name": "threshold_mask", **kw}}).method
    return METHODS["threshold_mask"].apply(model, cfg), cfg


def _scores_around_tau(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("scores"):
                p.copy_(TAU + 0.01 * torch.randn(p.shape, generator=g))


def _ste_case(layer, conv1d: bool):
    """Forward and d/d scores of one masked layer vs. x @ (W ⊙ m) written out, m = 1[s > tau]."""
    W = layer.parametrizations.weight.original  # Linear (out, in); Conv1D (in, out)
    scores = layer.parametrizations.weight[0].scores
    m = (scores.detach() > TAU).float().view(W.shape)  # the mask by hand
    assert 0 < int(m.sum()) < m.numel()
    x = torch.randn(3, 5, W.shape[0] if conv1d else W.shape[1])
    out = layer(x)
    W_eff = (W.detach() * m).requires_grad_(True)
    ref = x @ W_eff if conv1d else x @ W_eff.T
    if layer.bias is not None:
        ref = ref + layer.bias.detach()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)

    g = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, scores, g)
    (dW_eff,) = torch.autograd.grad(ref, W_eff, g)
    want = (dW_eff * W.detach()).reshape(-1)  # dL/ds = dL/dm = dL/dW_eff ⊙ W
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert not W.requires_grad


def test_mask_and_straight_through_gradient_match_hand_derivation():
    torch.manual_seed(0)
    model, _ = _apply(AutoModelForCausalLM.from_config(tiny.config("llama", 400)))
    _scores_around_tau(model)
    _ste_case(model.model.layers[0].self_attn.q_proj, conv1d=False)
    _ste_case(model.model.layers[1].mlp.down_proj, conv1d=False)


def test_straight_through_on_gpt2_conv1d():
    torch.manual_seed(0)
    model, _ = _apply(AutoModelForCausalLM.from_config(tiny.config("gpt2", 400)))
    _scores_around_tau(model)
    _ste_case(model.transformer.h[0].attn.c_attn, conv1d=True)


def test_only_scores_train():
    model, _ = _apply(AutoModelForCausalLM.from_config(tiny.config("llama", 400)))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.endswith("parametrizations.weight.0.scores") for n in names)
    assert len(names) == 2 * 7  # 7 linear layers per block, 2 blocks, head excluded


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_identity_at_init_and_merge_changes_exactly_the_masked_out_weights(arch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny.config(arch, 400)).eval()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(3, 400, (2, 11))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        model, cfg = _apply(model)
        torch.testing.assert_close(model(input_ids=ids).logits, want, atol=0.0, rtol=0.0)  # the mask is all ones

    _scores_around_tau(model)
    zeros = sum(int((p <= TAU).sum()) for n, p in model.named_parameters() if n.endswith("scores"))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    recorded = int(METHODS["threshold_mask"].state(model)["tunelab_changed"])
    merged = METHODS["threshold_mask"].merge(model, cfg)
    after = dict(merged.named_parameters())
    assert sorted(after) == sorted(base)
    changed = sum(int((after[n] != p).sum()) for n, p in base.items())
    assert changed == zeros == recorded > 0
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=1e-6, rtol=1e-6)


def test_builds_on_the_meta_device():
    cfg = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=2048)
    with torch.device("meta"):
        model, _ = _apply(AutoModelForCausalLM.from_config(cfg))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n == 4 * (4 * 256 * 256 + 3 * 256 * 1024)


def test_init_must_start_above_threshold():
    with pytest.raises(Exception, match="init_score"):
        build_config({"method": {"name": "threshold_mask", "init_score": 1e-3, "threshold": 5e-3}})


def test_train_then_load_gives_equal_logits(llama_dir, chat_data, tmp_path, monkeypatch):
    spec = METHODS["threshold_mask"]
    built = []
    monkeypatch.setitem(METHODS, "threshold_mask",
                        dataclasses.replace(spec, apply=lambda m, c: built.append(spec.apply(m, c)) or built[-1]))
    cfg = run_cfg(llama_dir, chat_data, tmp_path / "run", lr=1e-2)
    cfg["method"] = {"name": "threshold_mask"}
    result = tunelab.train(cfg, quiet=True)
    assert result.status == "completed"
    trained = built[0].eval()
    loaded, _ = tunelab.load(tmp_path / "run")
    ids = torch.randint(3, 400, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, trained(input_ids=ids).logits,
                                   atol=1e-6, rtol=1e-6)
    recorded = int(load_file(str(tmp_path / "run" / "final" / "method.safetensors"))["tunelab_changed"])
    base = load_file(str(llama_dir / "model.safetensors"))
    merged = dict(spec.merge(loaded, None).named_parameters())
    assert recorded == sum(int((merged[n] != t).sum()) for n, t in base.items()) > 0
