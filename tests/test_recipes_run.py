"""recipes.run.train as recipes compose it: the loop's event hook, and a base model handed in memory."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

import tunelab
from tests.test_train_loop import run_cfg, weights
from tunelab.recipes.run import train
from tunelab.training.events import Event


def test_events_follow_the_run(llama_dir, chat_data, tmp_path):
    events: list[Event] = []
    cfg = run_cfg(llama_dir, chat_data, tmp_path / "r", max_steps=4, eval_every=2, save_every=2)
    result = train(cfg, quiet=True, on_event=events.append)
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and events[-1].status == "completed"
    steps = [e for e in events if e.kind == "step"]
    assert [e.step for e in steps] == [1, 2, 3, 4] and all(e.total_steps == 4 for e in events)
    logged = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [e.metrics["loss"] for e in steps] == [m["loss"] for m in logged if "loss" in m]
    evals = [e for e in events if e.kind == "eval"]
    assert [e.step for e in evals] == [2, 4] and all("eval_loss" in e.metrics for e in evals)
    saved = [e for e in events if e.kind == "checkpoint"]
    assert [e.step for e in saved] == [2, 4] and all(e.checkpoint.is_dir() for e in saved)
    assert events[-1].metrics["eval_loss"] == result.metrics["eval_loss"]


def test_a_model_in_memory_trains_like_one_loaded_from_its_folder(llama_dir, chat_data, tmp_path):
    from_disk = train(run_cfg(llama_dir, chat_data, tmp_path / "a"), quiet=True)
    base = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    in_memory = train(run_cfg(llama_dir, chat_data, tmp_path / "b"), quiet=True, model=base)
    assert in_memory.metrics["loss"] == from_disk.metrics["loss"]
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model, _ = tunelab.load(tmp_path / "b")  # the artifact names the config's base: it reloads
    assert sum(p.numel() for p in model.parameters()) > 0


def test_a_redirected_run_logs_step_totals_elapsed_and_eta_on_unwrapped_lines(llama_dir, chat_data, tmp_path, capsys):
    from tests.test_cli import cli

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(run_cfg(llama_dir, chat_data, tmp_path / "deep" / ("x" * 90) / "r", max_steps=4)))
    code, _, err = cli(capsys, "train", str(cfg))  # stderr is not a terminal here
    assert code == 0, err
    steps = [line for line in err.splitlines() if line.startswith("step ")]
    assert steps and all("/4: loss" in s and "tok/s (non-padding tokens)" in s and " eta " in s for s in steps), steps
    assert steps[-1].startswith("step 4/4:") and "elapsed" in steps[-1]
    assert any(line.startswith("done: ") and line.rstrip().endswith(tuple("0123456789")) for line in err.splitlines())
