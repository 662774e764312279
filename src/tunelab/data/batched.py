"""The batched forms of templates.py: a batch of records rendered and tokenized with few calls.

Each function gives, for every item of its batch, exactly what the one-record function of templates.py
gives for it, or the `DataError` that function raises, in the item's place: the first pass
(data/firstpass.py) applies them in record order, so a batch reports its bad records and stops at its
first fatal error as a record-by-record pass would (tests/test_data_firstpass.py compares the two).

Chats are rendered with one `apply_chat_template` call per `RENDER_BATCH` chats (transformers' batched
form); a batch that fails (one chat the template rejects) or runs past the render deadline is rendered
again chat by chat, so every chat gets its own result or error. Rendered texts are tokenized in one call
to the fast tokenizer, with offsets where prompt masking needs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tunelab.data.templates import (
    RENDER_SECONDS,
    ChatTemplate,
    Encoded,
    _deadline,
    _RenderTimeout,
    _unstable,
    mask_chat,
    render,
    slow_tokenizer_error,
    special_ids,
)
from tunelab.data.types import Example, Message
from tunelab.data.validate import RecordError
from tunelab.errors import DataError

RENDER_BATCH = 64  # chats per apply_chat_template call: far below the deadline for any sane template
Result = tuple[list[int], list[int]] | DataError  # (ids, labels), or why there are none


Chats = Sequence[list[Message]]


def render_many(tokenizer: Any, template: ChatTemplate, chats: Chats, gen: bool) -> list[str | DataError]:
    """`render` of every chat."""
    out: list[str | DataError] = []
    for i in range(0, len(chats), RENDER_BATCH):
        out += _render_batch(tokenizer, template, chats[i : i + RENDER_BATCH], gen)
    return out


def _render_batch(tokenizer: Any, template: ChatTemplate, chats: Chats, gen: bool) -> list[str | DataError]:
    if all(chats):  # one call refuses a batch with an empty chat: that batch goes one by one
        try:
            with _deadline(RENDER_SECONDS):
                texts = tokenizer.apply_chat_template(list(chats), tokenize=False, chat_template=template.source,
                                                      add_generation_prompt=gen)
            if isinstance(texts, list) and len(texts) == len(chats) and all(isinstance(t, str) for t in texts):
                return texts
        except (Exception, _RenderTimeout):
            pass  # rendered one by one below: each chat gets its own result or error
    return [_render_one(tokenizer, template, chat, gen) for chat in chats]


def _render_one(tokenizer: Any, template: ChatTemplate, chat: list[Message], gen: bool) -> str | DataError:
    """A chat's render, or the record's error. A template too slow for one chat stops the pass here and now
    (collecting that error per chat would spend the render deadline on every chat of the file)."""
    try:
        return render(tokenizer, template, chat, gen)
    except RecordError as e:
        return e


def tokenize_chats(tokenizer: Any, template: ChatTemplate, chats: Chats, mask_prompt: bool) -> list[Result]:
    """`tokenize_chat` of every chat: assistant turns located by the renders of the chat's prefixes."""
    if not getattr(tokenizer, "is_fast", False):
        return [slow_tokenizer_error(tokenizer)] * len(chats)
    turns = [[k for k, m in enumerate(c) if m["role"] == "assistant"] for c in chats]
    fulls = render_many(tokenizer, template, chats, gen=False)
    starts = render_many(tokenizer, template, [c[:k] for c, ks in zip(chats, turns, strict=True) for k in ks], True)
    ends = render_many(tokenizer, template, [c[: k + 1] for c, ks in zip(chats, turns, strict=True) for k in ks
                                             if k + 1 < len(c)], False)
    located: list[tuple[str, list] | DataError] = []
    at_start = at_end = 0
    for chat, ks, full in zip(chats, turns, fulls, strict=True):
        n_end = sum(k + 1 < len(chat) for k in ks)
        located.append(_spans(template, chat, ks, full, starts[at_start : at_start + len(ks)],
                              ends[at_end : at_end + n_end]))
        at_start, at_end = at_start + len(ks), at_end + n_end
    texts = [x[0] for x in located if not isinstance(x, DataError)]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False,
                    return_token_type_ids=False) if texts else {"input_ids": [], "offset_mapping": []}
    encoded = iter(zip(enc["input_ids"], enc["offset_mapping"], strict=True))
    specials = special_ids(tokenizer)
    out: list[Result] = []
    for x in located:
        if isinstance(x, DataError):
            out.append(x)
            continue
        ids, offsets = next(encoded)
        try:
            out.append(mask_chat(tokenizer, template, Encoded(x[0], list(ids), offsets, specials), x[1], mask_prompt))
        except DataError as e:
            out.append(e)
    return out


def _spans(template: ChatTemplate, chat: list[Message], turns: list[int], full: str | DataError,
           starts: list[str | DataError], ends: list[str | DataError]) -> tuple[str, list] | DataError:
    """`assistant_spans` from renders made beforehand, with its errors in its order."""
    if isinstance(full, DataError):
        return full
    spans = []
    later = iter(ends)
    for k, head in zip(turns, starts, strict=True):
        if isinstance(head, DataError):
            return head
        if not full.startswith(head):
            return _unstable(template)
        if k + 1 == len(chat):
            end = len(full)
        else:
            upto = next(later)
            if isinstance(upto, DataError):
                return upto
            if not full.startswith(upto):
                return _unstable(template)
            end = len(upto)
        if end <= len(head):
            return _unstable(template)
        spans.append((len(head), end, chat[k]["content"]))
    return full, spans


def token_ids(tokenizer: Any, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
    """`list(tokenizer(text, add_special_tokens=...)["input_ids"])` of every text."""
    if not texts:
        return []
    enc = tokenizer(list(texts), add_special_tokens=add_special_tokens, return_attention_mask=False,
                    return_token_type_ids=False)
    return [list(ids) for ids in enc["input_ids"]]


def tokenize_texts(tokenizer: Any, texts: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """`tokenize_text` of every text: every token trained, ending in eos."""
    eos = getattr(tokenizer, "eos_token_id", None)
    out = []
    for ids in token_ids(tokenizer, texts):
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        out.append((ids, list(ids)))
    return out


def chat_examples(items: Sequence[tuple[str, Any]], results: Sequence[Result]) -> list[list[Example] | DataError]:
    """One example per record from `tokenize_chats` results (or the record's error)."""
    return [r if isinstance(r, DataError) else [Example(r[0], r[1], where)]
            for (where, _), r in zip(items, results, strict=True)]
