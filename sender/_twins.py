"""Choosing between a compiled module and its pure-Python twin (one rule for every pair).

The compiled twin is used unless ``SENDER_NO_EXTENSIONS=1`` is set or the interpreter is not
CPython; a compiled module that fails to import falls back to its twin too, and the caller
exposes which one won as ``COMPILED`` (tests/test_build.py fails when a build silently fell
back).
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType


def pick(compiled: str, python: str) -> tuple[ModuleType, bool]:
    """Import ``sender.<compiled>`` or else ``sender.<python>``; returns it and whether it is
    the compiled one."""
    if os.environ.get("SENDER_NO_EXTENSIONS") != "1" and sys.implementation.name == "cpython":
        try:
            return importlib.import_module(f"{__package__}.{compiled}"), True
        except ImportError:
            pass
    return importlib.import_module(f"{__package__}.{python}"), False
