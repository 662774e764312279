"""M15 KronA: delta W against an explicit block-loop Kronecker product, gradients, factor shapes,
exact merge on every architecture."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from tests import tiny
from tunelab.methods import METHODS
from tunelab.methods.krona import KronaLinear, factor_pair, kron_matvec
from tunelab.runconfig import build_config


def naive_kron(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Block (i, j) of A ⊗ B is A[i, j] * B, placed by explicit loops."""
    (a1, a2), (b1, b2) = A.shape, B.shape
    delta = torch.zeros(a1 * b1, a2 * b2, dtype=A.dtype)
    for i in range(a1):
        for j in range(a2):
            delta[i * b1:(i + 1) * b1, j * b2:(j + 1) * b2] = A[i, j] * B  # (b1, b2) block
    return delta  # (out, in)


def _krona(model, **kw):
    return METHODS["krona"].apply(model, build_config({"method": {"name": "krona", **kw}}).method)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 12, 13, 16, 32, 48, 97, 100, 256, 1000, 1021, 4096, 11008, 2 * 3 * 5 * 7])
def test_factor_pair_is_the_divisor_closest_to_sqrt(n):
    a, b = factor_pair(n)
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    best = min(abs(d - math.sqrt(n)) for d in divisors)
    assert a * b == n and a <= b
    assert abs(a - math.sqrt(n)) == best
    if n in (2, 3, 7, 13, 97, 1021):  # primes: A spans 1, B the whole dimension
        assert (a, b) == (1, n)


@pytest.mark.parametrize("shapes", [((2, 3), (4, 5)), ((1, 1), (13, 7)), ((5, 1), (1, 4)), ((8, 2), (3, 16))])
def test_kron_matvec_matches_explicit_product(shapes):
    torch.manual_seed(0)
    A, B = torch.randn(*shapes[0]), torch.randn(*shapes[1])
    x = torch.randn(3, 4, A.shape[1] * B.shape[1])
    torch.testing.assert_close(kron_matvec(x, A, B), x @ naive_kron(A, B).T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("out_in", [(32, 32), (12, 35), (13, 7), (64, 24)])
def test_layer_equals_naive_weight_forward_and_gradients(kind, out_in):
    torch.manual_seed(0)
    n_out, n_in = out_in
    base = nn.Linear(n_in, n_out) if kind == "linear" else Conv1D(n_out, n_in)
    if kind == "conv1d":
        nn.init.normal_(base.bias)
    W = base.weight if kind == "linear" else base.weight.T  # (out, in)
    layer = KronaLinear(base, alpha=0.7)
    A, B = layer.krona_A, layer.krona_B
    assert A.shape == (factor_pair(n_out)[0], factor_pair(n_in)[0]) and torch.count_nonzero(B) == 0
    with torch.no_grad():
        B.normal_()
    delta = 0.7 * naive_kron(A, B)
    torch.testing.assert_close(layer.delta_weight(), delta, atol=1e-6, rtol=1e-6)

    x = torch.randn(2, 5, n_in, requires_grad=True)
    out = layer(x)
    torch.testing.assert_close(out, x @ (W + delta).T + base.bias, atol=1e-5, rtol=1e-5)

    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (A, B, x), g)
    A2, B2 = A.detach().clone().requires_grad_(True), B.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    ref = x2 @ (W.detach() + 0.7 * naive_kron(A2, B2)).T + base.bias.detach()
    want = torch.autograd.grad(ref, (A2, B2, x2), g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    assert not base.weight.requires_grad


def test_update_is_zero_at_init_and_only_factors_train():
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny.config("llama", 400)).eval()
    ids = torch.randint(3, 400, (2, 12))
    with torch.no_grad():
        before = base(input_ids=ids).logits
        model = _krona(base, target_modules=["q_proj", "down_proj"])
        assert torch.equal(model(input_ids=ids).logits, before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    want = {f"model.layers.{i}.{m}.{f}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")
            for f in ("krona_A", "krona_B")}
    assert trainable == want


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_merge_is_exact(arch):
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(tiny.config(arch, 400)).eval()
    model = _krona(copy.deepcopy(plain), alpha=2.0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, KronaLinear):
                m.krona_B.normal_(std=0.05)
    ids = torch.randint(3, 400, (2, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        merged = METHODS["krona"].merge(model, None)
        after = merged(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, KronaLinear) for m in merged.modules())
    assert merged.state_dict().keys() == plain.state_dict().keys()
    assert not torch.allclose(plain(input_ids=ids).logits, after)


