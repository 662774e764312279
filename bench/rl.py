"""RL from a verifiable reward (GRPO, RLOO, PPO) and the O12 preference losses on TinyWorld: docs/results/rl.md.

    python bench/rl.py [--out runs/bench-rl] [--json docs/results/rl.json] [--seeds 42 43 44] [--no-ppo]
    python bench/rl.py --no-ppo --no-prefs --methods grpo --seeds 42 --tag=-mu4 --rl-set objective.epochs=4 \
        train.max_steps=480 --json runs/bench-rl/grpo-mu4.json      # one GRPO setting, its own run dirs
    python bench/rl.py --no-ppo --no-prefs --methods ppo --seeds 42 --rl-questions 64 --tag=-q64 \
        --json docs/results/rl-ppo-q64.json                          # PPO with the exact_match reward
    python bench/rl.py --skill counting --sft-steps 8 --no-ppo --no-prefs --methods grpo --seeds 42 \
        --out runs/bench-rl-counting --json docs/results/rl-counting.json  # another skill: held-out gained / lost

Every stage is one `tunelab train` of a shipped config with overrides; a stage whose run dir under
--out already has `final/` is reused, so an interrupted bench resumes where it stopped.

1. Arithmetic (tinyworld:skills@arithmetic-*; test sums are never in training): a full-SFT warm start,
   then from it GRPO (configs/rl-grpo.yaml) and RLOO (configs/rl-rloo.yaml) with one budget (RL_STEPS
   optimizer steps = RL_STEPS / 4 rollouts of 8 prompts x 8 replies, max_new_tokens 8), one run per seed.
   PPO (configs/align-ppo.yaml, same rollouts: 64 prompts x 1 reply, 4 minibatches, same steps) two ways:
   `--methods ppo` with the same exact_match reward as GRPO (one run per seed, beside them), and, unless
   --no-ppo, with a reward model trained here on arithmetic pairs (the right sum vs a near miss), one seed.
   Measured: greedy exact match on the 100 held-out and the 500 training questions before and after,
   the training questions also split into those the run sampled as prompts (its seeded prompt stream
   replayed) and the rest, beside the SFT start's on the same split;
   KL(policy || SFT start) per reply, estimated the same way for every method (k1 over 4 sampled replies
   to each held-out question, temperature 1); the training loop's seconds; the reward curve.
2. Preferences (tinyworld:prefs): DPO, KTO, SimPO from the alignment SFT model (configs/align-sft.yaml)
   and ORPO from the base (its recipe), each config as shipped. Measured on prefs@test (120 pairs):
   accuracy and margin of the mean token log-prob (the same for every model), DPO's implicit reward
   (summed log-ratio to the SFT model) accuracy, the objective's own eval accuracy / margin where it logs
   one; greedy replies to prefs@prompts-test scored by the rule the pairs come from; the forgetting probe.
Prints a table, writes --json and the reward curve PNG next to it.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import alignment  # noqa: E402  (bench/alignment.py: its stage runner and metrics reader)
from alignment import metrics  # noqa: E402

from tunelab import api  # noqa: E402
from tunelab.data.pipeline import load_tokenized  # noqa: E402
from tunelab.data.sources import read_records  # noqa: E402
from tunelab.data.stream import BatchStream  # noqa: E402
from tunelab.eval.probe import run_probe  # noqa: E402
from tunelab.inference.generation import (  # noqa: E402
    continuation_logprobs,
    encode_prompt,
    generate_ids,
    greedy,
    pad_id,
)
from tunelab.objectives import OBJECTIVES  # noqa: E402
from tunelab.objectives.grpo import exact_match as em_reward  # noqa: E402
from tunelab.objectives.grpo import read_tasks  # noqa: E402
from tunelab.recipes.compare.stats import sign_test  # noqa: E402
from tunelab.world.prefs import score_response  # noqa: E402
from tunelab.world.resolve import resolve_task  # noqa: E402

CONFIGS = ROOT / "configs"
ARITH = "tinyworld:skills@arithmetic"  # the skill: --skill sets it (e.g. counting)
SFT_STEPS = 120  # full SFT on the 500 training sums: ~0.4 greedy exact match on them (200 steps memorises: ~0.97)
RL_STEPS = 120  # 30 rollouts x 64 replies for every RL method
KL_SAMPLES = 4  # sampled replies per held-out question for the common KL estimate
RL_COMMON = [f"train.max_steps={RL_STEPS}", "train.warmup=8", f"train.eval_every={RL_STEPS // 2}",
             "train.save_every=0", "objective.eval_prompts=null"]
PPO_SAME_BUDGET = [  # align-ppo.yaml turned to rl-grpo.yaml's data, LoRA, lr and rollout size
    "data.train={train}", "data.eval={prompts}-test.jsonl", "data.max_length=64",
    "method.dropout=0.0", "objective.rollout_prompts=64", "objective.ppo_epochs=1", "objective.max_new_tokens=8",
    "objective.kl_target=null", "train.batch_size=16", "train.lr=5e-4", "train.precision=fp32",
    f"train.max_steps={RL_STEPS}", "train.warmup=8", f"train.eval_every={RL_STEPS // 2}", "train.save_every=0",
]


def train(name: str, config: str, overrides: list[str], runs: Path, log: dict) -> Path:
    """Train a stage (or reuse its finished run): bench/alignment.py's, always reusing."""
    return alignment.train(name, config, overrides, runs, True, log)


