"""Methods: what changes in the model. One module per technique; importing this package imports
every module in it, and each registers itself with `@register_method`."""

import importlib
import pkgutil

from tunelab.methods.registry import METHODS, MethodSpec, count_parameters, register_method

_NOT_METHODS = {"registry", "artifacts"}
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name not in _NOT_METHODS and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["METHODS", "MethodSpec", "count_parameters", "register_method"]
