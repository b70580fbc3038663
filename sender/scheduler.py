"""Timer heap and token bucket: the compiled twin when built, else the Python one.

``SENDER_NO_EXTENSIONS=1`` (or a non-CPython interpreter) forces the Python
twin; a failed import falls back to it too, and ``COMPILED`` says which one
is in use (tests/test_build.py fails when a build silently fell back).
Type checkers always see the Python twin, which carries the reference API.
"""

import os
import sys
from typing import TYPE_CHECKING

__all__ = ["COMPILED", "TimerHeap", "TokenBucket"]

_NO_EXTENSIONS = (
    os.environ.get("SENDER_NO_EXTENSIONS") == "1" or sys.implementation.name != "cpython"
)

COMPILED: bool
if TYPE_CHECKING or _NO_EXTENSIONS:
    from ._scheduler_py import TimerHeap as TimerHeap, TokenBucket as TokenBucket

    COMPILED = False
else:
    try:
        from ._scheduler_c import TimerHeap as TimerHeap, TokenBucket as TokenBucket

        COMPILED = True
    except ImportError:
        from ._scheduler_py import TimerHeap as TimerHeap, TokenBucket as TokenBucket

        COMPILED = False
