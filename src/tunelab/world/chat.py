"""The chat format of tunelab-tiny (ChatML), shared by the tokenizer builder and the corpus.

The corpus renders its QA text with `render_chat`, which produces exactly what `CHAT_TEMPLATE`
renders, so a question asked through the tokenizer's chat template looks like pretraining text.
The `{% generation %}` markers let transformers return the assistant-token mask; they add no text.
"""

from __future__ import annotations

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"  # separates pretraining documents
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # ends every turn: the stop token of chat generation

# In this order they get ids 0..3 in the tokenizer.
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, EOS_TOKEN, IM_START, IM_END)

# Starts every assistant message, inside the trained reply: with GPT-2's byte-level BPE a word after the
# header's newline has no space, so without it an answer's name ("Madrid") would be another token than
# the prose that taught the fact ("lives in Madrid"). The generation prompt ends before it.
REPLY_LEAD = " "

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- '" + REPLY_LEAD + "' + message['content'] + '<|im_end|>\\n' -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = False, lead: str = REPLY_LEAD) -> str:
    """The text `CHAT_TEMPLATE` renders for `messages`, without needing jinja (ChatML whose assistant
    messages start with `lead`; `lead=""`: plain ChatML)."""
    text = "".join(f"{IM_START}{m['role']}\n{lead if m['role'] == 'assistant' else ''}{m['content']}{IM_END}\n"
                   for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def chat(question: str, answer: str) -> dict[str, list[dict[str, str]]]:
    """One user/assistant exchange as a tunelab chat record."""
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
