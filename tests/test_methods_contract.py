"""The contract every registered method keeps, on every test architecture (one parametrized suite):

- after an optimizer step only the method's trainable tensors changed;
- identity at init where the method claims it (`MethodSpec.identity_at_init`);
- save -> load of the final artifact gives equal logits;
- merged == unmerged where the method is mergeable.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests import tiny
from tunelab.artifacts import save_artifact
from tunelab.config import ModelConfig
from tunelab.methods import METHODS
from tunelab.runconfig import method_config

VOCAB = 400

# Keys a method needs beyond its defaults to be built in a contract test.
REQUIRED = {
    "adalora": {"total_step": 4},
    "peft": {"peft_type": "IA3"},
    "partial": {"last_k": 1},
    "pasta": {"token_ids": list(range(VOCAB))},  # the random test ids hold no special token: adapt every token
}
# QLoRA's artifact is a plain LoRA adapter; reloaded it sits on the full-precision base, so its
# logits differ from the 4-bit training model by the base's quantisation error (test_method_qlora
# checks the exact claim on the dequantised base).
ROUND_TRIP_ATOL = {"qlora": 0.25}


def method_cfg(name: str):
    return method_config({"name": name, **REQUIRED.get(name, {})})


def build(arch: str, name: str, model_dirs) -> tuple[torch.nn.Module, torch.nn.Module]:
    base = AutoModelForCausalLM.from_pretrained(str(model_dirs[arch])).eval()
    torch.manual_seed(0)
    fresh = AutoModelForCausalLM.from_pretrained(str(model_dirs[arch]))
    return base, METHODS[name].apply(fresh, method_cfg(name))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def step(model: torch.nn.Module, ids: torch.Tensor) -> None:
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    (out.float().square().mean()).backward()
    opt.step()
    opt.zero_grad()
    model.eval()


def ids_for() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


CASES = [(name, arch) for name in sorted(METHODS) for arch in tiny.ARCHS]


@pytest.mark.parametrize("name, arch", CASES)
def test_only_trainable_tensors_change(name, arch, model_dirs):
    _, model = build(arch, name, model_dirs)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, f"{name} trains nothing on {arch}"
    step(model, ids_for())
    now = dict(model.named_parameters())
    changed_frozen = [n for n, t in frozen.items() if not torch.equal(now[n], t)]
    assert changed_frozen == []
    assert any(not torch.equal(now[n], t) for n, t in trainable.items()), "the step moved nothing"


@pytest.mark.parametrize("name, arch", [c for c in CASES if METHODS[c[0]].identity_at_init])
def test_identity_at_init(name, arch, model_dirs):
    base, model = build(arch, name, model_dirs)
    ids = ids_for()
    torch.testing.assert_close(logits(model.eval(), ids), logits(base, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, arch", CASES)
def test_save_load_round_trip(name, arch, model_dirs, tmp_path):
    from tunelab import api

    _, model = build(arch, name, model_dirs)
    step(model, ids_for())
    tok = tiny.tokenizer()
    save_artifact(model, tok, method_cfg(name), ModelConfig(name_or_path=str(model_dirs[arch])), tmp_path / "final")
    reloaded, _ = api.load(tmp_path / "final")
    ids = ids_for()
    atol = ROUND_TRIP_ATOL.get(name, 1e-5)
    torch.testing.assert_close(logits(reloaded.eval(), ids), logits(model, ids), atol=atol, rtol=1e-5)


@pytest.mark.parametrize("name, arch", [c for c in CASES if METHODS[c[0]].mergeable])
def test_merged_equals_unmerged(name, arch, model_dirs):
    _, model = build(arch, name, model_dirs)
    step(model, ids_for())
    ids = ids_for()
    want = logits(model, ids)
    merged = METHODS[name].merge(model, method_cfg(name))
    torch.testing.assert_close(logits(merged.eval(), ids), want, atol=1e-4, rtol=1e-4)
