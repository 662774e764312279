"""tunelab: adapt causal language models with every fine-tuning technique, measured side by side."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["train", "evaluate", "generate", "export", "load", "__version__"]


def __getattr__(name: str) -> Any:
    # The API pulls in torch and transformers; keep `import tunelab` itself light.
    if name in {"train", "evaluate", "generate", "export", "load", "data_check", "methods"}:
        from tunelab import api

        return getattr(api, name)
    raise AttributeError(name)
