"""Pure-Python twin of ``sender._scheduler_c``: retry timers and rate limits.

Both twins have the same names, signatures, results and exception types;
``sender.scheduler`` picks one. This twin is the reference: it runs where no
compiler is available (``SENDER_NO_EXTENSIONS=1``, PyPy), and the test suite
drives it side by side with the compiled one to prove they agree. Any change
here must be mirrored in ``_fast/scheduler.pyx`` in the same commit.

Arguments are converted the way the compiled twin's typed parameters convert
them (floats as C ``double``, priority as C ``long long``), so both twins do
the same IEEE arithmetic and raise the same errors on bad input.
"""

from __future__ import annotations

import heapq
import math
from operator import index as _index

__all__ = ["TimerHeap", "TokenBucket"]

# Range of the compiled twin's ``long long`` and ``Py_ssize_t`` parameters.
_INT_MIN = -(2**63)
_INT_MAX = 2**63 - 1

# Relative slack that absorbs float rounding, so that ``try_take(now + d)``
# succeeds when ``d = delay(now)`` even with large trio clock values.
_SLACK = 1e-12


def _real(x: object) -> float:
    """Convert like a C ``double`` parameter: numbers only, never strings."""
    t = type(x)
    if t is int or hasattr(t, "__float__") or hasattr(t, "__index__"):
        return float(x)  # type: ignore[arg-type]
    raise TypeError(f"must be real number, not {t.__name__}")


def _int(x: object, what: str) -> int:
    """Convert like a C ``long long`` / ``Py_ssize_t`` parameter."""
    x = _index(x)  # type: ignore[arg-type]
    if not _INT_MIN <= x <= _INT_MAX:
        raise OverflowError(f"Python int too large to convert to C {what}")
    return x


def _check_limits(rate: float, burst: float) -> None:
    # ``not x > 0`` also rejects NaN.
    if not rate > 0.0:
        raise ValueError(f"rate must be > 0, got {rate!r}")
    if not burst >= 1.0:
        raise ValueError(f"burst must be >= 1, got {burst!r}")


class TimerHeap:
    """Min-heap of items by (due, -priority, insertion order): retry timers and scheduled sends.

    Items are never compared, so any object can be stored; equal due times
    pop higher priority first, then first in, first out.
    """

    __slots__ = ("_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, object]] = []
        self._seq = 0

    def push(self, due: float, item: object, priority: int = 0) -> None:
        """Schedule ``item`` at ``due`` (trio clock seconds).

        Raises:
          ValueError: ``due`` is NaN, which has no place in an ordering.
          OverflowError: ``priority`` does not fit a signed 64-bit integer.
        """
        if type(due) is not float:
            due = _real(due)
        if type(priority) is not int or not _INT_MIN <= priority <= _INT_MAX:
            priority = _int(priority, "long")
        if due != due:
            raise ValueError("due must not be NaN")
        heapq.heappush(self._heap, (due, -priority, self._seq, item))
        self._seq += 1

    def peek_due(self) -> float:
        """Due time of the earliest item; ``math.inf`` when empty, so callers can sleep until it."""
        heap = self._heap
        return heap[0][0] if heap else math.inf

    def pop(self) -> object:
        """Remove and return the earliest item, due or not.

        Raises:
          IndexError: the heap is empty.
        """
        if not self._heap:
            raise IndexError("pop from empty TimerHeap")
        return heapq.heappop(self._heap)[3]

    def pop_due(self, now: float, limit: int = -1) -> list:
        """Remove and return, in order, the items with ``due <= now``; at most ``limit`` if ``limit >= 0``."""
        if type(now) is not float:
            now = _real(now)
        if type(limit) is not int or not _INT_MIN <= limit <= _INT_MAX:
            limit = _int(limit, "ssize_t")
        heap = self._heap
        out: list = []
        if limit < 0:
            limit = len(heap)
        pop = heapq.heappop
        while heap and heap[0][0] <= now and len(out) < limit:
            out.append(pop(heap)[3])
        return out

    def __len__(self) -> int:
        return len(self._heap)

    def clear(self) -> None:
        """Drop every item."""
        self._heap = []


class TokenBucket:
    """rate tokens per second, up to burst; time is passed in (trio clock), never read.

    Passing time in keeps the bucket deterministic under trio's virtual clocks
    and lets one clock reading serve many buckets. The bucket starts full.
    A clock reading older than the last one used adds no tokens.
    """

    __slots__ = ("_rate", "_burst", "_tokens", "_updated")

    def __init__(self, rate: float, burst: float, now: float = 0.0) -> None:
        """Raises ValueError naming ``rate`` (must be > 0) or ``burst`` (must be >= 1)."""
        rate = _real(rate)
        burst = _real(burst)
        now = _real(now)
        _check_limits(rate, burst)
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._updated = now

    @property
    def rate(self) -> float:
        """Tokens added per second."""
        return self._rate

    @property
    def burst(self) -> float:
        """Most tokens the bucket holds."""
        return self._burst

    def _current(self, now: float) -> float:
        if now > self._updated:
            t = self._tokens + (now - self._updated) * self._rate
            return t if t < self._burst else self._burst
        return self._tokens

    def _slack(self, now: float) -> float:
        return _SLACK * (self._burst + self._rate * (1.0 + abs(now)))

    def try_take(self, now: float, n: float = 1.0) -> bool:
        """Take ``n`` tokens if available and say whether it did; ``n > burst`` never succeeds.

        Raises:
          ValueError: ``n`` is negative or NaN.
        """
        if type(now) is not float:
            now = _real(now)
        if type(n) is not float:
            n = _real(n)
        if not n >= 0.0:
            raise ValueError(f"n must be >= 0, got {n!r}")
        if n > self._burst:
            return False
        cur = self._current(now)
        if n - cur > self._slack(now):
            return False
        self._tokens = cur - n
        if now > self._updated:
            self._updated = now
        return True

    def delay(self, now: float, n: float = 1.0) -> float:
        """Seconds until ``n`` tokens are available: 0.0 if now, ``math.inf`` if ``n > burst``; never negative.

        ``try_take(now + delay(now, n), n)`` succeeds if nothing else takes tokens meanwhile.

        Raises:
          ValueError: ``n`` is negative or NaN.
        """
        if type(now) is not float:
            now = _real(now)
        if type(n) is not float:
            n = _real(n)
        if not n >= 0.0:
            raise ValueError(f"n must be >= 0, got {n!r}")
        if n > self._burst:
            return math.inf
        missing = n - self._current(now)
        if missing <= self._slack(now):
            return 0.0
        return missing / self._rate

    def tokens(self, now: float) -> float:
        """Tokens available at ``now`` (never negative)."""
        if type(now) is not float:
            now = _real(now)
        cur = self._current(now)
        return cur if cur > 0.0 else 0.0

    def set_rate(self, rate: float, burst: float, now: float) -> None:
        """Change limits at run time, keeping current tokens (capped at the new burst).

        Tokens accrued up to ``now`` are counted at the old rate first.

        Raises:
          ValueError: naming ``rate`` (must be > 0) or ``burst`` (must be >= 1).
        """
        rate = _real(rate)
        burst = _real(burst)
        now = _real(now)
        _check_limits(rate, burst)
        cur = self._current(now)
        if now > self._updated:
            self._updated = now
        self._rate = rate
        self._burst = burst
        self._tokens = cur if cur < burst else burst
