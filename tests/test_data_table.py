"""Examples read lazily from the memory-mapped Arrow table (data/table.py): the table is the same sequence as
the list it was written from, its fingerprint is `pipeline.fingerprint`'s, and the training loop trains
from it exactly as from Python lists (same losses, same samples, same weights, same resume)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import tunelab
from tunelab.data.pipeline import fingerprint
from tunelab.data.stream import BatchStream
from tunelab.data.table import ExampleTable, ExampleWriter, hash_batch, lengths_of, to_batch
from tunelab.data.types import IGNORE, Example, TokenizedData
from tunelab.recipes import run as run_recipe


def examples() -> list[Example]:
    out = []
    for i in range(23):
        ids = list(range(i % 7 + 1))
        rejected = Example([5, 6, 7][: i % 3], [IGNORE, 6, 7][: i % 3], f"f:{i}#r") if i % 4 == 0 else None
        out.append(Example(ids, [IGNORE, *ids[1:]], f"f:{i}", i % 2 if i % 5 == 0 else None, rejected))
    out.append(Example([], [], "f:empty"))
    return out


def written(tmp_path: Path, exs: list[Example], batch: int = 5) -> tuple[ExampleTable, str]:
    writer = ExampleWriter(tmp_path / "t.arrow")
    for i in range(0, len(exs), batch):
        writer.write(to_batch(exs[i : i + batch]))
    digest = writer.close()
    return ExampleTable.open(tmp_path / "t.arrow"), digest


def test_the_table_is_the_sequence_it_was_written_from(tmp_path):
    exs = examples()
    table, digest = written(tmp_path, exs)
    assert len(table) == len(exs) and list(table) == exs and table == exs
    assert [table[i] for i in range(len(exs))] == exs and table[-1] == exs[-1]
    assert list(table[3:17:2]) == exs[3:17:2] and list(table[::-1][2:5]) == exs[::-1][2:5]
    assert lengths_of(table).tolist() == [len(e.input_ids) for e in exs] == lengths_of(exs).tolist()
    assert list(ExampleTable.concat([table, table])) == exs + exs
    with pytest.raises(IndexError):
        table[len(exs)]
    assert digest == fingerprint(exs) == fingerprint(table)


def test_hash_batch_is_the_fingerprint_of_any_split_into_batches():
    exs = examples()
    for size in (1, 4, 100):
        h = hashlib.sha256()
        for i in range(0, len(exs), size):
            hash_batch(h, to_batch(exs[i : i + size]))
        assert h.hexdigest() == fingerprint(exs)


def test_the_stream_gives_the_same_batches_from_the_table_as_from_the_list(tmp_path):
    exs = [e for e in examples() if e.rejected is None and e.input_ids and e.label is None]
    table, _ = written(tmp_path, exs)
    for packing in (False, True):
        kw = dict(batch_size=3, packing=packing, max_length=12, seed=5, pad_id=0)
        a, b = BatchStream(exs, **kw), BatchStream(table, **kw)
        assert isinstance(b.lengths, np.ndarray)
        for _ in range(9):  # past the end of an epoch
            (x,), (y,) = a.next_group(1), b.next_group(1)
            assert x.where == y.where and all(torch.equal(x.tensors[k], y.tensors[k]) for k in x.tensors)
        state = b.state()
        c = BatchStream(exs, **kw)
        c.restore(state)
        assert [mb.where for mb in c.next_group(4)] == [mb.where for mb in b.next_group(4)]


# ----------------------------------------------------------------------------- the loop


def run_cfg(model_dir: Path, data: tuple[Path, Path], out: Path, packing: bool) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(data[0]), "eval": str(data[1]), "max_length": 64, "packing": packing},
        "method": {"name": "lora", "r": 4, "dropout": 0.1},  # dropout: the RNG state resumes too
        "train": {"max_steps": 6, "batch_size": 4, "lr": 1e-2, "save_every": 3, "eval_every": 3,
                  "tensorboard": False, "precision": "fp32"},
        "output": {"dir": str(out)},
    }


def logged(run: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("batch"), r.get("eval_loss")) for r in rows if "loss" in r or
            "eval_loss" in r]


def final(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "adapter_model.safetensors"))


@pytest.mark.parametrize("packing", [False, True])
def test_the_loop_trains_from_the_table_as_from_lists(llama_dir, chat_data, tmp_path, monkeypatch, packing):
    tunelab.train(run_cfg(llama_dir, chat_data, tmp_path / "table", packing), quiet=True)
    real = run_recipe.load_tokenized

    def as_lists(*a, **k) -> TokenizedData:
        data = real(*a, **k)
        assert isinstance(data.examples, ExampleTable)
        return TokenizedData(list(data.examples), data.fingerprint, data.stats)

    monkeypatch.setattr(run_recipe, "load_tokenized", as_lists)
    lists = run_cfg(llama_dir, chat_data, tmp_path / "lists", packing)
    tunelab.train(lists, quiet=True)
    assert logged(tmp_path / "lists") == logged(tmp_path / "table")
    ref = final(tmp_path / "table")
    got = final(tmp_path / "lists")
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    # a run checkpointed from lists resumes on the table (the data cursor is the same) and ends the same
    monkeypatch.setattr(run_recipe, "load_tokenized", real)
    tunelab.train(lists, resume_from="step-3", quiet=True)
    got = final(tmp_path / "lists")
    assert all(torch.equal(ref[k], got[k]) for k in ref)
