"""Tiny random models of real architectures and small generated datasets, for offline CPU tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from tunelab.modeling.bpe import train_bpe

ARCHS = ["llama", "qwen2", "mistral", "gemma", "phi3", "gpt2", "gpt_neox"]
_COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=256, bos_token_id=1, eos_token_id=1, pad_token_id=0)

COLOURS = ["red", "blue", "green", "amber", "violet", "teal", "olive", "coral"]
THINGS = ["apple", "river", "stone", "cloud", "lamp", "chair", "road", "seed"]


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"The {rng.choice(THINGS)} is {rng.choice(COLOURS)} and the number is {rng.randint(0, 99)}."
            for _ in range(n)]


def tokenizer() -> PreTrainedTokenizerFast:
    return train_bpe(corpus() + [f"what colour is the {t}? {c}" for t in THINGS for c in COLOURS], vocab_size=400)


def config(arch: str, vocab: int, **kw):
    c = dict(_COMMON, vocab_size=vocab, **kw)
    if arch == "llama":
        return LlamaConfig(num_key_value_heads=2, **c)
    if arch == "qwen2":
        return Qwen2Config(num_key_value_heads=2, **c)
    if arch == "mistral":
        return MistralConfig(num_key_value_heads=2, sliding_window=None, **c)
    if arch == "gemma":
        return GemmaConfig(num_key_value_heads=2, head_dim=8, **c)
    if arch == "phi3":
        return Phi3Config(num_key_value_heads=2, **c)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, vocab_size=vocab,
                          bos_token_id=1, eos_token_id=1)
    if arch == "gpt_neox":
        return GPTNeoXConfig(**c)
    raise ValueError(arch)


def save_model(out: Path, arch: str = "llama", seed: int = 0) -> Path:
    """A tiny random model + tokenizer saved with save_pretrained (safetensors)."""
    tok = tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(arch, len(tok)))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def chat_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        t, c = rng.choice(THINGS), rng.choice(COLOURS)
        reply = " ".join([c] * rng.randint(1, 12))  # skewed lengths
        out.append({"messages": [{"role": "user", "content": f"what colour is the {t}?"},
                                 {"role": "assistant", "content": reply}]})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def quiet(_: str) -> None:
    """A `say` that prints nothing (runtimes' progress lines in tests)."""


def lora_adapters(llama_dir: Path, root: Path, names: tuple[str, ...] = ("a", "b")) -> dict[str, str]:
    """LoRA adapters with random B over the tiny Llama at `llama_dir`, saved as tunelab saves them (with the
    tokenizer, the base's path in adapter_config.json): each answers its own way (serve and ui tests)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    out = {}
    for i, name in enumerate(names):
        torch.manual_seed(100 + i)
        base = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                                init_lora_weights=False))
        path = root / f"adapter-{name}"
        model.save_pretrained(str(path))
        AutoTokenizer.from_pretrained(str(llama_dir)).save_pretrained(str(path))
        cfg = json.loads((path / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = str(llama_dir)
        (path / "adapter_config.json").write_text(json.dumps(cfg))
        out[name] = str(path)
    return out
