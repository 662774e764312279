"""Build `tunelab-tiny`: tokenizer, random Llama, pretraining on the TinyWorld corpus with tunelab's
own loop (`objective: lm`, packed), then a model card with what it cost and what it knows.

`tunelab world build-base --out DIR` runs this; `configs/tunelab-tiny.yaml` holds the recipe.
The result is deterministic for a given seed, config and torch build.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, PreTrainedTokenizerBase

from tunelab import owned
from tunelab.artifacts import load
from tunelab.config import SHIPPED_CONFIGS, config_path, deep_merge, read_yaml
from tunelab.errors import TunelabError
from tunelab.eval.suite import evaluate_task
from tunelab.modeling.bpe import train_bpe
from tunelab.recipes.run import train
from tunelab.world.chat import IM_END
from tunelab.world.corpus import make_corpus
from tunelab.world.generator import make_world

RECIPE = SHIPPED_CONFIGS / "tunelab-tiny.yaml"
def load_recipe(path: str | Path | None = None) -> dict[str, Any]:
    """The recipe YAML (default: the shipped configs/tunelab-tiny.yaml); a partial recipe is
    completed from the default one."""
    recipe = read_yaml(RECIPE)
    return deep_merge(recipe, read_yaml(config_path(path))) if path else recipe


def write_corpus(world_seed: int, path: Path, **corpus: Any) -> list[str]:
    docs = make_corpus(make_world(world_seed), world_seed, **corpus)
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return docs


def init_model(out: Path, tok: PreTrainedTokenizerBase, arch: dict[str, Any], seed: int) -> Path:
    torch.manual_seed(seed)
    im_end = tok.convert_tokens_to_ids(IM_END)
    cfg = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, bos_token_id=None,
                      eos_token_id=[tok.eos_token_id, im_end], pad_token_id=tok.pad_token_id, **arch)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config = GenerationConfig(eos_token_id=[im_end, tok.eos_token_id],
                                               pad_token_id=tok.pad_token_id, do_sample=False)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def build_base(out: str | Path, recipe_path: str | Path | None = None, *, steps: int | None = None,
               quiet: bool = False, resume: bool = False, eval_limit: int | None = None) -> dict[str, Any]:
    """Pretrain tunelab-tiny into `out` (a model folder with a README.md model card). The work
    folder `<out>.work` keeps the corpus, the initial model and the run: `resume` continues an
    interrupted build from its last checkpoint (exactly: the result is the same as uninterrupted)."""
    from transformers import AutoTokenizer

    recipe = load_recipe(recipe_path)
    if steps is not None:
        recipe["run"] = deep_merge(recipe["run"], {"train": {"max_steps": steps}})
    out = Path(out)
    work = out.with_name(out.name + ".work")
    owned.preflight(out, "model", what="--out", force=False)  # refused now, not after the build
    t0 = time.perf_counter()
    if resume and (work / "run" / "config.yaml").is_file():
        docs = [json.loads(line)["text"] for line in (work / "corpus.jsonl").read_text(encoding="utf-8").splitlines()]
        tok = AutoTokenizer.from_pretrained(str(work / "init"))
    else:
        resume = False
        owned.claim(work, "build", ["corpus.jsonl", "init", "run"], what="the build's work folder", replace=True,
                    force=False)
        docs = write_corpus(recipe["seed"], work / "corpus.jsonl", **recipe.get("corpus", {}))
        tok = train_bpe(docs, vocab_size=recipe["vocab_size"])
        init_model(work / "init", tok, recipe["architecture"], recipe["seed"])
    run_cfg = deep_merge(recipe["run"], {
        "model": {"name_or_path": str(work / "init")},
        "data": {"train": str(work / "corpus.jsonl")},
        "train": {"seed": recipe["seed"]},
        "output": {"dir": str(work / "run")},
    })
    result = train(run_cfg, quiet=quiet, resume=resume)
    if result.status != "completed":
        raise TunelabError(f"the build was interrupted at step {result.steps}",
                           fix=f"continue it: tunelab world build-base --out {out} --resume")
    wall = time.perf_counter() - t0
    tmp = owned.staging(out)
    shutil.copytree(work / "run" / "final", tmp, dirs_exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(str(work / "init"))
    model.generation_config.save_pretrained(str(tmp))
    summary = json.loads((work / "run" / "summary.json").read_text())
    stats = {
        "parameters": summary["total"], "corpus_documents": len(docs), "corpus_characters": sum(map(len, docs)),
        "corpus_tokens": sum(len(tok(d)["input_ids"]) for d in docs), "steps": result.steps,
        "wall_seconds": round(wall, 1), "final_train_loss": round(result.metrics.get("loss", float("nan")), 4),
        "recipe": recipe,
    }
    stats["eval"] = evaluate_base(tmp, limit=eval_limit)
    (tmp / "build.json").write_text(json.dumps(stats, indent=1), encoding="utf-8")
    write_card(tmp, stats)
    owned.install(tmp, out, "model", what="--out", force=False)
    return stats


CARD_TASKS = ("tinyworld:probe", "tinyworld:qa@train", "tinyworld:qa@test")


def evaluate_base(path: str | Path, limit: int | None = None) -> dict[str, Any]:
    """What the base knows: the forgetting probe (cloze accuracy on pretraining facts, perplexity on
    held-out corpus text) and zero-shot QA on people with and without QA text in the corpus."""

    model = load(path)
    out = {}
    for spec in CARD_TASKS:
        r = evaluate_task(model, spec, limit=limit)
        out[spec] = {k: v for k, v in r.items() if isinstance(v, (int, float)) and k != "tokens"}
    return out


def write_card(out: Path, stats: dict[str, Any]) -> None:
    ev = stats["eval"]
    probe, qa_train, qa_test = (ev[k] for k in CARD_TASKS)
    arch = stats["recipe"]["architecture"]
    train = stats["recipe"]["run"]["train"]
    card = f"""# tunelab-tiny

