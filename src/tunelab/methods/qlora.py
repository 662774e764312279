"""M14 QLoRA (Dettmers et al., arXiv:2305.14314): LoRA on a frozen 4-bit NF4 base; peft + bitsandbytes.

The base weights are stored as 4-bit NormalFloat codes, blockwise (64 weights per block):
W_hat[b] = absmax[b] * q[code], q the 16 quantiles of N(0, 1) scaled to [-1, 1]. Double
quantisation stores the absmax constants themselves in 8 bits (blocks of 256), so the base costs
about 0.5 + 1/64 + small per-layer constants bytes per parameter (`bytes_per_param`). The forward
dequantises each block to `compute_dtype` and adds the LoRA path, h = W_hat x + (alpha / r) B A x;
only A and B train. Every linear layer except the output head is quantised; embeddings, norms
and the head stay in float (as in the paper and bitsandbytes).

`apply` gets an already-loaded float model and quantises it in place (bitsandbytes `Linear4bit`
holding `Params4bit`: the same quantisation transformers' `BitsAndBytesConfig` loading does,
and the same codes, tested). To keep peak memory at the 4-bit size, load the base with
`load_4bit` instead; `apply` then only adds LoRA. On the meta device nothing is quantised (meta
tensors hold no values): parameter counts are still right, counting the base as its float shape.

The final artifact is a plain peft LoRA adapter. `PeftModel.from_pretrained` on the float base
gives W x + (alpha / r) B A x: it differs from the trained 4-bit model by the quantisation error
W - W_hat only (tested); `merge` folds the LoRA update into the dequantised weights W_hat.

Departures: paged optimizers (`optimizer: paged_adamw_*`) need CUDA; on CPU tunelab trains with
AdamW and says so. bitsandbytes' CPU inference path repacks 4-bit weights on the first no-grad
eval forward into a layout whose matmul has no autograd (input gradients then silently vanish
when training resumes) and expands the double-quantised constants; `apply` turns that repacking
off, so eval and training share one numerically identical path.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Literal

import torch
from peft import (
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    prepare_model_for_kbit_training,
    set_peft_model_state_dict,
)
from pydantic import Field
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from transformers.pytorch_utils import Conv1D

from tunelab.config import ModelConfig
from tunelab.errors import TunelabError
from tunelab.methods import lora
from tunelab.methods.registry import register_method
from tunelab.modeling.load import check_weights_safe, resolve_path

if TYPE_CHECKING:
    import bitsandbytes

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class QLoraConfig(lora.LoraConfig):
    """LoRA's settings (r, alpha, dropout, target_modules, ...) plus the 4-bit base's."""

    name: Literal["qlora"] = "qlora"  # type: ignore[assignment]
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the 4-bit weights are dequantised to for each matmul"
    )
    double_quant: bool = Field(True, description="quantise the per-block constants too (8-bit, blocks of 256)")
    optimizer: Literal["paged_adamw_8bit", "paged_adamw_32bit", "adamw"] = Field(
        "paged_adamw_8bit", description="paged optimizers need CUDA; elsewhere AdamW is used"
    )


def _bnb() -> Any:
    """bitsandbytes is an optional extra: imported when QLoRA is used, not when tunelab is."""
    try:
        import bitsandbytes
    except ImportError:
        raise TunelabError("method qlora needs bitsandbytes", fix="pip install 'tunelab[qlora]'") from None
    return bitsandbytes


def _4bit_layers(model: nn.Module) -> list[bitsandbytes.nn.Linear4bit]:
    bnb = _bnb()
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def bnb_config(cfg: QLoraConfig) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=_DTYPES[cfg.compute_dtype],
    )


def load_4bit(model_cfg: ModelConfig, cfg: QLoraConfig) -> nn.Module:
    """Load the base straight into 4 bits (never holding the float weights), on the GPU when there is one."""
    path = resolve_path(model_cfg.name_or_path)
    check_weights_safe(path, model_cfg.allow_pickle)
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=bnb_config(cfg), device_map={"": device}, revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code, use_safetensors=None if model_cfg.allow_pickle else True,
    )


def _to_4bit(layer: nn.Module, cfg: QLoraConfig) -> bitsandbytes.nn.Linear4bit:
    bnb = _bnb()
    weight = layer.weight.data
    if isinstance(layer, Conv1D):  # GPT-2 stores (in, out)
        weight = weight.t()
    out_features, in_features = weight.shape
    q = bnb.nn.Linear4bit(
        in_features, out_features, bias=layer.bias is not None, compute_dtype=_DTYPES[cfg.compute_dtype],
        compress_statistics=cfg.double_quant, quant_type="nf4", device="meta",
    )
    # Moving a not-yet-quantised Params4bit to a real device is what quantises it.
    q.weight = bnb.nn.Params4bit(
        weight.contiguous(), requires_grad=False, compress_statistics=cfg.double_quant, quant_type="nf4", module=q,
    ).to(weight.device)
    if layer.bias is not None:
        q.bias = nn.Parameter(layer.bias.data, requires_grad=False)
    return q


def quantizable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of the layers `quantize_` stores in 4 bits: every linear layer but the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, Conv1D)) and m is not head and "score" not in n]


def quantize_(model: nn.Module, cfg: QLoraConfig) -> nn.Module:
    """Replace every linear layer but the output head by its NF4 `Linear4bit`, in place."""
    for name, layer in quantizable(model):
        model.set_submodule(name, _to_4bit(layer, cfg))
    model.is_loaded_in_4bit = True  # what transformers sets; peft picks its 4-bit LoRA layers from it
    return model


def dequantize_(model: nn.Module) -> nn.Module:
    """Replace every `Linear4bit` by a float `nn.Linear` holding W_hat, in place."""
    bnb = _bnb()
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]:
        w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()  # (out, in)
        dense = nn.Linear(w.shape[1], w.shape[0], bias=layer.bias is not None, device=w.device)
        dense.weight = nn.Parameter(w, requires_grad=False)
        if layer.bias is not None:
            dense.bias = nn.Parameter(layer.bias.data.float(), requires_grad=False)
        model.set_submodule(name, dense)
    model.is_loaded_in_4bit = False
    return model


def bytes_per_param(model: nn.Module) -> float:
    """Stored bytes of the 4-bit base weights (codes + quantisation constants, as saved) per weight."""
    layers = _4bit_layers(model)
    if not layers:
        raise ValueError("the model holds no 4-bit layer")
    stored = sum(t.numel() * t.element_size() for m in layers for k, t in m.state_dict().items() if k != "bias")
    weights = sum(m.in_features * m.out_features for m in layers)
    return stored / weights


def optimizer_name(cfg: QLoraConfig) -> str:
    """The optimizer the config asks for, as this machine can run it."""
    return cfg.optimizer if torch.cuda.is_available() else "adamw"


def merge(model: nn.Module, cfg: QLoraConfig) -> nn.Module:
    """Fold B A into the dequantised base: a float model computing what the 4-bit one did."""
    assert isinstance(model, PeftModel)
    peft_cfg, state = model.peft_config["default"], get_peft_model_state_dict(model)
    dense = get_peft_model(dequantize_(model.unload()), peft_cfg)
    set_peft_model_state_dict(dense, state)
    return dense.merge_and_unload()


@register_method(
    "qlora", QLoraConfig, family="reparameterized", backend="peft", paper="arXiv:2305.14314", mergeable=True,
    summary="LoRA on a frozen NF4 4-bit base (double quantisation); adapter loads on the float base",
    merge=merge, optimizer=optimizer_name,
)
def apply(model: nn.Module, cfg: QLoraConfig) -> nn.Module:
    if not any(p.is_meta for p in model.parameters()):  # meta tensors hold nothing to quantise
        if not getattr(model, "is_loaded_in_4bit", False):
            quantize_(model, cfg)
        for layer in _4bit_layers(model):
            layer.support_avx512bf16_for_cpu = False  # see the module docstring
        if cfg.optimizer != optimizer_name(cfg):
            print(f"qlora: paged optimizers need CUDA; using AdamW instead of {cfg.optimizer}", file=sys.stderr)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return lora.apply(model, cfg)

