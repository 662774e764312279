"""Train a small byte-level BPE tokenizer with a chat template, offline (`tokenizers`).

Used to build the embedded base's tokenizer and the tiny models of the demo and the tests.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]


def train_bpe(
    texts: Iterable[str], vocab_size: int = 1024, special_tokens: list[str] | None = None,
    chat_template: str = CHATML_TEMPLATE, extra_special: list[str] | None = None,
) -> PreTrainedTokenizerFast:
    """A fast tokenizer: eos `<|endoftext|>`, pad `<|pad|>`, ChatML end-of-turn `<|im_end|>`."""
    special = list(special_tokens or SPECIAL_TOKENS) + list(extra_special or [])
    tok = Tokenizer(models.BPE())
    # add_prefix_space: a name tokenizes the same at a document's start and after a special token.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=special[0], pad_token=special[1], bos_token=None,
        additional_special_tokens=special[2:],
    )
    fast.chat_template = chat_template
    return fast
