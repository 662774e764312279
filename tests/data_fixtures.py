"""Shared helpers of the data tests: offline tokenizers and tiny dataset files.

Tokenizers are byte-level BPEs trained in milliseconds on generated sentences, cached per
process; the ones with template markers know the special tokens of every built-in template.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import Any

TEMPLATE_TOKENS = [
    "<|im_start|>", "<|im_end|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "[INST]", "[/INST]",
    "<start_of_turn>", "<end_of_turn>",
    "<|user|>", "<|assistant|>", "<|system|>", "<|end|>",
]  # fmt: skip

WORDS = (
    "the a cat dog sat on mat ran fast slow big small red blue green house tree river city name is was "
    "what where who how many apple bread Anna Bob lives works as teacher baker in Paris Oslo answer question "
    "you are helpful assistant hello thanks please tell me about"
).split()


def sentences(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize() + "." for _ in range(n)]


@functools.cache
def make_tokenizer(with_template_tokens: bool = True, chat_template: str | None = None) -> Any:
    """A fast tokenizer with bos `<s>`, eos `</s>`, pad `<pad>` (and the built-in templates' markers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    extra = TEMPLATE_TOKENS if with_template_tokens else []
    specials = ["<pad>", "<s>", "</s>", *extra]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(sentences(), trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", extra_special_tokens=extra
    )
    hf.chat_template = chat_template
    return hf


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def chat(*turns: str, system: str | None = None) -> dict[str, Any]:
    """{"messages": [...]} from alternating user/assistant contents."""
    messages = [{"role": "system", "content": system}] if system else []
    roles = ("user", "assistant")
    messages += [{"role": roles[i % 2], "content": c} for i, c in enumerate(turns)]
    return {"messages": messages}
