"""The contract every registered objective keeps (one suite parametrized over `OBJECTIVES`):

- a fully masked micro-batch (no trained token / unit) gives a finite loss and no gradient;
- gradient accumulation: k micro-batches whose loss sums are each divided by the units of all k
  (as `training/loop.py` normalises) give the gradient of the one batch holding their examples,
  also when the micro-batches hold different numbers of units.

Batches come from the loop's own path (data pipeline -> `BatchStream` micro-batches) and runtimes
from `make_runtime(RunContext(...))` as the loop builds them; PPO's update runs on a fixed rollout
built here (no sampling), cut into minibatches as its runtime cuts them. Pair objectives (reward,
dpo, simpo, orpo) count a pair as the unit and a batch of zero pairs cannot run, so their masked
batch is pairs with every label masked: still B units, a finite loss, and no gradient where the
loss reads the policy only through trained tokens (dpo, simpo, orpo). kto counts rated examples: a
masked example loses its rating too, so its masked batch has no unit and a zero loss. A newly
registered objective fails here until it gets a variant in VARIANTS.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from tests import tiny
from tunelab.api import resolve_config
from tunelab.artifacts import save_artifact
from tunelab.data.collate import collate
from tunelab.data.pipeline import load_tokenized
from tunelab.data.stream import BatchStream, MicroBatch
from tunelab.data.types import IGNORE, Example
from tunelab.errors import ConfigError
from tunelab.methods import METHODS
from tunelab.modeling.load import load_model, load_tokenizer
from tunelab.objectives import OBJECTIVES
from tunelab.objectives.grpo import Rollout
from tunelab.objectives.grpo import minibatch as group_minibatch
from tunelab.objectives.ppo import VALUE_HEAD
from tunelab.objectives.registry import RunContext, Runtime

CPU = torch.device("cpu")
MICRO = 2  # micro-batch size; every data file holds 5 examples: micro-batches of 2, 2 and 1 rows
FULL, LORA = {"name": "full"}, {"name": "lora", "r": 4, "dropout": 0.0}
# Gradients are sums over differently padded, differently ordered fp32 reductions.
GRAD_TOL = {"rtol": 1e-5, "atol": 1e-6}


# ----------------------------------------------------------------------------- data and frozen models


@pytest.fixture(scope="module")
def files(tmp_path_factory, llama_dir) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("contract")
    head = resolve_config({"model": {"name_or_path": str(llama_dir)}, "method": {"name": "head", "num_labels": 1}})
    tok = load_tokenizer(head.model)
    torch.manual_seed(1)  # another model on the same tokenizer: DPO's reference, distill's teacher
    AutoModelForCausalLM.from_config(tiny.config("llama", len(tok))).save_pretrained(str(d / "other"))
    tok.save_pretrained(str(d / "other"))
    torch.manual_seed(2)  # PPO's reward model: a scalar head saved as a `head` run saves it
    save_artifact(METHODS["head"].apply(load_model(head.model), head.method), tok, head.method, head.model, d / "rm")
    rng = random.Random(7)
    things, colours = tiny.THINGS, tiny.COLOURS[:3]
    prefs, classes = [], []
    for i in range(5):
        reply = " ".join([colours[i % 3]] * rng.randint(1, 4))
        prefs.append({"prompt": f"what colour is the {things[i]}?", "chosen": f"{reply} number",
                      "rejected": reply if i % 2 else f"{reply} {reply}"})
        classes.append({"text": f"the {things[i]} is " + " and ".join([colours[i % 3]] * (1 + i % 3)),
                        "label": colours[i % 3]})
    return {
        "model": llama_dir, "other": d / "other", "rm": d / "rm",
        "chat": tiny.write_jsonl(d / "chat.jsonl", tiny.chat_records(5, seed=3)),
        "prefs": tiny.write_jsonl(d / "prefs.jsonl", prefs),
        "unpaired": tiny.write_jsonl(d / "unpaired.jsonl", [  # each reply rated; neighbours differ in prompt
            {"prompt": p["prompt"], "completion": p[key], "label": key == "chosen"}
            for key in ("chosen", "rejected") for p in prefs]),
        "classes": tiny.write_jsonl(d / "classes.jsonl", classes),
        "pairs": tiny.write_jsonl(d / "pairs.jsonl", [{"query": f"what colour is the {things[i]}?",
                                                        "positive": f"the {things[i]} is {tiny.COLOURS[i]}" +
                                                        " indeed" * (i % 3)} for i in range(5)]),
        "prompts": tiny.write_jsonl(d / "prompts.jsonl", [{"prompt": f"what colour is the {t}?" + " really?" * (i % 3)}
                                                         for i, t in enumerate(things[:5])]),
        "answers": tiny.write_jsonl(d / "answers.jsonl", [  # grpo / rloo: prompts with a verifiable answer
            {"prompt": f"what colour is the {t}?" + " really?" * (i % 3), "answer": tiny.COLOURS[i]}
            for i, t in enumerate(things[:5])]),
    }


# ----------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One objective's runtime on a fresh model, and the micro-batches the loop would feed it."""

    model: nn.Module
    runtime: Runtime
    whole: MicroBatch  # one batch of every example of `parts`
    parts: list[MicroBatch]  # the same examples as k micro-batches
    masked: MicroBatch  # the same examples, nothing trained


