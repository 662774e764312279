"""Training throughput: tunelab's loop vs a plain PyTorch + peft loop, and packed vs padded.

    python bench/throughput.py [--steps 30] [--out docs/results/throughput.json]
    python bench/throughput.py --device cuda --shape 0.5b --precision bf16 --max-length 1024 \
        --out docs/results/throughput-gpu.json          # on a CUDA GPU

`--shape tiny` (default): Llama 256 x 4 layers, the size of tunelab-tiny; `--shape 0.5b`: hidden
1536 x 16 layers, MLP 4096, vocabulary 32,000 (0.48B parameters; a GPU size). On CUDA both loops
run on the GPU (tunelab's through accelerate, as `tunelab train` does) and the plain loop waits for
the GPU at the end of every step, as tunelab's does when it reads the gradient norm.

1. Same model (Llama 256 x 4 layers, the size of tunelab-tiny), same LoRA, same tokenized data in
   the same order, same batch, seed and precision: tokens/s of tunelab's loop (everything it does
   per step: accumulation bookkeeping, clipping, guards, logging, metrics.jsonl) against a
   hand-written loop (forward with labels, backward, clip, step). Target ratio >= 0.97.
2. tunelab with packing on vs off on a dataset whose lengths are log-normal: useful (non-padding)
   tokens per second. Target ratio >= 1.8.

Both measurements run in this one process, steps after warm-up only. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from tunelab.config import DataConfig
from tunelab.data.pipeline import load_tokenized
from tunelab.data.stream import epoch_rows
from tunelab.modeling.bpe import train_bpe
from tunelab.modeling.load import ModelConfig, load_tokenizer
from tunelab.recipes.run import train

WORDS = "the a river stone cloud lamp chair road seed boat bell door kite red blue green amber violet".split()
WARMUP = 3


def make_data(path: Path, n: int, seed: int, sigma: float) -> None:
    """Chat records whose reply lengths are log-normal (median ~40 words)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            words = max(2, min(200, int(rng.lognormvariate(math.log(40), sigma))))
            reply = " ".join(rng.choice(WORDS) for _ in range(words))
            f.write(json.dumps({"messages": [{"role": "user", "content": "say something"},
                                             {"role": "assistant", "content": reply}]}) + "\n")


SHAPES = {
    "tiny": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 4},
    "0.5b": {"hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 16, "num_attention_heads": 16,
             "num_key_value_heads": 4, "vocab_size": 32000},
}


def make_model(root: Path, data: Path, shape: str = "tiny", max_length: int = 512) -> Path:
    texts = [json.loads(line)["messages"][1]["content"] for line in data.read_text().splitlines()[:500]]
    tok = train_bpe(texts, vocab_size=1024)
    torch.manual_seed(0)
    dims = {"vocab_size": len(tok), **SHAPES[shape]}  # a larger vocabulary than the tokenizer's: rows unused
    cfg = LlamaConfig(**dims, max_position_embeddings=max(512, max_length), tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    out = root / "model"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def run_cfg(model: Path, data: Path, out: Path, steps: int, batch: int, packing: bool, precision: str,
            max_length: int = 256) -> dict:
    return {
        "model": {"name_or_path": str(model)},
        "data": {"train": str(data), "max_length": max_length, "packing": packing},
        "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "objective": {"name": "sft"},
        "train": {"max_steps": steps, "batch_size": batch, "lr": 1e-3, "precision": precision,
                  "tensorboard": True, "seed": 0},
        "output": {"dir": str(out)},
    }


def tunelab_rate(cfg: dict) -> dict[str, float]:
    result = train(cfg, quiet=True, overwrite=True)
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "elapsed" in r]
    timed = rows[WARMUP:]
    seconds = timed[-1]["elapsed"] - rows[WARMUP - 1]["elapsed"]
    return {"tokens_per_s": sum(r["padded_tokens"] for r in timed) / seconds,
            "useful_tokens_per_s": sum(r["tokens"] for r in timed) / seconds, "steps": len(timed)}


