"""M02 partial fine-tuning: the trainable set equals the one written by hand, on llama and gpt2."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests import tiny
from tunelab.errors import ConfigError, TunelabError
from tunelab.methods import METHODS
from tunelab.methods.partial import decoder_layers
from tunelab.runconfig import build_config

BLOCKS = {"llama": "model.layers", "qwen2": "model.layers", "mistral": "model.layers", "gemma": "model.layers",
          "phi3": "model.layers", "gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}


def _partial(model, **kw):
    return METHODS["partial"].apply(model, build_config({"method": {"name": "partial", **kw}}).method)


def _base(arch: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny.config(arch, 400))


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def names(arch: str) -> list[str]:
    return [n for n, _ in _base(arch).named_parameters()]


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_decoder_layers_found_on_every_architecture(arch):
    model = _base(arch)
    name, blocks = decoder_layers(model)
    assert name == BLOCKS[arch] and len(blocks) == 2


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_last_k_and_layers(arch):
    prefix = BLOCKS[arch]
    last = {n for n in names(arch) if n.startswith(f"{prefix}.1.")}
    first = {n for n in names(arch) if n.startswith(f"{prefix}.0.")}
    assert last and first
    assert trainable(_partial(_base(arch), last_k=1)) == last
    assert trainable(_partial(_base(arch), last_k=2)) == last | first
    assert trainable(_partial(_base(arch), layers=[0])) == first
    assert trainable(_partial(_base(arch), layers=[-1])) == last
    assert trainable(_partial(_base(arch), layers=[0, -1])) == first | last


def test_regex_on_llama_and_gpt2():
    llama = {n for n in names("llama") if ".mlp." in n}
    assert trainable(_partial(_base("llama"), regex=r"\.mlp\.")) == llama
    gpt2 = {n for n in names("gpt2") if n.endswith("attn.c_attn.weight")}
    assert len(gpt2) == 2
    assert trainable(_partial(_base("gpt2"), regex=r"c_attn\.weight$")) == gpt2


def test_norms():
    llama = {f"model.layers.{i}.{k}.weight" for i in range(2) for k in ("input_layernorm", "post_attention_layernorm")}
    assert trainable(_partial(_base("llama"), norms=True)) == llama | {"model.norm.weight"}
    gpt2 = {f"transformer.h.{i}.{k}.{w}" for i in range(2) for k in ("ln_1", "ln_2") for w in ("weight", "bias")}
    assert trainable(_partial(_base("gpt2"), norms=True)) == gpt2 | {"transformer.ln_f.weight", "transformer.ln_f.bias"}


def test_embeddings_and_head():
    assert trainable(_partial(_base("llama"), embeddings=True)) == {"model.embed_tokens.weight"}
    assert trainable(_partial(_base("llama"), head=True)) == {"lm_head.weight"}
    assert trainable(_partial(_base("gpt2"), embeddings=True)) == {"transformer.wte.weight", "transformer.wpe.weight"}
    # GPT-2 ties the head to the token embedding: one tensor, listed under its first name
    assert trainable(_partial(_base("gpt2"), head=True)) == {"transformer.wte.weight"}


def test_selections_add_up():
    want = {n for n in names("llama") if n.startswith("model.layers.1.")} | {"model.norm.weight", "lm_head.weight"}
    assert trainable(_partial(_base("llama"), last_k=1, head=True, regex=r"^model\.norm\.")) == want


def test_bad_selections_are_user_errors():
    with pytest.raises(ConfigError, match="at least one of last_k"):
        build_config({"method": {"name": "partial"}})
    with pytest.raises(ConfigError, match="regular expression"):
        build_config({"method": {"name": "partial", "regex": "mlp("}})
    with pytest.raises(TunelabError, match="has 2 blocks"):
        _partial(_base("llama"), last_k=3)
    with pytest.raises(TunelabError, match="block 2 does not exist"):
        _partial(_base("llama"), layers=[2])
    with pytest.raises(TunelabError, match="matches no parameter"):
        _partial(_base("llama"), regex="no_such_module")


