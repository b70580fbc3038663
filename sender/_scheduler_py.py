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

__all__ = ["Scheduler", "TimerHeap", "TokenBucket"]

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


# Queue states in ``Scheduler``.
_IDLE = 0        # no message waiting
_RUNNABLE = 1    # in the runnable heap: its head may go now
_PARKED = 2      # waiting on one bucket, in that bucket's waiter heap


class _Bucket:
    __slots__ = ("name", "rate", "burst", "tokens", "updated", "paused_until", "waiters", "nwait", "armed",
                 "gen")

    def __init__(self, name: str, rate: float, burst: float, now: float) -> None:
        self.name = name
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated = now
        self.paused_until = -math.inf
        # Heap of (-priority, seq, queue). An entry is current only while that queue is parked
        # here under that key; a queue that moves up (a more urgent message came) leaves its
        # old entry behind, skipped when it surfaces. ``nwait`` counts the current ones.
        self.waiters: list[tuple[int, int, int]] = []
        self.nwait = 0
        self.armed = False                              # a wake-up of this bucket is pending
        self.gen = 0                                    # wake-ups of older generations are stale

    def current(self, now: float) -> float:
        if now > self.updated:
            t = self.tokens + (now - self.updated) * self.rate
            return t if t < self.burst else self.burst
        return self.tokens

    def delay(self, now: float) -> float:
        """Seconds until one token is free (0.0: now)."""
        wait = self.paused_until - now
        if self.rate == math.inf:
            return wait if wait > 0.0 else 0.0
        missing = 1.0 - self.current(now)
        if missing <= _SLACK * (self.burst + self.rate * (1.0 + abs(now))):
            return wait if wait > 0.0 else 0.0
        missing /= self.rate
        return missing if missing > wait else wait

    def take(self, now: float) -> None:
        if self.rate != math.inf:
            self.tokens = self.current(now) - 1.0
            if now > self.updated:
                self.updated = now


class _Queue:
    __slots__ = ("items", "buckets", "state", "parked_on", "released_from", "key")

    def __init__(self, buckets: tuple[int, ...]) -> None:
        self.items: list[tuple[int, int, object]] = []   # heap of (-priority, seq, item)
        self.buckets = buckets
        self.state = _IDLE
        self.parked_on = -1
        self.released_from = -1
        self.key: tuple[int, int] = (0, 0)               # current (-priority, seq) where it waits


def _limits(rate: float, burst: float) -> None:
    # Unlike TokenBucket, rate may be inf: unlimited, which a bucket becomes when a rule is lifted.
    _check_limits(rate, burst)


