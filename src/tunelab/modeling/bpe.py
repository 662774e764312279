"""Train a small byte-level BPE tokenizer with a chat template, offline (`tokenizers`).

Used to build the embedded base's tokenizer and the tiny models of the demo and the tests. The
special tokens and the ChatML template are TinyWorld's (`tunelab.world.chat`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from tunelab.world.chat import CHAT_TEMPLATE, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS


def train_bpe(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A fast tokenizer: pad `<|pad|>`, eos `<|endoftext|>`, ChatML turns ending in `<|im_end|>`."""
    tok = Tokenizer(models.BPE())
    # GPT-2's byte-level pre-tokenizer, trained as GPT-2 is: merges take a space into the word that
    # follows it (" Madrid" one token), decoding returns the text exactly, and llama.cpp's converter
    # recognises it (`gpt2`). A word after a newline or a chat marker has no space, so the chat
    # template puts one at the start of every assistant reply (`tunelab.world.chat`): an answer's
    # name is then the token that the prose teaching the fact used ("lives in Madrid").
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    # Train on the text between special tokens, as it is split at encoding time; otherwise the
    # merges learn "<|im_start|>user" pieces and miss the segments that actually occur.
    split = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
    tok.train_from_iterator((seg for text in texts for seg in split.split(text) if seg), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, bos_token=None,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (EOS_TOKEN, PAD_TOKEN)],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
