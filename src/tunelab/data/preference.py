"""Preference records -> examples: pairs for the `reward`, `dpo`, `simpo` and `orpo` objectives,
rated single replies for `kto`.

- preference: `{"prompt", "chosen", "rejected"}` -> one pair;
- ranking: `{"prompt", "responses": [best, ..., worst]}` (K-wise human rankings) -> all K(K-1)/2
  ordered pairs (responses[i], responses[j]) with i < j, as in InstructGPT's reward model
  (Ouyang et al. 2022, arXiv:2203.02155);
- unpaired: `{"prompt", "completion", "label": true | false}` -> one reply, desirable or not.

`prompt` is a string (one user turn) or a list of messages. A pair is one `Example`: the chosen
conversation (prompt + assistant reply), with the rejected one on `Example.rejected`; labels mark
the reply and its end-of-turn token, exactly as SFT trains them (assistant turns inside a message
list prompt are context, not trained). A pair counts as ONE trained unit (the loop normalises by
pairs, not tokens): see `collate`'s `n_pairs`. An unpaired reply is one `Example` with its rating
on `Example.label` (1 desirable, 0 undesirable), one unit as well (data/stream.py).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from tunelab.data.batched import render_many, token_ids, tokenize_chats
from tunelab.data.templates import ChatTemplate, render, tokenize_chat
from tunelab.data.types import IGNORE, Example, Message
from tunelab.errors import DataError

PAIR_FORMATS = ("preference", "ranking")
PROMPT_FORMAT = "prompt"  # {"prompt"} records: what PPO generates replies to
NO_PACKING = "preference data: chosen and rejected replies are scored one per row"
NO_PACKING_UNPAIRED = "unpaired preference data: each reply is scored in a row of its own"


def prompt_messages(prompt: str | list[Message]) -> list[Message]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def reply_example(
    prompt: str | list[Message], reply: str, tokenizer: Any, template: ChatTemplate, where: str
) -> Example:
    """The conversation prompt + assistant `reply`, with only the reply (and end of turn) trained."""
    ids, labels = tokenize_chat(tokenizer, template, reply_messages(prompt, reply), mask_prompt=True)
    return Example(ids, last_run(labels), where)


def reply_messages(prompt: str | list[Message], reply: str) -> list[Message]:
    return [*prompt_messages(prompt), {"role": "assistant", "content": reply}]


def last_run(labels: list[int]) -> list[int]:
    """`labels` with only the last contiguous run of trained tokens kept: the reply, not the
    assistant turns of a message list prompt before it."""
    end = len(labels)
    while end and labels[end - 1] == IGNORE:
        end -= 1
    start = end
    while start and labels[start - 1] != IGNORE:
        start -= 1
    return [IGNORE] * start + labels[start:]


def unpaired_example(record: dict[str, Any], tokenizer: Any, template: ChatTemplate, where: str) -> Example:
    """A validated unpaired record: the prompt + completion, only the completion trained, its
    rating on `label` (1 desirable, 0 undesirable)."""
    ex = reply_example(record["prompt"], record["completion"], tokenizer, template, where)
    return replace(ex, label=int(record["label"]))


def ranked_pairs(record: dict[str, Any], fmt: str) -> list[tuple[str, str]]:
    """(better, worse) replies of a validated record."""
    if fmt == "preference":
        return [(record["chosen"], record["rejected"])]
    responses = record["responses"]
    return [(responses[i], responses[j]) for i in range(len(responses)) for j in range(i + 1, len(responses))]


def pair_examples(
    record: dict[str, Any], fmt: str, tokenizer: Any, template: ChatTemplate, where: str
) -> list[Example]:
    """Every (chosen, rejected) pair of a validated record, as examples."""
    out = []
    for k, (better, worse) in enumerate(ranked_pairs(record, fmt)):
        at = where if fmt == "preference" else f"{where}#{k}"
        chosen = reply_example(record["prompt"], better, tokenizer, template, at)
        rejected = reply_example(record["prompt"], worse, tokenizer, template, at)
        out.append(Example(chosen.input_ids, chosen.labels, at, rejected=rejected))
    return out


def prompt_example(record: dict[str, Any], tokenizer: Any, template: ChatTemplate, where: str) -> Example:
    """A prompt rendered with the generation prompt (the reply would follow). Its labels are its ids
    (nothing trains on them: PPO trains on the replies it samples)."""
    text = render(tokenizer, template, prompt_messages(record["prompt"]), gen=True)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return Example(ids, list(ids), where)


# ----------------------------------------------------------------------------- batches (data/batched.py)

Items = list[tuple[str, dict[str, Any]]]


def pair_examples_batch(
    items: Items, fmt: str, tokenizer: Any, template: ChatTemplate
) -> list[list[Example] | DataError]:
    """`pair_examples` of every validated `(where, record)`, every reply of the batch tokenized together."""
    pairs = [ranked_pairs(r, fmt) for _, r in items]
    chats = [reply_messages(r["prompt"], reply) for (_, r), ps in zip(items, pairs, strict=True)
             for pair in ps for reply in pair]
    results = iter(tokenize_chats(tokenizer, template, chats, mask_prompt=True))
    out: list[list[Example] | DataError] = []
    for (where, _), ps in zip(items, pairs, strict=True):
        mine = [next(results) for _ in range(2 * len(ps))]  # chosen, rejected of each pair, in order
        error = next((x for x in mine if isinstance(x, DataError)), None)
        if error is not None:
            out.append(error)
            continue
        examples = []
        for k in range(len(ps)):
            at = where if fmt == "preference" else f"{where}#{k}"
            (ids, labels), (r_ids, r_labels) = mine[2 * k], mine[2 * k + 1]  # type: ignore[misc]
            examples.append(Example(ids, last_run(labels), at, rejected=Example(r_ids, last_run(r_labels), at)))
        out.append(examples)
    return out


def unpaired_examples_batch(items: Items, tokenizer: Any, template: ChatTemplate) -> list[list[Example] | DataError]:
    """`unpaired_example` of every validated `(where, record)`."""
    chats = [reply_messages(r["prompt"], r["completion"]) for _, r in items]
    results = tokenize_chats(tokenizer, template, chats, mask_prompt=True)
    return [x if isinstance(x, DataError) else [Example(x[0], last_run(x[1]), where, label=int(r["label"]))]
            for (where, r), x in zip(items, results, strict=True)]


def prompt_examples_batch(items: Items, tokenizer: Any, template: ChatTemplate) -> list[list[Example] | DataError]:
    """`prompt_example` of every validated `(where, record)`."""
    texts = render_many(tokenizer, template, [prompt_messages(r["prompt"]) for _, r in items], gen=True)
    ids = iter(token_ids(tokenizer, [t for t in texts if not isinstance(t, DataError)], add_special_tokens=False))
    out: list[list[Example] | DataError] = []
    for (where, _), text in zip(items, texts, strict=True):
        if isinstance(text, DataError):
            out.append(text)
            continue
        row = next(ids)
        out.append([Example(row, list(row), where)])
    return out


def null_prompt_ids(tokenizer: Any, template: ChatTemplate) -> list[int]:
    """Token ids of an empty user turn followed by the assistant's header: the prompt a reply is
    scored after for its likelihood without the real prompt (pmi reward heads)."""
    return prompt_example({"prompt": ""}, tokenizer, template, "null prompt").input_ids
