"""Continual learning (O08): the metrics, the EWC Fisher and penalty and the reservoir against naive
references; bad input as one-line errors; runs of every strategy on a tiny model, per-task adapters
with BWT exactly 0, and a failed stage that loses nothing and resumes in the right stage."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from tests import tiny
from tunelab.data.collate import collate
from tunelab.data.types import IGNORE, Example
from tunelab.errors import ConfigError, DataError, TunelabError
from tunelab.recipes.continual import continual, read_spec
from tunelab.recipes.continual_math import diagonal_fisher, ewc_penalty, reservoir_add, transfer_metrics


def test_acc_bwt_fwt_against_a_hand_computed_matrix():
    R = [[0.8, 0.1, 0.0],
         [0.5, 0.9, 0.2],
         [0.4, 0.6, 0.7]]
    base = [0.0, 0.05, 0.1]
    m = transfer_metrics(R, base)
    assert m["acc"] == pytest.approx((0.4 + 0.6 + 0.7) / 3)
    assert m["bwt"] == pytest.approx(((0.4 - 0.8) + (0.6 - 0.9)) / 2)  # -0.35
    assert m["fwt"] == pytest.approx(((0.1 - 0.05) + (0.2 - 0.1)) / 2)  # +0.075
    assert m["forgetting"] == pytest.approx(0.35)
    assert transfer_metrics([[1.0, 0.0], [1.0, 1.0]], [0.0, 0.0])["bwt"] == 0.0


def _examples(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(3, 60) for _ in range(rng.randint(4, 9))]
        labels = [IGNORE, IGNORE] + ids[2:]
        out.append(Example(ids, labels))
    return out


def test_the_fisher_is_the_mean_squared_per_example_gradient(llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(llama_dir), torch_dtype=torch.float32)
    for n, p in model.named_parameters():  # a few trainable tensors keep the reference cheap
        p.requires_grad_(n.endswith("layers.0.mlp.down_proj.weight") or n.endswith("norm.weight"))
    examples = _examples(5, 0)
    got = diagonal_fisher(model, examples, pad_id=0)
    # reference: a loop over the samples, each gradient from transformers' own loss (mean NLL x tokens)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    want = {n: torch.zeros_like(p) for n, p in params.items()}
    model.eval()
    for ex in examples:
        ids = torch.tensor([ex.input_ids])
        labels = torch.tensor([ex.labels])
        out = model(input_ids=ids, labels=labels)
        n_tokens = int((labels[:, 1:] != IGNORE).sum())
        model.zero_grad()
        (out.loss * n_tokens).backward()
        for n, p in params.items():
            want[n] += p.grad.detach() ** 2 / len(examples)
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-9)
    # a mean over samples: the Fisher of the union is the size-weighted mean of the parts'
    a, b = diagonal_fisher(model, examples[:2], 0), diagonal_fisher(model, examples[2:], 0)
    for n in want:
        torch.testing.assert_close(got[n], (2 * a[n] + 3 * b[n]) / 5, rtol=1e-5, atol=1e-9)
    assert collate  # the batch of one the Fisher uses is the training collate


def test_the_ewc_penalty_is_the_formula():
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 0.5]]))
        model.bias.copy_(torch.tensor([0.25, -0.5]))
    f1 = {"weight": torch.tensor([[1.0, 0.0, 2.0], [0.5, 0.5, 0.0]]), "bias": torch.tensor([1.0, 3.0])}
    s1 = {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}
    f2 = {"weight": torch.ones(2, 3)}
    s2 = {"weight": torch.ones(2, 3)}
    got = ewc_penalty([(f1, s1), (f2, s2)], lam=4.0)(model)
    w, b = model.weight.detach(), model.bias.detach()
    by_hand = (1 * 1 + 0 * 4 + 2 * 9 + 0.5 * 0 + 0.5 * 1 + 0 * 0.25) + (1 * 0.0625 + 3 * 0.25)  # stage 1
    by_hand += float(((w - 1) ** 2).sum())  # stage 2: F = 1 on the weight only
    assert float(got) == pytest.approx(0.5 * 4.0 * by_hand)
    got.backward()  # the penalty trains: its gradient is lambda * F * (theta - theta*)
    torch.testing.assert_close(model.bias.grad, 4.0 * f1["bias"] * (b - 0))


def test_the_reservoir_keeps_every_record_with_the_same_chance():
    hits = Counter()
    for trial in range(3000):
        buffer: list[dict] = []
        seen = reservoir_add(buffer, 0, [{"i": i} for i in range(6)], 4, random.Random(trial))
        seen = reservoir_add(buffer, seen, [{"i": i} for i in range(6, 10)], 4, random.Random(10_000 + trial))
        assert seen == 10 and len(buffer) == 4 and len({r["i"] for r in buffer}) == 4
        hits.update(r["i"] for r in buffer)
    for i in range(10):  # each of the 10 records kept with probability 4/10
        assert hits[i] / 3000 == pytest.approx(0.4, abs=0.04)


# ----------------------------------------------------------------------------- configs and runs


def _data(tmp: Path, name: str, n: int, seed: int) -> str:
    return str(tiny.write_jsonl(tmp / f"{name}.jsonl", tiny.chat_records(n, seed=seed)))


def _config(tmp: Path, llama_dir: Path, strategy: str, stages: int = 2, **extra) -> dict:
    return {
        "model": {"name_or_path": str(llama_dir)},
        "data": {"max_length": 64},
        "method": {"name": "lora", "r": 4},
        "train": {"max_steps": 3, "batch_size": 2, "lr": 1e-2, "precision": "fp32", "tensorboard": False,
                  "save_every": 1},
        "stages": [{"task": f"t{k}", "train": _data(tmp, f"t{k}", 8, k), "eval": _data(tmp, f"e{k}", 4, 50 + k)}
                   for k in range(1, stages + 1)],
        "continual": {"strategy": strategy, "fisher_samples": 4, "buffer_size": 5, "metric": "loss", **extra},
    }


@pytest.mark.parametrize("change, problem", [
    (lambda c: c.update(stages=c["stages"][:1]), "at least 2 stages"),
    (lambda c: c["stages"][1].update(task="t1"), "task 't1' names more than one stage"),
    (lambda c: c.pop("stages"), "no `stages:`"),
    (lambda c: c["continual"].update(strategy="ewk"), "continual.strategy"),
    (lambda c: c["data"].update(train="x.jsonl"), "data.train is set; each stage names its own data"),
    (lambda c: c.update(objective={"name": "dpo"}) or c["continual"].update(strategy="ewc"), "use objective sft"),
])
def test_bad_continual_configs_are_one_line_errors(tmp_path, llama_dir, change, problem):
    cfg = _config(tmp_path, llama_dir, "naive")
    change(cfg)
    with pytest.raises(ConfigError) as e:
        read_spec(cfg)
    assert problem in e.value.message


def test_a_stage_with_no_data_stops_before_anything_trains(tmp_path, llama_dir):
    cfg = _config(tmp_path, llama_dir, "naive")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg["stages"][1]["train"] = str(empty)
    with pytest.raises(DataError, match=r"stage 2 \(t2\): its train data .* holds no records"):
        continual(cfg, out=tmp_path / "out", quiet=True, say=lambda _m: None)
    assert not (tmp_path / "out" / "stage-1").exists()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["naive", "replay", "ewc", "lwf"])
def test_each_strategy_runs_and_scores_every_task_after_every_stage(tmp_path, llama_dir, strategy):
    out = tmp_path / "out"
    lines: list[str] = []
    state = continual(_config(tmp_path, llama_dir, strategy, stages=3), out=out, quiet=True, say=lines.append)
    assert len(state["R"]) == 3 and all(len(row) == 3 for row in state["R"]) and len(state["base"]) == 3
    assert {"acc", "bwt", "fwt"} <= state.keys() and (out / "matrix.png").is_file()
    assert json.loads((out / "continual.json").read_text())["done"] == 3
    assert any("stage 3/3 (t3), eta" in line for line in lines), lines
    if strategy == "replay":
        buffer = [json.loads(line) for line in (out / "replay.jsonl").read_text().splitlines()]
        assert len(buffer) == 5  # buffer_size, from stages 1 and 2
        cfg = yaml.safe_load((out / "stage-3" / "config.yaml").read_text())
        assert [t["task"] for t in cfg["data"]["train"]] == ["t3", "replay"]
    if strategy == "ewc":
        assert sorted(p.name for p in (out / "ewc").iterdir()) == ["stage-1.safetensors", "stage-2.safetensors"]
    if strategy == "lwf":
        cfg = yaml.safe_load((out / "stage-2" / "config.yaml").read_text())
        assert cfg["objective"]["name"] == "distill" and cfg["objective"]["teacher"] == str(out / "stage-1")


@pytest.mark.slow
def test_per_task_adapters_have_bwt_exactly_zero_when_scored_again(tmp_path, llama_dir):
    state = continual(_config(tmp_path, llama_dir, "adapters", stages=3), out=tmp_path / "out", quiet=True,
                      say=lambda _m: None)
    R = state["R"]
    for j in range(3):  # task j's adapter, reloaded and scored after every later stage, scores the same
        assert all(R[i][j] == R[j][j] for i in range(j, 3))
        assert all(R[i][j] == state["base"][j] for i in range(j))  # not trained yet: the base answers
    assert state["bwt"] == 0.0


@pytest.mark.slow
def test_a_failed_stage_loses_nothing_and_resume_continues_there(tmp_path, llama_dir, monkeypatch):
    cfg = _config(tmp_path, llama_dir, "ewc", stages=3)
    out = tmp_path / "out"
    import tunelab.recipes.continual as rc

    real = rc._train_stage
    def failing(out_, spec, raw, run, k, *a, **kw):
        if k == 3:
            raise RuntimeError("the machine went away")
        return real(out_, spec, raw, run, k, *a, **kw)

    monkeypatch.setattr(rc, "_train_stage", failing)
    with pytest.raises(RuntimeError):
        continual(cfg, out=out, quiet=True, say=lambda _m: None)
    saved = json.loads((out / "continual.json").read_text())
    assert saved["done"] == 2 and len(saved["R"]) == 2  # stages 1 and 2 are kept
    with pytest.raises(TunelabError, match="already holds a continual run"):
        continual(cfg, out=out, quiet=True, say=lambda _m: None)
    monkeypatch.setattr(rc, "_train_stage", real)
    (out / "ewc" / "stage-2.safetensors").rename(tmp_path / "moved")  # state the strategy needs
    with pytest.raises(TunelabError, match=r"stage-2.safetensors is missing: stage 3 needs the Fisher of stage 2"):
        continual(cfg, out=out, resume=True, quiet=True, say=lambda _m: None)
    (tmp_path / "moved").rename(out / "ewc" / "stage-2.safetensors")
    lines: list[str] = []
    state = continual(cfg, out=out, resume=True, quiet=True, say=lines.append)
    assert state["R"][:2] == saved["R"] and len(state["R"]) == 3
    assert not any("stage 1/3" in line or "stage 2/3" in line for line in lines)  # it resumed in stage 3
    changed = dict(cfg, continual={**cfg["continual"], "ewc_lambda": 5.0})
    with pytest.raises(TunelabError, match="config differs"):
        continual(changed, out=out, resume=True, quiet=True, say=lambda _m: None)


def test_train_refuses_a_continual_config_pointing_to_the_command(tmp_path, llama_dir):
    from tunelab.cli import _quick_check

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path, llama_dir, "naive")))
    with pytest.raises(ConfigError, match=r"a continual-learning config .*run it with `tunelab continual CONFIG"):
        _quick_check(str(path), [])
