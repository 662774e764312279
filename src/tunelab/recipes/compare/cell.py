"""One compare cell, run in a child process of its own so that its peak memory and time are its
own: `python -m tunelab.recipes.compare.cell JOB.json RESULT.json`.

The cell trains its config (unless it is a zero-shot cell), scores the result on the task's eval
(and the forgetting probe), and writes RESULT.json: the score, every metric, trainable
parameters, wall time, peak RSS, the learning curve. A user error (bad data, NaN loss, out of
memory...) is a failed cell with its one-line reason, not a crash of the compare.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.recipes.evaluate import evaluate
from tunelab.recipes.run import train

# Metrics where lower is better; any other is higher-better.
LOWER_IS_BETTER = ("loss", "perplexity", "probe_heldout_perplexity")
# The metric a task is compared on when the spec names none: the first of these it reports.
DEFAULT_METRICS = ("exact_match", "accuracy", "pairwise_accuracy", "probe_cloze_accuracy", "loss")


def pick_metric(metrics: dict[str, Any], wanted: str | None) -> str:
    if wanted is not None:
        if wanted not in metrics:
            numeric = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
            raise KeyError(f"metric {wanted!r} is not reported by this eval; it reports: {', '.join(numeric)}")
        return wanted
    return next(m for m in (*DEFAULT_METRICS, *metrics) if isinstance(metrics.get(m), (int, float)))


def _curve(run_dir: Path) -> list[tuple[int, float]]:
    file = run_dir / "metrics.jsonl"
    if not file.is_file():
        return []
    rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(int(r["step"]), float(r["eval_loss"])) for r in rows if "eval_loss" in r]


def run_cell(job: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    cfg, task = job["config"], job["task"]
    out: dict[str, Any] = {"status": "done"}
    try:
        if job["train"]:
            result = train(cfg, overwrite=True, quiet=True)
            if result.status != "completed":
                raise TunelabError(f"training stopped at step {result.steps} ({result.status})")
            summary = json.loads((Path(result.run_dir) / "summary.json").read_text(encoding="utf-8"))
            model: str = str(result.run_dir)
            out.update(trainable=summary["trainable"], total=summary["total"], steps=summary["steps"],
                       train_seconds=round(time.perf_counter() - t0, 2), curve=_curve(Path(result.run_dir)))
        else:
            model = cfg["model"]["name_or_path"]
            out.update(trainable=0, total=None, steps=0, train_seconds=0.0, curve=[])
        metrics = evaluate(model, tasks=[task["eval"]], forgetting=bool(task.get("forgetting") and job["train"]),
                           limit=task.get("limit"), icl=cfg.get("icl"), rag=cfg.get("rag"))
        scores = {k: v for k, v in metrics[task["eval"]].items() if isinstance(v, (int, float))}
        metric = pick_metric(scores, task.get("metric"))
        forget = metrics.get("forgetting", {}).get("drop", {}).get("cloze_accuracy_points")
        if task.get("forgetting") and not job["train"]:
            forget = 0.0  # the base compared with itself
        out.update(metric=metric, score=scores[metric], metrics=scores, forgetting_points=forget,
                   lower_is_better=metric in LOWER_IS_BETTER)
        if not math.isfinite(out["score"]):
            raise TunelabError(f"the score ({metric}) is not finite: {out['score']}")
    except TunelabError as e:
        out = {"status": "failed", "error": " ".join(str(e).split())[:400]}
    except KeyError as e:
        out = {"status": "failed", "error": str(e.args[0])}
    except Exception as e:  # noqa: BLE001 - a crash of one cell must not stop the compare; its trace is kept
        out = {"status": "failed", "error": f"internal error: {type(e).__name__}: {e}"[:400],
               "traceback": traceback.format_exc()[-4000:]}
    out["wall_seconds"] = round(time.perf_counter() - t0, 2)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def main(argv: list[str]) -> int:
    job_file, result_file = map(Path, argv)
    result = run_cell(json.loads(job_file.read_text(encoding="utf-8")))
    tmp = result_file.with_name(result_file.name + ".tmp")
    tmp.write_text(json.dumps(result), encoding="utf-8")
    tmp.replace(result_file)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
