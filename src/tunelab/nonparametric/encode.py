"""Texts -> L2-normalised float32 vectors, for dense retrieval.

Two kinds of model, one pooling: the mean of the last hidden states over the attention mask
(`tunelab.inference.embed`, which the contrastive objective trains through too). (a) a causal LM,
loaded by `tunelab.artifacts.load` (the base `tunelab-tiny`, a model folder or cached hub id, a
run's final model, a peft adapter, a tunelab delta): its decoder's final hidden states, the head
unused; (b) any local Hugging Face encoder folder (BERT-like, `AutoModel`). Loading goes through
tunelab's safe loaders: safetensors only unless `allow_pickle`, no model code unless
`trust_remote_code`.

An index remembers its encoder's `fingerprint`, so that a query embedded by another model (whose
vectors live in another space) is refused instead of answered with noise. The fingerprint is
cheap: the model's config, the names and sizes of its weight and tokenizer files and a sample of
the weights' bytes, hashed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModel, PreTrainedTokenizerBase

from tunelab.artifacts import is_delta, load
from tunelab.config import ModelConfig
from tunelab.errors import TunelabError
from tunelab.inference.embed import embed
from tunelab.modeling.load import (
    WEIGHT_SUFFIXES,
    check_weight_files,
    check_weights_safe,
    load_tokenizer,
    model_config,
    resolve_path,
)

MAX_LENGTH = 512  # tokens an encoded text keeps: chunks are far shorter, a long query is cut


def is_causal_lm(config: Any) -> bool:
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in getattr(config, "architectures", None) or [])


def _sample_digest(f: Path, blocks: int = 16, block: int = 4096) -> str:
    """sha256 of `blocks` blocks spread evenly over the file: two trainings of one architecture
    have equal sizes but different bytes, and reading 64 KiB of a file costs nothing."""
    size, h = f.stat().st_size, hashlib.sha256()
    with open(f, "rb") as fh:
        for i in range(blocks):
            fh.seek(max(0, (size - block) * i // max(1, blocks - 1)))
            h.update(fh.read(block))
    return h.hexdigest()


def fingerprint(path: str, config: Any, pooling: str = "mean") -> str:
    """`<pooling>:<16 hex>`: a hash of the config, the names and sizes of the weight and tokenizer
    files, and a sample of the weights' bytes; equal for a copy of the folder, different for
    another training of the same architecture. A hub id without a local folder: its name."""
    files: list[tuple[str, int, str]] = []
    folder = Path(path)
    if folder.is_dir():
        files = sorted((f.name, f.stat().st_size, _sample_digest(f) if f.suffix in WEIGHT_SUFFIXES else "")
                       for f in folder.iterdir() if f.suffix in WEIGHT_SUFFIXES or f.name.startswith("tokenizer"))
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    cfg.pop("_name_or_path", None)
    cfg.pop("transformers_version", None)
    blob = json.dumps({"config": cfg, "files": files, "hub_id": None if files else path}, sort_keys=True, default=str)
    return f"{pooling}:{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


class Encoder:
    """A model and its tokenizer that embed texts (module docstring). `name` is what the user
    called it; `fingerprint` is its identity."""

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, *, name: str, fingerprint: str,
                 batch_size: int = 32):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.name, self.fingerprint, self.batch_size = name, fingerprint, batch_size
        config = getattr(model, "config", None)
        self.dim = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0))
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.max_length = min(MAX_LENGTH, positions or MAX_LENGTH)

    @classmethod
    def load(cls, name_or_path: str = "tunelab-tiny", *, trust_remote_code: bool = False,
             allow_pickle: bool = False, batch_size: int = 32) -> Encoder:
        """A causal LM through `tunelab.artifacts.load` (a model folder, hub id, `tunelab-tiny`, a
        run dir's final model, a peft adapter, a tunelab delta), or an encoder folder (AutoModel)."""
        p = Path(name_or_path)
        if (p / "config.yaml").is_file() or (p / "adapter_config.json").is_file() or is_delta(p):
            model, tok = load(p, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
            folder = p / "final" if (p / "config.yaml").is_file() else p
            return cls(model, tok, name=name_or_path, fingerprint=fingerprint(str(folder), model.config),
                       batch_size=batch_size)
        path = resolve_path(name_or_path)
        config = model_config(name_or_path, trust_remote_code=trust_remote_code)
        if is_causal_lm(config):
            model, tok = load(path, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        else:
            cfg = ModelConfig(name_or_path=path, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
            model, tok = _load_encoder(cfg, path), load_tokenizer(cfg, path)
        return cls(model, tok, name=name_or_path, fingerprint=fingerprint(path, config), batch_size=batch_size)

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        """(N, D) float32 unit rows. Texts are batched by length (less padding), then put back in order."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        device = next(self.model.parameters()).device
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(device)
            out[idx] = embed(self.model, batch["input_ids"], batch["attention_mask"]).cpu().numpy()
        return out


def _load_encoder(cfg: ModelConfig, path: str) -> torch.nn.Module:
    check_weights_safe(path, cfg.allow_pickle)
    check_weight_files(path)
    try:
        return AutoModel.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, dtype=torch.float32,
                                         use_safetensors=None if cfg.allow_pickle else True)
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e):
            raise TunelabError(f"{path}: this encoder needs its own Python code to load (auto_map)",
                               fix="if you trust the folder, pass --trust-remote-code") from None
        raise TunelabError(f"cannot load an encoder from {path}: {e}",
                           fix="point --encoder at a model folder saved by save_pretrained") from None
