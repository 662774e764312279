"""Objectives: what the model is trained to do. One module per family; importing this package
imports every module in it, and each registers its objectives with `@register_objective`."""

import importlib
import pkgutil

from tunelab.objectives.registry import OBJECTIVES, ObjectiveSpec, register_objective

_NOT_OBJECTIVES = {"registry", "alignment_losses", "preference_losses", "frozen", "rewards"}  # their pieces
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name not in _NOT_OBJECTIVES and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["OBJECTIVES", "ObjectiveSpec", "register_objective"]
