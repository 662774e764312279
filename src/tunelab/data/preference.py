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

from tunelab.data.templates import ChatTemplate, render, tokenize_chat
from tunelab.data.types import IGNORE, Example, Message

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
    messages = [*prompt_messages(prompt), {"role": "assistant", "content": reply}]
    ids, labels = tokenize_chat(tokenizer, template, messages, mask_prompt=True)
    return Example(ids, last_run(labels), where)


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


def null_prompt_ids(tokenizer: Any, template: ChatTemplate) -> list[int]:
    """Token ids of an empty user turn followed by the assistant's header: the prompt a reply is
    scored after for its likelihood without the real prompt (pmi reward heads)."""
    return prompt_example({"prompt": ""}, tokenizer, template, "null prompt").input_ids
