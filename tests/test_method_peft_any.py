"""M18 peft pass-through: DoRA, IA3, LoKr, LoHa, VeRA, OFT train, save and reload with equal logits; unknown
keys and types are config errors. Also builds every peft-backed example config on the meta device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

import tunelab
from tests import tiny
from tests.test_train_loop import run_cfg
from tunelab import api
from tunelab.artifacts import save_artifact
from tunelab.config import ModelConfig
from tunelab.errors import ConfigError, TunelabError
from tunelab.methods import METHODS, count_parameters
from tunelab.modeling.load import resolve_path
from tunelab.recipes.build_base import load_recipe
from tunelab.runconfig import build_config, load_config

TYPES = {
    "DORA": {"r": 4, "lora_alpha": 8},
    "IA3": {},
    "LOKR": {"r": 4},
    "LOHA": {"r": 4},
    "VERA": {"r": 4},
    "OFT": {"oft_block_size": 8, "r": 0},
}
IDS = torch.randint(3, 400, (2, 9), generator=torch.Generator().manual_seed(1))


def pcfg(peft_type: str, **config):
    return build_config({"method": {"name": "peft", "peft_type": peft_type, "config": config}}).method


def logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits


@pytest.mark.parametrize("peft_type", list(TYPES))
def test_trains_saves_and_reloads(peft_type, llama_dir, tmp_path):
    cfg = pcfg(peft_type, **TYPES[peft_type])
    model = METHODS["peft"].apply(AutoModelForCausalLM.from_pretrained(str(llama_dir)), cfg)
    assert model.peft_config["default"].peft_type.value == ("LORA" if peft_type == "DORA" else peft_type)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert before and len(before) < len(list(model.parameters()))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        out = model(input_ids=IDS).logits
        torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), IDS[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    save_artifact(model, tiny.tokenizer(), cfg, ModelConfig(name_or_path=str(llama_dir)), tmp_path / "final")
    assert (tmp_path / "final" / "adapter_config.json").is_file()
    reloaded, _ = api.load(tmp_path / "final")
    torch.testing.assert_close(logits(reloaded), logits(model), atol=1e-5, rtol=1e-5)


def test_dora_is_lora_with_weight_decomposition(llama_dir):
    model = METHODS["peft"].apply(AutoModelForCausalLM.from_pretrained(str(llama_dir)), pcfg("dora", r=4))
    assert model.peft_config["default"].use_dora
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())


def test_trains_through_the_loop(llama_dir, chat_data, tmp_path):
    cfg = run_cfg(llama_dir, chat_data, tmp_path / "run", max_steps=2)
    cfg["method"] = {"name": "peft", "peft_type": "LOKR", "config": {"r": 4}}
    assert tunelab.train(cfg, quiet=True).status == "completed"
    saved = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LOKR" and saved["r"] == 4


def test_unknown_key_names_it_and_the_allowed_ones():
    with pytest.raises(ConfigError) as e:
        pcfg("IA3", target_module=["k_proj"])
    assert "config.target_module" in str(e.value) and "allowed:" in str(e.value)
    assert "target_modules" in str(e.value) and "feedforward_modules" in str(e.value)


def test_keys_tunelab_sets_are_not_allowed():
    with pytest.raises(ConfigError, match="config.task_type"):
        pcfg("LOKR", task_type="SEQ_CLS")


def test_unknown_peft_type_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown peft type 'NOPE'.*LOKR"):
        pcfg("nope")


def test_adalora_is_sent_to_its_own_method():
    with pytest.raises(ConfigError, match="method.name: adalora"):
        pcfg("ADALORA")


def test_peft_value_errors_are_config_errors():
    with pytest.raises(ConfigError, match="feedforward_modules"):
        pcfg("IA3", target_modules=["k_proj"], feedforward_modules=["down_proj"])


def test_missing_targets_for_an_unknown_architecture_fall_back_to_all_linear():
    model = METHODS["peft"].apply(AutoModelForCausalLM.from_config(tiny.config("phi3", 400)), pcfg("LOKR", r=2))
    assert set(model.peft_config["default"].target_modules) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


def test_errors_at_apply_time_are_config_errors():
    model = AutoModelForCausalLM.from_config(tiny.config("llama", 400))
    with pytest.raises(TunelabError, match="LOKR"):
        METHODS["peft"].apply(model, pcfg("LOKR", target_modules=["no_such_module"]))


# ----------------------------------------------------------------------------- example configs

CONFIGS = ["prefix", "prompt-tuning", "ptuning", "qlora", "adalora", "dora"]
ROOT = Path(__file__).resolve().parents[1]


def base_config():
    """tunelab-tiny's config; where the embedded base is not built yet, the same architecture from its recipe."""
    try:
        return AutoConfig.from_pretrained(resolve_path("tunelab-tiny"))
    except TunelabError:
        recipe = load_recipe(ROOT / "configs" / "tunelab-tiny.yaml")
        return LlamaConfig(vocab_size=recipe["vocab_size"], tie_word_embeddings=True, **recipe["architecture"])


@pytest.mark.parametrize("name", CONFIGS)
def test_example_config_builds_on_meta(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.model.name_or_path == "tunelab-tiny" and cfg.data.train == "tinyworld:qa"
    if name == "adalora":
        assert cfg.method.total_step == cfg.train.max_steps
    with torch.device("meta"):
        model = METHODS[cfg.method.name].apply(AutoModelForCausalLM.from_config(base_config()), cfg.method)
    trainable, total = count_parameters(model)
    assert 0 < trainable < total
