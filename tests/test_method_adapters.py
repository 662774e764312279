"""M09 bottleneck adapters: the written-out formula, identity at init, placement, parameter count."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests import tiny
from tunelab.methods import METHODS, count_parameters
from tunelab.methods.adapters import Bottleneck, adapter_sites
from tunelab.runconfig import build_config

NAIVE_ACT = {
    "relu": lambda z: torch.where(z > 0, z, torch.zeros_like(z)),
    "gelu": lambda z: 0.5 * z * (1 + torch.erf(z / math.sqrt(2))),
    "silu": lambda z: z / (1 + torch.exp(-z)),
}


def _adapters(model, **kw):
    return METHODS["adapters"].apply(model, build_config({"method": {"name": "adapters", **kw}}).method)


def _base(arch: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny.config(arch, 400)).eval()


def naive(h, ad: Bottleneck, act: str):
    z = h @ ad.down.weight.T + ad.down.bias  # (B, T, m)
    return h + NAIVE_ACT[act](z) @ ad.up.weight.T + ad.up.bias  # (B, T, d)


def randomise_up(model) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Bottleneck):
                m.up.weight.normal_(std=0.2)
                m.up.bias.normal_(std=0.2)


@pytest.mark.parametrize("act", ["relu", "gelu", "silu"])
def test_bottleneck_matches_written_out_formula(act):
    torch.manual_seed(0)
    ad = Bottleneck(32, 4, act, torch.empty(0))
    h = torch.randn(2, 5, 32)
    torch.testing.assert_close(ad(h), h, atol=0, rtol=0)  # up is zero: identity
    with torch.no_grad():
        ad.up.weight.normal_()
        ad.up.bias.normal_()
    torch.testing.assert_close(ad(h), naive(h, ad, act), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_identity_at_init(arch):
    base = _base(arch)
    ids = torch.randint(3, 400, (2, 12))
    with torch.no_grad():
        before = base(input_ids=ids).logits
        for placement in ("houlsby", "pfeiffer"):
            after = _adapters(copy.deepcopy(base), placement=placement)(input_ids=ids).logits
            assert torch.equal(after, before), placement


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_sites_output_the_formula_applied_to_their_own_output(arch):
    """With non-zero up weights, each host's output = raw + up(act(down(raw))) of its raw output."""
    model = _adapters(_base(arch), nonlinearity="gelu")
    randomise_up(model)
    raw, final = {}, {}

    def keep(into: dict):
        return lambda m, args, out: into.__setitem__(m, out[0] if isinstance(out, tuple) else out)

    for site in adapter_sites(model, "houlsby"):
        site.register_forward_hook(keep(raw), prepend=True)  # runs before the adapter's hook
        site.register_forward_hook(keep(final))
    with torch.no_grad():
        model(input_ids=torch.randint(3, 400, (2, 12)))
        for site in adapter_sites(model, "houlsby"):
            want = naive(raw[site], site.tunelab_adapter, "gelu")
            torch.testing.assert_close(final[site], want, atol=1e-5, rtol=1e-5)
            assert not torch.allclose(final[site], raw[site])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_houlsby_places_two_per_block_pfeiffer_one(arch):
    hosts = {"llama": ("self_attn", "mlp"), "gpt2": ("attn", "mlp"), "gpt_neox": ("attention", "mlp")}[arch]
    prefix = {"llama": "model.layers", "gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}[arch]
    for placement, want_hosts in (("houlsby", hosts), ("pfeiffer", hosts[1:])):
        model = _adapters(_base(arch), placement=placement)
        found = {n.removesuffix(".tunelab_adapter") for n, m in model.named_modules() if isinstance(m, Bottleneck)}
        assert found == {f"{prefix}.{i}.{h}" for i in range(2) for h in want_hosts}
        d, m = 32, 32 // 16
        assert count_parameters(model)[0] == 2 * len(want_hosts) * (2 * d * m + m + d)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(".tunelab_adapter." in n for n in trainable)


