"""Reward modelling, PPO, DPO (LoRA and QLoRA) and distillation on TinyWorld: docs/results/alignment.md.

    python bench/alignment.py [--out docs/results/alignment.json] [--keep]

Runs the recipes of docs/alignment.md in order under runs/bench-align/ (reusing a finished stage's
run with --keep), then measures on held-out data:
- reward model: pairwise accuracy on tinyworld:prefs@test (and per kind of rejected reply); the
  recipe's `likelihood: pmi` head against the same recipe with `likelihood: off` (the head alone)
  and `reply`, each also as a judge: how often it prefers what the ground-truth rule prefers between
  the DPO policy's and the SFT model's greedy replies to held-out prompts (replies no pair contains);
- PPO: mean reward of greedy replies to tinyworld:prefs@prompts-test before (the SFT model) and
  after, KL per reply of the last rollouts vs the target, win rate over the SFT model by the reward model;
- DPO with LoRA and with QLoRA: held-out preference accuracy (implicit reward margin > 0 on
  prefs@test) and the same win rate;
- distillation: a 2-layer student (layers 0 and 3 of tunelab-tiny) trained on tinyworld:qa by
  `distill` from the demo's LoRA model vs by plain SFT, same steps: held-out exact match.
Prints a markdown table and writes JSON and markdown (and the PPO reward curve) next to --out.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tunelab import api  # noqa: E402
from tunelab.data.sources import read_records  # noqa: E402
from tunelab.eval.suite import evaluate_task  # noqa: E402
from tunelab.inference.generation import greedy  # noqa: E402
from tunelab.inference.reward import judge, rewards_of, score_records  # noqa: E402
from tunelab.world.prefs import score_response  # noqa: E402
from tunelab.world.resolve import resolve_task  # noqa: E402

CONFIGS = ROOT / "configs"
STUDENT_LAYERS = "[0,3]"
BUDGETS = (30, 60, 150)  # optimizer steps of the distilled and the SFT student


def train(name: str, config: str, overrides: list[str], runs: Path, keep: bool, log: dict) -> Path:
    """Train (or with --keep reuse) a stage; `log[name]` = the training loop's seconds (its last `elapsed`)."""
    run_dir = runs / name
    if keep and (run_dir / "final").is_dir():
        print(f"[{name}] reusing {run_dir}", flush=True)
    else:
        print(f"[{name}] tunelab train configs/{config} {' '.join(overrides)}", flush=True)
        api.train(CONFIGS / config, [*overrides, f"output.dir={run_dir}"], overwrite=True, quiet=True)
    log[name] = round(max(m.get("elapsed", 0.0) for m in metrics(run_dir)), 1)
    return run_dir


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def last_eval(run_dir: Path) -> dict:
    return [m for m in metrics(run_dir) if any(k.startswith("eval_") for k in m)][-1]


def records(spec: str) -> list[dict]:
    return [r for _, r in read_records(str(resolve_task(spec)))]


_REPLIES: dict[Path, list[str]] = {}


def greedy_replies(path: Path, prompts: list[str]) -> list[str]:
    """Greedy replies of a model to the held-out prompts (once per model)."""
    if path not in _REPLIES:
        model, tok = api.load(path)
        _REPLIES[path] = greedy(model, tok, prompts, max_new_tokens=24, chat=True)
    return _REPLIES[path]


def true_scores(replies: list[str], prompt_records: list[dict]) -> list[float]:
    return [score_response(x, r["answer"]) for x, r in zip(replies, prompt_records, strict=True)]


def judge_agreement(reward_run: Path, policy_run: Path, sft_dir: Path, prompt_records: list[dict]) -> dict:
    """Between the policy's and the SFT model's greedy reply to each held-out prompt: how often the
    reward model prefers the reply the ground-truth rule prefers (prompts where the rule ties left out)."""
    prompts = [r["prompt"] for r in prompt_records]
    a, b = greedy_replies(policy_run, prompts), greedy_replies(sft_dir, prompts)
    rm, rm_tok = api.load(reward_run)
    ra, rb = (rewards_of(rm, rm_tok, list(zip(prompts, x, strict=True))) for x in (a, b))
    ta, tb = true_scores(a, prompt_records), true_scores(b, prompt_records)
    decided = [(x > y) == (u > v) for x, y, u, v in zip(ra, rb, ta, tb, strict=True) if u != v]
    return {"agreement": sum(decided) / len(decided), "decided_prompts": len(decided)}


