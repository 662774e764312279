"""`tunelab ui`: a local web UI over run folders, compare reports, data checks, training and chat (docs/ui.md)."""

from __future__ import annotations

from tunelab.ui.app import create_ui_app, run_ui
from tunelab.ui.paths import Roots

__all__ = ["Roots", "create_ui_app", "run_ui"]
