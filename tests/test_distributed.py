"""Data-parallel training in several processes (`tunelab train --nproc N`, torchrun underneath; gloo on
CPU), under DDP and FSDP2 (`train.distributed: fsdp`): the same weights as one process at the same
global batch, one metrics line per step, and a SIGKILLed run resumed in several processes bit-identical
to an uninterrupted one. DeepSpeed: the config generated from tunelab's, checked by DeepSpeed's own class
and run for a ZeRO-2 and a ZeRO-3 step (where deepspeed is installed)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests import tiny
from tunelab.errors import ConfigError
from tunelab.runconfig import RunConfig
from tunelab.training import deepspeed
from tunelab.training.backends import backend_for

pytestmark = pytest.mark.slow
STEPS = 6  # 24 examples, global batch 4: an epoch is 6 steps


def _cfg(tmp: Path, model_dir: Path, data: Path, name: str, method: str, batch: int, **train) -> Path:
    cfg = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(data), "eval": str(data), "max_length": 64},
        "method": {"name": "lora", "r": 4, "dropout": 0.0} if method == "lora" else {"name": "full"},
        "train": {"max_steps": STEPS, "batch_size": batch, "lr": 1e-2 if method == "lora" else 1e-3,
                  "precision": "fp32", "tensorboard": False, "save_every": 2, "warmup": 1, **train},
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


@pytest.fixture(scope="module")
def runs(llama_dir, data, tmp_path_factory):
    """`runs(name, method, batch, *args, **train)`: a completed run, launched once per module (name, method):
    the one-process reference and the FSDP2 run serve several tests."""
    root, done = tmp_path_factory.mktemp("runs"), {}

    def run(name: str, method: str, batch: int, *args: str, **train) -> Path:
        if (name, method) not in done:
            proc = _train(str(_cfg(root, llama_dir, data, f"{name}-{method}", method, batch, **train)), *args, "-q")
            assert proc.returncode == 0, proc.stderr[-3000:]
            done[name, method] = root / f"{name}-{method}"
        return done[name, method]
    return run


def _same_run(one: Path, two: Path) -> None:
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys()
    for k in a:  # the same update up to the order of float sums (an all-reduce adds in another order)
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    s1, s2 = _steps(one), _steps(two)
    assert [r["step"] for r in s2] == list(range(1, STEPS + 1))  # the main process alone writes metrics
    for r1, r2 in zip(s1, s2, strict=True):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)  # the whole batch's loss, over both processes
        assert r2["trained_tokens"] == r1["trained_tokens"]
    e1, e2 = (json.loads((run / "summary.json").read_text()) for run in (one, two))
    assert e2["eval_tokens"] == e1["eval_tokens"]  # DDP: each process scored half the eval set; the sums agree
    assert e2["eval_loss"] == pytest.approx(e1["eval_loss"], rel=1e-4)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_processes_end_where_one_does_at_the_same_global_batch(method, runs):
    _same_run(runs("one", method, 4), runs("ddp", method, 2, "--nproc", "2"))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fsdp2_two_processes_end_where_one_does_at_the_same_global_batch(method, runs):
    """FSDP2 reduce-scatters the gradients (a sum in another order than one process's, as DDP's all-reduce):
    measured max |difference| of the final weights 3.4e-7 (lora) and 6e-8 (full), so the DDP tolerance
    (rtol 1e-4, atol 1e-5) holds with a margin of 30x; the final model is consolidated (one file, every key)."""
    two = runs("fsdp", method, 2, "--nproc", "2", distributed="fsdp")
    _same_run(runs("one", method, 4), two)
    shards = sorted(p.name for p in (two / "checkpoints" / f"step-{STEPS}" / "shards").iterdir())
    assert len(shards) == 2 and not (two / "checkpoints" / f"step-{STEPS}" / "trainable.safetensors").exists()


@pytest.mark.parametrize(("method", "fault", "kept"), [("lora", "kill", 2), ("full", "term", 3)])
def test_a_stopped_fsdp2_run_resumes_bit_identical(method, fault, kept, runs, llama_dir, data, tmp_path):
    """Sharded state (weights, Adam moments) through torch.distributed.checkpoint: SIGKILL at step 3
    resumes from step 2's shards, SIGTERM checkpoints step 3 in every process and resumes there; both end
    bit-identical to the uninterrupted FSDP2 run (the same sums in the same order: no tolerance needed)."""
    ref = runs("fsdp", method, 2, "--nproc", "2", distributed="fsdp")
    cfg = _cfg(tmp_path, llama_dir, data, "run", method, 2, distributed="fsdp")
    stopped = _train(str(cfg), "--nproc", "2", "-q", fault=f"{fault}@step:3")
    assert stopped.returncode != 0
    assert max(int(p.name.split("-")[1]) for p in (tmp_path / "run" / "checkpoints").glob("step-*")) == kept
    resumed = _train(str(cfg), "--nproc", "2", "--resume", "-q")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = _weights(ref), _weights(tmp_path / "run")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert {r["step"]: r["batch"] for r in _steps(tmp_path / "run")} == {r["step"]: r["batch"] for r in _steps(ref)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nodes(cfg: Path, *args: str, fault_rank: int | None = None) -> list[subprocess.CompletedProcess]:
    """Two machines, dry run: two launchers on this one (`--nnodes 2 --node-rank R`), one process each,
    meeting at node 0's address (127.0.0.1 and a free port), as two `srun` tasks would."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNELAB_FAULT")}
    env["OMP_NUM_THREADS"] = "1"
    if fault_rank is not None:  # that rank alone dies by SIGKILL after its third step
        env.update(TUNELAB_FAULT="kill@step:3", TUNELAB_FAULT_RANK=str(fault_rank))
    master = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(cfg), "--nnodes", "2", "--node-rank",
                               str(r), "--master", master, *args, "-q"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=DEAD_PEER_LIMIT)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def test_machine_flags_are_checked_before_anything_starts(llama_dir, data, tmp_path):
    cfg = str(_cfg(tmp_path, llama_dir, data, "flags", "lora", 2))
    no_master = _train(cfg, "--nnodes", "2")
    assert no_master.returncode == 2 and "--master" in no_master.stderr and "HOST:PORT" in no_master.stderr
    bad_rank = _train(cfg, "--nnodes", "2", "--node-rank", "2", "--master", "127.0.0.1:1")
    assert bad_rank.returncode == 2 and "not below --nnodes 2" in bad_rank.stderr
    assert "Traceback" not in no_master.stderr + bad_rank.stderr and not (tmp_path / "flags").exists()