def win_rate(policy_run: Path, sft_dir: Path, reward_run: Path, prompt_records: list[dict]) -> dict:
    """Greedy replies of the policy and the SFT model to held-out prompts, judged twice: by the reward
    model (as PPO's eval does) and by the rule the preferences were generated from (`score_response`)."""
    prompts = [r["prompt"] for r in prompt_records]
    rm, rm_tok = api.load(reward_run)
    replies = {"policy": greedy_replies(policy_run, prompts), "sft": greedy_replies(sft_dir, prompts)}
    out = judge(rm, rm_tok, prompts, replies["policy"], replies["sft"])
    true = {name: true_scores(rs, prompt_records) for name, rs in replies.items()}
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(true["policy"], true["sft"], strict=True)]
    out |= {"true_score": sum(true["policy"]) / len(prompts), "true_score_sft": sum(true["sft"]) / len(prompts),
            "true_win_rate": sum(wins) / len(prompts),
            "correct": sum(s > 0.5 for s in true["policy"]) / len(prompts),
            "correct_sft": sum(s > 0.5 for s in true["sft"]) / len(prompts)}
    out["examples"] = [{"prompt": p, "policy": a, "sft": b} for p, a, b in
                       list(zip(prompts, replies["policy"], replies["sft"], strict=True))[:3]]
    return out


