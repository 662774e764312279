"""Activation memory of LST (M19) against LoRA and full fine-tuning: the bytes autograd saves for backward.

    python bench/lst_memory.py [--rows 16] [--seq 128] [--out docs/results/lst-memory.json]

One batch (rows x seq tokens of TinyWorld skills text, every token trained: the `sft` loss with all
labels) through tunelab-tiny with each method applied from its defaults as the shipped configs set them
(`full`; `lora` r16 all-linear; `lst` reduction 8). The count is what `torch.autograd.graph.
saved_tensors_hooks` is handed during one forward + loss, each storage once, parameters and buffers
excluded (as bench/advise.py and tests/test_advise.py count it); the loss's own tensors (fp32
log-softmax over the vocabulary, the LM head's input) are shown apart since every method pays them.
In fp32 and under bf16 autocast (as `precision: bf16` trains). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from tunelab.config import ModelConfig
from tunelab.methods import METHODS, count_parameters
from tunelab.modeling.load import load_tokenizer, resolve_path
from tunelab.objectives.lm import next_token_loss
from tunelab.runconfig import method_config

CASES = {
    "full": {"name": "full"},
    "lora": {"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"},
    "lst": {"name": "lst", "reduction": 8},
}


def batch_of(tokenizer, rows: int, seq: int) -> dict[str, torch.Tensor]:
    text = " ".join(f"How many words are in: red stone river lamp {i}? There are {i % 7} words." for i in range(400))
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0][: rows * seq]
    if ids.numel() < rows * seq:
        raise SystemExit(f"not enough text for {rows} x {seq} tokens")
    ids = ids.view(rows, seq)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def saved_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor], autocast: bool) -> tuple[int, int]:
    """(bytes autograd saves in one forward + loss, of which the loss's: saved after the last hidden state)."""
    exclude = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}
    mark: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in exclude:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    head = model.get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda m, a: mark.append(len(seen)))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        loss_sum, n = next_token_loss(model, batch, None)
    hook.remove()
    (loss_sum / n).backward()
    sizes = list(seen.values())
    return sum(sizes), sum(sizes[mark[0]:])


def measure(name: str, batch: dict[str, torch.Tensor], autocast: bool) -> dict:
    model = AutoModelForCausalLM.from_pretrained(resolve_path("tunelab-tiny"), dtype=torch.float32)
    model = METHODS[name].apply(model, method_config(CASES[name])).train()
    trainable, total = count_parameters(model)
    saved, loss_part = saved_bytes(model, batch, autocast)
    return {"method": name, "trainable": trainable, "total": total, "saved_bytes": saved,
            "loss_bytes": loss_part, "model_bytes": saved - loss_part}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--out", default="docs/results/lst-memory.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    batch = batch_of(load_tokenizer(ModelConfig(name_or_path="tunelab-tiny"), resolve_path("tunelab-tiny")),
                     args.rows, args.seq)
    rows = []
    mib = 2**20
    print(f"tunelab-tiny, one batch of {args.rows} x {args.seq} tokens; MiB autograd saves for backward")
    print(f"{'precision':<13} {'method':<6} {'trainable':>10} {'saved':>8} {'loss':>6} {'model':>8} {'vs full':>8}")
    for autocast in (False, True):
        group = [{"precision": "bf16-autocast" if autocast else "fp32", **measure(name, batch, autocast)}
                 for name in CASES]
        for r in group:
            r["model_vs_full"] = r["model_bytes"] / group[0]["model_bytes"]
            print(f"{r['precision']:<13} {r['method']:<6} {r['trainable']:>10,} {r['saved_bytes'] / mib:>8.2f} "
                  f"{r['loss_bytes'] / mib:>6.2f} {r['model_bytes'] / mib:>8.2f} {r['model_vs_full']:>8.3f}")
        rows += group
    cmd = " ".join(["python bench/lst_memory.py", *(argv if argv is not None else sys.argv[1:])])
    out = {"command": cmd, "rows": args.rows, "seq": args.seq, "torch": torch.__version__,
           "machine": platform.platform(), "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
