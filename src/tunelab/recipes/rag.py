"""RAG retrieval (N02): index documents, query the index. `tunelab rag index` / `tunelab rag query`.

Names become models here: the tokenizer that measures chunks (default the embedded base
`tunelab-tiny`) and the encoder of a dense index (`base`: the tokenizer's model, mean-pooled).
Adding to an index reuses what the index recorded unless told otherwise. The building blocks are
in `tunelab.nonparametric` (chunk, encode, retrieve, index).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tunelab.config import ModelConfig
from tunelab.errors import TunelabError
from tunelab.modeling.load import EMBEDDED, load_tokenizer
from tunelab.nonparametric.chunk import MAX_DOC_BYTES
from tunelab.nonparametric.encode import Encoder
from tunelab.nonparametric.index import Hit, RagIndex, build_index

BASE = "base"  # --encoder base: the tokenizer's own model
DEFAULT_SIZE, DEFAULT_OVERLAP = 128, 16


def _recorded(out: str | Path, add: bool) -> dict[str, Any] | None:
    """The manifest of the index an add extends (None when building anew)."""
    if not add:
        return None
    if not (Path(out) / "manifest.json").is_file():
        raise TunelabError(f"--add: {out} is not a RAG index (no manifest.json)", fix="build it first, without --add")
    return RagIndex.open(out).manifest


def rag_index(
    docs: str | Path | Sequence[str | Path], out: str | Path, *, tokenizer: str | None = None,
    size: int | None = None, overlap: int | None = None, dense: bool = False, encoder: str | None = None,
    per_line: bool = False, add: bool = False, dense_index: str = "auto", max_doc_bytes: int = MAX_DOC_BYTES,
    trust_remote_code: bool = False, allow_pickle: bool = False, log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Chunk `docs` (.txt/.md/.jsonl files or folders) with `tokenizer` and write a BM25 index
    (with `dense`: also the chunks' vectors from `encoder`) to `out`; returns the build stats.
    With `add`: the documents are added to the index at `out`, chunked and encoded as it was."""
    recorded = _recorded(out, add)
    tok_name = tokenizer or (recorded["tokenizer"]["name"] if recorded else EMBEDDED)
    if size is None:
        size = recorded["chunking"]["size"] if recorded else DEFAULT_SIZE
    if overlap is None:
        overlap = recorded["chunking"]["overlap"] if recorded else DEFAULT_OVERLAP
    enc_name = encoder or ((recorded.get("encoder") or {}).get("name") if recorded else None)
    dense = dense or bool(recorded and recorded.get("encoder")) or encoder is not None
    trust = dict(trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    tok = load_tokenizer(ModelConfig(name_or_path=tok_name, **trust))
    enc = Encoder.load(tok_name if enc_name in (None, BASE) else enc_name, **trust) if dense else None
    return build_index(docs, out, tokenizer=tok, tokenizer_name=tok_name, size=size, overlap=overlap,
                       retrievers=("bm25", "dense") if dense else ("bm25",), encoder=enc, add=add,
                       per_line=per_line, max_doc_bytes=max_doc_bytes, dense_index=dense_index, log=log)


def rag_query(
    index: str | Path, query: str, *, k: int = 5, retriever: str = "bm25", encoder: str | None = None,
    trust_remote_code: bool = False, allow_pickle: bool = False,
) -> list[Hit]:
    """The `k` chunks of the index at `index` that best answer `query`, best first. Dense and
    hybrid retrieval embed the query with `encoder` (default: the one the index was built with)."""
    idx = RagIndex.open(index)
    enc = None
    if retriever in ("dense", "hybrid"):
        enc = idx.encoder(encoder, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    return idx.search([query], k, retriever, enc)[0]
