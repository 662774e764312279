"""Multi-task mixing (O03): sampling probabilities against the formula, the epoch's draws, exact
resume of the mixture, per-task losses that packing does not contaminate, and the config's errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests import tiny
from tunelab.config import DataConfig
from tunelab.data.mixture import draw_counts, load_mixture, mixing_probs, mixture_order
from tunelab.data.stream import MixtureStream
from tunelab.data.types import Example
from tunelab.errors import EXIT_RESUMABLE, ConfigError
from tunelab.inference.loss import evaluate_loss
from tunelab.objectives import OBJECTIVES
from tunelab.objectives.registry import RunContext
from tunelab.runconfig import build_config


def test_probabilities_match_the_formula():
    sizes = [1000, 100, 10]
    for temperature in (0.5, 1.0, 2.0, 5.0, 1e6):
        naive = [n ** (1 / temperature) for n in sizes]
        want = [x / sum(naive) for x in naive]
        got = mixing_probs(sizes, [None] * 3, temperature)
        assert got == pytest.approx(want, rel=1e-12)
    assert mixing_probs(sizes, [None] * 3, 1.0) == pytest.approx([1000 / 1110, 100 / 1110, 10 / 1110])
    assert mixing_probs(sizes, [None] * 3, 1e6) == pytest.approx([1 / 3] * 3, abs=1e-4)  # large T: uniform
    assert mixing_probs(sizes, [1.0, 1.0, 2.0], 3.0) == pytest.approx([0.25, 0.25, 0.5])  # weights win over T


def test_draw_counts_sum_and_round_by_largest_remainder():
    assert draw_counts([0.5, 0.3, 0.2], 10) == [5, 3, 2]
    assert draw_counts([1 / 3] * 3, 10) == [4, 3, 3]  # the tie goes to the earlier task
    for n in (1, 7, 1000):
        counts = draw_counts([0.61, 0.29, 0.1], n)
        assert sum(counts) == n
        assert all(abs(c - p * n) < 1 for c, p in zip(counts, [0.61, 0.29, 0.1], strict=True))


def test_an_epoch_draws_each_task_its_share_and_cycles_small_tasks():
    task_of = [0] * 90 + [1] * 10  # imbalanced: 90 and 10 examples
    probs = mixing_probs([90, 10], [None, None], 1e6)  # uniform: 50 draws each
    order = mixture_order(task_of, probs, seed=3, epoch=0)
    assert len(order) == 100
    per_task = Counter(task_of[i] for i in order)
    assert per_task == {0: 50, 1: 50}
    small = Counter(i for i in order if task_of[i] == 1)
    assert set(small) == set(range(90, 100)) and set(small.values()) == {5}  # every small example 5 times
    big = [i for i in order if task_of[i] == 0]
    assert len(set(big)) == 50  # the big task's 50 draws are distinct examples
    assert order == mixture_order(task_of, probs, seed=3, epoch=0)  # fixed by (seed, epoch)
    assert order != mixture_order(task_of, probs, seed=3, epoch=1)
    # over many epochs the drawn share matches p for every task
    drawn = Counter(task_of[i] for e in range(20) for i in mixture_order(task_of, [0.8, 0.2], 0, e))
    assert drawn[1] / sum(drawn.values()) == pytest.approx(0.2, abs=1e-9)


def _records(tmp: Path, name: str, n: int, seed: int) -> str:
    return str(tiny.write_jsonl(tmp / f"{name}.jsonl", tiny.chat_records(n, seed=seed)))


def test_the_stream_resumes_exactly_mid_epoch(tmp_path):
    examples = list(range(30))
    task_of = [0] * 20 + [1] * 10


    exs = [Example([1, 2, 3 + (i % 5)], [-100, 2, 3 + (i % 5)], where=f"f:{i}") for i in examples]
    kw = dict(task_of=task_of, probs=[0.5, 0.5], batch_size=4, packing=True, max_length=12, seed=7, pad_id=0)
    a = MixtureStream(exs, **kw)
    for _ in range(5):
        a.next_group(1)
    state = a.state()
    rest = [a.next_group(1)[0].where for _ in range(10)]  # crosses into the next epoch
    b = MixtureStream(exs, **kw)
    b.restore(json.loads(json.dumps(state)))
    assert [b.next_group(1)[0].where for _ in range(10)] == rest


def test_per_task_losses_are_uncontaminated_by_packing(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llama_dir))
    model = AutoModelForCausalLM.from_pretrained(str(llama_dir), torch_dtype=torch.float32).eval()
    data = DataConfig(train=[{"source": _records(tmp_path, "a", 12, 1), "task": "a"},
                             {"source": _records(tmp_path, "b", 8, 2), "task": "b"}], max_length=512)
    mix = load_mixture(data, tok, mask_prompt=True, formats=("chat",), log=lambda _m: None)
    stream = MixtureStream(mix.examples, task_of=mix.task_of, probs=mix.probs, batch_size=2, packing=True,
                           max_length=512, seed=0, pad_id=tok.pad_token_id)
    mb = stream.next_group(1)[0]
    assert mb.tensors["input_ids"].shape[0] == 2 and len(mb.where) > 4  # rows hold several examples, both tasks
    cfg = build_config({"model": {"name_or_path": str(llama_dir)}, "data": data.model_dump(mode="json")})
    runtime = OBJECTIVES["sft"].make_runtime(RunContext(cfg, model, tok, torch.device("cpu"), tasks=mix.names))
    with torch.no_grad():
        total, n = runtime.loss(model, mb.tensors)
    got = runtime.stats()
    # reference: every example of the batch alone, unpacked, through the plain next-token loss
    by_where = {ex.where: (ex, t) for ex, t in zip(mix.examples, mix.task_of, strict=True)}
    sums, counts = [0.0, 0.0], [0, 0]
    for where in mb.where:
        ex, t = by_where[where]
        ref = evaluate_loss(model, [ex], batch_size=1, pad_id=tok.pad_token_id, packing=False, max_length=512)
        sums[t] += ref["loss"] * ref["tokens"]
        counts[t] += int(ref["tokens"])
    for t, name in enumerate(mix.names):
        if counts[t]:
            assert got[f"loss_{name}"] == pytest.approx(sums[t] / counts[t], rel=1e-4)
    assert float(total) == pytest.approx(sum(sums), rel=1e-4) and int(n) == sum(counts)


@pytest.mark.parametrize("train, problem", [
    ([], "empty list"),
    (["a.jsonl", "dir/a.jsonl"], "'a' given to more than one source"),
    ([{"source": "x.jsonl", "task": "t"}, {"source": "y.jsonl", "task": "t"}], "'t' given to more than one"),
    ([{"source": "x.jsonl", "weight": 1}, {"source": "y.jsonl"}], "give every task a weight, or none"),
    ([{"source": "x.jsonl", "weight": 0}], "greater than 0"),
])
def test_bad_mixtures_are_one_line_errors(train, problem):
    with pytest.raises(ConfigError) as e:
        build_config({"data": {"train": train}})
    assert problem in e.value.message and "\n" not in e.value.message.strip()


def test_mixture_needs_an_objective_that_mixes_and_one_kind_of_eval():
    mix = [{"source": "x.jsonl", "eval": "xe.jsonl"}, {"source": "y.jsonl"}]
    with pytest.raises(ConfigError, match="objective dpo takes one source"):
        build_config({"data": {"train": mix}, "objective": {"name": "dpo"}})
    with pytest.raises(ConfigError, match="data.eval and per-task `eval:` are both set"):
        build_config({"data": {"train": mix, "eval": "all.jsonl"}})
    cfg = build_config({"data": {"train": mix}, "train": {"select_best": True}})  # per-task eval is eval
    assert [t.name() for t in cfg.data.tasks()] == ["x", "y"]
    assert DataConfig(train=["tinyworld:skills@sorting-train"]).tasks()[0].name() == "sorting-train"


def _write(tmp: Path, llama_dir: Path, name: str, a: str, b: str) -> Path:
    cfg = {
        "model": {"name_or_path": str(llama_dir)},
        "data": {"train": [{"source": a, "task": "a", "eval": a}, {"source": b, "task": "b", "weight": 1.0}],
                 "max_length": 64, "packing": True},
        "method": {"name": "lora", "r": 4},
        "train": {"max_steps": 12, "batch_size": 2, "lr": 5e-3, "save_every": 2, "eval_every": 6,
                  "precision": "fp32", "tensorboard": False},
        "output": {"dir": str(tmp / name)},
    }
    cfg["data"]["train"][0]["weight"] = 3.0
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _tunelab(*args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"TUNELAB_FAULT": fault} if fault else {})}
    return subprocess.run([sys.executable, "-m", "tunelab", *args], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_a_killed_multitask_run_resumes_bit_identical_with_per_task_metrics(llama_dir, tmp_path):
    a, b = _records(tmp_path, "ta", 24, 1), _records(tmp_path, "tb", 6, 2)
    ref = _tunelab("train", str(_write(tmp_path, llama_dir, "ref", a, b)), "-q")
    assert ref.returncode == 0, ref.stderr
    rows = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert all("loss_a" in r or "loss_b" in r for r in steps)
    assert any("loss_b" in r for r in steps)
    evals = [r for r in rows if "eval_loss_a" in r]
    assert len(evals) == 2 and not any("eval_loss_b" in r for r in rows)  # only task a has eval data
    assert math.isclose(evals[-1]["eval_loss"], evals[-1]["eval_loss_a"])
    cfg = _write(tmp_path, llama_dir, "run", a, b)
    killed = _tunelab("train", str(cfg), "-q", fault="kill@step:5")
    assert killed.returncode not in (0, EXIT_RESUMABLE)
    resumed = _tunelab("train", str(cfg), "--resume", "-q")
    assert resumed.returncode == 0, resumed.stderr
    want = load_file(str(tmp_path / "ref" / "final" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "run" / "final" / "adapter_model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    def digests(run: str) -> dict[int, str]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["batch"] for r in map(json.loads, lines) if "batch" in r}

    assert digests("run") == digests("ref")
