"""The GPU speed switches of the `train` section: liger-kernel's kernels and torch.compile, applied to
the model before the loop prepares it (fused AdamW is training/optim.py's, varlen attention
modeling/attention.py's).

Each computes the function the plain path computes, to float rounding (tests/test_speed.py states
the tolerances), and each falls back in one line where this machine cannot run it:
- `train.liger`: liger-kernel's Triton kernels for RMSNorm, RoPE and SwiGLU (CUDA only). Its fused
  linear + cross-entropy is not used: every tunelab objective takes the logits themselves. liger
  patches the architecture's module (its RoPE function) for the whole process: every model of that
  architecture in it runs liger's RoPE from then on (a DPO reference model, say), the same math.
- `train.compile`: `torch.compile` of each decoder layer in place (regional compilation, what
  torchtune and torchtitan do): one compiled layer serves every layer, compile time stays short, the
  state dict keeps its keys (checkpoints and artifacts are unchanged), and the packed-document mask
  is still built outside the compiled code, from the position ids of each batch.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
from torch import nn

from tunelab.config import TrainConfig
from tunelab.errors import TunelabError
from tunelab.modeling.load import decoder_layers

Say = Callable[[str], None]


def apply_switches(model: nn.Module, cfg: TrainConfig, optimizer: str, say: Say) -> None:
    """Apply `train.liger` and `train.compile` to `model` in place; one line per switch that cannot run."""
    if cfg.fused_optimizer and optimizer != "adamw":
        say(f"note: train.fused_optimizer applies to torch's AdamW; {optimizer} (bitsandbytes) keeps its own kernel")
    if cfg.liger:
        apply_liger(model, say)
    if cfg.compile:
        compile_layers(model, say)


def liger_missing(cuda: bool) -> str | None:
    """Why liger-kernel cannot run here (None: it can)."""
    if not cuda:
        return "needs a CUDA GPU (none here)"
    if importlib.util.find_spec("liger_kernel") is None:
        return "needs liger-kernel (pip install liger-kernel), which is not installed"
    return None


def apply_liger(model: nn.Module, say: Say) -> bool:
    """liger-kernel's RMSNorm, RoPE and SwiGLU in the model's layers; False (and one line) where it cannot."""
    why = liger_missing(torch.cuda.is_available())
    if why is None:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

        base = _transformers_model(model)
        kind = getattr(getattr(base, "config", None), "model_type", None)
        if kind not in MODEL_TYPE_TO_APPLY_LIGER_FN:
            why = f"has no kernels for model type {kind!r}"
    if why is not None:
        say(f"note: train.liger=true {why}: the model keeps PyTorch's kernels")
        return False
    # the logits stay: tunelab's objectives compute their losses from them (no fused linear cross-entropy)
    _apply_liger_kernel_to_instance(model=base, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    return True


def compile_missing(cuda: bool) -> str | None:
    """Why torch.compile's inductor cannot build kernels here (None: it can)."""
    if cuda:
        from torch.utils._triton import has_triton

        return None if has_triton() else "needs Triton on CUDA, which is not installed"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:  # inductor's InvalidCxxCompiler, or a torch without it
        return "needs a C++ compiler on CPU (g++, or the one $CXX names), and none was found"
    return None


def compile_layers(model: nn.Module, say: Say) -> bool:
    """Compile every decoder layer in place; False (and one line) where inductor cannot build here."""
    why = compile_missing(torch.cuda.is_available())
    if why is None:
        try:
            layers = decoder_layers(_transformers_model(model))
        except TunelabError:  # a model without a list of decoder layers
            why = "finds no decoder layers in this model"
    if why is not None:
        say(f"note: train.compile=true {why}: the model runs eagerly")
        return False
    for layer in layers:
        layer.compile()
    return True


def _transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside peft's wrapper (liger patches its modules, which LoRA layers keep)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model
