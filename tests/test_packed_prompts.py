"""Prompt tuning and P-tuning on packed rows (inference/logits.packed_prompt_logits): each packed
example's logits and the prompt's gradient equal those of the example alone, through peft's own
unpacked forward, on every architecture of the contract suite."""

from __future__ import annotations

import pytest
import torch
from peft import PromptEncoderConfig, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM

from tests import tiny
from tunelab.data.collate import collate
from tunelab.data.types import Example
from tunelab.inference.logits import forward_logits, token_nll_sum
from tunelab.methods import METHODS
from tunelab.methods.mpt import MPTConfig

N = 4  # virtual tokens


def model_for(arch: str, kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny.config(arch, 400)).float().eval()
    if kind == "mpt":  # tunelab's wrapper (methods/mpt.py): 3 tasks, task ids passed per batch
        model = METHODS["mpt"].apply(base, MPTConfig(num_virtual_tokens=N, num_tasks=3))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.5)
        return model
    cfg = (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N) if kind == "prompt" else
           PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_hidden_size=16))
    model = get_peft_model(base, cfg)
    with torch.no_grad():  # a prompt far from its init, so a wrong mask or position would show
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    return model


def examples() -> list[Example]:
    g = torch.Generator().manual_seed(1)
    out = []
    for n in (7, 3, 11):
        ids = torch.randint(5, 400, (n,), generator=g).tolist()
        out.append(Example(ids, [-100] + ids[1:]))
    return out


def with_task(batch: dict, task: int | None) -> dict:
    if task is not None:  # as data/stream.MixtureStream gives them: per token, -1 on padding
        batch["task_ids"] = torch.where(batch["labels"] != -200, task, -1)
    return batch


@pytest.mark.parametrize("kind", ["prompt", "ptuning", "mpt"])
@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_packed_prompt_equals_each_example_alone(arch, kind):
    model = model_for(arch, kind)
    task = 2 if kind == "mpt" else None
    exs = examples()
    packed = with_task(collate([exs], pad_id=0, packed=True), task)
    logits = forward_logits(model, packed)  # (1, T, V)
    start = 0
    for ex in exs:
        alone = forward_logits(model, with_task(collate([[ex]], pad_id=0, packed=False), task))  # peft's path
        n = len(ex.input_ids)
        torch.testing.assert_close(logits[0, start:start + n], alone[0], atol=2e-5, rtol=1e-4)
        start += n

    def prompt_grad(batches: list[dict]) -> list[torch.Tensor]:
        model.zero_grad()
        sum(token_nll_sum(forward_logits(model, b), b["labels"])[0] for b in batches).backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    together = prompt_grad([packed])
    apart = prompt_grad([with_task(collate([[ex]], pad_id=0, packed=False), task) for ex in exs])
    for a, b in zip(together, apart, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_unpacked_batches_keep_pefts_path():
    """Without position ids (padded batches) nothing changes: peft's forward runs as before."""
    model = model_for("llama", "prompt")
    batch = collate([[ex] for ex in examples()], pad_id=0, packed=False)
    expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, N:]
    torch.testing.assert_close(forward_logits(model, batch), expected)