def records(spec: str) -> list[dict]:
    return [r for _, r in read_records(str(resolve_task(spec)))]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


# ----------------------------------------------------------------------------- arithmetic: measures


def exact_match(run: Path | str) -> dict:
    return {split: api.evaluate_task(str(run), f"{ARITH}-{split}")["exact_match"] for split in ("test", "train")}


@torch.no_grad()
def reply_logps(model: torch.nn.Module, rows: list[tuple[list[int], int]], pad: int) -> list[float]:
    """Summed log-prob of each row's tokens after its first n_ctx (the reply), in one padded batch."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T), right padded
    mask, scored = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    for i, (row, n_ctx) in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)], scored[i, n_ctx : len(row)] = torch.tensor(row), 1, True
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)  # (B, T-1, V)
    token = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return (token * scored[:, 1:]).sum(-1).tolist()


def kl_to_start(run: Path, start: Path, seed: int = 0) -> float:
    """KL(policy || start) per reply: mean over sampled replies of sum_t log(pi / pi_start) (k1)."""
    policy, tok = api.load(run)
    ref, _ = api.load(start)
    policy.eval(), ref.eval()
    prompts = [encode_prompt(tok, r["messages"][:-1], True) for r in records(f"{ARITH}-test")] * KL_SAMPLES
    torch.manual_seed(seed)
    replies = generate_ids(policy, tok, prompts, max_new_tokens=8, batch_size=64, temperature=1.0)
    rows = [(p + r, len(p)) for p, r in zip(prompts, replies, strict=True)]
    diffs: list[float] = []
    for i in range(0, len(rows), 64):
        chunk = rows[i : i + 64]
        diffs += [a - b for a, b in zip(reply_logps(policy, chunk, pad_id(tok)),
                                        reply_logps(ref, chunk, pad_id(tok)), strict=True)]
    return sum(diffs) / len(diffs)


_CORRECT: dict[str, dict[str, float]] = {}


def question(record: dict) -> str:
    """The question of a chat record (GRPO, RLOO) or a prompt record (PPO)."""
    return record["prompt"] if "prompt" in record else record["messages"][0]["content"]


def correct_by_question(model_dir: Path, split: str = "train") -> dict[str, float]:
    """Greedy exact match (the `exact_match` reward) of each question of a split (by default the training
    questions), by its text."""
    key = f"{model_dir}|{split}"
    if key not in _CORRECT:
        model, tok = api.load(model_dir)
        split_records = records(f"{ARITH}-{split}")
        replies = greedy(model, tok, [r["messages"][:-1] for r in split_records], max_new_tokens=8,
                         batch_size=100, chat=True)
        _CORRECT[key] = {question(r): em_reward(x, r) for r, x in zip(split_records, replies, strict=True)}
    return _CORRECT[key]


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson interval of a binomial proportion k / n."""
    if not n:
        return [0.0, 1.0]
    p, d = k / n, 1 + z * z / n
    mid, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [max(0.0, mid - half), min(1.0, mid + half)]


