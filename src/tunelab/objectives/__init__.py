"""Objectives: what the model is trained to do. Importing this package registers them all."""

from tunelab.objectives import (  # noqa: F401  (each module registers its objectives)
    classify,  # classify (heads: methods/heads.py)
    distill,  # distill
    lm,  # lm, sft
    ppo,  # ppo
    preference,  # reward, dpo
)
from tunelab.objectives.registry import OBJECTIVES, ObjectiveSpec, register_objective

__all__ = ["OBJECTIVES", "ObjectiveSpec", "register_objective"]
