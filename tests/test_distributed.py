"""Data-parallel training in several processes (`tunelab train --nproc N`, torchrun underneath; gloo on
CPU): the same weights as one process at the same global batch, one metrics line per step, and a
SIGKILLed run resumed in several processes bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests import tiny

pytestmark = pytest.mark.slow
STEPS = 6  # 24 examples, global batch 4: an epoch is 6 steps


def _cfg(tmp: Path, model_dir: Path, data: Path, name: str, method: str, batch: int) -> Path:
    cfg = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(data), "eval": str(data), "max_length": 64},
        "method": {"name": "lora", "r": 4, "dropout": 0.0} if method == "lora" else {"name": "full"},
        "train": {"max_steps": STEPS, "batch_size": batch, "lr": 1e-2 if method == "lora" else 1e-3,
                  "precision": "fp32", "tensorboard": False, "save_every": 2, "warmup": 1},
        "output": {"dir": str(tmp / name)},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(*args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TUNELAB_FAULT"}
    env.update({"OMP_NUM_THREADS": "1", **({"TUNELAB_FAULT": fault} if fault else {})})
    return subprocess.run([sys.executable, "-m", "tunelab", "train", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    final = run / "final"
    name = "adapter_model.safetensors" if (final / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(str(final / name))


def _steps(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny.write_jsonl(tmp_path_factory.mktemp("ddp") / "train.jsonl", tiny.chat_records(24, seed=5))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_processes_end_where_one_does_at_the_same_global_batch(method, llama_dir, data, tmp_path):
    one = _train(str(_cfg(tmp_path, llama_dir, data, "one", method, batch=4)), "-q")
    assert one.returncode == 0, one.stderr[-2000:]
    two = _train(str(_cfg(tmp_path, llama_dir, data, "two", method, batch=2)), "--nproc", "2", "-q")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:  # the same update up to the order of float sums (an all-reduce adds in another order)
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    s1, s2 = _steps(tmp_path / "one"), _steps(tmp_path / "two")
    assert [r["step"] for r in s2] == list(range(1, STEPS + 1))  # the main process alone writes metrics
    for r1, r2 in zip(s1, s2, strict=True):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)  # the whole batch's loss, over both processes
        assert r2["trained_tokens"] == r1["trained_tokens"]
    e1, e2 = (json.loads((tmp_path / run / "summary.json").read_text()) for run in ("one", "two"))
    assert e2["eval_tokens"] == e1["eval_tokens"]  # each process scored half the eval set; the sums agree
    assert e2["eval_loss"] == pytest.approx(e1["eval_loss"], rel=1e-4)


def test_a_killed_two_process_run_resumes_bit_identical(llama_dir, data, tmp_path):
    ref = _train(str(_cfg(tmp_path, llama_dir, data, "ref", "lora", batch=2)), "--nproc", "2", "-q")
    assert ref.returncode == 0, ref.stderr[-3000:]
    cfg = _cfg(tmp_path, llama_dir, data, "run", "lora", batch=2)
    killed = _train(str(cfg), "--nproc", "2", "-q", fault="kill@step:3")
    assert killed.returncode != 0
    resumed = _train(str(cfg), "--nproc", "2", "--resume", "-q")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = _weights(tmp_path / "ref"), _weights(tmp_path / "run")
    assert all(torch.equal(want[k], got[k]) for k in want)
    batches = {r["step"]: r["batch"] for r in _steps(tmp_path / "run")}
    assert batches == {r["step"]: r["batch"] for r in _steps(tmp_path / "ref")}
