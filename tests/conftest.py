from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests import tiny

# OMP_NUM_THREADS=1 keeps tests usable while something else holds the cores.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))


@pytest.fixture(autouse=True)
def _own_data_cache(tmp_path_factory, monkeypatch):
    """Each test has a tokenized-data cache of its own (data/cache.py), also in the processes it starts:
    nothing stored by an earlier test or run can answer for this one."""
    monkeypatch.setenv("TUNELAB_DATA_CACHE", str(tmp_path_factory.mktemp("data-cache")))


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Lazily built tiny random models, one per architecture, shared by the session."""
    root = tmp_path_factory.mktemp("models")

    class Lazy(dict):
        def __missing__(self, arch: str) -> Path:
            self[arch] = tiny.save_model(root / arch, arch)
            return self[arch]

    return Lazy()


@pytest.fixture(scope="session")
def llama_dir(model_dirs) -> Path:
    return model_dirs["llama"]


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("data")
    return (tiny.write_jsonl(d / "train.jsonl", tiny.chat_records(64, seed=1)),
            tiny.write_jsonl(d / "eval.jsonl", tiny.chat_records(16, seed=2)))


@pytest.fixture(scope="module")
def tok(llama_dir):
    """The tiny Llama's tokenizer (ChatML template); data tests override it with their own."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llama_dir))
