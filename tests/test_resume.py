"""Exact resume: runs killed (SIGKILL, also mid-checkpoint) or stopped (SIGTERM) and resumed end
bit-identical to an uninterrupted run, having seen the same samples at every step."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tunelab.errors import EXIT_RESUMABLE

pytestmark = pytest.mark.slow
STEPS = 20  # 64 examples / batch 4 = 16 steps an epoch: the run crosses an epoch boundary


def write_cfg(tmp: Path, model_dir: Path, data: tuple[Path, Path], name: str) -> Path:
    cfg = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(data[0]), "max_length": 64},
        "method": {"name": "lora", "r": 4, "dropout": 0.1},  # dropout: the RNG state must resume too
        "train": {"max_steps": STEPS, "batch_size": 4, "lr": 5e-3, "save_every": 2, "precision": "fp32",
                  "tensorboard": False, "warmup": 3},
        "output": {"dir": str(tmp / name)},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def tunelab(*args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if fault:
        env["TUNELAB_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "tunelab", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "adapter_model.safetensors"))


def batches(run: Path) -> dict[int, set[str]]:
    seen: dict[int, set[str]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "batch" in row:
            seen.setdefault(row["step"], set()).add(row["batch"])
    return seen


@pytest.fixture(scope="module")
def reference(llama_dir, chat_data, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ref")
    r = tunelab("train", str(write_cfg(tmp, llama_dir, chat_data, "ref")), "-q")
    assert r.returncode == 0, r.stderr
    return tmp / "ref"


def assert_same_as_reference(run: Path, reference: Path) -> None:
    ref_w, got_w = final_weights(reference), final_weights(run)
    assert ref_w.keys() == got_w.keys()
    for k in ref_w:
        assert torch.equal(ref_w[k], got_w[k]), f"{k} differs after resume"
    ref_b, got_b = batches(reference), batches(run)
    assert set(got_b) == set(range(1, STEPS + 1))
    for step, ids in got_b.items():
        assert ids == ref_b[step], f"step {step} saw other samples"


@pytest.mark.parametrize("fault", [f"kill@step:{random.Random(os.getpid()).randint(3, STEPS - 2)}", "kill@save:6"])
def test_sigkill_then_resume_is_bit_identical(fault, llama_dir, chat_data, tmp_path, reference):
    cfg = write_cfg(tmp_path, llama_dir, chat_data, "run")
    r = tunelab("train", str(cfg), "-q", fault=fault)
    assert r.returncode == -9, (r.returncode, r.stderr[-2000:])
    if fault == "kill@save:6":  # died mid-write: step-6 must not exist, its temp dir must not be used
        assert not (tmp_path / "run" / "checkpoints" / "step-6").exists()
    r = tunelab("train", str(cfg), "--resume", "-q")
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_as_reference(tmp_path / "run", reference)


def test_sigterm_checkpoints_exits_resumable_and_resumes(llama_dir, chat_data, tmp_path, reference):
    cfg = write_cfg(tmp_path, llama_dir, chat_data, "run")
    r = tunelab("train", str(cfg), "-q", fault="term@step:7")
    assert r.returncode == EXIT_RESUMABLE, r.stderr[-2000:]
    assert (tmp_path / "run" / "checkpoints" / "step-7" / "manifest.json").exists()
    r = tunelab("train", str(tmp_path / "run"), "--resume", "-q")  # a run dir resumes with its own config
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_as_reference(tmp_path / "run", reference)


def test_a_key_added_to_tunelab_after_a_run_was_written_is_not_a_change():
    """Upgrading tunelab must not make its old runs unresumable: keys the old config.yaml lacks
    count as their defaults; a real change is still named."""
    from tunelab.recipes.run import changed_keys
    from tunelab.runconfig import build_config

    new = build_config({"method": {"name": "lora"}}).to_dict()
    old = {k: dict(v) if isinstance(v, dict) else v for k, v in new.items()}
    del old["data"]["max_truncated_share"]
    assert changed_keys(old, new) == []
    old["train"] = {**old["train"], "lr": 0.5}
    assert changed_keys(old, new) == ["train.lr"]
