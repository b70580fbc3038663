"""Scheduler, timer heap and token bucket: the compiled twin when built, else the Python one.

Which twin: see ``sender._twins``; ``COMPILED`` says which one is in use.
Type checkers always see the Python twin, which carries the reference API.
"""

from typing import TYPE_CHECKING

__all__ = ["COMPILED", "Scheduler", "TimerHeap", "TokenBucket"]

COMPILED: bool
if TYPE_CHECKING:
    from ._scheduler_py import Scheduler as Scheduler, TimerHeap as TimerHeap, TokenBucket as TokenBucket

    COMPILED = False
else:
    from ._twins import pick

    _twin, COMPILED = pick("_scheduler_c", "_scheduler_py")
    Scheduler, TimerHeap, TokenBucket = _twin.Scheduler, _twin.TimerHeap, _twin.TokenBucket
