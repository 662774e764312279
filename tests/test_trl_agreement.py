"""tunelab's pure preference and RL losses against TRL's own implementation on identical inputs (issue #19).

TRL (pinned in the dev extra) keeps its losses inside trainer methods. Each test makes the trainer with
`object.__new__` and sets only the attributes the method reads; where the method calls a model, the model
is a stub that returns fixed tensors. Where tunelab departs from TRL on purpose (docs/alignment.md,
docs/rl.md), the test checks agreement where the two coincide and that the gap is exactly the documented
one. Inputs are float64 and compared with assert_close's float64 defaults (rtol 1e-7, atol 1e-7), values
and gradients; ORPO is float32 (TRL casts its odds to float32) with the float32 defaults (rtol 1.3e-6,
atol 1e-5).
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from trl import DPOTrainer, GRPOTrainer, KTOTrainer, RLOOTrainer
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer
from trl.trainer import grpo_trainer, rloo_trainer

from tunelab.data.types import IGNORE
from tunelab.objectives.alignment_losses import (
    GRPO_LOSSES,
    dpo_loss,
    group_advantages,
    grpo_token_loss,
    leave_one_out_advantages,
    rloo_loss,
    sequence_logps,
)
from tunelab.objectives.kto import mismatched_batch
from tunelab.objectives.preference_losses import kto_loss, kto_reference_point, orpo_loss, simpo_loss

F64 = torch.float64
V = 11  # vocabulary of the stand-in models


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class OneProcess:
    """The accelerate.Accelerator calls the methods make, for one CPU process (no global accelerate state)."""

    device = torch.device("cpu")
    num_processes, process_index, sync_gradients = 1, 0, True

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x

    gather_for_metrics = gather

    def reduce(self, x: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return x


def bare(cls: type, **attrs):
    """A TRL trainer without __init__: only the attributes its loss methods read."""
    obj = object.__new__(cls)
    common = dict(accelerator=OneProcess(), aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
                  args=SimpleNamespace(gradient_checkpointing_kwargs=None), _total_train_tokens=0, _tp_size=1)
    for k, v in {**common, **attrs}.items():
        setattr(obj, k, v)
    return obj


class Unigram(torch.nn.Module):
    """A causal LM whose next-token distribution is softmax(w) at every position. Called as TRL calls a model
    patched by add_fused_lm_head: log_probs (B, T-1) of the next labels, 0 where they are -100. `logits` gives
    the same model as tunelab reads it, (B, T, V)."""

    is_gradient_checkpointing = False

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = w  # a plain tensor attribute, not a parameter

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **_) -> SimpleNamespace:
        lp = torch.where(labels[:, 1:] != IGNORE, F.log_softmax(self.w, -1)[input_ids[:, 1:]], 0)  # (B, T-1)
        z = torch.zeros_like(lp)
        return SimpleNamespace(log_probs=lp, entropy=z, mean_logits=z, is_top1=z.bool(), aux_loss=None)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.w.expand(*input_ids.shape, V)


def rows(n: int, seed: int, prompt: tuple[int, int] = (1, 3), reply: tuple[int, int] = (1, 6)) -> dict:
    """n right-padded rows of random tokens: a prompt then a trained reply of random lengths.
    Returns input_ids, attention_mask, labels (IGNORE off the reply) and completion_mask, all (n, T)."""
    g = gen(seed)
    lp = torch.randint(prompt[0], prompt[1] + 1, (n,), generator=g)
    lr = torch.randint(reply[0], reply[1] + 1, (n,), generator=g)
    t = int((lp + lr).max())
    pos = torch.arange(t)[None, :]  # (1, T)
    attn = pos < (lp + lr)[:, None]  # (n, T)
    reply_mask = attn & (pos >= lp[:, None])
    ids = torch.where(attn, torch.randint(1, V, (n, t), generator=g), 0)
    return {"input_ids": ids, "attention_mask": attn.long(), "labels": torch.where(reply_mask, ids, IGNORE),
            "completion_mask": reply_mask.long()}


def leaf(*shape: int, seed: int, scale: float = 1.0, dtype: torch.dtype = F64) -> torch.Tensor:
    return (torch.randn(shape, generator=gen(seed), dtype=dtype) * scale).requires_grad_()


def check(ours: torch.Tensor, theirs: torch.Tensor, wrt: torch.Tensor) -> None:
    """Equal values, and equal gradients (of a fixed random weighting of the outputs) with respect to `wrt`."""
    torch.testing.assert_close(ours, theirs)
    w = torch.randn(ours.shape, generator=gen(99), dtype=ours.dtype)
    (g_ours,) = torch.autograd.grad((ours * w).sum(), wrt, retain_graph=True)
    (g_theirs,) = torch.autograd.grad((theirs * w).sum(), wrt, retain_graph=True)
    torch.testing.assert_close(g_ours, g_theirs)


# --- log-probs and the pair losses -----------------------------------------------------------------


def test_sequence_logps_equal_trl_batch_logps():
    b = rows(6, seed=1)
    logits = leaf(6, b["input_ids"].shape[1], V, seed=2, scale=3.0)
    logp, n = sequence_logps(logits, b["labels"])
    check(logp, ORPOTrainer.get_batch_logps(logits, b["labels"], average_log_prob=False), logits)
    check(logp / n, ORPOTrainer.get_batch_logps(logits, b["labels"], average_log_prob=True), logits)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_equals_trl(loss_type):
    b = rows(8, seed=3)  # 4 chosen rows then 4 rejected, as both lay a pair batch out
    policy, ref = Unigram(leaf(V, seed=4)), Unigram(leaf(V, seed=5).detach())
    logp, n = sequence_logps(policy.logits(b["input_ids"]), b["labels"])  # (8,) sums
    ref_logp, _ = sequence_logps(ref.logits(b["input_ids"]), b["labels"])
    # tunelab's runtime feeds IPO per-token means; TRL divides the summed log-ratios by the lengths
    d = n if loss_type == "ipo" else 1
    beta = 0.3
    ours = dpo_loss(*(logp / d).chunk(2), *(ref_logp / d).chunk(2), beta=beta, loss_type=loss_type)[0].mean()
    trl = bare(DPOTrainer, model=policy, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
               loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False)
    inputs = {k: b[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = ref_logp.chunk(2)
    check(ours, trl._compute_loss(policy, inputs, return_outputs=False), policy.w)


def test_dpo_conservative_is_trl_sigmoid_plus_its_flip_term():
    """TRL 1.16 has no cDPO: its `sigmoid` ignores label_smoothing and `robust` is another loss
    (Chowdhury et al.). cDPO's -(1-e) logsigmoid(x) - e logsigmoid(-x) is exactly TRL's sigmoid + e*x."""
    b = rows(8, seed=6)
    policy, ref = Unigram(leaf(V, seed=7)), Unigram(leaf(V, seed=8).detach())
    logp, _ = sequence_logps(policy.logits(b["input_ids"]), b["labels"])
    ref_logp, _ = sequence_logps(ref.logits(b["input_ids"]), b["labels"])
    beta, eps = 0.2, 0.15
    ours = dpo_loss(*logp.chunk(2), *ref_logp.chunk(2), beta=beta, loss_type="conservative",
                    label_smoothing=eps)[0].mean()
    trl = bare(DPOTrainer, model=policy, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
               loss_types=["sigmoid"], loss_weights=[1.0], beta=beta, label_smoothing=eps, use_weighting=False)
    inputs = {k: b[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = ref_logp.chunk(2)
    h = (logp - ref_logp).view(2, -1)  # (2, B): chosen, rejected log-ratios
    check(ours, trl._compute_loss(policy, inputs, False) + eps * beta * (h[0] - h[1]).mean(), policy.w)


class Logits:
    """A model returning fixed logits, as TRL's CPO and ORPO trainers call it."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def __call__(self, input_ids: torch.Tensor, **_) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits)


