"""Objective `distill` (O07): a frozen teacher's token distributions, the runtime's loss against hand-computed KLs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tunelab
from tests import tiny
from tunelab.config import DataConfig
from tunelab.data.collate import collate
from tunelab.data.pipeline import load_tokenized
from tunelab.data.types import IGNORE
from tunelab.errors import TunelabError
from tunelab.inference.logits import token_nll_sum
from tunelab.modeling.bpe import train_bpe
from tunelab.objectives import OBJECTIVES
from tunelab.objectives.distill import DistillRuntime
from tunelab.objectives.registry import RunContext
from tunelab.runconfig import build_config

CPU = torch.device("cpu")
KINDS = ("forward_kl", "reverse_kl", "jsd")


@pytest.fixture(scope="module")
def batch(tok, chat_data) -> dict[str, torch.Tensor]:
    data = load_tokenized(DataConfig(train=str(chat_data[0])), "train", tok, mask_prompt=True,
                          formats=OBJECTIVES["distill"].formats, log=tiny.quiet)
    return collate([[ex] for ex in data.examples[:4]], tok.pad_token_id, packed=False)


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory) -> Path:
    """Same architecture and tokenizer as llama_dir, other weights."""
    return tiny.save_model(tmp_path_factory.mktemp("teacher") / "llama", "llama", seed=1)


@pytest.fixture(scope="module")
def small_student(llama_dir, tmp_path_factory) -> Path:
    """A tiny llama with fewer layers and a narrower hidden size, sharing llama_dir's tokenizer files."""
    out = tmp_path_factory.mktemp("student") / "small"
    tok = AutoTokenizer.from_pretrained(str(llama_dir))
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(
        tiny.config("llama", len(tok), hidden_size=16, num_hidden_layers=1, intermediate_size=32))
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def runtime(teacher: Path | str, student, tok, **objective) -> DistillRuntime:
    cfg = build_config({"method": {"name": "full"}, "objective": {"name": "distill", "teacher": str(teacher),
                                                                  **objective}})
    return DistillRuntime(RunContext(cfg, student, tok, CPU, tiny.quiet, [], tok.pad_token_id))


def student_of(path: Path):
    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def naive_divergence(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, kind: str, t: float,
                     beta: float = 0.5) -> tuple[torch.Tensor, int]:
    """T^2 * sum over trained labels (b, i), i >= 1, of D(p, q) at position i - 1; python loops, float64."""
    total, n = torch.zeros((), dtype=torch.float64), 0
    for b in range(labels.shape[0]):
        for i in range(1, labels.shape[1]):
            if int(labels[b, i]) == IGNORE:
                continue
            p = torch.softmax(teacher[b, i - 1].double() / t, -1)
            q = torch.softmax(student[b, i - 1].double() / t, -1)
            if kind == "forward_kl":
                d = (p * (p.log() - q.log())).sum()
            elif kind == "reverse_kl":
                d = (q * (q.log() - p.log())).sum()
            else:
                m = beta * p + (1 - beta) * q
                d = beta * (p * (p.log() - m.log())).sum() + (1 - beta) * (q * (q.log() - m.log())).sum()
            total, n = total + d, n + 1
    return total * t**2, n


@pytest.mark.parametrize("kind", KINDS)
def test_teacher_equal_to_student_gives_zero_divergence(llama_dir, tok, batch, kind):
    student = student_of(llama_dir)
    rt = runtime(llama_dir, student, tok, divergence=kind, temperature=2.0)
    assert rt.teacher is not student and not any(p.requires_grad for p in rt.teacher.parameters())
    assert not rt.teacher.training
    loss, n = rt.loss(student, batch)
    n_trained = int((batch["labels"][:, 1:] != IGNORE).sum())
    assert int(n) == n_trained > 0
    assert abs(float(loss.detach())) < 1e-6 and loss.requires_grad
    stats = rt.stats()
    assert stats["divergence"] == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        nll, count = token_nll_sum(student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                                   .logits, batch["labels"])
    assert stats["nll"] == pytest.approx(float(nll) / int(count), rel=1e-5)


def test_hard_weight_one_is_the_sft_token_nll(llama_dir, other_teacher, tok, batch):
    student = student_of(llama_dir)
    rt = runtime(other_teacher, student, tok, hard_weight=1.0)
    with torch.no_grad():
        loss, n = rt.loss(student, batch)
        sft, n_sft = OBJECTIVES["sft"].loss(student, batch, build_config({}).objective)
    assert int(n) == int(n_sft)
    torch.testing.assert_close(loss, sft, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind,temperature,hard_weight", [("forward_kl", 2.0, 0.0), ("forward_kl", 1.0, 0.0),
                                                          ("reverse_kl", 2.0, 0.0), ("jsd", 1.5, 0.0),
                                                          ("forward_kl", 2.0, 0.3)])
