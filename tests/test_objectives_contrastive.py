"""The contrastive objective (dense retriever training, #16): InfoNCE against a naive loop, the
embedding against a one-text-at-a-time reference, the `retrieval` format, the config's refusals,
and a run whose trained model indexes and queries in one space."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests import tiny
from tunelab.data.formats import detect_format, validate_record
from tunelab.errors import ConfigError
from tunelab.inference.embed import embed
from tunelab.objectives.contrastive import info_nce
from tunelab.runconfig import build_config


def test_info_nce_equals_a_naive_loop_in_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1).requires_grad_()
    p = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1).requires_grad_()
    tau = 0.07
    loss = info_nce(q, p, tau)
    loss.backward()
    got = (q.grad.clone(), p.grad.clone())
    q.grad = p.grad = None
    ref = 0.0
    for i in range(5):
        scores = [sum(q[i, d] * p[j, d] for d in range(8)) / tau for j in range(5)]
        denominator = sum(torch.exp(s) for s in scores)
        ref = ref - torch.log(torch.exp(scores[i]) / denominator)
    ref.backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    torch.testing.assert_close(got[0], q.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], p.grad, rtol=1e-5, atol=1e-6)
    one = torch.nn.functional.normalize(torch.randn(1, 8), dim=-1)
    assert float(info_nce(one, one, tau)) == 0.0  # a pair with no negatives: nothing to learn


def test_embedding_of_a_padded_batch_equals_each_text_alone(llama_dir):
    tok = AutoTokenizer.from_pretrained(llama_dir)
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    texts = ["the red box", "a much longer sentence about the blue chair and more", "x"]
    batch = tok(texts, padding=True, return_tensors="pt")
    assert tok.padding_side == "right"
    with torch.no_grad():
        together = embed(model, batch["input_ids"], batch["attention_mask"])
        for i, text in enumerate(texts):
            ids = torch.tensor([tok(text)["input_ids"]])
            hidden = model.model(input_ids=ids).last_hidden_state[0]  # (T, H): the decoder, no padding
            ref = hidden.mean(0) / hidden.mean(0).norm()
            torch.testing.assert_close(together[i], ref, rtol=1e-4, atol=1e-5)
    assert torch.allclose(together.norm(dim=-1), torch.ones(3))


def test_the_retrieval_format():
    record = {"query": "what colour is the box?", "positive": "the box is red"}
    assert detect_format(record) == "retrieval"
    assert validate_record(record, "retrieval") is None
    assert "missing field 'positive'" in validate_record({"query": "q", "positive2": "p"}, "retrieval").reason
    assert validate_record({"query": "same", "positive": "same "}, "retrieval").kind == "repeated text"


def test_the_config_refuses_accumulation_and_a_batch_of_one():
    build_config({"objective": {"name": "contrastive"}, "train": {"batch_size": 4}})
    with pytest.raises(ConfigError, match="gradient accumulation would change what each query is compared with"):
        build_config({"objective": {"name": "contrastive"}, "train": {"grad_accum": 2}})
    with pytest.raises(ConfigError, match="batch_size >= 2"):
        build_config({"objective": {"name": "contrastive"}, "train": {"batch_size": 1}})
    with pytest.raises(ConfigError, match="temperature"):
        build_config({"objective": {"name": "contrastive", "temperature": 0}})


@pytest.mark.slow
def test_a_trained_retriever_ranks_its_passages_first_and_indexes_in_its_own_space(llama_dir, tmp_path):
    """Training separates the pairs (in-batch loss falls, recall rises on the training pairs) and
    the run's model is an encoder the RAG index accepts (the same pooling both ways)."""
    from tunelab import api
    from tunelab.nonparametric.encode import Encoder

    pairs = [{"query": f"what colour is the {t}?", "positive": f"the {t} is painted {c}"}
             for t, c in zip(tiny.THINGS, tiny.COLOURS, strict=True)]
    data = tiny.write_jsonl(tmp_path / "pairs.jsonl", pairs)
    run = tmp_path / "run"

    def recall(model_path) -> float:
        enc = Encoder.load(str(model_path))
        q = enc.encode([p["query"] for p in pairs])
        d = enc.encode([p["positive"] for p in pairs])
        return sum(int((q[i] @ d.T).argmax() == i) for i in range(len(pairs))) / len(pairs)

    before = recall(llama_dir)
    result = api.train({"model": {"name_or_path": str(llama_dir), "dtype": "float32"},
                        "data": {"train": str(data), "max_length": 32}, "method": {"name": "full"},
                        "objective": {"name": "contrastive", "temperature": 0.1},
                        "train": {"max_steps": 40, "batch_size": len(pairs), "lr": 3e-3, "precision": "fp32",
                                  "log_every": 1}, "output": {"dir": str(run)}}, quiet=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[0] > 0.5 * math.log(len(pairs)) and losses[-1] < 0.5 * losses[0]
    after = recall(result.run_dir / "final")
    assert after == 1.0 and after > before
