"""The tokenizer of tunelab-tiny and the tests' tiny models (modeling/bpe.py) with TinyWorld's chat format.

GPT-2's byte-level BPE trained as GPT-2 is: text round-trips exactly, llama.cpp's converter knows
its pre-tokenizer, and the chat template's leading space in every assistant reply makes an
answer's name the token prose uses for it (what lets held-out QA draw on pretraining).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from tests import tiny
from tunelab.inference.generation import drop_lead, greedy, reply_lead
from tunelab.modeling.bpe import train_bpe
from tunelab.recipes.gguf_convert import pre_tokenizer_name
from tunelab.world import make_corpus, make_world, render_chat
from tunelab.world.chat import IM_END


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return train_bpe(make_corpus(make_world(0), 0)[:1500], vocab_size=1024)


@pytest.mark.parametrize("text", [
    "Hello world\nsecond line", "Zürich", "  two leading spaces", "tabs\tand\n\n\nblank lines \n",
    "trailing space ", "emoji 🙂 and ünïcödé", "<|im_start|>user\nhi<|im_end|>\n", "",
])
def test_decoding_returns_the_text_exactly(tok, text):
    assert tok.decode(tok(text)["input_ids"]) == text


def test_the_pre_tokenizer_is_gpt2s(tok, tmp_path):
    tok.save_pretrained(str(tmp_path))
    assert pre_tokenizer_name(tmp_path / "tokenizer.json") == "gpt-2"


def test_a_name_is_the_same_token_in_an_answer_and_in_prose(tok):
    for name in ("Madrid", "Lyon", "Zürich"):
        chat = render_chat([{"role": "user", "content": "Where?"}, {"role": "assistant", "content": name}])
        prompt = render_chat([{"role": "user", "content": "Where?"}], add_generation_prompt=True)
        ids, prompt_ids = tok(chat)["input_ids"], tok(prompt)["input_ids"]
        assert ids[:len(prompt_ids)] == prompt_ids  # the generation prompt is a token prefix of the whole chat
        reply = ids[len(prompt_ids):-2]  # without <|im_end|> and the newline
        prose = tok(f"lives in {name}")["input_ids"]
        assert prose[-len(reply):] == reply, (tok.convert_ids_to_tokens(reply), tok.convert_ids_to_tokens(prose))


def test_the_template_and_render_chat_agree(tok):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"},
                {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q2?"}]
    for msgs, gen in ((messages, True), (messages[:3], False)):
        assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == render_chat(msgs, gen)


def test_the_reply_lead_is_the_templates_space(tok):
    assert reply_lead(tok) == " "
    assert drop_lead(" Madrid", " ") == "Madrid" and drop_lead("Madrid", " ") == "Madrid"
    other = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer)
    assert reply_lead(other) == ""  # no template
    other.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                           "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert reply_lead(other) == ""
    other.chat_template = "{% for m in messages %}{{ raise_exception('no') }}{% endfor %}"  # cannot render
    assert reply_lead(other) == ""


def test_greedy_chat_replies_drop_the_lead():
    tok = tiny.tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny.config("llama", len(tok)))
    question = "what colour is the apple?"
    (reply,) = greedy(model, tok, [question], max_new_tokens=6, chat=True)
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True)["input_ids"]
    out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.convert_tokens_to_ids(IM_END))
    assert reply == drop_lead(tok.decode(out[0, len(ids):], skip_special_tokens=True), " ")