def plain_rate(cfg: dict, device: str = "cpu") -> dict[str, float]:
    """The baseline: transformers + peft, a hand-written loop over the same batches."""
    torch.manual_seed(0)
    mcfg = ModelConfig(name_or_path=cfg["model"]["name_or_path"])
    tok = load_tokenizer(mcfg)
    examples = load_tokenized(DataConfig(**cfg["data"]), "train", tok, mask_prompt=True, log=lambda s: None).examples
    model = AutoModelForCausalLM.from_pretrained(cfg["model"]["name_or_path"]).to(device)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    order = [row[0] for row in epoch_rows([len(e.input_ids) for e in examples], 0, 0, False,
                                          cfg["data"]["max_length"])]
    bs, steps = cfg["train"]["batch_size"], cfg["train"]["max_steps"]
    use_bf16 = cfg["train"]["precision"] == "bf16"
    model.train()
    times, tokens = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        chunk = [examples[i] for i in order[step * bs:(step + 1) * bs]]
        ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(e.input_ids) for e in chunk], batch_first=True,
                                              padding_value=tok.pad_token_id)
        labels = torch.nn.utils.rnn.pad_sequence([torch.tensor(e.labels) for e in chunk], batch_first=True,
                                                 padding_value=-100)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(e.input_ids), dtype=torch.long) for e in chunk],
                                               batch_first=True)
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        tokens.append(ids.numel())
    seconds = sum(times[WARMUP:])
    return {"tokens_per_s": sum(tokens[WARMUP:]) / seconds, "steps": steps - WARMUP}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shape", default="tiny", choices=list(SHAPES))
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--out", default="docs/results/throughput.json")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "data.jsonl"
        make_data(data, 2000, seed=0, sigma=0.9)
        model = make_model(root, data, args.shape, args.max_length)
        ml = args.max_length
        loop_cfg = run_cfg(model, data, root / "run", args.steps, args.batch, False, args.precision, ml)
        # interleave the two, twice, so drift of the machine hits both alike; keep the best of each
        ours = max((tunelab_rate(loop_cfg) for _ in range(2)), key=lambda r: r["tokens_per_s"])
        plain = max((plain_rate(loop_cfg, args.device) for _ in range(2)), key=lambda r: r["tokens_per_s"])
        padded = tunelab_rate(run_cfg(model, data, root / "pad", args.steps, args.batch, False, args.precision, ml))
        packed = tunelab_rate(run_cfg(model, data, root / "pack", args.steps, args.batch, True, args.precision, ml))
    result = {
        "machine": (torch.cuda.get_device_name() if args.device == "cuda" else
                    f"{platform.machine()} {torch.get_num_threads()} threads") + f", torch {torch.__version__}",
        "command": "python " + " ".join(sys.argv),
        "loop_vs_plain": {"tunelab_tokens_per_s": ours["tokens_per_s"], "plain_tokens_per_s": plain["tokens_per_s"],
                          "ratio": ours["tokens_per_s"] / plain["tokens_per_s"], "target": 0.97},
        "packed_vs_padded": {"packed_useful_tokens_per_s": packed["useful_tokens_per_s"],
                             "padded_useful_tokens_per_s": padded["useful_tokens_per_s"],
                             "ratio": packed["useful_tokens_per_s"] / padded["useful_tokens_per_s"], "target": 1.8},
        "settings": vars(args),
    }
    lv, pp = result["loop_vs_plain"], result["packed_vs_padded"]
    print(f"{'measure':<34}{'tunelab':>12}{'baseline':>12}{'ratio':>8}{'target':>8}")
    print(f"{'tokens/s, loop vs plain torch+peft':<34}{lv['tunelab_tokens_per_s']:>12,.0f}"
          f"{lv['plain_tokens_per_s']:>12,.0f}{lv['ratio']:>8.3f}{'>=0.97':>8}")
    print(f"{'useful tokens/s, packed vs padded':<34}{pp['packed_useful_tokens_per_s']:>12,.0f}"
          f"{pp['padded_useful_tokens_per_s']:>12,.0f}{pp['ratio']:>8.3f}{'>=1.8':>8}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
