"""M05 BitFit: exactly the biases train, added zero biases change nothing, a step moves only biases."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

import tunelab
from tests import tiny
from tunelab.config import build_config
from tunelab.methods import METHODS, count_parameters

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


def capture_apply(monkeypatch, name: str) -> list:
    """Models built by the method during a run (the first is the one that trains)."""
    spec, built = METHODS[name], []

    def apply(model, cfg):
        built.append(spec.apply(model, cfg))
        return built[-1]

    monkeypatch.setitem(METHODS, name, dataclasses.replace(spec, apply=apply))
    return built


def test_train_save_reload_gives_equal_logits(llama_dir, chat_data, tmp_path, monkeypatch):
    built = capture_apply(monkeypatch, "bitfit")
    cfg = {
        "model": {"name_or_path": str(llama_dir)},
        "data": {"train": str(chat_data[0]), "eval": str(chat_data[1]), "max_length": 64},
        "method": {"name": "bitfit"},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "tensorboard": False, "precision": "fp32"},
        "output": {"dir": str(tmp_path / "run")},
    }
    result = tunelab.train(cfg, quiet=True)
    trained = built[0].eval()
    loaded, _ = tunelab.load(result.run_dir)
    ids = torch.randint(3, 300, (2, 10))
    with torch.no_grad():
        want = trained(input_ids=ids).logits
        torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, want, atol=1e-6, rtol=1e-6)
        base = AutoModelForCausalLM.from_pretrained(str(llama_dir)).eval()
        assert not torch.allclose(base(input_ids=ids).logits, want), "training changed nothing"
