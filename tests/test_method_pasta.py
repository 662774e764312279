"""M21 PASTA: vectors added to special tokens' hidden states in every layer, against naive references:
layer 0's vectors are the same as adding them to the input embeddings; a vector acts from its token's
position on and nowhere before; cached generation equals recomputing the whole sequence; the
special tokens come from the tokenizer beside the model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tunelab
from tests.test_train_loop import run_cfg
from tunelab.errors import TunelabError
from tunelab.methods import METHODS
from tunelab.runconfig import method_config


def pasta(llama_dir, **kw):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(llama_dir), torch_dtype=torch.float32).eval()
    return METHODS["pasta"].apply(base, method_config({"name": "pasta", **kw})).eval()


def base_model(llama_dir):
    return AutoModelForCausalLM.from_pretrained(str(llama_dir), torch_dtype=torch.float32).eval()


def test_the_special_tokens_come_from_the_tokenizer_beside_the_model(llama_dir):
    tok = AutoTokenizer.from_pretrained(str(llama_dir))
    model = pasta(llama_dir)
    want = [i for i in tok.all_special_ids if i != tok.pad_token_id]
    assert model.tunelab_pasta.tunelab_ids.tolist() == want and tok.pad_token_id not in want
    n_layers = model.config.num_hidden_layers
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["tunelab_pasta.vectors"]
    assert model.tunelab_pasta.vectors.shape == (n_layers, len(want), model.config.hidden_size)
    named = pasta(llama_dir, tokens=["<|im_end|>"])
    assert named.tunelab_pasta.tunelab_ids.tolist() == [tok.convert_tokens_to_ids("<|im_end|>")]
    with pytest.raises(TunelabError, match="not in the tokenizer's vocabulary"):
        pasta(llama_dir, tokens=["<|nope|>"])


def _ids(special: int) -> torch.Tensor:
    ids = torch.randint(5, 300, (2, 10), generator=torch.Generator().manual_seed(2))
    ids[0, 3] = special
    ids[1, 0] = special
    ids[1, 7] = special
    return ids


def test_layer_zero_vectors_equal_adding_them_to_the_embeddings(llama_dir):
    model = pasta(llama_dir)
    k, special = 1, int(model.tunelab_pasta.tunelab_ids[1])
    with torch.no_grad():
        model.tunelab_pasta.vectors[0, k] = torch.randn(model.config.hidden_size)
    ids = _ids(special)
    base = base_model(llama_dir)
    with torch.no_grad():
        embeds = base.get_input_embeddings()(ids).clone()
        embeds[ids == special] += model.tunelab_pasta.vectors[0, k]  # the naive reference
        want = base(inputs_embeds=embeds).logits
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_vector_acts_from_its_token_on_and_in_every_layer(llama_dir):
    model = pasta(llama_dir)
    special = int(model.tunelab_pasta.tunelab_ids[0])
    ids = _ids(special)[:1]  # the special token at position 3
    with torch.no_grad():
        before = model(input_ids=ids).logits
        for layer in range(model.config.num_hidden_layers):
            model.tunelab_pasta.vectors.zero_()
            model.tunelab_pasta.vectors[layer, 0] = 3 * torch.randn(model.config.hidden_size)
            after = model(input_ids=ids).logits
            assert torch.equal(after[0, :3], before[0, :3]), layer  # causal: nothing before the token moves
            assert not torch.allclose(after[0, 3:], before[0, 3:]), layer  # from it on, every layer's vector acts


def test_cached_generation_equals_recomputing_the_whole_sequence(llama_dir):
    model = pasta(llama_dir)
    with torch.no_grad():
        model.tunelab_pasta.vectors.normal_(0, 2.0)
    special = int(model.tunelab_pasta.tunelab_ids[0])
    ids = _ids(special)[1:]  # specials at positions 0 and 7
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                do_sample=False, pad_token_id=0)
        seq = ids
        for _ in range(8):  # no cache: the whole sequence each step
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(cached, seq)


def test_trains_through_the_loop_and_reloads(llama_dir, chat_data, tmp_path):
    cfg = run_cfg(llama_dir, chat_data, tmp_path / "run", max_steps=4, lr=5e-2)
    cfg["method"] = {"name": "pasta"}
    result = tunelab.train(cfg, quiet=True)
    assert result.status == "completed" and result.metrics["loss"] < 20
    loaded, tok = tunelab.load(tmp_path / "run")
    assert float(loaded.tunelab_pasta.vectors.abs().sum()) > 0  # the vectors trained and came back
    ids = tok.apply_chat_template([{"role": "user", "content": "what colour is the box?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    plain = base_model(llama_dir)
    with torch.no_grad():
        assert not torch.allclose(loaded.eval()(input_ids=ids).logits, plain(input_ids=ids).logits)
