"""M14 QLoRA: NF4 codes against a naive blockwise quantiser, bytes per base weight, training on CPU through
the loop, and the artifact: a plain peft adapter on the float base, off the 4-bit model by quantisation only."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM

import tunelab
from tests import tiny
from tests.test_train_loop import run_cfg
from tunelab import api
from tunelab.artifacts import save_artifact
from tunelab.config import ModelConfig
from tunelab.methods import METHODS
from tunelab.methods.qlora import bytes_per_param, dequantize_, load_4bit, merge, quantize_
from tunelab.runconfig import build_config

bnb = pytest.importorskip("bitsandbytes")  # the `qlora` extra

# The 16 NF4 levels: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero (QLoRA, appendix E).
NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])
IDS = torch.randint(3, 400, (2, 9), generator=torch.Generator().manual_seed(1))


def qcfg(**kw):
    return build_config({"method": {"name": "qlora", "r": 4, "dropout": 0.0, **kw}}).method


def naive_nf4(w: torch.Tensor, block: int = 64) -> torch.Tensor:
    flat = w.reshape(-1, block)  # (n_blocks, 64), row-major blocks as bitsandbytes lays them out
    absmax = flat.abs().amax(dim=1, keepdim=True)
    codes = (flat / absmax).unsqueeze(-1).sub(NF4).abs().argmin(-1)  # nearest level
    return (NF4[codes] * absmax).reshape(w.shape)


def dequantized(layer: bnb.nn.Linear4bit) -> torch.Tensor:
    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def float_model(path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path))


@pytest.mark.parametrize("double", [False, True])
def test_nf4_codes_match_a_naive_blockwise_quantiser(double):
    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(128, 64))
    w = src[0].weight.detach().clone()
    layer = quantize_(src, qcfg(double_quant=double))[0]
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_state.nested is double
    got, ref = dequantized(layer), naive_nf4(w)
    if double:  # the per-block constants are 8-bit themselves: W_hat moves by under a percent of max |W|
        assert 0 < (got - ref).abs().max() <= 0.01 * w.abs().max()
    else:
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


def test_bytes_per_base_weight():
    """NF4 + double quant: 0.5 (codes) + 1/64 (8-bit block constants) + per-layer constants (code books,
    second-level scales), which a model of width 256 amortises; the tiny 32-wide test model cannot."""
    config = tiny.config("llama", 400, hidden_size=256, intermediate_size=512)
    dq = quantize_(AutoModelForCausalLM.from_config(config), qcfg())
    plain = quantize_(AutoModelForCausalLM.from_config(config), qcfg(double_quant=False))
    assert 0.5 < bytes_per_param(dq) < 0.6
    assert bytes_per_param(dq) < bytes_per_param(plain)  # fp32 constants: + 4/64


def test_same_codes_as_transformers_4bit_loading(llama_dir):
    ours = METHODS["qlora"].apply(float_model(llama_dir), qcfg())
    loaded = load_4bit(ModelConfig(name_or_path=str(llama_dir)), qcfg())
    assert loaded.is_loaded_in_4bit
    theirs = METHODS["qlora"].apply(loaded, qcfg())  # already 4-bit: only LoRA is added
    for (n, a), (_, b) in zip(ours.named_modules(), theirs.named_modules(), strict=True):
        if isinstance(a, bnb.nn.Linear4bit):
            assert torch.equal(a.weight.data, b.weight.data), n
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-6, rtol=0)


def test_eval_forward_keeps_input_gradients(llama_dir):
    """bitsandbytes' CPU inference repacking would drop the gradient through every 4-bit matmul once
    the model has run a no-grad eval forward; the gradients must not depend on that."""
    model = METHODS["qlora"].apply(float_model(llama_dir), qcfg())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)

    def grads() -> dict[str, torch.Tensor]:
        model.train()
        model(input_ids=IDS).logits.float().square().mean().backward()
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return out

    before = grads()
    logits(model)
    after = grads()
    for n, g in before.items():
        torch.testing.assert_close(after[n], g, atol=1e-6, rtol=1e-5, msg=n)


def test_trains_on_cpu_through_the_loop(llama_dir, chat_data, tmp_path, capsys):
    cfg = run_cfg(llama_dir, chat_data, tmp_path / "run", max_steps=2, eval_every=1)
    cfg["method"] = {"name": "qlora", "r": 4, "dropout": 0.0}
    result = tunelab.train(cfg, quiet=True)
    assert result.status == "completed" and result.steps == 2
    if not torch.cuda.is_available():
        assert "paged optimizers need CUDA; using AdamW" in capsys.readouterr().err
    adapter = PeftModel.from_pretrained(float_model(llama_dir), str(tmp_path / "run" / "final"))
    assert torch.isfinite(logits(adapter)).all()


def test_adapter_on_the_float_base_differs_by_quantisation_only(llama_dir, tmp_path):
    torch.manual_seed(0)
    model = METHODS["qlora"].apply(float_model(llama_dir), qcfg())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    four_bit = logits(model)
    save_artifact(model, tiny.tokenizer(), qcfg(), ModelConfig(name_or_path=str(llama_dir)), tmp_path / "final")

    # The float base with W replaced by the dequantised W_hat, plus the adapter: the 4-bit model exactly.
    twin = dequantize_(quantize_(float_model(llama_dir), qcfg()))
    base_error = (logits(float_model(llama_dir)) - logits(twin)).norm()  # W vs W_hat, no adapter
    torch.testing.assert_close(logits(PeftModel.from_pretrained(twin, str(tmp_path / "final"))), four_bit,
                               atol=1e-5, rtol=1e-5)
    # Plain peft on the untouched float base: off by the quantisation error W - W_hat only, of the size of
    # the base model's own (1.3x here: the adapter sees slightly different activations).
    on_float = logits(PeftModel.from_pretrained(float_model(llama_dir), str(tmp_path / "final")))
    adapted_error = (on_float - four_bit).norm()
    assert 0 < adapted_error <= 2 * base_error
    # api.load of the artifact is the same plain peft load.
    torch.testing.assert_close(logits(api.load(tmp_path / "final")[0]), on_float, atol=1e-6, rtol=0)


def test_merge_folds_lora_into_the_dequantised_base(llama_dir):
    model = METHODS["qlora"].apply(float_model(llama_dir), qcfg())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    want = logits(model)
    merged = merge(model, qcfg())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    torch.testing.assert_close(logits(merged), want, atol=1e-5, rtol=1e-5)


def test_counts_on_the_meta_device_equal_lora(llama_dir):
    """On meta nothing is quantised (no values), so the counts are LoRA's on the float shapes."""
    assert api.method_cost(str(llama_dir), "qlora") == api.method_cost(str(llama_dir), "lora")
