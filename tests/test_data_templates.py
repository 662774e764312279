"""Chat templates and masking: prompts masked, assistant turns and their end-of-turn tokens trained."""

from __future__ import annotations

from typing import Any

import pytest

from tests.data_fixtures import chat, make_tokenizer, write_jsonl
from tunelab.config import DataConfig
from tunelab.data.pipeline import load_tokenized, render_example
from tunelab.data.templates import BUILTIN_TEMPLATES
from tunelab.data.types import IGNORE
from tunelab.errors import DataError

SYSTEM, Q1, A1 = "You are helpful.", "Hello there.", "Hi, how can I help?"
Q2, A2 = "Tell me about Paris.", "Paris is a city."
RECORD = chat(Q1, A1, Q2, A2, system=SYSTEM)
# What a trained assistant turn decodes to, per template: (text before the content, end-of-turn marker).
EXPECTED = {
    "chatml": ("", "<|im_end|>"),
    "llama3": ("", "<|eot_id|>"),
    "mistral": (" ", "</s>"),  # "[/INST] answer</s>": the space belongs to the answer
    "gemma": ("", "<end_of_turn>"),
    "phi3": ("", "<|end|>"),
    "zephyr": ("", "</s>"),
}


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def trained_runs(tok: Any, ids: list[int], labels: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive trained tokens."""
    runs: list[list[int]] = []
    prev = False
    for t, label in zip(ids, labels, strict=True):
        if label != IGNORE:
            if not prev:
                runs.append([])
            runs[-1].append(t)
        prev = label != IGNORE
    return runs


def test_every_builtin_is_covered():
    assert set(EXPECTED) == set(BUILTIN_TEMPLATES)


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_builtin_masks_prompt_and_trains_end_of_turn(tok, name):
    ids, labels = render_example(RECORD, "chat", tok, mask_prompt=True, chat_template=name)
    lead, eot = EXPECTED[name]
    eot_id = tok.convert_tokens_to_ids(eot)
    runs = trained_runs(tok, ids, labels)
    assert [tok.decode(r) for r in runs] == [lead + A1 + eot, lead + A2 + eot]
    assert all(r[-1] == eot_id for r in runs)
    # labels equal ids where trained; everything else (system, users, headers) is masked
    assert all(label in (IGNORE, t) for t, label in zip(ids, labels, strict=True))
    masked = tok.decode([t for t, label in zip(ids, labels, strict=True) if label == IGNORE])
    for prompt_text in (SYSTEM, Q1, Q2):
        assert prompt_text in masked
    # the full sequence is exactly the template's rendering
    rendered = tok.apply_chat_template(RECORD["messages"], tokenize=False, chat_template=BUILTIN_TEMPLATES[name])
    assert tok.decode(ids) == rendered


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_builtin_generation_prompt_is_prefix_of_the_answer(tok, name):
    src = BUILTIN_TEMPLATES[name]
    msgs = RECORD["messages"]
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, chat_template=src, add_generation_prompt=True)
    full = tok.apply_chat_template(RECORD["messages"][:3], tokenize=False, chat_template=src)
    assert full.startswith(prompt) and len(full) > len(prompt)


def test_no_masking_trains_everything(tok):
    ids, labels = render_example(RECORD, "chat", tok, mask_prompt=False, chat_template="chatml")
    assert labels == ids


def test_instruction_renders_like_the_equivalent_chat(tok):
    record = {"instruction": Q2, "input": "Briefly.", "output": A2, "system": SYSTEM}
    as_chat = chat(f"{Q2}\n\nBriefly.", A2, system=SYSTEM)
    got = render_example(record, "instruction", tok, mask_prompt=True, chat_template="llama3")
    assert got == render_example(as_chat, "chat", tok, mask_prompt=True, chat_template="llama3")


def test_text_is_all_trained_and_ends_in_eos(tok):
    ids, labels = render_example({"text": "The cat sat."}, "text", tok, mask_prompt=True, chat_template=None)
    assert labels == ids and ids[-1] == tok.eos_token_id
    assert ids[:-1] == tok("The cat sat.")["input_ids"]


def test_template_without_end_of_turn_gets_a_trained_eos(tok):
    plain = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    ids, labels = render_example(RECORD, "chat", tok, mask_prompt=True, chat_template=plain)
    assert [tok.decode(r) for r in trained_runs(tok, ids, labels)] == [A1 + "</s>", A2 + "</s>"]


def test_tokenizers_own_template_is_the_default(tok):
    own = make_tokenizer(chat_template=BUILTIN_TEMPLATES["phi3"])
    ids, _ = render_example(RECORD, "chat", own, mask_prompt=True, chat_template=None)
    assert "<|assistant|>" in own.decode(ids)


def test_missing_template_falls_back_to_chatml_once(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [RECORD, RECORD, RECORD])
    logs: list[str] = []
    data = load_tokenized(DataConfig(train=str(path)), "train", tok, mask_prompt=True, log=logs.append)
    assert sum("using the built-in 'chatml'" in m for m in logs) == 1
    assert "<|im_start|>" in tok.decode(data.examples[0].input_ids)


def test_template_file(tmp_path, tok):
    path = tmp_path / "t.jinja"
    path.write_text(BUILTIN_TEMPLATES["gemma"])
    got = render_example(RECORD, "chat", tok, mask_prompt=True, chat_template=str(path))
    assert got == render_example(RECORD, "chat", tok, mask_prompt=True, chat_template="gemma")


def test_unknown_template_name(tok):
    with pytest.raises(DataError, match="neither a built-in template nor an existing file"):
        render_example(RECORD, "chat", tok, mask_prompt=True, chat_template="vicuna")


@pytest.mark.parametrize(
    ("name", "marker"), [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>"), ("gemma", "<end_of_turn>")]
)
def test_tokenizer_without_the_templates_tokens_is_refused(name, marker):
    bare = make_tokenizer(with_template_tokens=False)
    with pytest.raises(DataError) as e:
        render_example(RECORD, "chat", bare, mask_prompt=True, chat_template=name)
    assert f"the tokenizer has no {marker!r} token" in e.value.message
    assert "matches its tokenizer" in e.value.fix


def test_fallback_template_missing_from_the_vocabulary_says_so():
    bare = make_tokenizer(with_template_tokens=False)
    with pytest.raises(DataError, match="no chat template, and no '<\\|im_end\\|>' token") as e:
        render_example(RECORD, "chat", bare, mask_prompt=True, chat_template=None)
    assert "zephyr" in e.value.fix
    ids, labels = render_example(RECORD, "chat", bare, mask_prompt=True, chat_template="zephyr")
    assert [bare.decode(r) for r in trained_runs(bare, ids, labels)] == [A1 + "</s>", A2 + "</s>"]


def test_custom_template_with_an_unknown_end_marker_is_refused(tok):
    custom = BUILTIN_TEMPLATES["chatml"].replace("<|im_end|>", "<|my_end|>")
    with pytest.raises(DataError, match=r"no '<\|my_end\|>' token"):
        render_example(RECORD, "chat", tok, mask_prompt=True, chat_template=custom)


def test_template_that_is_not_prefix_stable_is_refused(tok):
    unstable = "{{ messages | length }}" + BUILTIN_TEMPLATES["chatml"]
    with pytest.raises(DataError, match="renders earlier turns differently"):
        render_example(RECORD, "chat", tok, mask_prompt=True, chat_template=unstable)


def test_template_error_is_a_record_problem(tmp_path, tok):
    strict = (
        "{% for m in messages %}{% if 'forbidden' in m['content'] %}{{ raise_exception('no forbidden words') }}"
        "{% endif %}{% endfor %}" + BUILTIN_TEMPLATES["chatml"]
    )
    path = write_jsonl(tmp_path / "c.jsonl", [RECORD, chat("A forbidden question.", A1)])
    with pytest.raises(DataError) as e:
        load_tokenized(DataConfig(train=str(path), chat_template=strict), "train", tok, mask_prompt=True, log=print)
    assert e.value.problems == [f"{path}:2: chat template 'data.chat_template' failed: no forbidden words"]


class _Slow:
    """A tokenizer without offsets (a Python/sentencepiece one)."""

    is_fast = False

    def __init__(self, inner: Any):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_slow_tokenizer_is_refused_for_chats(tok):
    with pytest.raises(DataError, match="slow tokenizer") as e:
        render_example(RECORD, "chat", _Slow(tok), mask_prompt=True, chat_template="chatml")
    assert "tokenizer.json" in e.value.fix
