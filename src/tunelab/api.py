"""tunelab's Python API; the CLI mirrors it one command per function. Thin: each function is a
recipe (recipes/) or the artifact loader.

    import tunelab
    result = tunelab.train("configs/sft-lora.yaml", ["train.max_steps=50"])
    print(result.run_dir, result.metrics)
"""

from __future__ import annotations

from tunelab.artifacts import load
from tunelab.recipes.advise import advise
from tunelab.recipes.compare import compare
from tunelab.recipes.continual import continual
from tunelab.recipes.evaluate import evaluate, evaluate_task, generate, score
from tunelab.recipes.export import export
from tunelab.recipes.meta import adapt_eval, adapt_table, meta_train
from tunelab.recipes.methods import method_cost, methods
from tunelab.recipes.rag import rag_index, rag_query
from tunelab.recipes.run import RUN_ENTRIES, ConfigLike, changed_keys, data_check, resolve_config, train
from tunelab.recipes.serve import serve
from tunelab.recipes.tune import TuneResult, tune

__all__ = ["RUN_ENTRIES", "ConfigLike", "adapt_eval", "adapt_table", "changed_keys", "compare", "continual",
           "data_check", "evaluate", "evaluate_task", "export", "advise", "generate", "load", "meta_train",
           "method_cost", "methods", "rag_index", "rag_query", "resolve_config", "score", "serve", "train", "tune",
           "TuneResult"]
