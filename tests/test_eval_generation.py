"""Batched greedy generation equals one-at-a-time generation; replies stop at the end-of-turn token."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.inference.generation import continuation_logprobs, greedy, stop_token_ids
from tunelab.world.chat import IM_END


@pytest.fixture(scope="module")
def llama(llama_dir):
    return AutoModelForCausalLM.from_pretrained(str(llama_dir)).eval(), AutoTokenizer.from_pretrained(str(llama_dir))


CHATS = [
    [{"role": "user", "content": "what colour is the lamp?"}],
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "The apple is red and the number is 12. what colour is the river?"}],
]
RAW = ["The apple is", "The", "what colour is the stone? It is blue and the number is"]


@pytest.mark.parametrize("prompts, chat", [(CHATS, True), (RAW, False)])
def test_batched_greedy_equals_unbatched(llama, prompts, chat):
    model, tok = llama
    side = tok.padding_side
    batched = greedy(model, tok, prompts, max_new_tokens=8, batch_size=3, chat=chat)
    alone = [greedy(model, tok, [p], max_new_tokens=8, batch_size=1, chat=chat)[0] for p in prompts]
    assert batched == alone
    assert tok.padding_side == side  # left padding only while generating


def test_reference_generation_without_padding(llama):
    """One prompt, no padding: the same tokens as a plain model.generate call."""
    model, tok = llama
    ids = tok.apply_chat_template(CHATS[0], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, eos_token_id=stop_token_ids(model, tok),
                         pad_token_id=tok.pad_token_id)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    stops = stop_token_ids(model, tok)
    new = new[: next((i for i, t in enumerate(new) if t in stops), len(new))]
    assert greedy(model, tok, [CHATS[0]], max_new_tokens=8, chat=True) == [tok.decode(new, skip_special_tokens=True)]


def test_stop_tokens_include_end_of_turn(llama):
    model, tok = llama
    stops = stop_token_ids(model, tok)
    assert tok.convert_tokens_to_ids(IM_END) in stops and tok.eos_token_id in stops


def test_continuation_logprobs_match_a_direct_forward(llama):
    model, tok = llama
    got = continuation_logprobs(model, tok, ["The apple is", "The"], [" red", " river is blue"], batch_size=2)
    for (ctx, cont), (s, n) in zip([("The apple is", " red"), ("The", " river is blue")], got, strict=True):
        c, k = tok(ctx)["input_ids"], tok(cont, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([c + k])).logits[0].log_softmax(-1)
        want = sum(float(logp[len(c) - 1 + i, t]) for i, t in enumerate(k))
        assert n == len(k) and s == pytest.approx(want, abs=1e-4)
