"""GGUF export on a real base: LoRA SFT on TinyWorld QA, then every GGUF form, each checked in
llama.cpp's runtime against transformers on held-out questions.

    python bench/export_gguf.py [--base tunelab-tiny] [--steps N] [--out runs/bench-gguf] \
        [--json docs/results/export-gguf.json]

Trains `configs/sft-lora.yaml` on `tinyworld:qa` from `--base` (skipped when the run is there), then
`tunelab export --gguf f16 | q8_0 | q4_k_m` and `--gguf-adapter`, each with its check (recipes/gguf.py:
50 questions of tinyworld:qa@test: tokenization agreement, greedy agreement, exact match of each
runtime, next-token logits). The baseline in the same run is the transformers model itself (the
check's exact match column). Prints a table, writes JSON with file sizes and seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from tunelab.recipes.export import export
from tunelab.recipes.run import train

FORMS = [("f16", {"gguf": "f16"}), ("q8_0", {"gguf": "q8_0"}), ("q4_k_m", {"gguf": "q4_k_m"}),
         ("lora-adapter", {"gguf_adapter": True})]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="tunelab-tiny")
    ap.add_argument("--steps", type=int, default=None, help="default: the config's (60)")
    ap.add_argument("--out", default="runs/bench-gguf")
    ap.add_argument("--json", default="docs/results/export-gguf.json")
    args = ap.parse_args()
    out = Path(args.out)
    run = out / "sft-lora"
    if not (run / "final").is_dir():
        steps = [] if args.steps is None else [f"train.max_steps={args.steps}"]
        train("configs/sft-lora.yaml", [f"model.name_or_path={args.base}", *steps, f"output.dir={run}"],
              overwrite=True)
    rows = {}
    for name, kw in FORMS:
        t = time.perf_counter()
        folder = export(run, out / f"export-{name}", force=False, **kw)
        seconds = time.perf_counter() - t
        check = json.loads((folder / "export_check.json").read_text())["gguf"]
        files = {p.name: round(p.stat().st_size / 2**20, 2) for p in folder.glob("*.gguf")}
        rows[name] = {**{k: v for k, v in check.items() if k != "examples"}, "gguf_mib": files,
                      "seconds": round(seconds, 1)}
    print(f"{'form':<13} {'tok agree':>9} {'greedy agree':>12} {'EM hf':>6} {'EM gguf':>7} {'logit diff':>10} "
          f"{'MiB':>6}")
    for name, r in rows.items():
        print(f"{name:<13} {r['tokenization_agreement']:>9.3f} {r['greedy_agreement']:>12.3f} "
              f"{r['exact_match_transformers']:>6.3f} {r['exact_match_gguf']:>7.3f} "
              f"{r['first_logits_max_abs_diff']:>10.3g} {sum(r['gguf_mib'].values()):>6.1f}")
    Path(args.json).write_text(json.dumps({
        "base": args.base if not Path(args.base).exists() else Path(args.base).name, "sft_steps": args.steps,
        "results": rows, "machine": {"platform": platform.platform(), "python": platform.python_version()},
    }, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
