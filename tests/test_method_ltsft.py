"""M06 LT-SFT: the phase-2 mask against a hand-computed top-k of |theta1 - theta0| (explicit sort),
phase 2 moves exactly the masked entries, train -> load round trip, merge, meta-device build."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

import tunelab
from tests import tiny
from tests.test_train_loop import run_cfg
from tunelab.methods import METHODS
from tunelab.runconfig import build_config

DENSITY = 0.05
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _apply(model, **kw):
    cfg = build_config({"method": {"name": "ltsft", **kw}}).method
    return METHODS["ltsft"].apply(model, cfg), cfg


def _hand_topk(theta1: dict[str, torch.Tensor], theta0: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Top-k of |theta1 - theta0| over all eligible weights together, by an explicit stable sort."""
    names = list(theta1)
    flat = torch.cat([(theta1[n] - theta0[n]).abs().reshape(-1) for n in names])
    order = torch.sort(flat, descending=True, stable=True).indices
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[order[:k]] = True
    out, start = {}, 0
    for n in names:
        out[n] = keep[start:start + theta1[n].numel()].view(theta1[n].shape)
        start += theta1[n].numel()
    return out


def _cfg(llama_dir, chat_data, out, steps: int = 4) -> dict:
    # constant lr: a run stopped and resumed must match one that was not; decay must not leak outside the mask
    cfg = run_cfg(llama_dir, chat_data, out, max_steps=steps, scheduler="constant", weight_decay=0.1)
    cfg["method"] = {"name": "ltsft", "density": DENSITY, "phase1_steps": 2}
    del cfg["data"]["eval"]  # no evaluation needed: keeps the runs short
    return cfg


@pytest.fixture(scope="module")
def trained(llama_dir, chat_data, tmp_path_factory):
    """A 4-step run (2 dense + 2 sparse), with theta1 and the in-memory model caught by a spy on on_step."""
    spec = METHODS["ltsft"]
    seen: dict = {"run": tmp_path_factory.mktemp("ltsft") / "run"}

    def spy_on_step(model, cfg, step):
        if step == cfg.phase1_steps:
            seen["theta1"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        spec.on_step(model, cfg, step)
        seen["model"] = model

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(METHODS, "ltsft", dataclasses.replace(spec, on_step=spy_on_step))
        result = tunelab.train(_cfg(llama_dir, chat_data, seen["run"]), quiet=True)
    assert result.status == "completed" and result.steps == 4
    return seen


def test_two_phases_through_train(llama_dir, trained):
    spec = METHODS["ltsft"]
    theta0 = load_file(str(llama_dir / "model.safetensors"))
    theta1 = trained["theta1"]
    assert sorted(n.split(".")[-2] for n in theta1) == sorted(LINEAR * 2)  # linear weights only, no head
    eligible = sum(t.numel() for t in theta1.values())
    k = round(DENSITY * eligible)
    want = _hand_topk(theta1, theta0, k)

    model = trained["model"]
    modules = dict(model.named_modules())
    for n, mask in want.items():
        assert torch.equal(modules[n.rsplit(".", 1)[0]].tunelab_mask, mask), n

    final = dict(model.named_parameters())
    for n, mask in want.items():
        moved = final[n].detach() != theta0[n]
        assert torch.equal(moved, mask), n  # changed exactly on the masked entries
    assert sum(int((final[n].detach() != t).sum()) for n, t in theta0.items()) == k  # nothing else moved

    saved = load_file(str(trained["run"] / "final" / "method.safetensors"))
    assert int(saved["tunelab_changed"]) == k
    assert not any("theta0" in n for n in saved)  # rebuilt from the base on load

    loaded, _ = tunelab.load(trained["run"])
    ids = torch.randint(3, 400, (2, 11))
    with torch.no_grad():
        want_logits = model.eval()(input_ids=ids).logits
        torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, want_logits, atol=1e-6, rtol=1e-6)
    merged = spec.merge(loaded, None)
    assert not any("tunelab_" in n or "theta0" in n for n, _ in merged.named_buffers())
    merged_params = dict(merged.named_parameters())
    assert sum(int((merged_params[n] != t).sum()) for n, t in theta0.items()) == k


def test_phase_two_masks_gradients_and_restores_outside_the_mask():
    torch.manual_seed(0)
    model, cfg = _apply(AutoModelForCausalLM.from_config(tiny.config("llama", 400)), density=0.1, phase1_steps=1,
                        embeddings=True)
    emb = model.get_input_embeddings()
    assert emb.weight.requires_grad and emb.tunelab_mask.all()
    layer = model.model.layers[0].self_attn.q_proj
    theta0 = layer.weight.detach().clone()
    with torch.no_grad():  # a phase-1 update: every eligible weight moved
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    METHODS["ltsft"].on_step(model, cfg, 1)
    mask = layer.tunelab_mask
    assert torch.equal(layer.weight, theta0)  # reset to theta0
    total = sum(int(m.tunelab_mask.sum()) for m in model.modules() if hasattr(m, "tunelab_mask"))
    eligible = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == round(0.1 * eligible)

    ids = torch.randint(3, 400, (2, 9))
    model(input_ids=ids).logits.square().mean().backward()
    assert layer.weight.grad[~mask].abs().max() == 0 and layer.weight.grad[mask].abs().max() > 0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.5)
    opt.step()
    METHODS["ltsft"].on_step(model, cfg, 2)
    assert torch.equal(layer.weight[~mask], theta0[~mask])
    assert bool((layer.weight[mask] != theta0[mask]).all())


def test_builds_on_the_meta_device():
    cfg = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=2048)
    with torch.device("meta"):
        model, _ = _apply(AutoModelForCausalLM.from_config(cfg))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.ltsft_theta0.is_meta and layer.tunelab_mask.is_meta
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4 * (4 * 256 * 256 + 3 * 256 * 1024)


def test_resume_after_the_phase_change_is_exact(llama_dir, chat_data, trained, tmp_path):
    """Stopped after step 3 (phase 2) and resumed to 4 equals the uninterrupted run: the masks travel
    in the checkpoint."""
    tunelab.train(_cfg(llama_dir, chat_data, tmp_path / "b", steps=3), quiet=True)
    tunelab.train(_cfg(llama_dir, chat_data, tmp_path / "b"), quiet=True, resume=True, allow_changed=True)
    a, b = (load_file(str(r / "final" / "method.safetensors")) for r in (trained["run"], tmp_path / "b"))
    assert a.keys() == b.keys() and any(n.endswith("tunelab_mask") for n in a)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_phase_two_starts_with_a_fresh_optimizer(trained):
    """As the paper's second fine-tuning run: AdamW's moments and step count start over at the phase change."""
    from tunelab.training import checkpoint
    from tunelab.training.state import load_tree

    ckpt = checkpoint.latest(trained["run"] / "checkpoints")
    state = load_tree(ckpt / "optimizer")["state"]
    assert state and {int(s["step"]) for s in state.values()} == {4 - 2}  # 2 phase-2 steps since the restart
    # the trainable parameters are exactly the eligible weights, in module order: so is the optimizer's state
    masks = [m.tunelab_mask for m in trained["model"].modules() if hasattr(m, "tunelab_mask")]
    firsts = [state[i]["exp_avg"] for i in sorted(state, key=int)]
    assert [a.shape for a in firsts] == [m.shape for m in masks]
    assert sum(int((avg[~mask] != 0).sum()) for avg, mask in zip(firsts, masks, strict=True)) == 0
    assert sum(int((avg[mask] != 0).sum()) for avg, mask in zip(firsts, masks, strict=True)) > 0
