"""M17 AdaLoRA: the loop calls peft's budget update after every optimizer step with the gradients still
there, the final total rank is the target budget, and the orthogonality penalty is the hand-computed one
(and the one peft's forward adds when given labels)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from peft.tuners.adalora import AdaLoraModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import tunelab
from tests import tiny
from tests.test_train_loop import run_cfg, weights
from tunelab.errors import ConfigError
from tunelab.methods import METHODS
from tunelab.methods.adalora import orth_penalty
from tunelab.runconfig import build_config

SCHEDULE = {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1, "total_step": 6,
            "target_modules": ["q_proj", "v_proj"]}
N_MATRICES = 2 * 2  # q_proj and v_proj in each of the tiny llama's 2 layers


def acfg(**kw):
    return build_config({"method": {"name": "adalora", **SCHEDULE, **kw}}).method


def test_budget_update_every_step_with_gradients_then_target_rank(llama_dir, chat_data, tmp_path, monkeypatch):
    seen: list[tuple[int, bool]] = []
    live: dict[str, AdaLoraModel] = {}
    original = AdaLoraModel.update_and_allocate

    def spy(self, global_step):
        grads = [p.grad is not None for n, p in self.model.named_parameters() if "lora_" in n and p.requires_grad]
        seen.append((global_step, bool(grads) and all(grads)))
        live["model"] = self
        return original(self, global_step)

    monkeypatch.setattr(AdaLoraModel, "update_and_allocate", spy)
    cfg = run_cfg(llama_dir, chat_data, tmp_path / "run", max_steps=6)
    cfg["method"] = {"name": "adalora", **SCHEDULE}
    assert tunelab.train(cfg, quiet=True).status == "completed"

    assert [s for s, _ in seen] == [1, 2, 3, 4, 5, 6], "one update per optimizer step, 1-based, up to total_step"
    assert all(ok for _, ok in seen), "the update ran after the gradients were cleared"
    budget = SCHEDULE["target_r"] * N_MATRICES
    model = live["model"]
    pattern = model.peft_config["default"].rank_pattern
    assert sum(sum(v) for v in pattern.values()) == budget
    live_rank = sum(int((p != 0).sum()) for n, p in model.named_parameters() if "lora_E" in n)
    assert live_rank == budget

    final = tmp_path / "run" / "final"
    saved = json.loads((final / "adapter_config.json").read_text())["rank_pattern"]
    assert sum(sum(v) for v in saved.values()) == budget
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(llama_dir)), str(final))
    assert sum(p.shape[0] for n, p in reloaded.named_parameters() if "lora_E" in n) == budget
    ids = torch.randint(3, 400, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.eval()(input_ids=ids).logits
        torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)

    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["penalty"] > 0 for m in metrics if "loss" in m), "the orthogonality penalty reached the loss"


def fro_distance_to_identity(rows: torch.Tensor) -> float:
    """||G - I||_F with G the Gram matrix of the rows, entry by entry."""
    total = 0.0
    for i in range(rows.shape[0]):
        for j in range(rows.shape[0]):
            total += (float(rows[i] @ rows[j]) - (1.0 if i == j else 0.0)) ** 2
    return total**0.5


def test_orth_penalty_is_the_hand_computed_one_and_pefts():
    torch.manual_seed(0)
    cfg = acfg(init_r=3, orth_reg_weight=0.7)
    model = METHODS["adalora"].apply(AutoModelForCausalLM.from_config(tiny.config("llama", 400)), cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(std=0.5)
    distances = []
    for n, p in model.named_parameters():
        if ".lora_A." in n:  # Q (r, in): its rows should be orthonormal
            distances.append(fro_distance_to_identity(p.detach()))
        elif ".lora_B." in n:  # P (out, r): its columns should be
            distances.append(fro_distance_to_identity(p.detach().T))
    assert len(distances) == 2 * N_MATRICES
    hand = 0.7 * sum(distances) / len(distances)
    got = orth_penalty(model, cfg)
    assert abs(float(got) - hand) <= 1e-4 * hand
    assert got.requires_grad

    ids = torch.randint(3, 400, (2, 9))
    with torch.no_grad():  # peft adds the same term inside forward, and only when given labels
        with_term = model(input_ids=ids, labels=ids).loss
        without = model.base_model.model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(with_term - without, got.detach(), atol=1e-5, rtol=1e-5)
    assert orth_penalty(model, acfg(orth_reg_weight=0.0)) is None


@pytest.mark.parametrize("kw, words", [
    ({"total_step": None}, "train.max_steps"),
    ({"tinit": 4, "tfinal": 2}, "no steps left to prune"),
    ({"target_r": 5}, "must not exceed init_r"),
])
def test_schedule_errors_are_config_errors(kw, words):
    with pytest.raises(ConfigError, match=words):
        acfg(**kw)


def test_resume_continues_the_rank_allocation_exactly(llama_dir, chat_data, tmp_path, monkeypatch):
    """A run stopped after a checkpoint and resumed ends bit-identical to the uninterrupted one, and its
    allocator holds, step by step, the same smoothed importance: it comes back with the weights (#19)."""
    schedule = {**SCHEDULE, "total_step": 8, "tinit": 1, "tfinal": 2, "deltaT": 1}
    seen: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    original = AdaLoraModel.update_and_allocate

    def spy(self, global_step):
        out = original(self, global_step)
        seen.setdefault(current[0], {})[global_step] = {
            n: t.clone() for n, t in self.rankallocator.exp_avg_ipt.items()}
        return out

    current = ["ref"]
    monkeypatch.setattr(AdaLoraModel, "update_and_allocate", spy)

    def cfg(name: str) -> dict:
        c = run_cfg(llama_dir, chat_data, tmp_path / name, max_steps=8, save_every=3)
        c["method"] = {"name": "adalora", **schedule}
        return c

    assert tunelab.train(cfg("ref"), quiet=True).status == "completed"

    class Stop(Exception):
        pass

    def stop_after_step_4(event):
        if event.kind == "step" and event.step == 4:
            raise Stop  # a crash after the checkpoint of step 3: the importance of step 4 is lost with it

    current[0] = "run"
    with pytest.raises(Stop):
        tunelab.train(cfg("run"), quiet=True, on_event=stop_after_step_4)
    aux = load_file(str(tmp_path / "run" / "checkpoints" / "step-3" / "method_aux.safetensors"))
    assert any(k.startswith("exp_avg_ipt/") for k in aux) and any(k.startswith("rank_pattern/") for k in aux)
    assert tunelab.train(cfg("run"), resume=True, quiet=True).status == "completed"
    want, got = weights(tmp_path / "ref"), weights(tmp_path / "run")
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    for step in (4, 5):  # after the resume at step 3: the importance continues, it does not start over
        assert seen["run"][step].keys() == seen["ref"][step].keys()
        assert all(torch.equal(seen["run"][step][n], seen["ref"][step][n]) for n in seen["ref"][step]), step
    ref_cfg = json.loads((tmp_path / "ref" / "final" / "adapter_config.json").read_text())
    run_cfg_ = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert ref_cfg["rank_pattern"] == run_cfg_["rank_pattern"]
