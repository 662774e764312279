"""M16 DyLoRA: rank-b truncation against a naive LoRA of rank b, reproducible rank draws, eval at
any rank, exact merge, and a save -> reload round trip."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

import tunelab
from tests import tiny
from tunelab.errors import ConfigError
from tunelab.methods import METHODS
from tunelab.methods.dylora import DyLoraConfig, DyLoraLinear, RankState, rank_state, set_rank
from tunelab.runconfig import build_config


def _dylora(model, **kw):
    return METHODS["dylora"].apply(model, build_config({"method": {"name": "dylora", **kw}}).method)


def _layer(kind: str, r: int = 6, alpha: float = 12.0, update: str = "all") -> DyLoraLinear:
    torch.manual_seed(0)
    base = nn.Linear(20, 12) if kind == "linear" else Conv1D(12, 20)
    cfg = DyLoraConfig(r=r, alpha=alpha, update=update)
    layer = DyLoraLinear(base, cfg, RankState(r, r))
    assert torch.count_nonzero(layer.lora_B) == 0
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def naive_lora(x, W, bias, A, B, alpha):
    """x W^T + b + (alpha / rank) x A^T B^T with A (rank, in), B (out, rank)."""
    return x @ W.T + bias + (alpha / A.shape[0]) * (x @ A.T) @ B.T


def weight(layer: DyLoraLinear) -> torch.Tensor:
    base = layer.base_layer
    return base.weight.T if isinstance(base, Conv1D) else base.weight  # (out, in)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("b", [1, 3, 6])
def test_truncated_step_equals_naive_lora_of_rank_b(kind, b):
    layer = _layer(kind).train()
    layer.state.train_rank = b
    A, B = layer.lora_A, layer.lora_B
    x = torch.randn(2, 5, 20, requires_grad=True)
    out = layer(x)
    A2, B2 = A.detach()[:b].clone().requires_grad_(True), B.detach()[:, :b].clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    ref = naive_lora(x2, weight(layer).detach(), layer.base_layer.bias.detach(), A2, B2, 12.0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    g = torch.randn_like(out)
    gA, gB, gx = torch.autograd.grad(out, (A, B, x), g)
    rA, rB, rx = torch.autograd.grad(ref, (A2, B2, x2), g)
    torch.testing.assert_close(gA[:b], rA, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gB[:, :b], rB, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, rx, atol=1e-5, rtol=1e-5)
    assert not gA[b:].any() and not gB[:, b:].any(), "components above b must not learn"


def test_last_mode_trains_only_component_b():
    layer = _layer("linear", update="last").train()
    layer.state.train_rank = 4
    x = torch.randn(3, 20)
    full = _layer("linear").train()
    full.state.train_rank = 4
    torch.testing.assert_close(layer(x), full(x))  # same forward, different gradient
    gA, gB = torch.autograd.grad(layer(x).sum(), (layer.lora_A, layer.lora_B))
    rows = [i for i in range(6) if gA[i].any()]
    cols = [i for i in range(6) if gB[:, i].any()]
    assert rows == [3] and cols == [3]


@pytest.mark.parametrize("k", [1, 2, 5])
def test_eval_at_rank_k_equals_naive_lora_of_rank_k(k):
    layer = _layer("linear").eval()
    layer.state.eval_rank = k
    x = torch.randn(4, 20)
    before = torch.get_rng_state()
    with torch.no_grad():
        out = layer(x)
        ref = naive_lora(x, weight(layer), layer.base_layer.bias, layer.lora_A[:k], layer.lora_B[:, :k], 12.0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.get_rng_state(), before), "eval must not draw a rank"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_model_at_rank_k_equals_peft_lora_with_the_truncated_factors(arch):
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(tiny.config(arch, 400)).eval()
    targets = ["q_proj", "v_proj"] if arch == "llama" else ["c_attn"]
    model = _dylora(copy.deepcopy(plain), r=8, alpha=16.0, target_modules=targets, eval_rank=3)
    ours = {n: m for n, m in model.named_modules() if isinstance(m, DyLoraLinear)}
    with torch.no_grad():
        for m in ours.values():
            m.lora_B.normal_(std=0.1)
    peft = get_peft_model(plain, LoraConfig(r=3, lora_alpha=16.0, target_modules=targets, lora_dropout=0.0,
                                            fan_in_fan_out=arch == "gpt2")).eval()
    with torch.no_grad():
        for n, m in ours.items():
            theirs = peft.base_model.model.get_submodule(n)
            theirs.lora_A["default"].weight.copy_(m.lora_A[:3])
            theirs.lora_B["default"].weight.copy_(m.lora_B[:, :3])
        ids = torch.randint(3, 400, (2, 12))
        torch.testing.assert_close(model(input_ids=ids).logits, peft(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def draws(seed: int, steps: int, model) -> list[int]:
    torch.manual_seed(seed)
    model.train()
    state = rank_state(model)
    ranks = []
    for step in range(1, steps + 1):
        model(input_ids=torch.randint(3, 400, (1, 4)))
        ranks.append(state.train_rank)
        METHODS["dylora"].on_step(model, None, step)
    return ranks


def test_rank_draws_are_reproducible_and_on_step_consumes_no_rng():
    torch.manual_seed(0)
    model = _dylora(AutoModelForCausalLM.from_config(tiny.config("llama", 400)), r=4, target_modules=["q_proj"])
    a, b, c = draws(1, 12, model), draws(1, 12, model), draws(2, 12, model)
    assert a == b and a != c
    assert set(a) <= {1, 2, 3, 4} and len(set(a)) > 1
    before = torch.get_rng_state()
    METHODS["dylora"].on_step(model, None, 13)
    assert torch.equal(torch.get_rng_state(), before), "the draw waits for the next forward (exact resume)"
    assert rank_state(model).train_rank is None


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_merge_at_eval_rank_is_exact(arch):
    torch.manual_seed(0)
    model = _dylora(AutoModelForCausalLM.from_config(tiny.config(arch, 400)), r=4, eval_rank=2).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DyLoraLinear):
                m.lora_B.normal_(std=0.05)
    ids = torch.randint(3, 400, (2, 12))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        set_rank(model, 3)
        assert not torch.allclose(model(input_ids=ids).logits, full)
        set_rank(model, 2)
        merged = METHODS["dylora"].merge(model, None)
        torch.testing.assert_close(merged(input_ids=ids).logits, full, atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, DyLoraLinear) for m in merged.modules())


def test_eval_rank_above_r_is_a_config_error():
    with pytest.raises(ConfigError, match="eval_rank"):
        build_config({"method": {"name": "dylora", "r": 4, "eval_rank": 5}})


def test_resumed_run_draws_the_same_ranks(llama_dir, chat_data, tmp_path):
    """2 steps, stop, resume to 4 == 4 steps straight (constant lr so the step count is the only change)."""
    def cfg(out: str, steps: int) -> dict:
        return {
            "model": {"name_or_path": str(llama_dir)},
            "data": {"train": str(chat_data[0]), "max_length": 64},
            "method": {"name": "dylora", "r": 8, "dropout": 0.1},
            "train": {"max_steps": steps, "batch_size": 4, "lr": 1e-2, "tensorboard": False, "precision": "fp32",
                      "scheduler": "constant"},
            "output": {"dir": str(tmp_path / out)},
        }

    tunelab.train(cfg("straight", 4), quiet=True)
    tunelab.train(cfg("resumed", 2), quiet=True)
    tunelab.train(cfg("resumed", 4), quiet=True, resume=True, allow_changed=True)
    a = load_file(str(tmp_path / "straight" / "final" / "method.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "final" / "method.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k




def test_export_at_another_rank_merged_and_as_a_delta(llama_dir, chat_data, tmp_path, capsys):
    """`tunelab export RUN --rank k`: merged, the weights are the base's plus (alpha / k) B[:, :k] A[:k]
    (as set_rank + merge in Python); as a delta, it loads at rank k. A rank outside 1..r, or a run of
    another method, is refused in one line."""
    from tests.test_cli import cli
    from tunelab.artifacts import load

    run = tmp_path / "run"
    tunelab.train({"model": {"name_or_path": str(llama_dir)}, "data": {"train": str(chat_data[0]), "max_length": 64},
                   "method": {"name": "dylora", "r": 8, "alpha": 16},
                   "train": {"max_steps": 3, "batch_size": 4, "lr": 5e-2, "tensorboard": False, "precision": "fp32"},
                   "output": {"dir": str(run)}}, quiet=True)
    want, _ = load(run)
    set_rank(want, 3)
    want = METHODS["dylora"].merge(want, None).state_dict()
    at8, _ = load(run)
    at8 = METHODS["dylora"].merge(at8, None).state_dict()
    assert any(not torch.equal(want[k], at8[k]) for k in want)  # rank 3 is not rank 8

    assert cli(capsys, "export", str(run), "--out", str(tmp_path / "m3"), "--merge", "--rank", "3")[0] == 0
    got = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m3")).state_dict()
    for k, v in want.items():
        assert torch.allclose(got[k], v, atol=1e-6), k

    assert cli(capsys, "export", str(run), "--out", str(tmp_path / "d3"), "--rank", "3")[0] == 0
    delta, _ = load(tmp_path / "d3")
    assert rank_state(delta).eval_rank == 3 and rank_state(delta).r == 8

    code, _, err = cli(capsys, "export", str(run), "--out", str(tmp_path / "x"), "--rank", "9")
    assert code == 2 and "--rank 9: outside 1..8" in err and not (tmp_path / "x").exists()
    lora = tmp_path / "lora"
    tunelab.train({"model": {"name_or_path": str(llama_dir)}, "data": {"train": str(chat_data[0]), "max_length": 64},
                   "method": {"name": "lora", "r": 4},
                   "train": {"max_steps": 1, "batch_size": 4, "tensorboard": False, "precision": "fp32"},
                   "output": {"dir": str(lora)}}, quiet=True)
    code, _, err = cli(capsys, "export", str(lora), "--out", str(tmp_path / "y"), "--rank", "2")
    assert code == 2 and "only a DyLoRA run can be exported at another rank" in err