def heldout_flips(run_model: Path, start: Path) -> dict:
    """Held-out questions the run gets right and its start not ("gained") and the reverse, with the sign
    test's p on those, and each model's held-out exact match with its 95% Wilson interval."""
    rl, before = correct_by_question(run_model, "test"), correct_by_question(start, "test")
    gained, lost = sum(rl[q] > before[q] for q in before), sum(rl[q] < before[q] for q in before)
    n, k_rl, k_start = len(before), round(sum(rl.values())), round(sum(before.values()))
    return {"n": n, "start": k_start / n, "rl": k_rl / n, "start_ci95": wilson(k_start, n), "rl_ci95": wilson(k_rl, n),
            "gained": gained, "lost": lost, "sign_test_p": sign_test(gained, gained + lost)}


def sampled_prompts(run: Path) -> set[str]:
    """The training questions an RL run sampled: the loop's seeded data stream replayed, from which each
    rollout takes the next prompts_per_rollout (GRPO, RLOO) or rollout_prompts (PPO) examples."""
    cfg = api.resolve_config(run)
    _, tok = api.load(run / "final")
    data = load_tokenized(cfg.data, "train", tok, mask_prompt=True, formats=OBJECTIVES[cfg.objective.name].formats,
                          log=lambda _: None)
    stream = BatchStream(data.examples, batch_size=cfg.train.batch_size, packing=cfg.data.packing,
                         max_length=cfg.data.max_length, seed=cfg.train.seed, pad_id=pad_id(tok))
    by_where = read_tasks(cfg.data)["train"]
    n = len((run / "rollouts.jsonl").read_text().splitlines())
    per_rollout = getattr(cfg.objective, "prompts_per_rollout", None) or cfg.objective.rollout_prompts
    return {question(by_where[e.where]) for _ in range(n) for e in stream.next_examples(per_rollout)}


def seen_split(run: Path, start: Path) -> dict:
    """Training-question exact match of the run and of its start, on the questions it sampled and the rest."""
    seen = sampled_prompts(run)
    rl, before = correct_by_question(run / "final"), correct_by_question(start)
    out: dict = {"n_seen": len(seen)}
    for part in ("seen", "unseen"):
        qs = [q for q in before if (q in seen) == (part == "seen")]
        out.setdefault("rl", {})[part] = statistics.fmean(rl[q] for q in qs)
        out.setdefault("start", {})[part] = statistics.fmean(before[q] for q in qs)
        # paired: questions the run got right that the start did not, and the reverse (a sign test on these)
        out.setdefault("flips", {})[part] = {"gained": sum(rl[q] > before[q] for q in qs),
                                             "lost": sum(rl[q] < before[q] for q in qs)}
    return out


def head_to_head(a: Path, b: Path) -> dict:
    """Run b against run a question by question (greedy exact match of their final models): on the training
    questions both sampled and on those neither did, how many b got right and a not ("b_only") and the
    reverse, with the sign test's p on those."""
    seen = sampled_prompts(a) & sampled_prompts(b)
    right_a, right_b = correct_by_question(a / "final"), correct_by_question(b / "final")
    out: dict = {"n_seen": len(seen)}
    for part in ("seen", "unseen"):
        qs = [q for q in right_a if (q in seen) == (part == "seen")]
        a_only, b_only = sum(right_a[q] > right_b[q] for q in qs), sum(right_b[q] > right_a[q] for q in qs)
        out[part] = {"a": statistics.fmean(right_a[q] for q in qs), "b": statistics.fmean(right_b[q] for q in qs),
                     "a_only": a_only, "b_only": b_only, "sign_test_p": sign_test(b_only, a_only + b_only)}
    return out


