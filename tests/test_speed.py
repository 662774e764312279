"""The GPU speed switches (docs/training.md, "GPU speed switches"): each computes what the plain path
computes, within a stated tolerance, and each says in one line when this machine cannot run it.

On CPU: the varlen attention paths (flash-attention's through transformers' own dispatch with CPU
stand-ins for its two kernels; FlexAttention's forward, which runs on CPU), fused AdamW, torch.compile
of the decoder layers, and every fallback line. liger-kernel's kernels need CUDA: that test is the
one skipped without it (bench/gpu.py also runs them on a GPU).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers.modeling_flash_attention_utils as fa_utils
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama

import tunelab
from tunelab.config import ModelConfig, TrainConfig
from tunelab.data.collate import block_causal_mask, collate
from tunelab.data.types import IGNORE, Example
from tunelab.inference.logits import forward_logits, token_nll_sum
from tunelab.modeling.load import load_model
from tunelab.training import speed
from tunelab.training.optim import build_optimizer

VOCAB = 64


def tiny_llama(attn: str = "sdpa", seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=128, attn_implementation=attn)
    return LlamaForCausalLM(cfg)


def example(n: int, seed: int) -> Example:
    ids = torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return Example(ids, [IGNORE] * 2 + ids[2:])


# two packed rows of 3 and 2 documents; the second row ends in padding (a run of its own)
ROWS = [[example(9, 1), example(5, 2), example(7, 3)], [example(6, 4), example(3, 5)]]


def block_mask_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference: the packed batch through an explicit (B, 1, T, T) block-diagonal causal mask."""
    return model(input_ids=batch["input_ids"], attention_mask=block_causal_mask(batch["position_ids"], torch.float32),
                 use_cache=False).logits


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("attn", ["flash_attention_2", "flex_attention"])
def test_a_varlen_attention_this_machine_cannot_train_falls_back_to_sdpa_in_one_line(llama_dir, capfd, attn):
    if torch.cuda.is_available():
        pytest.skip("CUDA is here: the fallback this test checks does not happen")
    model = load_model(ModelConfig(name_or_path=str(llama_dir), attn_implementation=attn))
    assert model.config._attn_implementation == "sdpa"
    lines = [line for line in capfd.readouterr().err.splitlines() if attn in line]
    assert len(lines) == 1 and "using sdpa" in lines[0], lines


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None) -> torch.Tensor:
    """Attention in flash-attn's layout (B, T, H, D), grouped key/value heads repeated."""
    rep = q.shape[2] // k.shape[2]
    q, k, v = (x.transpose(1, 2) for x in (q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)))
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale).transpose(1, 2)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):  # flash-attn's signature
    return _attend(q, k, v, causal, softmax_scale)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False):
    """flash-attn's varlen kernel on CPU: (N, H, D) tokens, each sequence cu_seqlens[i]:cu_seqlens[i+1] alone."""
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        out[s:e] = _attend(q[None, s:e], k[None, s:e], v[None, s:e], causal, softmax_scale)[0]
    return out


@pytest.fixture
def cpu_flash_kernels(monkeypatch):
    """transformers' flash_attention_2 path as it is (its dispatch, its varlen detection, its cu_seqlens from the
    position ids), with flash-attn's two CUDA kernels replaced by the CPU references above."""
    process = fa_utils._lazy_define_process_function(flash_attn_varlen_func)
    kernels = ((flash_attn_func, flash_attn_varlen_func, None, None, None), (process, dict))
    monkeypatch.setattr(fa_utils, "lazy_import_flash_attention", lambda *a, **k: kernels)


def test_flash_attention_on_packed_rows_equals_the_block_mask(cpu_flash_kernels):
    """Tolerance: 1e-5 on logits and loss gradients (fp32; measured ~1e-7)."""
    model = tiny_llama()
    batch = collate(ROWS, pad_id=0, packed=True)
    ref = block_mask_logits(model, batch)
    ref_loss, _ = token_nll_sum(ref, batch["labels"])
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))
    model.config._attn_implementation = "flash_attention_2"  # what from_pretrained sets where flash-attn is there
    got = forward_logits(model, batch)  # flattened to one row: flash-attn's varlen path
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    loss, _ = token_nll_sum(got, batch["labels"])
    for g, r in zip(torch.autograd.grad(loss, list(model.parameters())), ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=0)
    # the flattening is what keeps the documents apart: as (B, T) rows flash-attn would attend across them
    with torch.no_grad():
        rows = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    assert (rows - ref).abs().max() > 1e-2


def test_flex_attention_on_packed_rows_equals_the_block_mask():
    """FlexAttention runs forward on CPU (compiled; no backward there). Tolerance: 1e-5 on logits (fp32)."""
    model = tiny_llama().eval()
    batch = collate(ROWS, pad_id=0, packed=True)
    with torch.no_grad():
        ref = block_mask_logits(model, batch)
        model.set_attn_implementation("flex_attention")
        assert model.config._attn_implementation == "flex_attention"
        torch.testing.assert_close(forward_logits(model, batch), ref, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- fused AdamW


def _train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    losses = []
    for i in range(steps):
        batch = collate([[example(12, 100 + i), example(9, 200 + i)], [example(15, 300 + i)]], 0, packed=True)
        loss, n = token_nll_sum(forward_logits(model, batch), batch["labels"])
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach() / n))
    return losses


