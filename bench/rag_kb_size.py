"""Answer accuracy against knowledge-base size (#16, must-show 2): the RAG-trained generator of
bench/nonparametric.py answering `new-facts@test` with BM25 passages from knowledge bases of 120
lines up to 1M (the real lines + distractor lines about non-existent people, bench/rag_scale.py's).

    python bench/rag_kb_size.py [--runs runs/nonparametric] [--sizes 120,1000,10000,100000,1000000]

Prints a table and writes docs/results/rag-kb-size.json. Needs bench/nonparametric.py's runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from rag_scale import knowledge_base  # noqa: E402

from tunelab import api  # noqa: E402
from tunelab.config import ModelConfig  # noqa: E402
from tunelab.modeling.load import load_tokenizer  # noqa: E402
from tunelab.nonparametric.index import build_index  # noqa: E402

TEST = "tinyworld:new-facts@test"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="runs/nonparametric")
    ap.add_argument("--sizes", default="120,1000,10000,100000,1000000")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--json", default=str(ROOT / "docs/results/rag-kb-size.json"))
    args = ap.parse_args()
    runs = sorted((Path(args.runs) / "compare" / "cells" / "rag-bm25-k3+lora" / "test").glob("seed-*/run"))
    if not runs:
        sys.exit(f"no RAG-trained runs under {args.runs}: run python bench/nonparametric.py first")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(x) for x in args.sizes.split(",")]:
            lines, _, _ = knowledge_base(n)
            kb = Path(tmp) / f"kb-{n}.txt"
            kb.write_text("\n".join(lines) + "\n", encoding="utf-8")
            t0 = time.perf_counter()
            build_index(kb, Path(tmp) / f"index-{n}", tokenizer=load_tokenizer(ModelConfig()), per_line=True,
                        log=lambda s: None)
            build = time.perf_counter() - t0
            scores, m = [], {}
            for run in runs:
                m = api.evaluate(str(run), tasks=[TEST], rag={"index": str(Path(tmp) / f"index-{n}"),
                                                              "k": args.k})[TEST]
                scores.append(m["exact_match"])
            rows.append({"chunks": n, "build_s": round(build, 2), "exact_match": scores,
                         "mean": sum(scores) / len(scores), "recall": m["retrieval_recall"],
                         "p50_ms": m["retrieval_ms_p50"], "p95_ms": m["retrieval_ms_p95"]})
            r = rows[-1]
            print(f"{n:>9,} chunks  build {r['build_s']:7.1f} s  recall@{args.k} {r['recall']:.3f}  "
                  f"p95 {r['p95_ms']:.2f} ms  exact match {r['mean']:.3f} {[round(s, 3) for s in scores]}",
                  flush=True)
    Path(args.json).write_text(json.dumps({"command": "python bench/rag_kb_size.py " + " ".join(sys.argv[1:]),
                                           "k": args.k, "runs": len(runs), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