The embedded base model of tunelab: a small Llama pretrained from scratch by tunelab's own loop
(`objective: lm`, packed, full fine-tuning of a random init) on the TinyWorld corpus (seed
{stats['recipe']['seed']}). It exists so that every technique can be measured offline on a base
that knows something: its world's people, places and facts.

| | |
|---|---|
| architecture | Llama, hidden {arch['hidden_size']}, {arch['num_hidden_layers']} layers, \
{arch['num_attention_heads']} heads, intermediate {arch['intermediate_size']}, tied embeddings |
| parameters | {stats['parameters']:,} |
| tokenizer | GPT-2's byte-level BPE (decoding returns the text exactly; llama.cpp: `gpt2`), \
{stats['recipe']['vocab_size']} tokens; ChatML template (`<|im_start|>`, `<|im_end|>`), every assistant reply \
starting with a space |
| corpus | {stats['corpus_documents']:,} documents, {stats['corpus_characters']:,} characters, \
{stats['corpus_tokens']:,} tokens |
| training | {stats['steps']} steps x {train['batch_size']} packed rows x \
{stats['recipe']['run']['data']['max_length']} tokens, lr {train['lr']} cosine, {train['precision']} autocast |
| wall time | {stats['wall_seconds'] / 60:.1f} min on the build machine (2 CPU cores) |
| final training loss | {stats['final_train_loss']} |
| probe: cloze accuracy on pretraining facts | {probe['probe_cloze_accuracy']:.3f} |
| probe: perplexity on held-out corpus text | {probe['probe_heldout_perplexity']:.3f} |
| zero-shot QA, people with QA text in the corpus (`qa@train`) | exact match {qa_train['exact_match']:.3f} |
| zero-shot QA, held-out people (`qa@test`) | exact match {qa_test['exact_match']:.3f} |

Rebuild: `tunelab world build-base --out DIR` (recipe: `configs/tunelab-tiny.yaml`).
Evaluate: `tunelab eval tunelab-tiny --task tinyworld:probe --task tinyworld:qa@test --json`.
"""
    (out / "README.md").write_text(card, encoding="utf-8")