@dataclass(frozen=True)
class Variant:
    """One configuration of an objective under contract: its data, objective and method settings."""

    id: str
    data: str  # a key of `files`
    objective: dict[str, Any] = field(default_factory=dict)  # beyond the name
    paths: dict[str, str] = field(default_factory=dict)  # objective keys given a file: key -> a key of `files`
    method: dict[str, Any] = field(default_factory=lambda: FULL)
    packing: bool = False
    max_length: int = 48
    # A reward is scored at the last token of the whole conversation, not on trained tokens: a pair
    # whose labels are all masked still counts one unit and may train (and a batch of zero pairs
    # cannot run: transformers refuses an empty batch), so only its finiteness is checked.
    masked_trains: bool = False
    # Objectives whose loss couples the examples of a batch (contrastive: in-batch negatives) cannot
    # keep the accumulation contract; they must refuse train.grad_accum > 1 instead, saying why.
    whole_batch: str | None = None
    build: Callable[[Variant, Any, dict[str, Path]], Case] | None = None  # None: loop_case


def config(name: str, v: Variant, files: dict[str, Path], grad_accum: int = 1) -> Any:
    objective = {"name": name, **v.objective, **{k: str(files[f]) for k, f in v.paths.items()}}
    return resolve_config({
        "model": {"name_or_path": str(files["model"]), "dtype": "float32"},
        "data": {"train": str(files[v.data]), "max_length": v.max_length, "packing": v.packing,
                 "max_truncated_share": 1.0, "allow_cut_replies": True},  # short rows on purpose
        "method": v.method, "objective": objective,
        "train": {"batch_size": MICRO, "seed": 0, "precision": "fp32", "grad_accum": grad_accum},
    })


def setup(cfg: Any) -> tuple[nn.Module, Any, list[Example], RunContext]:
    """Tokenizer, data, model and run context as `tunelab.train` and its Loop build them."""
    spec = OBJECTIVES[cfg.objective.name]
    tok = load_tokenizer(cfg.model)
    data = load_tokenized(cfg.data, "train", tok, mask_prompt=spec.mask_prompt, formats=spec.formats,
                          log=tiny.quiet).examples
    torch.manual_seed(cfg.train.seed)
    model = METHODS[cfg.method.name].apply(load_model(cfg.model), cfg.method)
    return model, tok, data, RunContext(cfg, model, tok, CPU, tiny.quiet, data, tok.pad_token_id)


def masked(ex: Example) -> Example:
    """The example with nothing trained: every label (and class, and rejected reply's label) IGNORE."""
    return replace(ex, labels=[IGNORE] * len(ex.labels), label=None if ex.label is None else IGNORE,
                   rejected=None if ex.rejected is None else masked(ex.rejected))


def loop_case(v: Variant, cfg: Any, files: dict[str, Path]) -> Case:
    model, tok, data, ctx = setup(cfg)
    runtime = OBJECTIVES[cfg.objective.name].make_runtime(ctx)

    def stream(examples: list[Example], batch_size: int) -> BatchStream:
        return BatchStream(examples, batch_size=batch_size, packing=cfg.data.packing, max_length=cfg.data.max_length,
                           seed=cfg.train.seed, pad_id=tok.pad_token_id)

    n_rows = stream(data, 1).micro_batches_per_epoch()  # one epoch: every (packed) row once
    assert not cfg.data.packing or n_rows < len(data), "packing put every example in a row of its own"
    k = stream(data, MICRO).micro_batches_per_epoch()
    (whole,) = stream(data, n_rows).next_group(1)
    (all_masked,) = stream([masked(ex) for ex in data], n_rows).next_group(1)
    return Case(model, runtime, whole, stream(data, MICRO).next_group(k), all_masked)