def rl_summary(run: Path, start: Path) -> dict:
    rollouts = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    last_eval = [m for m in metrics(run) if "eval_reward" in m][-1]
    return {"exact_match": exact_match(run), "train_seen_split": seen_split(run, start),
            "heldout_flips": heldout_flips(run / "final", start),
            "kl_to_start": kl_to_start(run, start),
            "kl_logged_last_rollout": rollouts[-1].get("kl"), "eval_reward": last_eval["eval_reward"],
            "rollout_reward": [r["reward"] for r in rollouts], "steps": metrics(run)[-1]["step"]}


# ----------------------------------------------------------------------------- arithmetic: PPO's reward model


def arithmetic_pairs(runs: Path) -> Path:
    """Pairs (right sum vs a near miss) and prompt records for PPO's reward model, from the skill splits."""
    rng = random.Random(0)
    stem = runs / "arith"
    for split in ("train", "test"):
        pairs, prompts = [], []
        for r in records(f"{ARITH}-{split}"):
            q, a = r["messages"][0]["content"], int(r["answer"])
            wrong = max(0, a + rng.choice((-11, -10, -2, -1, 1, 2, 10, 11)))
            wrong = wrong if wrong != a else a + 1
            pairs.append({"prompt": q, "chosen": str(a), "rejected": str(wrong)})
            prompts.append({"prompt": q, "answer": str(a)})
        write_jsonl(runs / f"arith-pairs-{split}.jsonl", pairs)
        write_jsonl(runs / f"arith-prompts-{split}.jsonl", prompts)
    return stem


def run_ppo(runs: Path, sft: Path, seconds: dict) -> dict:
    stem = arithmetic_pairs(runs)
    rm = train("arith-reward", "align-reward.yaml",
               [f"model.name_or_path={sft}", f"data.train={stem}-pairs-train.jsonl",
                f"data.eval={stem}-pairs-test.jsonl", "data.max_length=64", "train.max_steps=200",
                "train.eval_every=0", "train.save_every=0"], runs, seconds)
    rm_acc = {split: api.evaluate_task(str(rm), f"{stem}-pairs-{split}.jsonl")["accuracy"]
              for split in ("test", "train")}
    overrides = [o.format(prompts=f"{stem}-prompts", train=f"{stem}-prompts-train.jsonl") for o in PPO_SAME_BUDGET]
    ppo = train("ppo", "align-ppo.yaml", [f"model.name_or_path={sft}", f"objective.reward_model={rm}", *overrides],
                runs, seconds)
    return {"reward_model_pairwise_accuracy": rm_acc, **rl_summary(ppo, sft), "overrides": overrides}


def rl_overrides(method: str, runs: Path, rl_questions: int | None) -> list[str]:
    """The bench's overrides of one verifiable-reward method: GRPO and RLOO on the chat records, PPO with
    the exact_match reward on prompt records of the same questions, at the same budget (PPO_SAME_BUDGET)."""
    if method != "ppo":
        train_path = None
        if rl_questions:  # RL samples its prompts from the first n training questions only, each many times
            train_path = runs / f"arith-train-first{rl_questions}.jsonl"
            write_jsonl(train_path, records(f"{ARITH}-train")[:rl_questions])
        return [*RL_COMMON, f"data.train={train_path or f'{ARITH}-train'}", f"data.eval={ARITH}-test"]
    stem = arithmetic_pairs(runs)
    train_path = Path(f"{stem}-prompts-train.jsonl")
    if rl_questions:
        train_path = runs / f"arith-prompts-train-first{rl_questions}.jsonl"
        write_jsonl(train_path, [json.loads(x) for x in (runs / "arith-prompts-train.jsonl").read_text()
                                 .splitlines()][:rl_questions])
    return [*(o.format(prompts=f"{stem}-prompts", train=train_path) for o in PPO_SAME_BUDGET),
            "objective.reward=exact_match", "objective.reward_model=null"]


RL_CONFIG = {"grpo": "rl-grpo.yaml", "rloo": "rl-rloo.yaml", "ppo": "align-ppo.yaml"}
RL_KEY = {"grpo": "grpo", "rloo": "rloo", "ppo": "ppo_verifiable"}  # "ppo": PPO with the reward model


