"""Trainable parameter counts equal their closed forms on a Llama-2-7B config built on the meta
device (no weight allocated), through `tunelab methods --model DIR --method NAME --json`."""

from __future__ import annotations

import json
import math

import pytest
from transformers import LlamaConfig

from tunelab.cli import main

D, FF, L, VOCAB = 4096, 11008, 32, 32000


@pytest.fixture(scope="module")
def llama7b(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-2-7b")
    LlamaConfig(hidden_size=D, intermediate_size=FF, num_hidden_layers=L, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=VOCAB, max_position_embeddings=4096).save_pretrained(str(path))
    return path


def cost(capsys, model, method, *overrides) -> dict:
    with pytest.raises(SystemExit) as e:
        main(["methods", "--model", str(model), "--method", method, *overrides, "--json"])
    assert e.value.code == 0
    return json.loads(capsys.readouterr().out)


def divisor_near_sqrt(n: int) -> int:
    return max(a for a in range(1, math.isqrt(n) + 1) if n % a == 0)


def test_total_is_the_7b_parameter_count(llama7b, capsys):
    assert cost(capsys, llama7b, "full")["total"] == 6_738_415_616


def test_lora_q_v_r8(llama7b, capsys):
    got = cost(capsys, llama7b, "lora", "method.r=8", "method.target_modules=[q_proj,v_proj]")
    assert got["trainable"] == L * 2 * 8 * (D + D) == 4_194_304


def test_krona_q_v(llama7b, capsys):
    a = divisor_near_sqrt(D)  # A is (a x a), B is (D/a x D/a) for a square D x D weight
    per_layer = 2 * (a * a + (D // a) * (D // a))
    got = cost(capsys, llama7b, "krona", "method.target_modules=[q_proj,v_proj]")
    assert got["trainable"] == L * per_layer


@pytest.mark.parametrize("placement, per_block", [("houlsby", 2), ("pfeiffer", 1)])
def test_adapters(llama7b, capsys, placement, per_block):
    m = D // 16
    got = cost(capsys, llama7b, "adapters", f"method.placement={placement}", "method.reduction_factor=16")
    assert got["trainable"] == L * per_block * (2 * D * m + m + D)