def rollout_case(v: Variant, cfg: Any, files: dict[str, Path]) -> Case:
    """PPO on a fixed rollout: the pipeline's prompts + fixed replies of different lengths, old log-probs and
    values of the policy itself, perturbed (ratios != 1, some clipped), random advantages and returns."""
    model, tok, prompts, ctx = setup(cfg)
    runtime = OBJECTIVES[cfg.objective.name].make_runtime(ctx)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in getattr(model, VALUE_HEAD).parameters():  # zero-initialised: no gradient would reach the body
            p.normal_(0, 0.3)
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    replies = [tok(" ".join([tiny.COLOURS[i]] * (1 + 2 * i)), add_special_tokens=False)["input_ids"] + [stop]
               for i in range(len(prompts))]
    queries = [list(p.input_ids) for p in prompts]
    where = [p.where for p in prompts]
    data = rollout(model, [q + r for q, r in zip(queries, replies, strict=True)], [len(q) for q in queries],
                   tok.pad_token_id)
    empty = rollout(model, queries, [len(q) for q in queries], tok.pad_token_id)  # no reply token anywhere
    rows = list(range(len(prompts)))
    parts = [minibatch(data, rows[s : s + MICRO], where) for s in range(0, len(rows), MICRO)]
    return Case(model, runtime, minibatch(data, rows, where), parts, minibatch(empty, rows, where))


def rollout(model: nn.Module, rows: list[list[int]], n_query: list[int], pad: int) -> dict[str, torch.Tensor]:
    """The tensors PPO's rollout hands its minibatches (right-padded rows, labels on the reply only,
    per-token tensors over positions 0..T-2, each predicting the next token), zero outside the reply."""
    examples = [Example(row, [IGNORE] * q + row[q:]) for row, q in zip(rows, n_query, strict=True)]
    batch = collate([[ex] for ex in examples], pad_id=pad, packed=False)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        values = getattr(model, VALUE_HEAD)(out.hidden_states[-1])[:, :-1]  # (N, T-1)
    mask = batch["labels"][:, 1:] != IGNORE  # (N, T-1)
    logp = out.logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]  # (N, T-1)
    g = torch.Generator().manual_seed(4)

    def reply_only(x: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, x, 0.0)

    return {**batch, "reply_mask": mask,
            "old_logp": reply_only(logp + 0.3 * torch.randn(mask.shape, generator=g)),
            "old_values": reply_only(values + 0.3 * torch.randn(mask.shape, generator=g)),
            "advantages": reply_only(torch.randn(mask.shape, generator=g)),
            "returns": reply_only(torch.randn(mask.shape, generator=g))}


def group_case(v: Variant, cfg: Any, files: dict[str, Path]) -> Case:
    """GRPO / RLOO on a fixed rollout: the pipeline's prompts + fixed replies of different lengths, the
    policy's own log-probs perturbed as the sampling policy's and the reference's (ratios != 1, some
    clipped), random advantages; cut into minibatches by the runtime's own `minibatch`."""
    model, tok, prompts, ctx = setup(cfg)
    runtime = OBJECTIVES[cfg.objective.name].make_runtime(ctx)
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    replies = [tok(" ".join([tiny.COLOURS[i]] * (1 + 2 * i)), add_special_tokens=False)["input_ids"] + [stop]
               for i in range(len(prompts))]
    queries = [list(p.input_ids) for p in prompts]  # prompt records: the example is the prompt
    where = [p.where for p in prompts]
    g = torch.Generator().manual_seed(5)
    with_ref = bool(getattr(cfg.objective, "beta", 0)) and cfg.objective.name == "grpo"

    def rollout(rows: list[list[int]], n_query: list[int]) -> dict[str, torch.Tensor]:
        examples = [Example(row, [IGNORE] * q + row[q:]) for row, q in zip(rows, n_query, strict=True)]
        batch = collate([[ex] for ex in examples], pad_id=tok.pad_token_id, packed=False)
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        mask = batch["labels"][:, 1:] != IGNORE  # (N, T-1)
        logp = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]  # (N, T-1)

        def perturbed() -> list[list[float]]:
            x = logp + 0.3 * torch.randn(mask.shape, generator=g)
            return [row[m].tolist() for row, m in zip(x, mask, strict=True)]

        old, ref = perturbed(), perturbed() if with_ref else None
        advantages = torch.randn(len(rows), generator=g).tolist()
        return Rollout(rows, n_query, where, old, ref, advantages, []).tensors(tok.pad_token_id)

    data = rollout([q + r for q, r in zip(queries, replies, strict=True)], [len(q) for q in queries])
    empty = rollout(queries, [len(q) for q in queries])  # no reply token anywhere
    rows = list(range(len(prompts)))
    parts = [group_minibatch(data, rows[s : s + MICRO], where, runtime.unit) for s in range(0, len(rows), MICRO)]
    return Case(model, runtime, group_minibatch(data, rows, where, runtime.unit), parts,
                group_minibatch(empty, rows, where, runtime.unit))


