"""`tunelab world build-base` end to end on a miniature recipe: tokenizer, init, pretraining with the
one loop, a loadable model with its model card; and an interrupted build resumes to the same weights."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tunelab import api
from tunelab.recipes.build_base import build_base

MINI = {
    "vocab_size": 512,
    "architecture": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 128},
    "run": {"data": {"max_length": 64, "max_truncated_share": 1.0},  # a 64-token miniature cuts most documents
            "train": {"max_steps": 4, "batch_size": 2, "save_every": 2, "precision": "fp32", "log_every": 1}},
}


@pytest.fixture(scope="module")
def mini_base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("base")
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(MINI))
    stats = build_base(tmp / "tiny", tmp / "recipe.yaml", quiet=True, eval_limit=4)
    return tmp, stats


def test_build_base_makes_a_loadable_model_with_a_card(mini_base):
    tmp, stats = mini_base
    assert stats["steps"] == 4 and stats["corpus_tokens"] > 10_000
    card = (tmp / "tiny" / "README.md").read_text()
    assert "probe: cloze accuracy" in card and f"{stats['parameters']:,}" in card
    model, tok = api.load(tmp / "tiny")
    assert tok.chat_template and "<|im_end|>" in tok.get_vocab()
    assert model.config.hidden_size == 32


def test_interrupted_build_resumes_to_the_same_weights(mini_base, tmp_path, monkeypatch):
    tmp, _ = mini_base
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(MINI))
    monkeypatch.setenv("TUNELAB_FAULT", "term@step:3")
    with pytest.raises(Exception, match="interrupted at step 3"):
        build_base(tmp_path / "tiny", tmp_path / "recipe.yaml", quiet=True, eval_limit=2)
    monkeypatch.delenv("TUNELAB_FAULT")
    build_base(tmp_path / "tiny", tmp_path / "recipe.yaml", quiet=True, resume=True, eval_limit=2)
    want = load_file(str(tmp / "tiny" / "model.safetensors"))
    got = load_file(str(tmp_path / "tiny" / "model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
