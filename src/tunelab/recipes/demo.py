"""`tunelab demo` / `make demo`: LoRA SFT of the embedded base on TinyWorld QA, before and after.

The base model `tunelab-tiny` knows TinyWorld's people from pretraining prose, and was shown
short-answer QA only for the training people. The demo fine-tunes it with LoRA on those QA pairs
(`configs/sft-lora.yaml`) and measures, on held-out people whose facts it only read as prose:
exact match before and after, and the forgetting probe (cloze accuracy on pretraining facts and
perplexity on held-out corpus text) of the tuned model next to its base.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tunelab.artifacts import load
from tunelab.config import SHIPPED_CONFIGS
from tunelab.data.sources import resolve_source
from tunelab.errors import TunelabError
from tunelab.eval.probe import forgetting
from tunelab.eval.suite import evaluate_task
from tunelab.owned import write_atomic
from tunelab.recipes.run import train

CONFIG = SHIPPED_CONFIGS / "sft-lora.yaml"
TASK = "tinyworld:qa@test"


def recipe() -> Path:
    if not CONFIG.is_file():
        raise TunelabError(f"{CONFIG}: the demo's config is missing from the installed package",
                           fix="reinstall tunelab (pip install --force-reinstall tunelab)")
    return CONFIG


def run_demo(out: str | Path = "runs/demo") -> dict[str, Any]:
    console = Console()
    t0 = time.perf_counter()
    console.print(f"[bold]tunelab demo[/]: LoRA SFT of tunelab-tiny on tinyworld:qa, measured on {TASK} "
                  "(people whose facts the base only read as prose)")
    base_qa = evaluate_task("tunelab-tiny", TASK)
    console.print(f"base model before tuning: exact match {base_qa['exact_match']:.3f}")
    result = train(recipe(), [f"output.dir={out}"], overwrite=True)
    model = load(result.run_dir)
    tuned_qa = evaluate_task(model, TASK)
    probe = forgetting(model)
    summary = {
        "task": TASK, "steps": result.steps,
        "exact_match": {"base": base_qa["exact_match"], "tuned": tuned_qa["exact_match"]},
        "probe_cloze_accuracy": {"base": probe["base"]["probe_cloze_accuracy"],
                                 "tuned": probe["model"]["probe_cloze_accuracy"]},
        "probe_heldout_perplexity": {"base": probe["base"]["probe_heldout_perplexity"],
                                     "tuned": probe["model"]["probe_heldout_perplexity"]},
        "forgetting_drop_points": probe["drop"]["cloze_accuracy_points"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_atomic(Path(result.run_dir) / "demo.json", json.dumps(summary, indent=1))
    console.print(_table(summary))
    console.print(
        f"forgetting: probe cloze accuracy dropped {summary['forgetting_drop_points']:.1f} points; "
        f"total {summary['seconds']:.0f}s\n"
        f"reproduce: tunelab eval {result.run_dir} --task {TASK} --forgetting --json\n"
        f"try:       tunelab generate {result.run_dir} --prompt \"{_example_question()}\"",
        soft_wrap=True,  # commands to copy: never broken across lines
    )
    return summary


def _table(s: dict[str, Any]) -> Table:
    table = Table(title=f"{s['task']}: held-out people, short answers")
    for col in ("model", "exact match", "probe cloze acc.", "held-out ppl"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for key, name in (("base", "tunelab-tiny (base)"), ("tuned", f"LoRA SFT, {s['steps']} steps")):
        table.add_row(name, f"{s['exact_match'][key]:.3f}", f"{s['probe_cloze_accuracy'][key]:.3f}",
                      f"{s['probe_heldout_perplexity'][key]:.2f}")
    return table


def _example_question() -> str:
    with open(resolve_source(TASK), encoding="utf-8") as f:
        return json.loads(f.readline())["messages"][0]["content"]