def minibatch(data: dict[str, torch.Tensor], idx: list[int], where: list[str]) -> MicroBatch:
    """Rows `idx` of the rollout, all-padding columns dropped, as PPO's runtime cuts its minibatches."""
    width_all = data["input_ids"].shape[1]
    width = int(data["attention_mask"][idx].sum(-1).max())
    t = {k: x[idx][:, : width if x.shape[1] == width_all else width - 1] for k, x in data.items()}
    return MicroBatch(t, [where[i] for i in idx], int(t["reply_mask"].sum()), int(t["attention_mask"].sum()))


# Every registered objective needs at least one variant here (test_every_registered_objective_has_a_case).
VARIANTS: dict[str, list[Variant]] = {
    "lm": [Variant("lm-packed", "chat", packing=True, max_length=80)],
    "sft": [Variant("sft", "chat"), Variant("sft-lora", "chat", method=LORA)],
    "classify": [Variant("classify", "classes", method={"name": "head", "num_labels": 3})],
    "reward": [
        Variant("reward-centred", "prefs", {"center_rewards": 0.1}, method={"name": "head", "num_labels": 1},
                masked_trains=True),
        Variant("reward-pmi-lm_weight", "prefs", {"lm_weight": 0.5},
                method={"name": "head", "num_labels": 1, "likelihood": "pmi"}, masked_trains=True),
    ],
    "dpo": [
        Variant("dpo-conservative-reference_model", "prefs", {"label_smoothing": 0.2}, paths={"reference": "other"}),
        Variant("dpo-ipo-frozen_copy", "prefs", {"loss_type": "ipo"}),
        Variant("dpo-hinge-lora-precomputed", "prefs", {"loss_type": "hinge", "precompute_reference": True},
                method=LORA),
    ],
    "simpo": [Variant("simpo", "prefs", {"beta": 2.5, "gamma_beta_ratio": 0.3}),
              Variant("simpo-lora", "prefs", method=LORA)],
    "orpo": [Variant("orpo", "prefs", {"odds_ratio_weight": 0.5}), Variant("orpo-lora", "prefs", method=LORA)],
    # KTO's reference point z0 is estimated from the whole batch: accumulation is refused, as contrastive's
    "kto": [Variant("kto-reference_model", "unpaired", {"beta": 0.2, "undesirable_weight": 1.3},
                    paths={"reference": "other"}, whole_batch="gradient accumulation"),
            Variant("kto-lora", "unpaired", method=LORA, whole_batch="gradient accumulation")],
    "distill": [Variant("distill-jsd-hard_weight", "chat",
                        {"divergence": "jsd", "temperature": 2.0, "hard_weight": 0.3},
                        paths={"teacher": "other"})],
    "contrastive": [Variant("contrastive", "pairs", {"temperature": 0.1}, masked_trains=True,
                            whole_batch="gradient accumulation")],
    "ppo": [Variant("ppo-entropy", "prompts", {"vf_coef": 0.5, "entropy_coef": 0.05}, paths={"reward_model": "rm"},
                    build=rollout_case)],
    "grpo": [Variant("grpo-exact_match-clip_higher", "answers", {"reward": "exact_match", "beta": 0.1,
                                                             "epsilon_high": 0.28}, build=group_case),
             Variant("grpo-dr_grpo-lora-reward_model", "prompts", {"loss_type": "dr_grpo"},
                     paths={"reward_model": "rm"}, method=LORA, build=group_case),
             Variant("grpo-dapo-lora", "answers", {"reward": "numeric", "loss_type": "dapo", "beta": 0.0},
                     method=LORA, build=group_case)],
    "rloo": [Variant("rloo-unclipped", "answers", {"reward": "contains_answer", "epsilon": None}, build=group_case),
             Variant("rloo-lora", "answers", {"reward": "exact_match", "epsilon": 0.1}, method=LORA,
                     build=group_case)],
}
ADD_A_CASE = ("add a Variant to VARIANTS in tests/test_objectives_contract.py, with a batch builder (`build`) if "
              "the loop's data path (loop_case) cannot build its batches")