def test_loss_matches_the_divergence_computed_by_hand(llama_dir, other_teacher, tok, batch, kind, temperature,
                                                      hard_weight):
    # float64 throughout: divergences of nearby distributions lose ~1e-4 (relative) to float32 rounding
    student = student_of(llama_dir).double()
    rt = runtime(other_teacher, student, tok, divergence=kind, temperature=temperature, hard_weight=hard_weight,
                 beta=0.3)
    rt.teacher.double()
    with torch.no_grad():
        loss, n = rt.loss(student, batch)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        s_logits = student(**inputs).logits
        t_logits = student_of(other_teacher).double()(**inputs).logits
        nll, _ = token_nll_sum(s_logits, batch["labels"])
    assert loss.dtype == s_logits.dtype == t_logits.dtype == torch.float64
    div, count = naive_divergence(s_logits, t_logits, batch["labels"], kind, temperature, beta=0.3)
    assert int(n) == count
    assert float(div) > 1e-3  # a different teacher: a real divergence
    expected = (1 - hard_weight) * div + hard_weight * nll.double()
    # (the NLL term is float32 in token_nll_sum whatever the logits' dtype)
    torch.testing.assert_close(loss, expected, rtol=1e-9 if hard_weight == 0 else 1e-6, atol=1e-12)
    stats = rt.stats()
    assert stats["divergence"] == pytest.approx(float(div) / count, rel=1e-9)
    assert stats["nll"] == pytest.approx(float(nll) / count, rel=1e-7)


def test_smaller_student_distils_from_a_larger_teacher(llama_dir, small_student, chat_data, tmp_path):
    run = tmp_path / "run"
    cfg = {
        "model": {"name_or_path": str(small_student)},
        "data": {"train": str(chat_data[0]), "eval": str(chat_data[1]), "max_length": 64},
        "method": {"name": "full"},
        "objective": {"name": "distill", "teacher": str(llama_dir), "temperature": 2.0},
        "train": {"max_steps": 12, "batch_size": 8, "lr": 1e-2, "scheduler": "constant", "tensorboard": False,
                  "precision": "fp32"},
        "output": {"dir": str(run)},
    }
    result = tunelab.train(cfg, quiet=True)
    assert result.status == "completed" and result.steps == 12
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m]
    assert len(steps) == 12 and all("divergence" in m and "nll" in m for m in steps)
    first, last = steps[0]["loss"], sum(m["loss"] for m in steps[-3:]) / 3
    assert last < 0.7 * first, [m["loss"] for m in steps]
    # the loss is the divergence alone (hard_weight 0), per trained token
    assert all(m["loss"] == pytest.approx(m["divergence"], rel=1e-5) for m in steps)
    assert "eval_loss" in lines[-1] and lines[-1]["eval_loss"] < first
    model, _ = tunelab.load(run)
    assert model.config.hidden_size == 16 and model.config.num_hidden_layers == 1
    n_student = sum(p.numel() for p in model.parameters())
    assert n_student < sum(p.numel() for p in student_of(llama_dir).parameters())


def test_a_teacher_with_another_tokenizer_is_refused(llama_dir, chat_data, tok, tmp_path):
    other_tok = train_bpe([f"a completely different {w} corpus of words" for w in tiny.COLOURS] * 20,
                          vocab_size=len(tok))
    assert other_tok.get_vocab() != tok.get_vocab()
    teacher = tmp_path / "teacher"
    AutoModelForCausalLM.from_config(tiny.config("llama", len(other_tok))).save_pretrained(str(teacher))
    other_tok.save_pretrained(str(teacher))
    with pytest.raises(TunelabError, match="tokenizer"):
        runtime(teacher, student_of(llama_dir), tok)
    cfg = {
        "model": {"name_or_path": str(llama_dir)},
        "data": {"train": str(chat_data[0]), "max_length": 64},
        "method": {"name": "full"},
        "objective": {"name": "distill", "teacher": str(teacher)},
        "train": {"max_steps": 1, "batch_size": 2, "tensorboard": False, "precision": "fp32"},
        "output": {"dir": str(tmp_path / "run")},
    }
    with pytest.raises(TunelabError, match="tokenizer") as e:
        tunelab.train(cfg, quiet=True)
    assert "teacher" in str(e.value) and e.value.fix
    assert not (tmp_path / "run" / "final").exists()


def test_distill_needs_its_runtime(llama_dir, tok, batch):
    cfg = build_config({"objective": {"name": "distill", "teacher": str(llama_dir)}}).objective
    with pytest.raises(TunelabError, match="runtime"):
        OBJECTIVES["distill"].loss(student_of(llama_dir), batch, cfg)
