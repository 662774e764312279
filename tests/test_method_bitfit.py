"""M05 BitFit: exactly the biases train, added zero biases change nothing, a step moves only biases."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests import tiny
from tunelab.methods import METHODS, count_parameters
from tunelab.runconfig import build_config

LLAMA_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
LLAMA_MLP = ["gate_proj", "up_proj", "down_proj"]


def _bitfit(model, **kw):
    return METHODS["bitfit"].apply(model, build_config({"method": {"name": "bitfit", **kw}}).method)


def _base(arch: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny.config(arch, 400)).eval()


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_llama_trainable_set_is_every_linear_bias():
    want = {f"model.layers.{i}.self_attn.{p}.bias" for i in range(2) for p in LLAMA_ATTN}
    want |= {f"model.layers.{i}.mlp.{p}.bias" for i in range(2) for p in LLAMA_MLP}
    assert trainable(_bitfit(_base("llama"))) == want
    # per layer: q 32, k 16, v 16 (2 kv heads of 8), o 32, gate 64, up 64, down 32
    assert count_parameters(_bitfit(_base("llama")))[0] == 2 * (32 + 16 + 16 + 32 + 64 + 64 + 32)


def test_attention_targets_only_add_attention_biases():
    want = {f"model.layers.{i}.self_attn.{p}.bias" for i in range(2) for p in LLAMA_ATTN}
    model = _bitfit(_base("llama"), targets="attention")
    assert trainable(model) == want
    assert model.model.layers[0].mlp.up_proj.bias is None


def test_qwen2_keeps_its_own_biases_and_gets_the_missing_ones():
    base = _base("qwen2")
    own = {n for n, _ in base.named_parameters() if n.endswith(".bias")}
    assert own == {f"model.layers.{i}.self_attn.{p}.bias" for i in range(2) for p in ("q_proj", "k_proj", "v_proj")}
    saved = {n: p.detach().clone() for n, p in base.named_parameters() if n in own}
    model = _bitfit(base)
    want = {f"model.layers.{i}.self_attn.{p}.bias" for i in range(2) for p in LLAMA_ATTN}
    want |= {f"model.layers.{i}.mlp.{p}.bias" for i in range(2) for p in LLAMA_MLP}
    assert trainable(model) == want
    params = dict(model.named_parameters())
    for n, t in saved.items():
        assert torch.equal(params[n], t), f"{n}: an existing bias was reset"


@pytest.mark.parametrize("norm_bias", [True, False])
def test_gpt2_trains_its_biases_and_optionally_layernorm_biases(norm_bias):
    base = _base("gpt2")
    want = {n for n, _ in base.named_parameters() if n.endswith(".bias")}
    if not norm_bias:
        want = {n for n in want if ".ln_" not in n}
    assert any(".ln_" in n for n in want) == norm_bias
    assert trainable(_bitfit(base, train_norm_bias=norm_bias)) == want


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_zero_init_biases_leave_logits_unchanged(arch):
    base = _base(arch)
    ids = torch.randint(3, 400, (2, 12))
    with torch.no_grad():
        before = base(input_ids=ids).logits
        model = _bitfit(base)
        after = model(input_ids=ids).logits
    assert torch.equal(after, before)
    assert trainable(model), arch


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_one_optimizer_step_changes_only_biases(arch):
    model = _bitfit(_base(arch)).train()
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 400, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    changed = {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}
    biases = trainable(model)
    assert changed and changed <= biases, changed - biases
    assert len(changed) >= len(biases) // 2  # most biases actually moved (AdamW moves any nonzero grad)