def arithmetic(runs: Path, seeds: list[int], with_ppo: bool, seconds: dict, methods: list[str],
               rl_set: list[str], tag: str, rl_questions: int | None) -> dict:
    sft_warmup = [] if SFT_STEPS >= 40 else ["train.warmup=4"]  # sft-full.yaml's 20 would outlast a short run
    sft = train("sft", "sft-full.yaml", [f"data.train={ARITH}-train", "data.eval=null", f"train.max_steps={SFT_STEPS}",
                                         "train.lr=5e-4", "train.eval_every=0", "train.save_every=0", *sft_warmup],
                runs, seconds)
    start = sft / "final"
    out: dict = {"sft": {"exact_match": exact_match(sft), "steps": SFT_STEPS, "overrides": sft_warmup},
                 "base": {"exact_match": exact_match("tunelab-tiny")}}
    for method in methods:
        common = rl_overrides(method, runs, rl_questions)
        out[RL_KEY[method]] = {seed: rl_summary(train(f"{method}{tag}-s{seed}", RL_CONFIG[method], [
            f"model.name_or_path={start}", f"train.seed={seed}", *common, *rl_set], runs, seconds), start)
            for seed in seeds}
        print(method, {s: (v["exact_match"], v["train_seen_split"], round(v["kl_to_start"], 3))
                       for s, v in out[RL_KEY[method]].items()}, flush=True)
    for method in methods[1:]:  # each later method against the first, seed by seed, question by question
        out[f"{RL_KEY[method]}_vs_{RL_KEY[methods[0]]}"] = {
            seed: head_to_head(runs / f"{methods[0]}{tag}-s{seed}", runs / f"{method}{tag}-s{seed}") for seed in seeds}
    if with_ppo:
        out["ppo"] = run_ppo(runs, start, seconds)
        print("ppo", out["ppo"]["exact_match"], out["ppo"]["reward_model_pairwise_accuracy"], flush=True)
    return out


# ----------------------------------------------------------------------------- preferences


def pair_scores(path: Path | str, pairs: list[dict]) -> list[tuple[float, int, float, int]]:
    """(sum logp chosen, its tokens, sum logp rejected, its tokens) of each prefs@test pair."""
    model, tok = api.load(path)
    prompts = [p["prompt"] for p in pairs]
    s = continuation_logprobs(model, tok, prompts * 2, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs],
                              chat=True)
    return [(*s[i], *s[i + len(pairs)]) for i in range(len(pairs))]


def preference_summary(path: Path | str, sft_scores: list, pairs: list[dict], prompt_records: list[dict]) -> dict:
    scores = pair_scores(path, pairs)
    mean_margin = [c / nc - r / nr for c, nc, r, nr in scores]
    implicit = [(c - r) - (c0 - r0) for (c, _, r, _), (c0, _, r0, _) in zip(scores, sft_scores, strict=True)]
    model, tok = api.load(path)
    replies = greedy(model, tok, [r["prompt"] for r in prompt_records], max_new_tokens=24, chat=True)
    true = [score_response(x, r["answer"]) for x, r in zip(replies, prompt_records, strict=True)]
    probe = run_probe(model, tok)
    return {"mean_logp_accuracy": sum(m > 0 for m in mean_margin) / len(pairs),
            "mean_logp_margin": statistics.fmean(mean_margin),
            "implicit_reward_accuracy_vs_sft": sum(m > 0 for m in implicit) / len(pairs),
            "implicit_margin_vs_sft": statistics.fmean(implicit),
            "true_score": statistics.fmean(true), "correct": sum(s > 0.5 for s in true) / len(true),
            "probe_cloze_accuracy": probe["probe_cloze_accuracy"],
            "probe_heldout_perplexity": probe["probe_heldout_perplexity"]}


def own_eval(run: Path) -> dict:
    evals = [m for m in metrics(run) if "eval_accuracy" in m]
    return {k: v for k, v in evals[-1].items() if k.startswith("eval_")} if evals else {}


