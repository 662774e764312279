"""M10-M12 prompt family: trainable parameters against closed forms (Llama-2-7B on the meta device and the
tiny llama), generation with virtual tokens through the API and batched greedy, save -> load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import tunelab
from tests import tiny
from tests.test_train_loop import run_cfg
from tunelab import api
from tunelab.artifacts import save_artifact
from tunelab.config import ModelConfig
from tunelab.inference.generation import encode_prompt, generate_ids, greedy, stop_token_ids
from tunelab.methods import METHODS, count_parameters
from tunelab.objectives import lm
from tunelab.runconfig import build_config

N = 20  # virtual tokens in the closed-form checks


def llama(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int) -> dict:
    return dict(hidden=hidden, layers=layers, kv=kv_heads * hidden // heads, intermediate=intermediate, vocab=vocab,
                config=LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                   num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab))


def expected(method: str, m: dict, n: int, e: int | None = None) -> int:
    """Trainable parameters written out; h hidden, L layers, d the key/value width (kv heads x head dim)."""
    h, L, d = m["hidden"], m["layers"], m["kv"]
    if method == "prompt":
        return n * h
    if method == "prefix":
        return n * L * 2 * d
    if method == "prefix-projection":  # E (n, d) -> Linear(d, e) -> tanh -> Linear(e, L * 2d)
        return n * d + (d * e + e) + (e * L * 2 * d + L * 2 * d)
    if method == "ptuning-mlp":  # E (n, h) -> Linear(h, e) -> ReLU -> Linear(e, e) -> ReLU -> Linear(e, h)
        return n * h + (h * e + e) + (e * e + e) + (e * h + h)
    if method == "ptuning-lstm":  # E -> 2-layer BiLSTM(width e) -> Linear(2e, 2e) -> ReLU -> Linear(2e, h)
        gates = 4 * e
        layer1 = 2 * (gates * h + gates * e + 2 * gates)
        layer2 = 2 * (gates * 2 * e + gates * e + 2 * gates)
        return n * h + layer1 + layer2 + (2 * e * 2 * e + 2 * e) + (2 * e * h + h)
    raise ValueError(method)


CASES = [  # (method id for `expected`, method name, overrides)
    ("prompt", "prompt", []),
    ("prefix", "prefix", []),
    ("prefix-projection", "prefix", ["method.prefix_projection=true", "method.encoder_hidden_size=64"]),
    ("ptuning-mlp", "ptuning", ["method.encoder_hidden_size=64"]),
    ("ptuning-lstm", "ptuning", ["method.encoder_type=lstm", "method.encoder_hidden_size=64"]),
]


@pytest.mark.parametrize("kv_heads", [32, 8], ids=["mha", "gqa"])
@pytest.mark.parametrize("kind, name, overrides", CASES, ids=[c[0] for c in CASES])
def test_llama2_7b_counts_on_meta(tmp_path, kind, name, overrides, kv_heads):
    m = llama(4096, 32, 32, kv_heads, 11008, 32000)
    m["config"].save_pretrained(str(tmp_path))
    cost = api.method_cost(str(tmp_path), name, [f"method.num_virtual_tokens={N}", *overrides])
    assert cost["trainable"] == expected(kind, m, N, e=64)
    assert cost["total"] > 5_000_000_000


@pytest.mark.parametrize("kind, name, overrides", CASES, ids=[c[0] for c in CASES])
def test_tiny_llama_counts(kind, name, overrides):
    m = llama(32, 2, 4, 2, 64, 400)  # tests/tiny.py's llama: 2 kv heads of 8, so d = 16 != hidden
    raw = {"name": name, "num_virtual_tokens": 5}
    for o in overrides:
        key, value = o.removeprefix("method.").split("=")
        raw[key] = {"true": True}.get(value, value)
    model = METHODS[name].apply(AutoModelForCausalLM.from_config(tiny.config("llama", 400)),
                                build_config({"method": raw}).method)
    assert count_parameters(model)[0] == expected(kind, m, 5, e=64)


def test_text_init_starts_from_the_words_embeddings(llama_dir):
    cfg = build_config({"method": {"name": "prompt", "num_virtual_tokens": 3, "init": "text",
                                   "init_text": "what colour"}}).method
    base = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    words = torch.tensor(tiny.tokenizer()("what colour", add_special_tokens=False)["input_ids"])
    want = base.get_input_embeddings().weight[words].detach().clone()
    model = METHODS["prompt"].apply(base, cfg)
    got = model.prompt_encoder["default"].embedding.weight.detach()
    reps = -(-3 // len(words))
    torch.testing.assert_close(got, want.repeat(reps, 1)[:3])


# ----------------------------------------------------------------------------- trained tiny runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_dirs) -> dict[str, Path]:
    """One 2-step run per method."""
    root = tmp_path_factory.mktemp("prompt-runs")
    data = (tiny.write_jsonl(root / "train.jsonl", tiny.chat_records(32, seed=1)),
            tiny.write_jsonl(root / "eval.jsonl", tiny.chat_records(8, seed=2)))
    out = {}
    for name in ("prefix", "prompt", "ptuning"):
        cfg = run_cfg(model_dirs["llama"], data, root / name, max_steps=2, lr=1e-2)
        cfg["method"] = {"name": name, "num_virtual_tokens": 4}
        assert tunelab.train(cfg, quiet=True).status == "completed"
        out[name] = root / name
    return out


def test_loss_logits_cover_the_input_positions_only():
    model = METHODS["prompt"].apply(AutoModelForCausalLM.from_config(tiny.config("llama", 400)),
                                    build_config({"method": {"name": "prompt", "num_virtual_tokens": 3}}).method)
    ids = torch.randint(3, 400, (2, 7))
    assert lm.forward_logits(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}).shape[1] == 7


@pytest.mark.parametrize("name", ["prefix", "prompt", "ptuning"])
def test_generate_through_the_api(runs, name):
    reply = api.generate(runs[name], "what colour is the lamp?", max_new_tokens=6)
    assert isinstance(reply, str)


@pytest.mark.parametrize("name", ["prefix", "prompt", "ptuning"])
def test_batched_greedy_equals_one_by_one(runs, name):
    model, tok = api.load(runs[name])
    prompts = ["what colour is the lamp?", "what colour is the river? tell me now", "what?", "what colour is the road?"]
    batched = greedy(model, tok, prompts, max_new_tokens=6, batch_size=4, chat=True)
    alone = [greedy(model, tok, [p], max_new_tokens=6, chat=True)[0] for p in prompts]
    assert batched == alone


def no_cache_greedy(model, ids: list[int], n: int, stops: list[int]) -> list[int]:
    """The naive reference: one full forward per new token, no KV cache, argmax, stop token kept."""
    ids, new = list(ids), []
    for _ in range(n):
        x = torch.tensor([ids])
        with torch.no_grad():
            nxt = int(model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0, -1].argmax())
        new.append(nxt)
        ids.append(nxt)
        if nxt in stops:
            break
    return new


@pytest.mark.parametrize("name", ["prefix", "prompt", "ptuning"])
def test_cached_generation_equals_the_no_cache_reference(llama_dir, name):
    """transformers 5.24 renamed the KV cache argument: peft's prefix was dropped and virtual tokens
    were injected again at every step. Greedy with the cache, batched and alone, must equal the
    reference (random non-zero virtual tokens, so a dropped prefix changes the reply)."""
    torch.manual_seed(0)
    cfg = build_config({"method": {"name": name, "num_virtual_tokens": 4}}).method
    model = METHODS[name].apply(AutoModelForCausalLM.from_pretrained(str(llama_dir)), cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    tok = tiny.tokenizer()
    prompts = ["what colour is the lamp?", "what colour is the river? tell me now", "what?"]
    encoded = [encode_prompt(tok, p, chat=True) for p in prompts]
    want = [no_cache_greedy(model, ids, 8, stop_token_ids(model, tok)) for ids in encoded]
    assert generate_ids(model, tok, encoded, max_new_tokens=8, batch_size=3) == want
    assert [generate_ids(model, tok, [ids], max_new_tokens=8)[0] for ids in encoded] == want
    base = AutoModelForCausalLM.from_pretrained(str(llama_dir)).eval()
    assert want != [no_cache_greedy(base, ids, 8, stop_token_ids(base, tok)) for ids in encoded]


@pytest.mark.parametrize("name", ["prefix", "prompt", "ptuning"])
def test_save_load_round_trip(llama_dir, tmp_path, name):
    torch.manual_seed(0)
    cfg = build_config({"method": {"name": name, "num_virtual_tokens": 4}}).method
    model = METHODS[name].apply(AutoModelForCausalLM.from_pretrained(str(llama_dir)), cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    save_artifact(model, tiny.tokenizer(), cfg, ModelConfig(name_or_path=str(llama_dir)), tmp_path / "final")
    reloaded, _ = api.load(tmp_path / "final")
    ids = torch.randint(3, 400, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        got = reloaded.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
