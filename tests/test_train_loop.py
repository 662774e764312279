"""The one loop: accumulation invariance, the non-finite guard, checkpoints, peft/transformers loading."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import tunelab
from tunelab.data.types import IGNORE
from tunelab.errors import NonFiniteError, ResumeError, TunelabError
from tunelab.inference.logits import token_nll_sum
from tunelab.objectives import OBJECTIVES
from tunelab.training import checkpoint


def run_cfg(model_dir: Path, data: tuple[Path, Path], out: Path, **train) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(data[0]), "eval": str(data[1]), "max_length": 64},
        "method": {"name": "lora", "r": 4, "dropout": 0.0},
        "objective": {"name": "sft"},
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "tensorboard": False, "precision": "fp32", **train},
        "output": {"dir": str(out)},
    }


def weights(run: Path) -> dict[str, torch.Tensor]:
    final = run / "final"
    name = "adapter_model.safetensors" if (final / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(str(final / name))


def test_fully_masked_batch_gives_zero_loss_not_nan():
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.full((2, 5), IGNORE)
    loss, n = token_nll_sum(logits, labels)
    assert float(loss.detach()) == 0.0 and int(n) == 0
    (loss / max(int(n), 1)).backward()
    assert torch.isfinite(logits.grad).all() and float(logits.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("packing", [False, True])
def test_accumulation_matches_big_batch(llama_dir, chat_data, tmp_path, packing):
    """batch 8 x accum 1 and batch 1 x accum 8 apply the same update (mixed lengths)."""
    results = []
    for bs, acc in ((8, 1), (1, 8)):
        # lr 1e-3: AdamW's first step is ~lr * sign(g), so float-summation noise in near-zero
        # gradients shows up at the scale of lr; the claim tested is the update, to 1e-5
        cfg = run_cfg(llama_dir, chat_data, tmp_path / f"{bs}x{acc}", max_steps=1, batch_size=bs, grad_accum=acc,
                      lr=1e-3)
        cfg["method"] = {"name": "full"}
        cfg["data"]["packing"] = packing
        tunelab.train(cfg, quiet=True)
        results.append(weights(tmp_path / f"{bs}x{acc}"))
    base = load_file(str(llama_dir / "model.safetensors"))
    a, b = results
    assert any(not torch.equal(a[k], base[k]) for k in base), "the step changed nothing"
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-5, k


def poison(monkeypatch, at_call: int, factor: float) -> None:
    """Multiply the sft loss by `factor` (nan, inf) at the `at_call`-th micro-batch."""
    spec = OBJECTIVES["sft"]
    calls = {"n": 0}

    def poisoned(model, batch, cfg):
        calls["n"] += 1
        loss, n = spec.loss(model, batch, cfg)
        return (loss * factor, n) if calls["n"] == at_call else (loss, n)

    monkeypatch.setitem(OBJECTIVES, "sft", dataclasses.replace(spec, loss=poisoned))


def test_nan_halts_before_the_step_and_keeps_last_checkpoint(llama_dir, chat_data, tmp_path, monkeypatch):
    poison(monkeypatch, at_call=5, factor=float("nan"))
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteError, match="step 5"):
        tunelab.train(run_cfg(llama_dir, chat_data, out, max_steps=8, save_every=2), quiet=True)
    assert checkpoint.latest(out / "checkpoints").name == "step-4"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4 and not (out / "final").exists()


def test_skip_policy_skips_and_still_applies_every_step(llama_dir, chat_data, tmp_path, monkeypatch):
    poison(monkeypatch, at_call=2, factor=float("inf"))
    out = tmp_path / "skip"
    result = tunelab.train(run_cfg(llama_dir, chat_data, out, max_steps=4, nonfinite="skip"), quiet=True)
    assert result.status == "completed" and result.steps == 4
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("skipped", 0) for r in rows) == 1


def test_incomplete_checkpoint_is_never_loaded(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        checkpoint.commit(root, step, lambda d: (d / "w.txt").write_text("x"), keep_last=5)
    (root / "step-6" / "w.txt").write_text("torn")  # bytes no longer match the manifest
    (root / "step-8").mkdir()  # no manifest at all
    (root / ".tmp-step-10-1").mkdir()  # a crashed write
    assert checkpoint.latest(root).name == "step-4"


def test_keep_last_prunes_only_after_commit(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        checkpoint.commit(root, step, lambda d: (d / "w.txt").write_text("x"), keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-3"]


def test_existing_run_is_not_overwritten_silently(llama_dir, chat_data, tmp_path):
    out = tmp_path / "again"
    tunelab.train(run_cfg(llama_dir, chat_data, out, max_steps=1), quiet=True)
    with pytest.raises(ResumeError, match="already holds a run"):
        tunelab.train(run_cfg(llama_dir, chat_data, out, max_steps=1), quiet=True)
    with pytest.raises(ResumeError, match="train.lr"):
        tunelab.train(run_cfg(llama_dir, chat_data, out, max_steps=1, lr=0.5), quiet=True, resume=True)


def test_adapter_loads_in_plain_peft_and_merged_export_in_transformers(llama_dir, chat_data, tmp_path):
    out = tmp_path / "run"
    tunelab.train(run_cfg(llama_dir, chat_data, out, max_steps=3), quiet=True)
    ids = torch.randint(3, 300, (2, 10))
    ours, _ = tunelab.load(out)
    base = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    theirs = PeftModel.from_pretrained(base, str(out / "final")).eval()
    with torch.no_grad():
        want = ours.eval()(input_ids=ids).logits
        torch.testing.assert_close(theirs(input_ids=ids).logits, want, atol=1e-6, rtol=1e-6)
        assert not torch.allclose(AutoModelForCausalLM.from_pretrained(str(llama_dir))(input_ids=ids).logits, want)
        merged_dir = tunelab.export(out, tmp_path / "merged", merge=True)
        merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
        torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    assert not any(p.suffix in {".bin", ".pt"} for p in merged_dir.iterdir())


def test_out_of_memory_names_sizes_and_fix(llama_dir, chat_data, tmp_path, monkeypatch):
    spec = OBJECTIVES["sft"]

    def oom(model, batch, cfg):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setitem(OBJECTIVES, "sft", dataclasses.replace(spec, loss=oom))
    with pytest.raises(TunelabError, match=r"out of memory at step 1 \(micro-batch 4 x 64 tokens") as e:
        tunelab.train(run_cfg(llama_dir, chat_data, tmp_path / "oom"), quiet=True)
    assert "grad_accum=2" in str(e.value) and "gradient_checkpointing" in str(e.value)


def test_same_seed_same_losses_and_gradient_checkpointing_matches(llama_dir, chat_data, tmp_path):
    def losses(name: str, **train) -> list[float]:
        tunelab.train(run_cfg(llama_dir, chat_data, tmp_path / name, **train), quiet=True)
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    a, b = losses("a"), losses("b")
    assert a == b and len(a) == 4
    c = losses("c", gradient_checkpointing=True)
    assert c == pytest.approx(a, rel=1e-5, abs=1e-6)


def test_select_best_keeps_the_weights_of_the_lowest_eval_loss(llama_dir, chat_data, tmp_path):
    cfg = run_cfg(llama_dir, chat_data, tmp_path / "run", max_steps=6, eval_every=1, lr=3e-2, select_best=True)
    result = tunelab.train(cfg, quiet=True)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = {m["step"]: m["eval_loss"] for m in rows if "eval_loss" in m}
    best_step = min(evals, key=evals.get)
    assert set(evals) == set(range(1, 7)) and result.metrics["best_step"] == best_step
    # the saved final model is the best eval's, not the last step's: its eval loss is the minimum
    again = tunelab.evaluate(tmp_path / "run", str(chat_data[1]))
    assert again["loss"] == pytest.approx(evals[best_step], rel=1e-4)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["eval_loss"] == pytest.approx(evals[best_step])


def test_a_resumed_run_keeps_the_best_eval_of_before_the_stop(llama_dir, chat_data, tmp_path, monkeypatch):
    """select_best across a resume: the best eval (step 2 here, scripted) was before the stop at step 3;
    the checkpoint keeps its weights (best.safetensors), so the resumed run's final model is step 2's,
    as an uninterrupted run's is."""
    from tunelab.training.loop import BEST_FILE, Loop

    scripted = {2: 1.0, 4: 2.0, 6: 3.0}
    real = Loop.evaluate

    def evaluate(self):
        out = real(self)
        return {**out, "eval_loss": scripted[self.step]} if out else out

    monkeypatch.setattr(Loop, "evaluate", evaluate)

    def cfg(name: str, steps: int) -> dict:
        return run_cfg(llama_dir, chat_data, tmp_path / name, max_steps=steps, eval_every=2, save_every=1, lr=3e-2,
                       select_best=True, scheduler="constant")

    straight = tunelab.train(cfg("straight", 6), quiet=True)
    scripted[3] = 9.0  # the first part ends at step 3 (its final eval); the whole run never evaluates there
    tunelab.train(cfg("resumed", 3), quiet=True)
    assert (tmp_path / "resumed" / "checkpoints" / "step-3" / BEST_FILE).is_file()
    resumed = tunelab.train(cfg("resumed", 6), quiet=True, resume=True, allow_changed=True)
    assert straight.metrics["best_step"] == resumed.metrics["best_step"] == 2
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_select_best_needs_eval_data(llama_dir, chat_data, tmp_path):
    cfg = run_cfg(llama_dir, chat_data, tmp_path / "run", max_steps=2, select_best=True)
    cfg["data"].pop("eval")
    with pytest.raises(TunelabError, match="select_best"):
        tunelab.train(cfg, quiet=True)


