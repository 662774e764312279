"""Load base models and tokenizers (local dir, hub id, or the embedded `tunelab-tiny`), safely.

Weights load from safetensors only; a folder holding only pickle weights (.bin/.pt) is refused
unless `model.allow_pickle` is set. `trust_remote_code` is off unless the user turns it on.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import try_to_load_from_cache
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from tunelab.config import ModelConfig
from tunelab.errors import TunelabError, UnsafeFileError
from tunelab.modeling.attention import usable_attention

EMBEDDED = "tunelab-tiny"
ASSETS = Path(__file__).resolve().parents[1] / "assets"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# Attention projections per architecture, for `target_modules: attention`.
ATTENTION_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "phi3": ["qkv_proj", "o_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_path(name_or_path: str) -> str:
    """`tunelab-tiny` -> the packaged base; an existing folder -> itself; anything else: a hub id."""
    if name_or_path == EMBEDDED:
        path = ASSETS / "tiny-base"
        if not (path / "config.json").is_file():
            raise TunelabError(
                "the embedded base model tunelab-tiny is not in this install",
                fix="set model.name_or_path to a local model folder or hub id",
            )
        return str(path)
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise TunelabError(
                f"{p}: not a model folder (no config.json)", fix="point at a folder saved by save_pretrained"
            )
        return str(p)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise TunelabError(f"{name_or_path}: no such model folder", fix="check the path, or use tunelab-tiny")
    return _hub_id(name_or_path)


def _hub_id(name: str) -> str:
    """A hub id, checked before transformers retries it for a minute: with the hub unreachable (or
    HF_HUB_OFFLINE set) it must already be in the local Hugging Face cache, and is read from there."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("", "0", "false")
    if not offline and _hub_reachable():
        return name
    try:
        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # an id the hub could not hold (bad characters, ...): not cached either
        cached = None
    if isinstance(cached, str):
        os.environ["HF_HUB_OFFLINE"] = "1"  # read it from the cache, no retries
        return name
    why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub cannot be reached from here (no network)"
    raise TunelabError(f"{name}: not a local folder, {why}, and it is not in the local cache",
                       fix="use a local model folder or tunelab-tiny (or download it where there is a network and "
                       "copy the folder here)")


@functools.lru_cache(maxsize=1)
def _hub_reachable() -> bool:
    try:
        socket.create_connection(HUB, timeout=3).close()
        return True
    except OSError:
        return False


HUB = ("huggingface.co", 443)


def check_weights_safe(path: str, allow_pickle: bool) -> None:
    """Refuse a local folder whose weights exist only as pickle files."""
    p = Path(path)
    if not p.is_dir() or allow_pickle:
        return
    has_safe = any(p.glob("*.safetensors"))
    pickled = [f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES]
    if pickled and not has_safe:
        raise UnsafeFileError(
            f"{p}: weights only in pickle format ({', '.join(sorted(pickled))}); loading them can run arbitrary code",
            fix="convert the weights to safetensors, or set model.allow_pickle=true if you trust the source",
        )


WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


def check_adapter_weights(folder: Path, allow_pickle: bool) -> None:
    """A peft adapter folder whose weights are only pickle (`adapter_model.bin`) is refused like a
    model folder's: peft would unpickle it."""
    if allow_pickle or (folder / "adapter_model.safetensors").is_file():
        return
    pickled = sorted(f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES)
    raise UnsafeFileError(
        f"{folder}: adapter weights only in pickle format ({', '.join(pickled) or 'no adapter_model.safetensors'})",
        fix="convert them to safetensors (adapter_model.safetensors), or pass --allow-pickle if you trust the source")


def _custom_code_error(path: str, e: Exception) -> TunelabError | None:
    """transformers' refusal of a model that needs its own code, as a tunelab error (else None)."""
    if "trust_remote_code" not in str(e):
        return None
    return UnsafeFileError(f"{path}: this model needs its own Python code to load (auto_map), which runs only "
                           "when you allow it", fix="if you trust the folder, set model.trust_remote_code=true in "
                           "your config, or pass --trust-remote-code")


def _announce_remote_code(cfg: ModelConfig, path: str) -> None:
    if cfg.trust_remote_code:
        sys.stderr.write(f"note: model.trust_remote_code is on: Python code from {path} may run\n")