def test_two_machines_train_as_two_processes_on_one(runs, llama_dir, data, tmp_path):
    node0, node1 = _nodes(_cfg(tmp_path, llama_dir, data, "nodes", "lora", 2))
    assert node0.returncode == 0 and node1.returncode == 0, node0.stderr[-2000:] + node1.stderr[-2000:]
    _same_run(runs("one", "lora", 4), tmp_path / "nodes")


# How long the others may take to stop after one process dies: gloo reports the closed connection at once
# (measured: the whole two-machine run, started to stopped, in ~15 s); `train.dist_timeout` (600 s by default)
# bounds a machine that vanishes without closing its connections.
DEAD_PEER_LIMIT = 120


def test_a_process_that_dies_stops_the_others_with_a_clear_message_and_resumes_exactly(runs, llama_dir, data,
                                                                                       tmp_path):
    """Machine 1's process is SIGKILLed after step 3: its launcher names it, machine 0's process stops
    with one line naming the last checkpoint (step 2) instead of waiting; `--resume` (here in two local
    processes: the same ranks) ends bit-identical to an uninterrupted two-process run."""
    cfg = _cfg(tmp_path, llama_dir, data, "run", "lora", 2)
    node0, node1 = _nodes(cfg, fault_rank=1)
    assert node0.returncode != 0 and node1.returncode != 0
    assert "error: process rank 1" in node1.stderr and "SIGKILL" in node1.stderr, node1.stderr[-2000:]
    assert "another process of this run stopped" in node0.stderr and "step-2" in node0.stderr, node0.stderr[-3000:]
    assert "Traceback" not in node0.stderr + node1.stderr, node0.stderr[-3000:] + node1.stderr[-3000:]
    resumed = _train(str(cfg), "--nproc", "2", "--resume", "-q")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref = runs("ddp", "lora", 2, "--nproc", "2")
    want, got = _weights(ref), _weights(tmp_path / "run")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert {r["step"]: r["batch"] for r in _steps(tmp_path / "run")} == {r["step"]: r["batch"] for r in _steps(ref)}