def test_select_best_restores_an_earlier_step_exactly(llama_dir, chat_data, tmp_path, monkeypatch):
    from tunelab.training.loop import Loop

    scripted = iter([3.0, 1.0, 2.0, 2.5])  # evals at steps 1, 2, 3 and the final one at 4: step 2 is best
    monkeypatch.setattr(Loop, "evaluate", lambda self: {"eval_loss": next(scripted)})
    cfg = run_cfg(llama_dir, chat_data, tmp_path / "run", max_steps=4, eval_every=1, save_every=1, keep_last=10,
                  select_best=True)
    result = tunelab.train(cfg, quiet=True)
    assert result.metrics["best_step"] == 2 and result.metrics["eval_loss"] == 1.0
    at_step2 = load_file(str(tmp_path / "run" / "checkpoints" / "step-2" / "trainable.safetensors"))
    final = load_file(str(tmp_path / "run" / "final" / "adapter_model.safetensors"))
    assert len(final) == len(at_step2) > 0
    for name, t in at_step2.items():  # peft drops the adapter name from its saved keys
        torch.testing.assert_close(final[name.replace(".default", "")], t, rtol=0, atol=0)


def test_runs_of_different_precision_in_one_process(llama_dir, chat_data, tmp_path):
    """tune's trials and the API called twice train in one process; accelerate's process-wide state
    must not make the second run inherit (or refuse) the first one's precision."""
    a = tunelab.train(run_cfg(llama_dir, chat_data, tmp_path / "bf16", max_steps=1, precision="bf16"), quiet=True)
    b = tunelab.train(run_cfg(llama_dir, chat_data, tmp_path / "fp32", max_steps=1, precision="fp32"), quiet=True)
    assert a.status == b.status == "completed"