def check_weight_files(folder: str | Path) -> None:
    """Refuse weight files that are links out of their folder (a shared model folder whose
    `model.safetensors` points at another file would read that file, and an export would copy it;
    links into the folder and the Hugging Face cache's snapshot -> blobs links are fine), and
    safetensors files that are truncated or corrupt, naming the file."""
    p = Path(folder)
    if not p.is_dir():
        return
    home = p.resolve()
    for f in sorted(p.iterdir()):
        if f.suffix not in WEIGHT_SUFFIXES or not f.is_symlink():
            continue
        target = f.resolve()
        if home in target.parents or target.parent == home.parent.parent / "blobs":
            continue
        raise UnsafeFileError(f"{f}: a link to {target}, outside the model folder; refusing to read it",
                              fix="replace the link by the file itself (cp --dereference), if you trust it")
    for f in sorted(p.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):  # reads and checks the header and the file's length
                pass
        except (SafetensorError, OSError) as e:
            raise TunelabError(f"{f}: not a complete safetensors file ({e})",
                               fix="the file is truncated or corrupt: copy, download or export it again") from None


def load_tokenizer(cfg: ModelConfig, path: str | None = None) -> PreTrainedTokenizerBase:
    path = path or resolve_path(cfg.name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    except (OSError, ValueError) as e:
        raise _custom_code_error(path, e) or TunelabError(
            f"cannot load a tokenizer from {path}: {e}", fix="check model.name_or_path") from None
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise TunelabError(f"{path}: the tokenizer has neither a pad nor an eos token", fix="add a pad token")
        # Padding is excluded by the attention mask and the labels, never by token id, so eos is safe.
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_model(cfg: ModelConfig, path: str | None = None, *, training: bool = True) -> nn.Module:
    path = path or resolve_path(cfg.name_or_path)
    check_weights_safe(path, cfg.allow_pickle)
    check_weight_files(path)
    kwargs: dict[str, Any] = {
        "trust_remote_code": cfg.trust_remote_code,
        "revision": cfg.revision,
        "use_safetensors": None if cfg.allow_pickle else True,
        "dtype": _dtype(cfg.dtype, training),
    }
    attention, note = usable_attention(cfg.attn_implementation)
    if note:
        sys.stderr.write(note + "\n")
    if attention:
        kwargs["attn_implementation"] = attention
    _announce_remote_code(cfg, path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ValueError as e:
        if (err := _custom_code_error(path, e)) is None:
            raise
        raise err from None
    except OSError as e:
        raise TunelabError(f"cannot load a model from {path}: {e}", fix="check model.name_or_path") from None
    if cfg.keep_layers is not None:
        keep_layers(model, cfg.keep_layers)
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of a causal LM's decoder blocks (Llama-like `model.layers`, GPT-2 `transformer.h`,
    GPT-NeoX `gpt_neox.layers`)."""
    body = getattr(model, "base_model", model)
    for name in ("layers", "h"):
        blocks = getattr(body, name, None)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise TunelabError(f"{type(model).__name__}: cannot find its decoder layers",
                       fix="keep_layers supports models with model.layers / transformer.h / gpt_neox.layers")


def keep_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """Drop every decoder layer not in `keep` (in place); config and per-layer indices follow."""
    blocks = decoder_layers(model)
    n = len(blocks)
    if not keep or len(set(keep)) != len(keep) or any(not 0 <= i < n for i in keep) or keep != sorted(keep):
        raise TunelabError(f"model.keep_layers {keep}: give distinct increasing layer indices in 0..{n - 1}",
                           fix=f"e.g. model.keep_layers={[0, n - 1] if n > 1 else [0]}".replace(" ", ""))
    kept = nn.ModuleList(blocks[i] for i in keep)
    for new_idx, block in enumerate(kept):
        for mod in block.modules():  # attention modules index the KV cache by layer
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx
    body = getattr(model, "base_model", model)
    setattr(body, "layers" if hasattr(body, "layers") else "h", kept)
    cfg = model.config
    for attr in ("num_hidden_layers", "n_layer"):
        if hasattr(cfg, attr):
            setattr(cfg, attr, len(keep))
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    return model


def _dtype(name: str, training: bool) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    # Training keeps fp32 master weights (mixed precision comes from autocast); inference on a
    # bf16-capable GPU can use bf16.
    if not training and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def model_config(name_or_path: str, trust_remote_code: bool = False) -> Any:
    path = resolve_path(name_or_path)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if (err := _custom_code_error(path, e)) is None:
            raise
        raise err from None


def linear_targets(model: nn.Module) -> list[str]:
    """Leaf names of every Linear/Conv1D inside the model except the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {
        name.rsplit(".", 1)[-1]
        for name, mod in model.named_modules()
        if isinstance(mod, (nn.Linear, Conv1D)) and mod is not head and "score" not in name
    }
    return sorted(names)


def attention_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    if model_type not in ATTENTION_TARGETS:
        raise TunelabError(
            f"no attention target list for architecture {model_type!r}",
            fix=f"list modules explicitly, e.g. method.target_modules=[{','.join(linear_targets(model)[:2])}]",
        )
    return ATTENTION_TARGETS[model_type]


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))