def preferences(runs: Path, seconds: dict) -> dict:
    sft = train("align-sft", "align-sft.yaml", [], runs, seconds) / "final"
    pairs, prompt_records = records("tinyworld:prefs@test"), records("tinyworld:prefs@prompts-test")
    sft_scores = pair_scores(sft, pairs)
    out = {"base": preference_summary("tunelab-tiny", sft_scores, pairs, prompt_records),
           "sft": preference_summary(sft, sft_scores, pairs, prompt_records)}
    for name, start, label in (("dpo", sft, "sft"), ("kto", sft, "sft"), ("simpo", sft, "sft"),
                               ("orpo", "tunelab-tiny", "base")):
        run = train(name, f"align-{name}.yaml", [f"model.name_or_path={start}"], runs, seconds)
        cfg = api.resolve_config(run)
        out[name] = {**preference_summary(run, sft_scores, pairs, prompt_records), "own_eval": own_eval(run),
                     "steps": cfg.train.max_steps, "batch_size": cfg.train.batch_size, "start": label}
        print(name, {k: v for k, v in out[name].items() if k != "own_eval"}, flush=True)
    return out


# ----------------------------------------------------------------------------- report


LABEL = {"grpo": "GRPO", "rloo": "RLOO", "ppo_verifiable": "PPO"}


