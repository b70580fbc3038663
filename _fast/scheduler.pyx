# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
"""Compiled twin of ``sender._scheduler_py``: retry timers and rate limits.

Built as ``sender._scheduler_c``. Same names, signatures, results and
exception types as the Python twin, which holds the reference docstrings;
any change here must be mirrored there in the same commit.

The heap keeps its ordering keys in C memory (an array of structs) and its
items in a Python list, so sifting moves plain C structs and never touches a
reference count, while the garbage collector still sees every item.
"""

from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.number cimport PyNumber_Index
from libc.math cimport INFINITY, fabs, isnan

# Relative slack that absorbs float rounding; see _scheduler_py._SLACK.
cdef double _SLACK = 1e-12


cdef struct _Entry:
    double due
    long long prio
    long long seq
    Py_ssize_t slot        # index of the item in TimerHeap._items


cdef inline bint _before(const _Entry* a, const _Entry* b) noexcept nogil:
    """Heap order: earlier due, then higher priority, then earlier push."""
    if a.due != b.due:
        return a.due < b.due
    if a.prio != b.prio:
        return a.prio > b.prio
    return a.seq < b.seq


cdef class TimerHeap:
    """Min-heap of items by (due, -priority, insertion order): retry timers and scheduled sends.

    Items are never compared, so any object can be stored; equal due times
    pop higher priority first, then first in, first out.
    """

    cdef _Entry* _heap         # binary heap of keys, _n used of _cap
    cdef Py_ssize_t* _free     # stack of free slots in _items, _nfree used of _cap
    cdef Py_ssize_t _n, _nfree, _cap
    cdef long long _seq
    cdef list _items           # item of each slot; None in free slots

    def __cinit__(self, *args, **kwargs):
        # Accepts anything so Python subclasses may define their own __init__.
        self._items = []

    def __init__(self):
        pass

    def __dealloc__(self):
        PyMem_Free(self._heap)
        PyMem_Free(self._free)

    cdef int _grow(self) except -1:
        cdef Py_ssize_t cap = self._cap * 2 if self._cap else 16
        cdef _Entry* heap = <_Entry*>PyMem_Realloc(self._heap, cap * sizeof(_Entry))
        if heap is NULL:
            raise MemoryError()
        self._heap = heap
        cdef Py_ssize_t* free = <Py_ssize_t*>PyMem_Realloc(self._free, cap * sizeof(Py_ssize_t))
        if free is NULL:
            raise MemoryError()
        self._free = free
        self._cap = cap
        return 0

    cpdef push(self, double due, object item, object priority=0):
        """Schedule ``item`` at ``due`` (trio clock seconds)."""
        cdef Py_ssize_t slot, i, parent
        cdef _Entry e
        if type(priority) is not int:
            priority = PyNumber_Index(priority)  # reject floats, unlike a bare long long
        e.prio = priority
        if isnan(due):
            raise ValueError("due must not be NaN")
        # Invariant: _n + _nfree == len(_items) <= _cap, so the heap has room
        # once the item is stored.
        if self._nfree:
            self._nfree -= 1
            slot = self._free[self._nfree]
            self._items[slot] = item
        else:
            slot = len(self._items)
            if slot >= self._cap:
                self._grow()
            self._items.append(item)
        e.due = due
        e.seq = self._seq
        e.slot = slot
        self._seq += 1
        # Sift up by moving parents into the hole.
        i = self._n
        self._n += 1
        while i > 0:
            parent = (i - 1) >> 1
            if _before(&e, &self._heap[parent]):
                self._heap[i] = self._heap[parent]
                i = parent
            else:
                break
        self._heap[i] = e

    cdef object _pop_top(self):
        """Remove the root (caller checked _n > 0) and return its item."""
        cdef _Entry* heap = self._heap
        cdef Py_ssize_t slot = heap[0].slot
        cdef Py_ssize_t i = 0, child, parent
        self._n -= 1
        cdef Py_ssize_t n = self._n
        cdef _Entry last
        if n > 0:
            # Floyd's variant, as in heapq: walk the hole down to a leaf along
            # the earlier children, then sift the last entry up from there;
            # about half the comparisons of a plain sift-down.
            last = heap[n]
            child = 1
            while child < n:
                if child + 1 < n and _before(&heap[child + 1], &heap[child]):
                    child += 1
                heap[i] = heap[child]
                i = child
                child = 2 * i + 1
            while i > 0:
                parent = (i - 1) >> 1
                if _before(&last, &heap[parent]):
                    heap[i] = heap[parent]
                    i = parent
                else:
                    break
            heap[i] = last
        item = self._items[slot]
        self._items[slot] = None
        self._free[self._nfree] = slot
        self._nfree += 1
        return item

    cpdef double peek_due(self):
        """Due time of the earliest item; ``math.inf`` when empty."""
        return self._heap[0].due if self._n else INFINITY

    cpdef object pop(self):
        """Remove and return the earliest item, due or not; IndexError when empty."""
        if not self._n:
            raise IndexError("pop from empty TimerHeap")
        return self._pop_top()

    cpdef list pop_due(self, double now, Py_ssize_t limit=-1):
        """Remove and return, in order, the items with ``due <= now``; at most ``limit`` if ``limit >= 0``."""
        cdef list out = []
        cdef Py_ssize_t taken = 0
        if limit < 0:
            limit = self._n
        while self._n and self._heap[0].due <= now and taken < limit:
            out.append(self._pop_top())
            taken += 1
        return out

    def __len__(self):
        return self._n

    cpdef clear(self):
        """Drop every item."""
        # Reset C state before the old list dies: dropping items may run
        # arbitrary finalizers that use this heap again.
        old = self._items
        self._items = []
        self._n = 0
        self._nfree = 0
        self._cap = 0
        PyMem_Free(self._heap)
        PyMem_Free(self._free)
        self._heap = NULL
        self._free = NULL
        del old


