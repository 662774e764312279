"""M13 LoRA: layer numerics against the written-out formula; merge equals unmerged."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests import tiny
from tunelab.methods import METHODS, count_parameters
from tunelab.runconfig import build_config


def _lora(model, **kw):
    cfg = build_config({"method": {"name": "lora", "dropout": 0.0, **kw}}).method
    return METHODS["lora"].apply(model, cfg)


def test_lora_layer_matches_naive_formula():
    torch.manual_seed(0)
    model = _lora(AutoModelForCausalLM.from_config(tiny.config("llama", 400)), r=4, alpha=8.0)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    W = layer.base_layer.weight  # (out, in)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, in), (out, r)
    assert torch.count_nonzero(B) == 0, "B must be zero at init"
    with torch.no_grad():
        B.normal_()
    x = torch.randn(3, 5, W.shape[1], requires_grad=True)
    out = layer(x)
    ref_W = W + (8.0 / 4) * B @ A
    ref = x @ ref_W.T
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    g = torch.randn_like(out)
    gA, gB, gx = torch.autograd.grad(out, (A, B, x), g)
    x2 = x.detach().clone().requires_grad_(True)
    A2, B2 = A.detach().clone().requires_grad_(True), B.detach().clone().requires_grad_(True)
    ref2 = x2 @ (W.detach() + 2.0 * B2 @ A2).T
    rA, rB, rx = torch.autograd.grad(ref2, (A2, B2, x2), g)
    for got, want in ((gA, rA), (gB, rB), (gx, rx)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert W.grad is None and not W.requires_grad


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_lora_merge_equals_unmerged(arch):
    torch.manual_seed(0)
    model = _lora(AutoModelForCausalLM.from_config(tiny.config(arch, 400)), r=4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    model.eval()
    ids = torch.randint(3, 400, (2, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        merged = model.merge_and_unload()
        after = merged(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_lora_parameter_count_closed_form():
    model = _lora(AutoModelForCausalLM.from_config(tiny.config("llama", 400)), r=4, target_modules=["q_proj", "v_proj"])
    trainable, _ = count_parameters(model)
    # per layer: q (32->32) and v (32->16 with 2 kv heads of dim 8): r*(in+out) each
    assert trainable == 2 * (4 * (32 + 32) + 4 * (32 + 16))


def test_target_modules_found_for_every_architecture():
    for arch in tiny.ARCHS:
        model = _lora(AutoModelForCausalLM.from_config(tiny.config(arch, 400)), target_modules="attention")
        assert count_parameters(model)[0] > 0, arch