class Scheduler:
    """Messages in queues that wait for tokens of the buckets their queue names.

    A queue holds messages that share one set of limits, for example one customer's mail to
    one recipient domain through one source IP; it names its buckets (customer, domain,
    provider, IP, site...) by id. A message leaves (``pop``) only when every bucket of its
    queue has a token, and then takes one from each. Within a queue higher priority goes
    first, then first in, first out; across queues the runnable queue whose head has the
    highest priority goes first, and queues take turns.

    No scanning: a queue blocked by a bucket parks on that bucket alone (no head-of-line
    blocking of other queues), and the bucket wakes its best waiter when its next token is
    due. Messages pushed with a future ``due`` wait in a timer heap. Time is passed in
    (trio clock seconds), never read.
    """

    __slots__ = ("_buckets", "_queues", "_timers", "_wakeups", "_runnable", "_seq", "_size")

    def __init__(self) -> None:
        self._buckets: list[_Bucket] = []
        self._queues: list[_Queue] = []
        self._timers: list[tuple[float, int, int, int, object]] = []   # (due, -prio, seq, queue, item)
        self._wakeups: list[tuple[float, int, int]] = []               # (at, bucket, gen)
        self._runnable: list[tuple[int, int, int]] = []                # (-prio, seq, queue)
        self._seq = 0
        self._size = 0

    # ------------------------------------------------------------------ buckets

    def add_bucket(self, name: str, rate: float, burst: float, now: float) -> int:
        """A new token bucket, full; returns its id. ``rate`` is tokens per second (``math.inf``:
        unlimited), ``burst`` the most it holds. ``name`` says which limit it is (for explain).

        Raises:
          ValueError: naming ``rate`` (must be > 0) or ``burst`` (must be >= 1).
        """
        name = str(name)
        rate = _real(rate)
        burst = _real(burst)
        now = _real(now)
        _limits(rate, burst)
        self._buckets.append(_Bucket(name, rate, burst, now))
        return len(self._buckets) - 1

    def _bucket(self, bid: object) -> _Bucket:
        bid = _int(bid, "ssize_t")
        if not 0 <= bid < len(self._buckets):
            raise IndexError(f"no bucket {bid}")
        return self._buckets[bid]

    def set_bucket(self, bid: int, rate: float, burst: float, now: float) -> None:
        """Change a bucket's limits at run time, keeping its tokens (capped at the new burst);
        tokens accrued up to ``now`` count at the old rate. Its waiters are re-timed.

        Raises:
          ValueError: naming ``rate`` or ``burst``. IndexError: no such bucket.
        """
        b = self._bucket(bid)
        rate = _real(rate)
        burst = _real(burst)
        now = _real(now)
        _limits(rate, burst)
        cur = b.current(now) if b.rate != math.inf else b.burst
        if now > b.updated:
            b.updated = now
        b.rate = rate
        b.burst = burst
        b.tokens = cur if cur < burst else burst
        self._rearm(_int(bid, "ssize_t"), now)

    def pause_bucket(self, bid: int, until: float, now: float) -> None:
        """Give no token before ``until`` (``-math.inf`` lifts a pause); tokens still accrue.

        Raises:
          ValueError: ``until`` is NaN. IndexError: no such bucket.
        """
        b = self._bucket(bid)
        until = _real(until)
        now = _real(now)
        if until != until:
            raise ValueError("until must not be NaN")
        b.paused_until = until
        self._rearm(_int(bid, "ssize_t"), now)

    def bucket_name(self, bid: int) -> str:
        return self._bucket(bid).name

    def bucket_rate(self, bid: int) -> float:
        """Tokens per second (``math.inf``: unlimited)."""
        return self._bucket(bid).rate

    def bucket_tokens(self, bid: int, now: float) -> float:
        """Tokens available at ``now`` (never negative)."""
        b = self._bucket(bid)
        now = _real(now)
        if b.rate == math.inf:
            return b.burst
        cur = b.current(now)
        return cur if cur > 0.0 else 0.0

    def bucket_waiters(self, bid: int) -> int:
        """How many queues wait for this bucket (a measure of its saturation)."""
        return self._bucket(bid).nwait

    def _rearm(self, bid: int, now: float) -> None:
        b = self._buckets[bid]
        if b.armed:
            b.armed = False
            b.gen += 1
        self._arm(bid, now)

    def _arm(self, bid: int, now: float) -> None:
        """Schedule the wake-up of a bucket that has waiters, when its next token is due."""
        b = self._buckets[bid]
        if b.nwait and not b.armed:
            b.armed = True
            heapq.heappush(self._wakeups, (now + b.delay(now), bid, b.gen))

    # ------------------------------------------------------------------ queues

    def _bucket_ids(self, buckets: object) -> tuple[int, ...]:
        ids = tuple(_int(b, "ssize_t") for b in buckets)  # type: ignore[attr-defined]
        for b in ids:
            if not 0 <= b < len(self._buckets):
                raise IndexError(f"no bucket {b}")
        return ids

    def add_queue(self, buckets: object) -> int:
        """A new queue limited by the given bucket ids (checked in that order); returns its id.

        Raises:
          IndexError: a bucket id does not exist.
        """
        self._queues.append(_Queue(self._bucket_ids(buckets)))
        return len(self._queues) - 1

    def _queue(self, qid: object) -> _Queue:
        qid = _int(qid, "ssize_t")
        if not 0 <= qid < len(self._queues):
            raise IndexError(f"no queue {qid}")
        return self._queues[qid]

    def set_queue_buckets(self, qid: int, buckets: object, now: float) -> None:
        """Replace a queue's buckets (rules changed); a parked queue gets checked again.

        Raises:
          IndexError: no such queue or bucket.
        """
        q = self._queue(qid)
        ids = self._bucket_ids(buckets)
        now = _real(now)
        qid = _int(qid, "ssize_t")
        q.buckets = ids
        if q.state == _PARKED:
            b = self._buckets[q.parked_on]
            b.nwait -= 1                    # its entry in the waiter heap is stale from now on
            q.state = _RUNNABLE
            q.parked_on = -1
            heapq.heappush(self._runnable, (q.key[0], q.key[1], qid))
            if not b.nwait and b.armed:
                b.armed = False
                b.gen += 1

    def queue_length(self, qid: int) -> int:
        """Messages waiting in the queue (not those pushed with a future ``due``)."""
        return len(self._queue(qid).items)

    def held(self, qid: int, now: float) -> tuple[int, float] | None:
        """Why the queue's head waits: ``(bucket id, earliest time it has a token)``, or None
        if the queue is not waiting for a bucket."""
        q = self._queue(qid)
        now = _real(now)
        if q.state != _PARKED:
            return None
        return q.parked_on, now + self._buckets[q.parked_on].delay(now)

    # ------------------------------------------------------------------ messages

    def push(self, qid: int, item: object, now: float, priority: int = 0, due: float = 0.0) -> None:
        """Queue ``item``, at once or, if ``due > now``, when ``due`` comes.

        Raises:
          IndexError: no such queue. ValueError: ``due`` is NaN.
          OverflowError: ``priority`` does not fit a signed 64-bit integer.
        """
        q = self._queue(qid)
        if type(now) is not float:
            now = _real(now)
        if type(due) is not float:
            due = _real(due)
        if type(priority) is not int or not _INT_MIN <= priority <= _INT_MAX:
            priority = _int(priority, "long")
        if due != due:
            raise ValueError("due must not be NaN")
        seq = self._seq
        self._seq = seq + 1
        self._size += 1
        if due > now:
            heapq.heappush(self._timers, (due, -priority, seq, _int(qid, "ssize_t"), item))
            return
        self._enqueue(q, _int(qid, "ssize_t"), -priority, seq, item)

    def drain(self, qid: int, now: float) -> list:
        """Take every message waiting in the queue out of it, best first (its route changed:
        the caller queues them elsewhere). Messages pushed with a future ``due`` stay.

        Raises:
          IndexError: no such queue.
        """
        q = self._queue(qid)
        now = _real(now)
        if q.state == _PARKED:
            b = self._buckets[q.parked_on]
            b.nwait -= 1                    # its waiter entry is stale from now on
            if not b.nwait and b.armed:
                b.armed = False
                b.gen += 1
        if q.released_from >= 0:            # the bucket that let it go wakes its next waiter
            self._arm(q.released_from, now)
            q.released_from = -1
        q.state = _IDLE                     # a runnable entry left behind is stale
        q.parked_on = -1
        items = [item for _, _, item in sorted(q.items, key=lambda m: (m[0], m[1]))]
        q.items = []
        self._size -= len(items)
        return items

    def _enqueue(self, q: _Queue, qid: int, negprio: int, seq: int, item: object) -> None:
        heapq.heappush(q.items, (negprio, seq, item))
        if q.state == _IDLE:
            q.state = _RUNNABLE
            q.key = (negprio, seq)
            heapq.heappush(self._runnable, (negprio, seq, qid))
        elif negprio < q.key[0]:
            # A more urgent head: the queue moves up where it waits (its old entry goes stale).
            q.key = (negprio, seq)
            heap = self._runnable if q.state == _RUNNABLE else self._buckets[q.parked_on].waiters
            heapq.heappush(heap, (negprio, seq, qid))

    def _advance(self, now: float) -> None:
        """Move due timers into their queues and wake the buckets whose token is due."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, negprio, seq, qid, item = heapq.heappop(timers)
            self._enqueue(self._queues[qid], qid, negprio, seq, item)
        wakeups = self._wakeups
        while wakeups and wakeups[0][0] <= now:
            _, bid, gen = heapq.heappop(wakeups)
            b = self._buckets[bid]
            if gen != b.gen or not b.armed:
                continue
            b.armed = False
            while b.waiters:
                negprio, seq, qid = heapq.heappop(b.waiters)
                q = self._queues[qid]
                if q.state != _PARKED or q.parked_on != bid or q.key != (negprio, seq):
                    continue                # stale
                b.nwait -= 1
                q.state = _RUNNABLE
                q.parked_on = -1
                q.released_from = bid
                heapq.heappush(self._runnable, (negprio, seq, qid))
                break

    def pop(self, now: float) -> tuple[int, object] | None:
        """The next message allowed to go at ``now``, as ``(queue id, item)``, with one token
        taken from each bucket of its queue; None if every waiting message is held."""
        if type(now) is not float:
            now = _real(now)
        buckets = self._buckets
        runnable = self._runnable
        while True:
            self._advance(now)
            if not runnable:
                return None
            negprio, seq, qid = heapq.heappop(runnable)
            q = self._queues[qid]
            if q.state != _RUNNABLE or q.key != (negprio, seq):
                continue                    # stale: the queue moved up meanwhile
            released_from = q.released_from
            q.released_from = -1
            blocked = -1
            for bid in q.buckets:
                if buckets[bid].delay(now) > 0.0:
                    blocked = bid
                    break
            if blocked >= 0:
                q.state = _PARKED
                q.parked_on = blocked
                heapq.heappush(buckets[blocked].waiters, (negprio, seq, qid))
                buckets[blocked].nwait += 1
                self._arm(blocked, now)
                if released_from >= 0:
                    self._arm(released_from, now)
                continue
            for bid in q.buckets:
                buckets[bid].take(now)
            item = heapq.heappop(q.items)[2]
            if q.items:
                seq = self._seq
                self._seq = seq + 1
                q.key = (q.items[0][0], seq)
                heapq.heappush(runnable, (q.items[0][0], seq, qid))
            else:
                q.state = _IDLE
            if released_from >= 0:
                self._arm(released_from, now)
            self._size -= 1
            return qid, item

    def next_wakeup(self) -> float:
        """The earliest time ``pop`` may return a message: ``-math.inf`` if one may go now,
        ``math.inf`` if nothing waits for a time."""
        if self._runnable:
            return -math.inf
        t = self._timers[0][0] if self._timers else math.inf
        wakeups = self._wakeups
        while wakeups:
            at, bid, gen = wakeups[0]
            b = self._buckets[bid]
            if gen == b.gen and b.armed:
                return at if at < t else t
            heapq.heappop(wakeups)
        return t

    def scheduled(self) -> int:
        """Messages pushed with a future ``due`` that has not come yet."""
        return len(self._timers)

    def __len__(self) -> int:
        """Every message not yet popped."""
        return self._size
