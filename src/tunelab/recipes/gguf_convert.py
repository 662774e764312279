"""Run llama.cpp's own converter (`convert_hf_to_gguf.py` / `convert_lora_to_gguf.py`) from a
llama.cpp source folder, as a subprocess of `tunelab export --gguf`:

    python -m tunelab.recipes.gguf_convert LLAMA_CPP_DIR SCRIPT [converter arguments...]

One change to its behaviour: llama.cpp names a BPE pre-tokenizer by hashing what the tokenizer
makes of a fixed text, and that hash depends on the whole vocabulary, so a tokenizer trained
anywhere else (tunelab-tiny's, a user's own) is refused as "not recognized" even when its
pre-tokenizer is exactly GPT-2's. When the hash is unknown and tokenizer.json's pre-tokenizer is
GPT-2's byte-level regex, structurally, the converter is told "gpt-2"; any other unknown
pre-tokenizer is still refused. The export's check then compares llama.cpp's tokenization with
transformers' on real prompts, so a wrong guess cannot pass silently.
"""

from __future__ import annotations

import json
import logging
import runpy
import sys
from pathlib import Path
from typing import Any

# GPT-2's pre-tokenizer as the `tokenizers` library writes it (its regex is ByteLevel's built-in one).
GPT2_PRE_TOKENIZER = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def pre_tokenizer_name(tokenizer_json: Path) -> str | None:
    """'gpt-2' when the tokenizer.json's pre-tokenizer is exactly GPT-2's; else None."""
    try:
        pre = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("pre_tokenizer")
    except (OSError, ValueError):
        return None
    if isinstance(pre, dict) and pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    return "gpt-2" if pre == GPT2_PRE_TOKENIZER else None


def _patch(base: Any) -> None:
    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
        log = logging.getLogger("hf-to-gguf")
        level = log.level
        log.setLevel(logging.ERROR)  # its long "not recognized" banner, for a case handled below
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            name = pre_tokenizer_name(Path(self.dir_model) / "tokenizer.json")
            if name is None:
                raise
            return name
        finally:
            log.setLevel(level)

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre


def main(argv: list[str]) -> None:
    llama, script, *args = argv
    root = Path(llama)
    sys.path[:0] = [str(root), str(root / "gguf-py")]
    from conversion import base  # llama.cpp's converter package (on the path just above)

    _patch(base)
    sys.argv = [str(root / script), *args]
    runpy.run_path(str(root / script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