def test_fused_adamw_steps_equal_plain_adamw():
    """10 steps of full fine-tuning, weight decay on: tolerance 1e-6 on every weight (fp32; measured 1.2e-7).
    lr 1e-3: AdamW's step is ~lr x sign(g) where g is tiny, so rounding differences show at the scale of lr
    (at lr 1e-2 the largest difference after 10 steps was 3.3e-6, in one weight of 2,048)."""
    runs = []
    for fused in (False, True):
        model = tiny_llama(seed=3)
        opt = build_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.1, fused_optimizer=fused))
        assert bool(opt.defaults["fused"]) is fused
        _train_steps(model, opt, 10)
        runs.append(model.state_dict())
    plain, fused = runs
    assert any(not torch.equal(plain[k], tiny_llama(seed=3).state_dict()[k]) for k in plain), "nothing trained"
    for k in plain:
        torch.testing.assert_close(fused[k], plain[k], atol=1e-6, rtol=0)


def test_fused_optimizer_with_a_bitsandbytes_optimizer_says_it_keeps_its_own():
    said: list[str] = []
    speed.apply_switches(tiny_llama(), TrainConfig(fused_optimizer=True), "paged_adamw_8bit", said.append)
    assert len(said) == 1 and "paged_adamw_8bit" in said[0] and "keeps its own" in said[0]


# ----------------------------------------------------------------------------- liger-kernel


def test_liger_without_cuda_or_package_falls_back_in_one_line(monkeypatch):
    assert "CUDA" in speed.liger_missing(cuda=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert "pip install liger-kernel" in speed.liger_missing(cuda=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    said: list[str] = []
    model = tiny_llama()
    before = {n: type(m) for n, m in model.named_modules()}
    assert speed.apply_liger(model, said.append) is False
    assert len(said) == 1 and said[0].startswith("note: train.liger=true needs a CUDA GPU")
    assert {n: type(m) for n, m in model.named_modules()} == before


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="liger-kernel's Triton kernels run on CUDA only")
@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel is not installed")
def test_liger_kernels_equal_plain_kernels_on_cuda(monkeypatch):
    """Logits and loss gradients of a LoRA Llama on packed rows, fp32. Tolerance: 1e-4 (liger's kernels
    order their float sums differently)."""
    from peft import LoraConfig, get_peft_model

    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):  # liger patches the module for the process
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    model = get_peft_model(tiny_llama().cuda(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    batch = {k: v.cuda() for k, v in collate(ROWS, pad_id=0, packed=True).items()}

    def logits_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        logits = forward_logits(model, batch)
        loss, _ = token_nll_sum(logits, batch["labels"])
        params = [p for p in model.parameters() if p.requires_grad]
        return logits.detach(), list(torch.autograd.grad(loss, params))

    ref, ref_grads = logits_and_grads()
    assert speed.apply_liger(model, print) is True
    got, grads = logits_and_grads()
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- torch.compile


def test_compile_without_a_compiler_falls_back_in_one_line(monkeypatch):
    from torch._inductor import config as inductor

    monkeypatch.setattr(inductor.cpp, "cxx", (None, "/no/such/c++"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    said: list[str] = []
    model = tiny_llama()
    assert speed.compile_layers(model, said.append) is False
    assert len(said) == 1 and said[0].startswith("note: train.compile=true needs a C++ compiler")
    assert all(layer._compiled_call_impl is None for layer in model.model.layers)


def _run(llama_dir: Path, data: tuple[Path, Path], out: Path, quiet: bool = True, **train) -> list[float]:
    cfg = {
        "model": {"name_or_path": str(llama_dir)},
        "data": {"train": str(data[0]), "max_length": 64, "packing": True},
        "method": {"name": "lora", "r": 4, "dropout": 0.0},
        "objective": {"name": "sft"},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "tensorboard": False, "precision": "fp32", **train},
        "output": {"dir": str(out)},
    }
    tunelab.train(cfg, quiet=quiet)
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_loop_with_fused_adamw_and_liger_on_cpu_trains_like_the_plain_loop(llama_dir, chat_data, tmp_path, capfd):
    """Through `tunelab train`: liger falls back in one line, fused AdamW runs; per-step losses within 1e-5."""
    plain = _run(llama_dir, chat_data, tmp_path / "plain")
    capfd.readouterr()
    switched = _run(llama_dir, chat_data, tmp_path / "switched", quiet=False, fused_optimizer=True, liger=True)
    if not torch.cuda.is_available():
        notes = [line for line in capfd.readouterr().err.splitlines() if "train.liger" in line]
        assert len(notes) == 1, notes
    assert len(plain) == len(switched) == 3
    torch.testing.assert_close(torch.tensor(switched), torch.tensor(plain), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_compiled_layers_train_like_eager(llama_dir, chat_data, tmp_path):
    """torch.compile (inductor; on CPU it builds C++ kernels): 3 LoRA steps on packed rows of varying width
    (a recompile with dynamic shapes), per-step losses within 1e-4 of eager, the same keys in the adapter."""
    from safetensors.torch import load_file

    eager = _run(llama_dir, chat_data, tmp_path / "eager")
    compiled = _run(llama_dir, chat_data, tmp_path / "compiled", compile=True)
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), atol=1e-4, rtol=1e-4)
    a, b = (load_file(str(tmp_path / r / "final" / "adapter_model.safetensors")) for r in ("eager", "compiled"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-3)


def test_compiled_model_state_dict_keeps_its_keys():
    model = tiny_llama()
    keys = list(model.state_dict())
    assert speed.compile_layers(model, print) is (speed.compile_missing(torch.cuda.is_available()) is None)
    assert list(model.state_dict()) == keys  # checkpoints and saved models are those of an eager run