def plot(arith: dict, png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if "ppo" in arith else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    left = axes[0][0]
    methods = [m for m in ("grpo", "rloo", "ppo_verifiable") if m in arith]
    for method, color in zip(methods, ("tab:blue", "tab:orange", "tab:green"), strict=False):
        runs = list(arith[method].values())
        curves = [v["rollout_reward"] for v in runs]
        per_rollout = runs[0]["steps"] / len(curves[0])  # optimizer steps per rollout
        steps = [per_rollout * (i + 1) for i in range(len(curves[0]))]
        for c in curves:
            left.plot(steps, c, color=color, alpha=0.25, lw=1)
        left.plot(steps, [statistics.fmean(x) for x in zip(*curves, strict=True)], color=color, lw=2,
                  label=f"{LABEL[method]} (mean of {len(curves)} seeds)")
    left.set(xlabel="optimizer step", ylabel="sampled reward = exact match (T=1)",
             title=f"{' vs '.join(LABEL[m] for m in methods)}, verifiable reward, from the SFT model{title}")
    left.legend()
    if "ppo" in arith:
        right = axes[0][1]
        r = arith["ppo"]["rollout_reward"]
        right.plot([4 * (i + 1) for i in range(len(r))], r, color="tab:red", lw=2, label="PPO (1 seed)")
        right.set(xlabel="optimizer step", ylabel="reward-model score (sampled)",
                  title="PPO, learned arithmetic reward model")
        right.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def table(res: dict) -> str:
    a = res["arithmetic"]
    lines = [f"| {res.get('skill', ARITH).split('@')[-1]} | held-out EM | train EM | KL to SFT start | loop s | "
             "train EM sampled: SFT -> RL | train EM not sampled: SFT -> RL | held-out gained / lost (sign p) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|",
             f"| base | {a['base']['exact_match']['test']:.2f} | {a['base']['exact_match']['train']:.3f} | | |",
             f"| SFT | {a['sft']['exact_match']['test']:.2f} | {a['sft']['exact_match']['train']:.3f} | 0 | "
             f"{res['seconds']['sft']} |"]
    for method in ("grpo", "rloo", "ppo"):
        for seed, v in a.get(RL_KEY[method], {}).items():
            split, loop_s = v["train_seen_split"], res["seconds"][f"{method}{res['tag']}-s{seed}"]
            parts = [f"{split['start'][k]:.3f} -> {split['rl'][k]:.3f} (+{split['flips'][k]['gained']} "
                     f"-{split['flips'][k]['lost']})" for k in ("seen", "unseen")]
            h = v.get("heldout_flips")
            flips = f"+{h['gained']} -{h['lost']} (p {h['sign_test_p']:.3g})" if h else ""
            lines.append(f"| {method} s{seed} | {v['exact_match']['test']:.2f} | {v['exact_match']['train']:.3f} | "
                         f"{v['kl_to_start']:.3f} | {loop_s} | {parts[0]} | {parts[1]} | {flips} |")
    for key in [k for k in a if "_vs_" in k]:
        b, base = key.split("_vs_")
        for seed, v in a[key].items():
            lines += [f"{key} s{seed} {part}: {base} {x['a']:.3f}, {b} {x['b']:.3f}; right only by {b} "
                      f"{x['b_only']}, only by {base} {x['a_only']} (sign test p {x['sign_test_p']:.3g})"
                      for part, x in ((part, v[part]) for part in ("seen", "unseen"))]
    if "ppo" in a:
        v = a["ppo"]
        lines.append(f"| ppo, reward model | {v['exact_match']['test']:.2f} | {v['exact_match']['train']:.3f} | "
                     f"{v['kl_to_start']:.3f} | {res['seconds']['ppo']} |")
    p = res.get("preferences", {})
    if p:
        lines += ["", "| prefs | mean-logp acc | margin | implicit acc vs SFT | true score | correct | probe cloze |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {k} | {v['mean_logp_accuracy']:.3f} | {v['mean_logp_margin']:.3f} | "
              f"{v['implicit_reward_accuracy_vs_sft']:.3f} | {v['true_score']:.3f} | {v['correct']:.3f} | "
              f"{v['probe_cloze_accuracy']:.3f} |" for k, v in p.items()]
    return "\n".join(lines)


def main() -> None:
    global ARITH, SFT_STEPS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-rl"), help="run dirs (finished ones are reused)")
    ap.add_argument("--json", default=str(ROOT / "docs" / "results" / "rl.json"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    ap.add_argument("--no-ppo", action="store_true", help="skip the arithmetic reward model and PPO with it "
                    "(PPO with the exact_match reward is `--methods ppo`)")
    ap.add_argument("--no-prefs", action="store_true", help="skip the preference losses")
    ap.add_argument("--methods", nargs="+", default=["grpo", "rloo"], choices=["grpo", "rloo", "ppo"],
                    help="the verifiable-reward RL methods to run, one run per seed (ppo: PPO with the exact_match "
                    "reward at the same budget, 'ppo_verifiable' in the JSON)")
    ap.add_argument("--rl-set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides for the runs of --methods, after the bench's own (e.g. objective.epochs=4)")
    ap.add_argument("--rl-questions", type=int, default=None, metavar="N",
                    help="the runs of --methods sample their prompts from the first N training questions only, so "
                    "every one is trained on several times; the split reports them as 'sampled'")
    ap.add_argument("--skill", default="arithmetic", help="the TinyWorld skill (tinyworld:skills@<skill>-train / "
                    "-test) of the SFT start and the verifiable-reward runs, e.g. counting")
    ap.add_argument("--sft-steps", type=int, default=SFT_STEPS, help="full-SFT warm-start steps (below 40: warmup 4)")
    ap.add_argument("--tag", default="", help="suffix of the run dirs of --methods (<method><tag>-s<seed>), so "
                    "runs with other --rl-set do not reuse these")
    args = ap.parse_args()
    ARITH, SFT_STEPS = f"tinyworld:skills@{args.skill}", args.sft_steps
    runs, out = Path(args.out), Path(args.json)
    runs.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    res: dict = {"machine": f"{platform.processor() or platform.machine()}, {platform.system()}, "
                 f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
                 "command": "python " + " ".join(sys.argv).replace(f"{ROOT}/", ""), "seconds": seconds,
                 "rl_steps": RL_STEPS, "sft_steps": SFT_STEPS, "skill": ARITH, "rl_set": args.rl_set, "tag": args.tag,
                 "rl_questions": args.rl_questions}
    res["arithmetic"] = arithmetic(runs, args.seeds, not args.no_ppo, seconds, args.methods, args.rl_set, args.tag,
                                   args.rl_questions)
    if not args.no_prefs:
        res["preferences"] = preferences(runs, seconds)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1).replace(f"{ROOT}/", "") + "\n", encoding="utf-8")  # no machine paths
    title = f"\nprompts: the first {args.rl_questions} training questions" if args.rl_questions else ""
    plot(res["arithmetic"], out.with_name(f"{out.stem}-reward.png"), title)
    print(table(res))


if __name__ == "__main__":
    main()