CASES = [pytest.param(name, v, id=v.id if v else name)
         for name in sorted(OBJECTIVES) for v in VARIANTS.get(name) or [None]]


@pytest.fixture(scope="module")
def case_of(files) -> Callable[[str, Variant | None], Case]:
    """A variant's case, built on first use and shared by the contract tests (none changes a weight)."""
    built: dict[str, Case] = {}

    def case(name: str, v: Variant | None) -> Case:
        if v is None:
            pytest.fail(f"objective {name!r} is registered but has no contract case: {ADD_A_CASE}")
        if v.id not in built:
            built[v.id] = (v.build or loop_case)(v, config(name, v, files), files)
        return built[v.id]

    return case


def accumulate(case: Case, mbs: list[MicroBatch]) -> tuple[float, dict[str, torch.Tensor | None]]:
    """One optimizer step's backward as the loop does it: each loss sum / the units of all `mbs`.
    Returns the normalised loss and the trainable parameters' gradients."""
    case.model.train()
    case.model.zero_grad(set_to_none=True)
    n_total = sum(mb.n_trained for mb in mbs)
    total = 0.0
    for mb in mbs:
        loss_sum, n = case.runtime.loss(case.model, mb.tensors)
        assert int(n) == mb.n_trained, "the runtime's units differ from those the loop normalises by"
        (loss_sum / max(n_total, 1)).backward()
        total += float(loss_sum.detach())
    grads = {k: None if p.grad is None else p.grad.clone()
             for k, p in case.model.named_parameters() if p.requires_grad}
    return total / max(n_total, 1), grads


# ----------------------------------------------------------------------------- the contract


def test_every_registered_objective_has_a_case():
    missing, stale = sorted(set(OBJECTIVES) - set(VARIANTS)), sorted(set(VARIANTS) - set(OBJECTIVES))
    assert not missing, f"objectives {missing} have no contract case: {ADD_A_CASE}"
    assert not stale, f"VARIANTS names objectives that are not registered: {stale}"
    ids = [v.id for vs in VARIANTS.values() for v in vs]
    assert len(set(ids)) == len(ids), "variant ids name the cached cases: they must be unique"


@pytest.mark.parametrize("name, variant", CASES)
def test_fully_masked_batch_gives_a_finite_loss_and_no_gradient(name, variant, case_of):
    case = case_of(name, variant)
    mb = case.masked
    assert mb.n_trained == (int(mb.tensors["n_pairs"]) if "n_pairs" in mb.tensors else 0)
    loss, grads = accumulate(case, [mb])
    assert math.isfinite(loss)
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    if mb.n_trained == 0:
        assert loss == 0.0, "a batch with nothing trained adds to the loss"
    moved = sorted(k for k, g in grads.items() if g is not None and g.any())
    assert variant.masked_trains or moved == [], f"gradient from a batch with nothing trained: {moved[:5]}"


@pytest.mark.parametrize("name, variant", CASES)
def test_accumulated_micro_batches_give_the_gradient_of_the_whole_batch(name, variant, case_of, files):
    if variant is not None and variant.whole_batch:
        with pytest.raises(ConfigError, match=variant.whole_batch):
            config(name, variant, files, grad_accum=2)
        return
    case = case_of(name, variant)
    assert len(case.parts) >= 2 and [w for mb in case.parts for w in mb.where] == case.whole.where
    assert len({mb.n_trained for mb in case.parts}) > 1, "equal units would hide a mean-of-means normalisation"
    whole_loss, whole = accumulate(case, [case.whole])
    parts_loss, parts = accumulate(case, case.parts)
    assert math.isfinite(whole_loss) and parts_loss == pytest.approx(whole_loss, rel=1e-5)
    assert set(parts) == set(whole) and any(g is not None and g.any() for g in whole.values()), "no gradient at all"
    for k, g in whole.items():
        torch.testing.assert_close(parts[k], g, **GRAD_TOL, msg=lambda m, k=k: f"{k}: {m}")
