"""Objectives: what the model is trained to do. Importing this package registers them all."""

import tunelab.objectives.classify  # noqa: F401  (registers classify; heads: methods/heads.py)
from tunelab.objectives import lm  # noqa: F401  (registers lm, sft)
from tunelab.objectives.registry import OBJECTIVES, ObjectiveSpec, register_objective

__all__ = ["OBJECTIVES", "ObjectiveSpec", "register_objective"]