def _run_config(**train) -> RunConfig:
    return RunConfig.model_validate({"train": {"batch_size": 2, "grad_accum": 3, "max_grad_norm": 0.5, **train}})


def test_fsdp_refuses_what_it_cannot_shard_in_one_line(tmp_path):
    cfg = RunConfig.model_validate({"method": {"name": "bitfit"}, "train": {"distributed": "fsdp"}})
    with pytest.raises(ConfigError, match="fsdp runs method full/lora, not 'bitfit'") as e:
        backend_for(cfg, tmp_path, 2, "no")
    assert "train.distributed=ddp" in str(e.value)
    with pytest.raises(ValueError, match="select_best"):
        _run_config(distributed="fsdp", select_best=True)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_config_states_tunelabs_batch_clipping_and_precision(stage, tmp_path, monkeypatch):
    cfg = _run_config(distributed=f"deepspeed_zero{stage}")
    with pytest.raises(ConfigError, match="does not drive DeepSpeed"):  # written, then refused in one line
        backend_for(cfg, tmp_path, 2, "bf16")
    ds = json.loads((tmp_path / deepspeed.CONFIG_FILE).read_text())
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 2 * 3 * 2 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["zero_optimization"]["stage"] == stage
    assert "optimizer" not in ds and "scheduler" not in ds  # tunelab's AdamW and schedule stay


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeeds_own_config_class_accepts_the_generated_config(stage, tmp_path, monkeypatch):
    from deepspeed.runtime import config as ds_config  # the dev extra installs it: never skipped
    with pytest.raises(ConfigError):
        backend_for(_run_config(distributed=f"deepspeed_zero{stage}"), tmp_path, 2, "bf16")
    monkeypatch.setattr(ds_config.dist, "get_world_size", lambda *a, **k: 2)  # two processes, without launching
    monkeypatch.setattr(ds_config.dist, "get_rank", lambda *a, **k: 0)
    checked = ds_config.DeepSpeedConfig(str(tmp_path / deepspeed.CONFIG_FILE))
    assert (checked.train_batch_size, checked.gradient_accumulation_steps, checked.zero_optimization_stage) == \
        (12, 3, stage)
    assert checked.gradient_clipping == 0.5 and checked.bfloat16_config.enabled and not checked.float16_config.enabled


ZERO_STEP = '''
import os
import sys
import torch, deepspeed
import deepspeed.comm.torch as ds_comm
from transformers import AutoModelForCausalLM
from tests import tiny
from tunelab.runconfig import RunConfig
from tunelab.training import deepspeed as generated
# DeepSpeed's shared-memory all-reduce for CPUs is a speed-up it JIT-compiles (~60 s of C++ on 2 cores):
# plain gloo collectives instead; the ZeRO partitioning and the step are the same
ds_comm.build_shm_op = lambda: None
deepspeed.init_distributed(dist_backend="gloo")
for stage in (2, 3):
    cfg = RunConfig.model_validate({"train": {"batch_size": 2, "distributed": f"deepspeed_zero{stage}"}})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny.config("llama", 400))
    before = model.model.norm.weight.detach().clone()
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                      config=generated.config(cfg, 2, "no"))
    x = torch.randint(0, 400, (2, 16))
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step()
    with deepspeed.zero.GatheredParameters([model.model.norm.weight]):  # ZeRO-3: gather the shard to compare
        changed = not torch.equal(model.model.norm.weight.detach().cpu(), before)
    sys.stdout.write(f"zero{stage} {engine.global_steps} {changed}\\n")  # one write: the ranks' lines stay whole
    sys.stdout.flush()
torch.distributed.barrier()
sys.stdout.flush()
os._exit(0)  # skip interpreter teardown: DeepSpeed's CPU comm threads sometimes abort there ("terminate called")
'''


def test_the_generated_config_runs_a_zero2_and_zero3_step_on_cpu(tmp_path):
    """DeepSpeed's CPU accelerator on gloo, driven directly (not by tunelab's loop, which refuses it): the
    generated config runs a ZeRO-2 and a ZeRO-3 optimizer step in 2 processes."""
    script = tmp_path / "zero_step.py"
    script.write_text(ZERO_STEP)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("zero2 1 True") == 2 and proc.stdout.count("zero3 1 True") == 2, proc.stdout[-2000:]
