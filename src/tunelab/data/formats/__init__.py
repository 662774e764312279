"""Data formats: one module per format, each registering how a record of it is detected, checked
and encoded (`register_format`, registry.py). Importing this package imports every module in it.
A new format is one file here plus its tests.

| format | record |
|---|---|
| text | `{"text"}` |
| instruction | `{"instruction", "input"?, "output", "system"?}` (alpaca) |
| chat | `{"messages": [{"role", "content"}]}` or ShareGPT `{"conversations": [{"from", "value"}]}` |
| preference | `{"prompt", "chosen", "rejected"}` |
| ranking | `{"prompt", "responses": [best, ..., worst]}` |
| unpaired | `{"prompt", "completion", "label"}`, label true or false (one rated reply, for KTO) |
| prompt | `{"prompt"}` (what PPO samples replies to) |
| classification | `{"text", "label"}` |
"""

import importlib
import pkgutil

from tunelab.data.formats.registry import (
    FORMATS,
    EncodeContext,
    FormatSpec,
    detect_format,
    register_format,
    resolve_format,
    validate_record,
)

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name != "registry" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["FORMATS", "EncodeContext", "FormatSpec", "detect_format", "register_format", "resolve_format",
           "validate_record"]
