"""Methods: what changes in the model. Importing this package registers them all."""

from tunelab.methods import full, lora  # noqa: F401  (registration)
from tunelab.methods.registry import METHODS, MethodSpec, count_parameters, register_method

__all__ = ["METHODS", "MethodSpec", "count_parameters", "register_method"]