def pair_batch(b: dict) -> dict:
    """rows() as TRL's CPO/ORPO batch: chosen_* then rejected_* (the first and second half)."""
    out = {}
    for side, part in zip(("chosen", "rejected"), (slice(0, len(b["labels"]) // 2), slice(len(b["labels"]) // 2, None)),
                          strict=True):
        for k in ("input_ids", "attention_mask", "labels"):
            out[f"{side}_{k}"] = b[k][part]
    return out


def pair_trainer(cls: type, **attrs):
    return bare(cls, is_encoder_decoder=False, padding_value=0, pad_token_id=0, **attrs)


@pytest.mark.parametrize("beta, ratio", [(2.0, 0.5), (2.5, 0.25)])
def test_simpo_equals_trl_cpo_simpo(beta, ratio):
    """TRL's `simpo_gamma` is gamma itself: tunelab's gamma_beta_ratio x beta."""
    b = rows(8, seed=9)
    logits = leaf(8, b["input_ids"].shape[1], V, seed=10, scale=2.0)
    logp, n = sequence_logps(logits, b["labels"])
    ours = simpo_loss(*(logp / n).chunk(2), beta=beta, gamma_beta_ratio=ratio)[0].mean()
    trl = pair_trainer(CPOTrainer, loss_type="simpo", beta=beta, simpo_gamma=ratio * beta, alpha=0.0,
                       label_smoothing=0.0, cpo_alpha=0.0)
    check(ours, trl.get_batch_loss_metrics(Logits(logits), pair_batch(b))[0], logits)


def orpo_both(b: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tunelab's ORPO loss, TRL's, the logits both read), float32, weight 0.1 = TRL's beta."""
    logits = leaf(len(b["labels"]), b["input_ids"].shape[1], V, seed=seed, scale=2.0, dtype=torch.float32)
    logp, n = sequence_logps(logits, b["labels"])
    ours = orpo_loss(*(logp / n).chunk(2), weight=0.1)[0].mean()
    trl = pair_trainer(ORPOTrainer, beta=0.1)
    return ours, trl.get_batch_loss_metrics(Logits(logits), pair_batch(b))[0], logits


def test_orpo_equals_trl_without_prompts_and_with_equal_chosen_lengths():
    """Where the NLL conventions coincide: every chosen reply has the same length and no prompt."""
    b = rows(8, seed=11, prompt=(0, 0), reply=(5, 5))
    b["labels"][:, 0] = IGNORE  # the first token is predicted by nothing, in both
    check(*orpo_both(b, seed=12))


def test_orpo_differs_from_trl_by_the_nll_normalisation_only():
    """docs/alignment.md: tunelab's NLL is the mean over pairs of each chosen reply's mean over its tokens; TRL's
    is the mean over all the batch's chosen tokens, prompt tokens included (ORPOTrainer.concatenated_forward)."""
    b = rows(8, seed=13)
    ours, theirs, logits = orpo_both(b, seed=14)
    chosen = slice(0, 4)
    trained = b["attention_mask"][chosen, 1:].bool()  # every non-pad token after the first: prompt and reply
    nll = -F.log_softmax(logits[chosen, :-1], -1).gather(-1, b["input_ids"][chosen, 1:, None])[..., 0]  # (4, T-1)
    trl_nll = nll[trained].mean()
    logp, n = sequence_logps(logits[chosen], b["labels"][chosen])
    our_nll = (-logp / n).mean()
    assert abs((trl_nll - our_nll).item()) > 1e-2  # the case exercises the difference
    check(ours - our_nll + trl_nll, theirs, logits)


# --- KTO -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed, z0_positive", [(15, True), (25, False)])
def test_kto_equals_trl_given_the_same_mismatched_pairs(seed, z0_positive):
    """z0 from the same mismatched pairs (tunelab's rotation; TRL's is the same +1 rotation, made at
    tokenisation before shuffling: docs/alignment.md) is TRL's estimate, floored at 0, with no gradient."""
    b = rows(6, seed=seed)
    b["label"] = torch.tensor([1, 0, 1, 1, 0, 0])
    kl_b = mismatched_batch(b, pad_id=0, max_length=64)
    policy, ref = Unigram(leaf(V, seed=seed + 100)), Unigram(leaf(V, seed=seed + 200).detach())

    def logps(model: Unigram, batch: dict) -> torch.Tensor:
        return sequence_logps(model.logits(batch["input_ids"]), batch["labels"])[0]

    z0 = kto_reference_point(logps(policy, kl_b) - logps(ref, kl_b))
    assert (float(z0) > 0) == z0_positive
    beta, w_d, w_u = 0.2, 1.0, 1.3
    ours = kto_loss(logps(policy, b), logps(ref, b), b["label"] == 1, z0, beta=beta, desirable_weight=w_d,
                    undesirable_weight=w_u)[0].mean()
    trl = bare(KTOTrainer, model=policy, ref_model=ref, calculate_KL=True, precompute_ref_logps=False,
               loss_type="kto", beta=beta, desirable_weight=w_d, undesirable_weight=w_u)
    inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "label": b["label"],
              "completion_mask": (b["labels"] != IGNORE).long(), "KL_input_ids": kl_b["input_ids"],
              "KL_attention_mask": kl_b["attention_mask"], "KL_completion_mask": (kl_b["labels"] != IGNORE).long()}
    check(ours, trl._compute_loss(policy, inputs, return_outputs=False), policy.w)


# --- GRPO and RLOO ---------------------------------------------------------------------------------------
# N = 3 prompts x G = 4 replies, rewards grouped as both group them: G consecutive replies per prompt.

G, C = 4, 6  # replies per prompt, reply positions


def replies(seed: int) -> dict:
    """Per-token tensors of 12 replies of 1..C tokens: the policy's log-probs (the leaf) and the sampling
    policy's and the reference's nearby; the reply mask; rewards with one all-equal group."""
    g = gen(seed)
    n = 3 * G
    mask = torch.arange(C)[None, :] < torch.randint(1, C + 1, (n,), generator=g)[:, None]  # (N, C)
    logp = (-torch.rand(n, C, generator=g, dtype=F64) * 3).requires_grad_()
    near = lambda: logp.detach() + 0.3 * torch.randn(n, C, generator=g, dtype=F64)  # noqa: E731
    rewards = torch.randint(0, 3, (n,), generator=g).to(F64)
    rewards[:G] = 1.0  # a group of equal rewards: advantage 0 in both
    return {"logp": logp, "old": near(), "ref": near(), "mask": mask, "rewards": rewards,
            "adv": torch.randn(n, generator=g, dtype=F64)}


def rl_inputs(r: dict, **extra: torch.Tensor) -> dict:
    n = len(r["rewards"])
    return {"prompt_ids": torch.ones(n, 2, dtype=torch.long), "prompt_mask": torch.ones(n, 2, dtype=torch.long),
            "completion_ids": torch.ones(n, C, dtype=torch.long), "completion_mask": r["mask"].long(), **extra}


def fixed_logps(logp: torch.Tensor):
    """Stands in for the trainers' _get_per_token_logps_and_entropies: (log-probs (B, C), entropies, aux loss)."""
    return lambda *args, **kwargs: (logp, torch.zeros_like(logp), None)


@pytest.mark.parametrize("loss_type, eps_high, beta", [("grpo", 0.2, 0.04), ("dr_grpo", 0.2, 0.0),
                                                       ("dapo", 0.28, 0.04)])
def test_grpo_losses_equal_trl(loss_type, eps_high, beta):
    r, max_new = replies(seed=30), 8
    per_token, _ = grpo_token_loss(r["logp"], r["old"], r["adv"], r["mask"], epsilon=0.2, epsilon_high=eps_high,
                                   ref_logp=r["ref"], beta=beta)
    total, units = GRPO_LOSSES[loss_type](per_token, r["mask"], max_new)
    trl = bare(GRPOTrainer, model=SimpleNamespace(training=True), top_entropy_quantile=1.0,
               off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta, loss_type=loss_type,
               epsilon_low=0.2, epsilon_high=eps_high, use_vllm=False, current_gradient_accumulation_steps=1,
               _entropy_bonus_enabled=False, max_completion_length=max_new,
               args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
               _get_per_token_logps_and_entropies=fixed_logps(r["logp"]))
    inputs = rl_inputs(r, advantages=r["adv"], old_per_token_logps=r["old"], ref_per_token_logps=r["ref"],
                       num_items_in_batch=r["mask"].sum())
    check(total / units, trl._compute_loss(None, inputs), r["logp"])


def rollout_trainer(cls: type, r: dict, monkeypatch, **attrs):
    """A TRL GRPO/RLOO trainer whose _generate_and_score_completions scores fixed replies with fixed rewards."""
    monkeypatch.setattr(grpo_trainer if cls is GRPOTrainer else rloo_trainer, "gather_object", lambda x: x)
    n = len(r["rewards"])
    ids = [[1] * int(k) for k in r["mask"].sum(-1)]
    prompts, texts = [[1, 1]] * n, ["reply"] * n
    # RLOO's _generate returns (prompt ids, reply ids, texts); GRPO's adds tool masks, vLLM log-probs, images
    generated = (prompts, ids, texts) if cls is RLOOTrainer else (prompts, ids, None, texts, None, {}, None, None)
    return bare(cls, model=SimpleNamespace(training=True, is_gradient_checkpointing=False), num_generations=G,
                _tokenizer=SimpleNamespace(pad_token_id=0), pad_to_multiple_of=None, mask_truncated_completions=False,
                args=SimpleNamespace(per_device_train_batch_size=n, steps_per_generation=1,
                                     gradient_accumulation_steps=1, gradient_checkpointing_kwargs=None),
                _calculate_rewards=lambda *a: r["rewards"][:, None], reward_weights=torch.ones(1),
                reward_func_names=["r"], log_multimodal=False, _pending_extra_logs={}, _pending_metrics={},
                _logs={"prompt": [], "completion": [], "rewards": defaultdict(list), "advantages": []},
                _generate=lambda prompts: generated,
                **attrs)


@pytest.mark.parametrize("scale", [True, False])
def test_grpo_advantages_equal_trl(scale, monkeypatch):
    """Both: (r - mean_g) / (std_g + 1e-4), std with Bessel's correction (docs/rl.md); dr_grpo's unscaled form."""
    r = replies(seed=31)
    trl = rollout_trainer(GRPOTrainer, r, monkeypatch, environment_factories=None, tools=None, environments=[],
                          num_iterations=1, use_vllm=False, beta=0.0, multi_objective_aggregation="sum_then_normalize",
                          scale_rewards="group" if scale else "none")
    theirs = trl._generate_and_score_completions([{"prompt": "q"}] * len(r["rewards"]))["advantages"]
    ours = group_advantages(r["rewards"], G, scale=scale)
    assert (ours[:G] == 0).all()
    torch.testing.assert_close(ours, theirs)


def test_rloo_advantages_equal_trl_with_the_kl_in_the_reward(monkeypatch):
    """R_i = r_i - beta * sum_t (log pi_old - log pi_ref), then the leave-one-out baseline (docs/rl.md), as TRL's
    RLOO (normalize_advantages off, its default; tunelab's scale_rewards is another normalisation)."""
    r, beta = replies(seed=32), 0.05
    ref_model = object()
    trl = rollout_trainer(RLOOTrainer, r, monkeypatch, beta=beta, ref_model=ref_model, reward_clip_range=None,
                          normalize_advantages=False,
                          _get_per_token_logps_and_entropies=lambda model, *a, **k: (
                              r["ref"] if model is ref_model else r["old"], None, None))
    theirs = trl._generate_and_score_completions([{"prompt": "q"}] * len(r["rewards"]))["advantages"]
    kl = torch.where(r["mask"], r["old"] - r["ref"], 0).sum(-1)  # (N,) k1 summed over the reply
    torch.testing.assert_close(leave_one_out_advantages(r["rewards"] - beta * kl, G), theirs)


def test_rloo_loss_equals_trl():
    r = replies(seed=33)
    total, units, _ = rloo_loss(r["logp"], r["old"], r["adv"], r["mask"], epsilon=0.2, epsilon_high=0.3)
    trl = bare(RLOOTrainer, model=SimpleNamespace(training=True), epsilon_low=0.2, epsilon_high=0.3,
               _get_per_token_logps_and_entropies=fixed_logps(r["logp"]))
    old = torch.where(r["mask"], r["old"], 0).sum(-1)  # (N,) the sampling policy's reply log-probs
    check(total / units, trl._compute_loss(None, rl_inputs(r, advantages=r["adv"], old_logps=old)), r["logp"])