def reward_accuracy(reward_run: Path) -> dict:
    """Pairwise accuracy on prefs@test (overall and per kind of rejected reply) and on rankings-test."""
    model, tok = api.load(reward_run)
    test_pairs = records("tinyworld:prefs@test")
    scored = score_records(model, tok, [(str(i), r) for i, r in enumerate(test_pairs)])
    kinds: dict[str, list[bool]] = collections.defaultdict(list)
    for r, s in zip(test_pairs, scored["records"], strict=True):
        kinds[r["rejected_kind"]].append(s["chosen"] > s["rejected"])
    ranks = records("tinyworld:prefs@rankings-test")
    ranked = score_records(model, tok, [(str(i), r) for i, r in enumerate(ranks)])
    return {"pairwise_accuracy": scored["accuracy"], "pairs": scored["pairs"],
            "by_rejected_kind": {k: sum(v) / len(v) for k, v in sorted(kinds.items())},
            "rankings_test_pairwise_accuracy": ranked["accuracy"], "rankings_test_pairs": ranked["pairs"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "alignment.json"))
    ap.add_argument("--runs", default=str(ROOT / "runs" / "bench-align"))
    ap.add_argument("--keep", action="store_true", help="reuse finished stages in --runs")
    args = ap.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    seconds: dict[str, float] = {}
    res: dict = {"machine": f"{platform.processor() or platform.machine()}, {platform.system()}",
                 "command": "python bench/alignment.py", "seconds": seconds}

    sft = train("sft", "align-sft.yaml", [], runs, args.keep, seconds)
    sft_model = sft / "final"

    # --- O04 reward model
    reward = train("reward", "align-reward.yaml", [f"model.name_or_path={sft_model}"], runs, args.keep, seconds)
    res["reward"] = reward_accuracy(reward)
    print("reward:", res["reward"], flush=True)

    prompt_records = records("tinyworld:prefs@prompts-test")

    # --- O05 PPO
    ppo = train("ppo", "align-ppo.yaml", [f"model.name_or_path={sft_model}", f"objective.reward_model={reward}"],
                runs, args.keep, seconds)
    rows = metrics(ppo)
    rollouts = [json.loads(line) for line in (ppo / "rollouts.jsonl").read_text().splitlines()]
    final = last_eval(ppo)
    target = api.resolve_config(ppo).objective.kl_target
    res["ppo_judged"] = win_rate(ppo, sft_model, reward, prompt_records)
    res["ppo"] = {
        "held_out_reward_sft": final["eval_reward_reference"], "held_out_reward_ppo": final["eval_reward"],
        "win_rate_vs_sft": final["eval_win_rate"], "kl_target": target,
        "kl_last_rollouts": [round(r["kl"], 3) for r in rollouts[-3:]],
        "rollout_reward_first": rollouts[0]["reward"], "rollout_reward_last": rollouts[-1]["reward"],
        "rollouts": len(rollouts), "steps": rows[-1]["step"],
    }
    png = ppo / "reward_curve.png"
    if png.is_file():
        shutil.copy(png, out.with_name("alignment-ppo-reward.png"))
    print("ppo:", res["ppo"], flush=True)

    # --- O06 DPO, LoRA and QLoRA
    for name, method in (("dpo-lora", "lora"), ("dpo-qlora", "qlora")):
        run = train(name, "align-dpo.yaml", [f"model.name_or_path={sft_model}", f"method.name={method}"],
                    runs, args.keep, seconds)
        ev = last_eval(run)
        res[name] = {"held_out_preference_accuracy": ev["eval_accuracy"], "held_out_margin": ev["eval_margin"],
                     **win_rate(run, sft_model, reward, prompt_records)}
        print(f"{name}:", {k: v for k, v in res[name].items() if k != "examples"}, flush=True)

    # --- reward-model variants: the same recipe with the head alone / the plain reply likelihood
    variants = {"pmi": {**res["reward"], **judge_agreement(reward, runs / "dpo-lora", sft_model, prompt_records)}}
    for likelihood in ("off", "reply"):
        run = train(f"reward-{likelihood}", "align-reward.yaml",
                    [f"model.name_or_path={sft_model}", f"method.likelihood={likelihood}"], runs, args.keep, seconds)
        variants[likelihood] = {**reward_accuracy(run),
                                **judge_agreement(run, runs / "dpo-lora", sft_model, prompt_records)}
    res["reward_variants"] = variants
    print("reward variants:", variants, flush=True)

    # --- O07 distillation: a 2-layer student, distill vs SFT at the same budget
    teacher = train("teacher", "sft-lora.yaml", [], runs, args.keep, seconds)
    em = {"teacher": evaluate_task(str(teacher), "tinyworld:qa@test")["exact_match"]}
    by_budget = {}
    for steps in BUDGETS:
        budget = [f"train.max_steps={steps}", f"train.warmup={max(1, steps // 15)}"]
        pair = {}
        for name, cfg, extra in (("distill", "distill.yaml", [f"objective.teacher={teacher}"]),
                                 ("sft", "distill-sft-baseline.yaml", [])):
            run = train(f"student-{name}-{steps}", cfg, [*extra, *budget], runs, args.keep, seconds)
            pair[name] = evaluate_task(str(run), "tinyworld:qa@test")["exact_match"]
        by_budget[steps] = pair
    distill = runs / f"student-distill-{BUDGETS[-1]}"
    from tunelab.config import ModelConfig
    from tunelab.modeling.load import load_model, load_tokenizer

    init_cfg = ModelConfig(keep_layers=json.loads(STUDENT_LAYERS))
    init = (load_model(init_cfg, training=False), load_tokenizer(init_cfg))
    em["student_init"] = evaluate_task(init, "tinyworld:qa@test")["exact_match"]
    n_params = {name: json.loads((path / "summary.json").read_text())["total"]
                for name, path in (("student", distill), ("teacher", teacher))}
    res["distill"] = {"exact_match": em, "by_budget": by_budget, "parameters": n_params}
    print("distill:", res["distill"], flush=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    md = markdown(res)
    out.with_suffix(".md").write_text(md, encoding="utf-8")
    print(md)


def markdown(r: dict) -> str:
    rw, pp, ds = r["reward"], r["ppo"], r["distill"]
    lines = [
        "# Alignment and distillation on TinyWorld", "",
        "Command: `python bench/alignment.py` (2 CPU cores, no GPU; one seed). Raw numbers: `alignment.json`.",
        "Recipes: `configs/align-*.yaml`, `configs/distill*.yaml`; how to choose: [../alignment.md](../alignment.md).",
        "", "| stage | training loop s (incl. PPO rollouts and evals) |", "|---|---:|",
        *[f"| {k} | {v} |" for k, v in r["seconds"].items()], "",
        "## Reward model (O04)", "",
        f"Held-out pairwise accuracy on `tinyworld:prefs@test` (people none of whose prompts are in training): "
        f"**{rw['pairwise_accuracy']:.3f}** over {rw['pairs']} pairs; on every ordered pair of the 5-way "
        f"`rankings-test`: {rw['rankings_test_pairwise_accuracy']:.3f} over {rw['rankings_test_pairs']} pairs.", "",
        "| rejected reply | accuracy |", "|---|---:|",
        *[f"| {k} | {v:.3f} |" for k, v in rw["by_rejected_kind"].items()], "",
        "The recipe (`method.likelihood: pmi`) against the same recipe with the head alone (`off`) and with the "
        "plain reply log-likelihood (`reply`). Judge agreement: between the DPO (LoRA) policy's and the SFT "
        "model's greedy replies to each held-out prompt, how often the reward model prefers the one the "
        "ground-truth rule prefers (prompts the rule ties left out) - the replies a policy produces, which no "
        "training or test pair contains:", "",
        "| `likelihood` | held-out pairwise accuracy | wrong-polite | rankings-test | judge agreement |",
        "|---|---:|---:|---:|---:|",
        *[f"| {k} | {v['pairwise_accuracy']:.3f} | {v['by_rejected_kind']['wrong-polite']:.3f} | "
          f"{v['rankings_test_pairwise_accuracy']:.3f} | {v['agreement']:.3f} ({v['decided_prompts']} prompts) |"
          for k, v in r["reward_variants"].items()], "",
        "## PPO (O05) and DPO (O06) from the same SFT model", "",
        "Held-out prompts `tinyworld:prefs@prompts-test`, greedy replies, judged by the reward model above; "
        "win rate over the SFT model (ties count half).", "",
        "| policy | held-out reward | SFT reward | win rate vs SFT | held-out preference accuracy | KL |",
        "|---|---:|---:|---:|---:|---|",
        f"| PPO, LoRA | {pp['held_out_reward_ppo']:.3f} | {pp['held_out_reward_sft']:.3f} | "
        f"{pp['win_rate_vs_sft']:.3f} | | last rollouts {pp['kl_last_rollouts']} (target {pp['kl_target']}) |",
    ]
    for name, label in (("dpo-lora", "DPO, LoRA"), ("dpo-qlora", "DPO, QLoRA")):
        d = r[name]
        lines.append(f"| {label} | {d['reward']:.3f} | {d['reward_baseline']:.3f} | {d['win_rate']:.3f} | "
                     f"{d['held_out_preference_accuracy']:.3f} | |")
    lines += [
        "", "The same greedy replies judged by the rule the preferences were generated from (`tinyworld.world.prefs."
        "score_response`: +2 correct, 0 evasive, -1 wrong; +0.5 polite, -1 rude) - the ground truth the reward "
        "model only approximates:", "",
        "| policy | true score | SFT true score | true win rate vs SFT | correct answers | SFT correct |",
        "|---|---:|---:|---:|---:|---:|",
        *[f"| {label} | {d['true_score']:.3f} | {d['true_score_sft']:.3f} | {d['true_win_rate']:.3f} | "
          f"{d['correct']:.3f} | {d['correct_sft']:.3f} |"
          for label, d in (("PPO, LoRA", r["ppo_judged"]), ("DPO, LoRA", r["dpo-lora"]),
                           ("DPO, QLoRA", r["dpo-qlora"]))],
    ]
    lines += [
        "", f"PPO: {pp['rollouts']} rollouts, {pp['steps']} optimizer steps; sampled rollout reward "
        f"{pp['rollout_reward_first']:.3f} -> {pp['rollout_reward_last']:.3f}. Reward curve: "
        "![PPO reward curve](alignment-ppo-reward.png)", "",
        "## Distillation (O07)", "",
        f"Student: layers 0 and 3 of tunelab-tiny ({ds['parameters']['student']:,} parameters; "
        f"`model.keep_layers: [0, 3]`); teacher: the demo's LoRA model ({ds['parameters']['teacher']:,}), "
        f"held-out exact match {ds['exact_match']['teacher']:.3f}; the student before training: "
        f"{ds['exact_match']['student_init']:.3f}. Both students train on tinyworld:qa with the same steps, "
        "batch and lr (`configs/distill.yaml`: forward KL, T=1, hard_weight 0.5; "
        "`configs/distill-sft-baseline.yaml`: SFT); held-out exact match on `tinyworld:qa@test`:", "",
        "| steps | distill | SFT | difference (points) |", "|---:|---:|---:|---:|",
        *[f"| {k} | {v['distill']:.3f} | {v['sft']:.3f} | {100 * (v['distill'] - v['sft']):+.1f} |"
          for k, v in ds["by_budget"].items()], "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
