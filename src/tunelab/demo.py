"""`tunelab demo` / `make demo`: fine-tune end to end, then show before/after.

Until the embedded base `tunelab-tiny` ships, the demo builds a tiny randomly initialised Llama
with its own BPE tokenizer, generates a small lookup task (which colour belongs to which thing),
trains LoRA SFT on it and reports held-out loss and exact match before and after. It says so.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, LlamaConfig

from tunelab import api
from tunelab.bpe import train_bpe

THINGS = ["apple", "river", "stone", "cloud", "lamp", "chair", "road", "seed", "boat", "bell", "door", "kite"]
COLOURS = ["red", "blue", "green", "amber", "violet", "teal", "olive", "coral", "white", "black", "grey", "gold"]
QUESTIONS = ["What colour is the {t}?", "Which colour does the {t} have?", "Tell me the colour of the {t}.",
             "The {t} is which colour?", "Name the colour of the {t}."]


def demo_task(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """A fixed thing -> colour map asked in paraphrases; test uses question forms not in train."""
    rng = random.Random(seed)
    colour = dict(zip(THINGS, rng.sample(COLOURS, len(THINGS)), strict=True))

    def rec(q: str, t: str) -> dict:
        return {"messages": [{"role": "user", "content": q.format(t=t)},
                             {"role": "assistant", "content": colour[t]}], "answer": colour[t]}

    train = [rec(q, t) for q in QUESTIONS[:4] for t in THINGS for _ in range(4)]
    rng.shuffle(train)
    return train, [rec(QUESTIONS[4], t) for t in THINGS]


def build_random_base(out: Path, texts: list[str], seed: int = 0) -> Path:
    tok = train_bpe(texts, vocab_size=512)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def exact_match(model_path: str | Path, records: list[dict]) -> float:
    model, tok = api.load(model_path)
    hits = 0
    for r in records:
        reply = _greedy(model, tok, r["messages"][0]["content"])
        hits += reply.strip().lower() == r["answer"]
    return hits / len(records)


@torch.no_grad()
def _greedy(model, tok, prompt: str) -> str:
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    out = model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def run_demo(out: str | Path = "runs/demo") -> dict[str, float]:
    console = Console()
    out = Path(out)
    console.print(
        "[bold yellow]NOTE[/]: the embedded base model tunelab-tiny is not built yet, so this demo trains a "
        "[bold]tiny randomly initialised Llama[/] on a small generated lookup task (which colour each thing has)."
    )
    t0 = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    (out / "data").mkdir(parents=True)
    train, test = demo_task()
    for name, rows in (("train", train), ("test", test)):
        (out / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    texts = [m["content"] for r in train + test for m in r["messages"]]
    base = build_random_base(out / "base", texts)
    before = {"em": exact_match(base, test), **api.evaluate(base, str(out / "data" / "test.jsonl"))}
    console.print(f"base model: {base}  ({time.perf_counter() - t0:.1f}s)")
    result = api.train({
        "model": {"name_or_path": str(base)},
        "data": {"train": str(out / "data" / "train.jsonl"), "eval": str(out / "data" / "test.jsonl"),
                 "max_length": 64},
        "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
        "objective": {"name": "sft"},
        "train": {"max_steps": 150, "batch_size": 16, "lr": 1e-2, "warmup": 10, "eval_every": 50,
                  "save_every": 50},
        "output": {"dir": str(out / "run")},
    })
    run = result.run_dir
    after = {"em": exact_match(run, test), **api.evaluate(run, str(out / "data" / "test.jsonl"))}
    table = Table(title="held-out questions (unseen phrasing)")
    for col in ("", "exact match", "loss", "perplexity"):
        table.add_column(col)
    for name, m in (("base (random init)", before), ("LoRA SFT", after)):
        table.add_row(name, f"{m['em']:.2f}", f"{m['loss']:.3f}", f"{m['perplexity']:.2f}")
    console.print(table)
    question = test[0]["messages"][0]["content"]
    console.print(f"sample: Q: {question}  A: {_greedy(*api.load(run), question)!r}")
    console.print(f"run: {run}   total {time.perf_counter() - t0:.0f}s\n"
                  f"try: tunelab generate {run} --prompt \"What colour is the lamp?\"")
    return {"em_before": before["em"], "em_after": after["em"], "loss_before": before["loss"],
            "loss_after": after["loss"]}