cdef inline int _check_limits(double rate, double burst) except -1:
    # ``not x > 0`` also rejects NaN.
    if not rate > 0.0:
        raise ValueError(f"rate must be > 0, got {rate!r}")
    if not burst >= 1.0:
        raise ValueError(f"burst must be >= 1, got {burst!r}")
    return 0


cdef class TokenBucket:
    """rate tokens per second, up to burst; time is passed in (trio clock), never read.

    Passing time in keeps the bucket deterministic under trio's virtual clocks
    and lets one clock reading serve many buckets. The bucket starts full.
    A clock reading older than the last one used adds no tokens.
    """

    cdef readonly double rate
    cdef readonly double burst
    cdef double _tokens, _updated

    def __init__(self, double rate, double burst, double now=0.0):
        _check_limits(rate, burst)
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._updated = now

    cdef inline double _current(self, double now) noexcept:
        cdef double t
        if now > self._updated:
            t = self._tokens + (now - self._updated) * self.rate
            return t if t < self.burst else self.burst
        return self._tokens

    cdef inline double _slack(self, double now) noexcept:
        return _SLACK * (self.burst + self.rate * (1.0 + fabs(now)))

    cpdef bint try_take(self, double now, double n=1.0) except -1:
        """Take ``n`` tokens if available and say whether it did; ``n > burst`` never succeeds."""
        cdef double cur
        if not n >= 0.0:
            raise ValueError(f"n must be >= 0, got {n!r}")
        if n > self.burst:
            return False
        cur = self._current(now)
        if n - cur > self._slack(now):
            return False
        self._tokens = cur - n
        if now > self._updated:
            self._updated = now
        return True

    cpdef double delay(self, double now, double n=1.0) except? -1.0:
        """Seconds until ``n`` tokens are available: 0.0 if now, ``math.inf`` if ``n > burst``; never negative."""
        cdef double missing
        if not n >= 0.0:
            raise ValueError(f"n must be >= 0, got {n!r}")
        if n > self.burst:
            return INFINITY
        missing = n - self._current(now)
        if missing <= self._slack(now):
            return 0.0
        return missing / self.rate

    cpdef double tokens(self, double now):
        """Tokens available at ``now`` (never negative)."""
        cdef double cur = self._current(now)
        return cur if cur > 0.0 else 0.0

    cpdef set_rate(self, double rate, double burst, double now):
        """Change limits at run time, keeping current tokens (capped at the new burst)."""
        cdef double cur
        _check_limits(rate, burst)
        cur = self._current(now)
        if now > self._updated:
            self._updated = now
        self.rate = rate
        self.burst = burst
        self._tokens = cur if cur < burst else burst
