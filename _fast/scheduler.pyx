# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
"""Compiled twin of ``sender._scheduler_py``: retry timers, rate limits and the scheduler.

Built as ``sender._scheduler_c``. Same names, signatures, results and
exception types as the Python twin, which holds the reference docstrings;
any change here must be mirrored there in the same commit.

The heaps keep their ordering keys in C memory (arrays of structs) and their
items in a Python list, so sifting moves plain C structs and never touches a
reference count, while the garbage collector still sees every item.

``Scheduler`` keeps all of its state that way too: buckets, queues and the
runnable, waiter, timer and wake-up heaps are C arrays of structs, and the
only Python objects on the hot path are the items and the ``(queue id, item)``
that ``pop`` returns. Its heaps follow ``heapq`` step for step and compare
keys as the twin's tuples compare, so even a NaN wake-up time (from a clock
of NaN or ``-inf``) leaves both twins' heaps in the same order.
"""

cimport cython
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.number cimport PyNumber_Float, PyNumber_Index
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


# ---------------------------------------------------------------------------
# Scheduler


cdef double _real(object x) except? -1.0:
    """Convert like the twin's ``_real`` (a C ``double`` parameter): numbers only, never strings.

    Scheduler methods convert their arguments one by one in the twin's order,
    rather than as typed parameters, so a call with two bad arguments raises
    the same error in both twins.
    """
    t = type(x)
    if t is float:
        return PyFloat_AS_DOUBLE(x)
    if t is int or hasattr(t, "__float__") or hasattr(t, "__index__"):
        return PyFloat_AS_DOUBLE(PyNumber_Float(x))
    raise TypeError(f"must be real number, not {t.__name__}")


cdef long long _int(object x, str what) except? -1:
    """Convert like the twin's ``_int`` (a C ``long long`` / ``Py_ssize_t`` parameter)."""
    cdef int overflow = 0
    cdef long long v
    if type(x) is not int:
        x = PyNumber_Index(x)  # rejects floats, unlike a bare long long
    v = PyLong_AsLongLongAndOverflow(x, &overflow)
    if overflow:
        raise OverflowError(f"Python int too large to convert to C {what}")
    return v


# Queue states, as in the twin.
cdef enum:
    _IDLE = 0        # no message waiting
    _RUNNABLE = 1    # in the runnable heap: its head may go now
    _PARKED = 2      # waiting on one bucket, in that bucket's waiter heap


# Heap keys. Each is the twin's tuple with -priority kept as priority (its
# negation overflows at -2**63) and the item as a slot in Scheduler._items.

cdef struct _Msg:           # a message in its queue: (-priority, seq, item)
    long long prio
    long long seq
    Py_ssize_t slot

cdef struct _Timer:         # a message pushed with a future due: (due, -priority, seq, queue, item)
    double due
    long long prio
    long long seq
    Py_ssize_t qid
    Py_ssize_t slot

cdef struct _Turn:          # a queue in the runnable heap or a waiter heap: (-priority, seq, queue)
    long long prio
    long long seq
    Py_ssize_t qid

cdef struct _Wake:          # a bucket's wake-up: (at, bucket, gen)
    double at
    Py_ssize_t bid
    long long gen

ctypedef fused _Key:
    _Msg
    _Timer
    _Turn
    _Wake


cdef inline bint _lt(const _Key* a, const _Key* b) noexcept nogil:
    """The twin's tuple ``<``: the first unequal field decides, so NaN orders as it does there."""
    if _Key is _Wake:
        if a.at != b.at:
            return a.at < b.at
        if a.bid != b.bid:
            return a.bid < b.bid
        return a.gen < b.gen
    else:
        if _Key is _Timer:
            if a.due != b.due:
                return a.due < b.due
        if a.prio != b.prio:
            return a.prio > b.prio
        if _Key is _Turn:
            if a.seq != b.seq:
                return a.seq < b.seq
            return a.qid < b.qid
        else:
            return a.seq < b.seq     # unique: the item is never compared


# heapq's algorithms, step for step (and its names: _siftdown moves toward the
# root). Keys are unique (a waiter heap may hold a stale copy of a current entry,
# equal in every field), so any heap would pop the same order; following heapq
# matters only for NaN wake-up times, which compare false both ways.

cdef inline void _siftdown(_Key* heap, Py_ssize_t start, Py_ssize_t pos) noexcept nogil:
    cdef _Key item = heap[pos]
    cdef Py_ssize_t parent
    while pos > start:
        parent = (pos - 1) >> 1
        if _lt(&item, &heap[parent]):
            heap[pos] = heap[parent]
            pos = parent
        else:
            break
    heap[pos] = item


cdef inline void _siftup(_Key* heap, Py_ssize_t n, Py_ssize_t pos) noexcept nogil:
    cdef Py_ssize_t start = pos, child = 2 * pos + 1
    cdef _Key item = heap[pos]
    while child < n:
        if child + 1 < n and not _lt(&heap[child], &heap[child + 1]):
            child += 1
        heap[pos] = heap[child]
        pos = child
        child = 2 * pos + 1
    heap[pos] = item
    _siftdown(heap, start, pos)


cdef int _grow(void** array, Py_ssize_t* cap, size_t size) except -1:
    """Double an array's capacity (at least 4)."""
    cdef Py_ssize_t new_cap = cap[0] * 2 if cap[0] else 4
    cdef void* p = PyMem_Realloc(array[0], new_cap * size)
    if p is NULL:
        raise MemoryError()
    array[0] = p
    cap[0] = new_cap
    return 0


cdef inline int _heappush(_Key** heap, Py_ssize_t* n, Py_ssize_t* cap, _Key key) except -1:
    """Add ``key``, growing the array if it is full."""
    if n[0] == cap[0]:
        _grow(<void**>heap, cap, sizeof(_Key))
    heap[0][n[0]] = key
    n[0] += 1
    _siftdown(heap[0], 0, n[0] - 1)
    return 0


cdef inline _Key _heappop(_Key* heap, Py_ssize_t* n) noexcept nogil:
    """Remove and return the root; the caller checked the heap is not empty."""
    n[0] -= 1
    cdef _Key last = heap[n[0]]
    cdef _Key top
    if n[0] == 0:
        return last
    top = heap[0]
    heap[0] = last
    _siftup(heap, n[0], 0)
    return top


cdef struct _Bucket:
    double rate             # tokens per second; INFINITY: unlimited
    double burst
    double tokens
    double updated
    double paused_until
    # Heap of queues parked on this bucket. An entry is current only while its queue is
    # parked here under that key; a queue that moves up (a more urgent message came) leaves
    # its old entry behind, skipped when it surfaces. ``nwait`` counts the current ones.
    _Turn* waiters
    Py_ssize_t nentries, capentries
    Py_ssize_t nwait
    long long gen           # wake-ups of older generations are stale
    bint armed              # a wake-up of this bucket is pending


cdef inline double _current(const _Bucket* b, double now) noexcept nogil:
    cdef double t
    if now > b.updated:
        t = b.tokens + (now - b.updated) * b.rate
        return t if t < b.burst else b.burst
    return b.tokens


cdef inline double _delay(const _Bucket* b, double now) noexcept nogil:
    """Seconds until one token is free (0.0: now); the twin's ``_Bucket.delay``."""
    cdef double wait = b.paused_until - now
    cdef double missing
    if b.rate == INFINITY:
        return wait if wait > 0.0 else 0.0
    missing = 1.0 - _current(b, now)
    if missing <= _SLACK * (b.burst + b.rate * (1.0 + fabs(now))):
        return wait if wait > 0.0 else 0.0
    missing /= b.rate
    return missing if missing > wait else wait


cdef inline void _take(_Bucket* b, double now) noexcept nogil:
    if b.rate != INFINITY:
        b.tokens = _current(b, now) - 1.0
        if now > b.updated:
            b.updated = now


cdef struct _Queue:
    _Msg* items             # heap of its waiting messages
    Py_ssize_t n, cap
    Py_ssize_t* buckets     # bucket ids, checked in this order
    Py_ssize_t nbuckets
    Py_ssize_t parked_on
    Py_ssize_t released_from
    long long key_prio      # its current key where it waits (runnable or waiter heap)
    long long key_seq
    int state


cdef class Scheduler:
    """Messages in queues that wait for tokens of the buckets their queue names.

    See the Python twin for the full contract. A message leaves (``pop``) only
    when every bucket of its queue has a token; a blocked queue parks on one
    bucket, which wakes its best waiter when its next token is due.
    """

    # Not @cython.final as a class, so that Python subclasses work as they do
    # with the twin; its cdef helpers are final, so calls to them skip the vtable.

    cdef _Bucket* _buckets
    cdef Py_ssize_t _nbuckets, _capbuckets
    cdef list _names                # name of each bucket
    cdef _Queue* _queues
    cdef Py_ssize_t _nqueues, _capqueues
    cdef _Timer* _timers
    cdef Py_ssize_t _ntimers, _captimers
    cdef _Wake* _wakeups
    cdef Py_ssize_t _nwakeups, _capwakeups
    cdef _Turn* _runnable
    cdef Py_ssize_t _nrunnable, _caprunnable
    cdef list _items                # item of each slot; None in free slots
    cdef Py_ssize_t* _free          # stack of free slots, room for len(_items)
    cdef Py_ssize_t _nfree, _capfree
    cdef long long _seq
    cdef Py_ssize_t _size

    def __cinit__(self, *args, **kwargs):
        # Accepts anything so Python subclasses may define their own __init__.
        self._names = []
        self._items = []

    def __init__(self):
        pass

    def __dealloc__(self):
        cdef Py_ssize_t i
        for i in range(self._nbuckets):
            PyMem_Free(self._buckets[i].waiters)
        for i in range(self._nqueues):
            PyMem_Free(self._queues[i].items)
            PyMem_Free(self._queues[i].buckets)
        PyMem_Free(self._buckets)
        PyMem_Free(self._queues)
        PyMem_Free(self._timers)
        PyMem_Free(self._wakeups)
        PyMem_Free(self._runnable)
        PyMem_Free(self._free)

    # ------------------------------------------------------------------ items

    @cython.final
    cdef Py_ssize_t _store(self, object item) except -1:
        """Put ``item`` in a free slot of ``_items`` and return the slot."""
        cdef Py_ssize_t slot
        if self._nfree:
            self._nfree -= 1
            slot = self._free[self._nfree]
            self._items[slot] = item
            return slot
        slot = len(self._items)
        if slot == self._capfree:
            _grow(<void**>&self._free, &self._capfree, sizeof(Py_ssize_t))
        self._items.append(item)
        return slot

    @cython.final
    cdef object _release(self, Py_ssize_t slot):
        """Empty a slot and return its item."""
        item = self._items[slot]
        self._items[slot] = None
        self._free[self._nfree] = slot
        self._nfree += 1
        return item

    # ------------------------------------------------------------------ buckets

    def add_bucket(self, name, rate, burst, now):
        """A new token bucket, full; returns its id. ``rate``: tokens per second (``math.inf``: unlimited)."""
        name = str(name)
        cdef double r = _real(rate)
        cdef double bu = _real(burst)
        cdef double t = _real(now)
        _check_limits(r, bu)
        if self._nbuckets == self._capbuckets:
            _grow(<void**>&self._buckets, &self._capbuckets, sizeof(_Bucket))
        self._names.append(name)
        cdef _Bucket* b = &self._buckets[self._nbuckets]
        b.rate = r
        b.burst = bu
        b.tokens = bu
        b.updated = t
        b.paused_until = -INFINITY
        b.waiters = NULL
        b.nentries = 0
        b.capentries = 0
        b.nwait = 0
        b.gen = 0
        b.armed = False
        self._nbuckets += 1
        return self._nbuckets - 1

    @cython.final
    cdef Py_ssize_t _bucket(self, object bid) except -1:
        """Check a bucket id as the twin's ``_bucket`` does; returns it as an index."""
        cdef long long i = _int(bid, "ssize_t")
        if not 0 <= i < self._nbuckets:
            raise IndexError(f"no bucket {i}")
        return <Py_ssize_t>i

    def set_bucket(self, bid, rate, burst, now):
        """Change a bucket's limits at run time, keeping its tokens (capped at the new burst)."""
        cdef Py_ssize_t i = self._bucket(bid)
        cdef double r = _real(rate)
        cdef double bu = _real(burst)
        cdef double t = _real(now)
        cdef double cur
        _check_limits(r, bu)
        cdef _Bucket* b = &self._buckets[i]
        cur = _current(b, t) if b.rate != INFINITY else b.burst
        if t > b.updated:
            b.updated = t
        b.rate = r
        b.burst = bu
        b.tokens = cur if cur < bu else bu
        self._rearm(i, t)

    def pause_bucket(self, bid, until, now):
        """Give no token before ``until`` (``-math.inf`` lifts a pause); tokens still accrue."""
        cdef Py_ssize_t i = self._bucket(bid)
        cdef double u = _real(until)
        cdef double t = _real(now)
        if isnan(u):
            raise ValueError("until must not be NaN")
        self._buckets[i].paused_until = u
        self._rearm(i, t)

    def bucket_name(self, bid):
        return self._names[self._bucket(bid)]

    def bucket_rate(self, bid):
        """Tokens per second (``math.inf``: unlimited)."""
        return self._buckets[self._bucket(bid)].rate

    def bucket_tokens(self, bid, now):
        """Tokens available at ``now`` (never negative)."""
        cdef Py_ssize_t i = self._bucket(bid)
        cdef double t = _real(now)
        cdef double cur
        cdef _Bucket* b = &self._buckets[i]
        if b.rate == INFINITY:
            return b.burst
        cur = _current(b, t)
        return cur if cur > 0.0 else 0.0

    def bucket_waiters(self, bid):
        """How many queues wait for this bucket (a measure of its saturation)."""
        return self._buckets[self._bucket(bid)].nwait

    @cython.final
    cdef int _rearm(self, Py_ssize_t bid, double now) except -1:
        cdef _Bucket* b = &self._buckets[bid]
        if b.armed:
            b.armed = False
            b.gen += 1
        return self._arm(bid, now)

    @cython.final
    cdef int _arm(self, Py_ssize_t bid, double now) except -1:
        """Schedule the wake-up of a bucket that has waiters, when its next token is due."""
        cdef _Bucket* b = &self._buckets[bid]
        cdef _Wake w
        if b.nwait and not b.armed:
            b.armed = True
            w.at = now + _delay(b, now)
            w.bid = bid
            w.gen = b.gen
            _heappush(&self._wakeups, &self._nwakeups, &self._capwakeups, w)
        return 0

    # ------------------------------------------------------------------ queues

    @cython.final
    cdef Py_ssize_t* _bucket_ids(self, object buckets, Py_ssize_t* count) except NULL:
        """Bucket ids as a new C array (the caller frees it): all converted first, then
        checked in order, as in the twin."""
        cdef list ids = [_int(b, "ssize_t") for b in buckets]
        cdef Py_ssize_t n = len(ids), k
        cdef long long i
        for k in range(n):
            i = ids[k]
            if not 0 <= i < self._nbuckets:
                raise IndexError(f"no bucket {i}")
        cdef Py_ssize_t* out = <Py_ssize_t*>PyMem_Malloc((n if n else 1) * sizeof(Py_ssize_t))
        if out is NULL:
            raise MemoryError()
        for k in range(n):
            out[k] = ids[k]
        count[0] = n
        return out

    def add_queue(self, buckets):
        """A new queue limited by the given bucket ids (checked in that order); returns its id."""
        cdef Py_ssize_t n
        cdef Py_ssize_t* ids = self._bucket_ids(buckets, &n)
        if self._nqueues == self._capqueues:
            try:
                _grow(<void**>&self._queues, &self._capqueues, sizeof(_Queue))
            except MemoryError:
                PyMem_Free(ids)
                raise
        cdef _Queue* q = &self._queues[self._nqueues]
        q.items = NULL
        q.n = 0
        q.cap = 0
        q.buckets = ids
        q.nbuckets = n
        q.parked_on = -1
        q.released_from = -1
        q.key_prio = 0
        q.key_seq = 0
        q.state = _IDLE
        self._nqueues += 1
        return self._nqueues - 1

    @cython.final
    cdef Py_ssize_t _queue(self, object qid) except -1:
        """Check a queue id as the twin's ``_queue`` does; returns it as an index."""
        cdef long long i = _int(qid, "ssize_t")
        if not 0 <= i < self._nqueues:
            raise IndexError(f"no queue {i}")
        return <Py_ssize_t>i

    def set_queue_buckets(self, qid, buckets, now):
        """Replace a queue's buckets (rules changed); a parked queue gets checked again."""
        cdef Py_ssize_t i = self._queue(qid), n
        cdef Py_ssize_t* ids = self._bucket_ids(buckets, &n)
        cdef double t
        try:
            t = _real(now)
        except BaseException:
            PyMem_Free(ids)
            raise
        cdef _Queue* q = &self._queues[i]
        cdef _Bucket* b
        cdef _Turn key
        PyMem_Free(q.buckets)
        q.buckets = ids
        q.nbuckets = n
        if q.state != _PARKED:
            return
        key.prio = q.key_prio
        key.seq = q.key_seq
        key.qid = i
        b = &self._buckets[q.parked_on]
        b.nwait -= 1                    # its entry in the waiter heap is stale from now on
        q.state = _RUNNABLE
        q.parked_on = -1
        _heappush(&self._runnable, &self._nrunnable, &self._caprunnable, key)
        if not b.nwait and b.armed:
            b.armed = False
            b.gen += 1

    def queue_length(self, qid):
        """Messages waiting in the queue (not those pushed with a future ``due``)."""
        return self._queues[self._queue(qid)].n

    def held(self, qid, now):
        """Why the queue's head waits: ``(bucket id, earliest time it has a token)``, or None."""
        cdef Py_ssize_t i = self._queue(qid)
        cdef double t = _real(now)
        cdef _Queue* q = &self._queues[i]
        if q.state != _PARKED:
            return None
        return q.parked_on, t + _delay(&self._buckets[q.parked_on], t)

    # ------------------------------------------------------------------ messages

    def push(self, qid, item, now, priority=0, due=0.0):
        """Queue ``item``, at once or, if ``due > now``, when ``due`` comes."""
        cdef Py_ssize_t i = self._queue(qid)
        cdef double t = _real(now)
        cdef double d = _real(due)
        cdef long long prio = _int(priority, "long")
        cdef _Timer timer
        if isnan(d):
            raise ValueError("due must not be NaN")
        cdef long long seq = self._seq
        cdef Py_ssize_t slot = self._store(item)
        self._seq = seq + 1
        self._size += 1
        if d > t:
            timer.due = d
            timer.prio = prio
            timer.seq = seq
            timer.qid = i
            timer.slot = slot
            _heappush(&self._timers, &self._ntimers, &self._captimers, timer)
        else:
            self._enqueue(i, prio, seq, slot)

    def drain(self, qid, now):
        """Take every message waiting in the queue out of it, best first; future ``due`` stay."""
        cdef Py_ssize_t i = self._queue(qid)
        cdef double t = _real(now)
        cdef _Queue* q = &self._queues[i]
        cdef _Bucket* b
        cdef _Msg m
        cdef list items = []
        if q.state == _PARKED:
            b = &self._buckets[q.parked_on]
            b.nwait -= 1                    # its waiter entry is stale from now on
            if not b.nwait and b.armed:
                b.armed = False
                b.gen += 1
        if q.released_from >= 0:            # the bucket that let it go wakes its next waiter
            self._arm(q.released_from, t)
            q.released_from = -1
        q.state = _IDLE                     # a runnable entry left behind is stale
        q.parked_on = -1
        while q.n:
            m = _heappop(q.items, &q.n)
            items.append(self._release(m.slot))
        self._size -= len(items)
        return items

    @cython.final
    cdef int _enqueue(self, Py_ssize_t qid, long long prio, long long seq, Py_ssize_t slot) except -1:
        cdef _Queue* q = &self._queues[qid]
        cdef _Bucket* b
        cdef _Msg m
        cdef _Turn turn
        m.prio = prio
        m.seq = seq
        m.slot = slot
        _heappush(&q.items, &q.n, &q.cap, m)
        turn.prio = prio
        turn.seq = seq
        turn.qid = qid
        if q.state == _IDLE:
            q.state = _RUNNABLE
            q.key_prio = prio
            q.key_seq = seq
            _heappush(&self._runnable, &self._nrunnable, &self._caprunnable, turn)
        elif prio > q.key_prio:
            # A more urgent head: the queue moves up where it waits (its old entry goes stale).
            q.key_prio = prio
            q.key_seq = seq
            if q.state == _RUNNABLE:
                _heappush(&self._runnable, &self._nrunnable, &self._caprunnable, turn)
            else:
                b = &self._buckets[q.parked_on]
                _heappush(&b.waiters, &b.nentries, &b.capentries, turn)
        return 0

    @cython.final
    cdef int _advance(self, double now) except -1:
        """Move due timers into their queues and wake the buckets whose token is due."""
        cdef _Timer timer
        cdef _Wake w
        cdef _Turn turn
        cdef _Bucket* b
        cdef _Queue* q
        while self._ntimers and self._timers[0].due <= now:
            timer = _heappop(self._timers, &self._ntimers)
            self._enqueue(timer.qid, timer.prio, timer.seq, timer.slot)
        while self._nwakeups and self._wakeups[0].at <= now:
            w = _heappop(self._wakeups, &self._nwakeups)
            b = &self._buckets[w.bid]
            if w.gen != b.gen or not b.armed:
                continue
            b.armed = False
            while b.nentries:
                turn = _heappop(b.waiters, &b.nentries)
                q = &self._queues[turn.qid]
                if (q.state != _PARKED or q.parked_on != w.bid
                        or q.key_prio != turn.prio or q.key_seq != turn.seq):
                    continue                # stale
                b.nwait -= 1
                q.state = _RUNNABLE
                q.parked_on = -1
                q.released_from = w.bid
                _heappush(&self._runnable, &self._nrunnable, &self._caprunnable, turn)
                break
        return 0

    def pop(self, now):
        """The next message allowed to go at ``now``, as ``(queue id, item)``; None if all are held."""
        cdef double t = _real(now)
        cdef _Turn turn
        cdef _Queue* q
        cdef _Bucket* b
        cdef _Msg m
        cdef Py_ssize_t released_from, blocked, k
        while True:
            self._advance(t)
            if not self._nrunnable:
                return None
            turn = _heappop(self._runnable, &self._nrunnable)
            q = &self._queues[turn.qid]
            if q.state != _RUNNABLE or q.key_prio != turn.prio or q.key_seq != turn.seq:
                continue                    # stale: the queue moved up meanwhile
            released_from = q.released_from
            q.released_from = -1
            blocked = -1
            for k in range(q.nbuckets):
                if _delay(&self._buckets[q.buckets[k]], t) > 0.0:
                    blocked = q.buckets[k]
                    break
            if blocked >= 0:
                q.state = _PARKED
                q.parked_on = blocked
                b = &self._buckets[blocked]
                _heappush(&b.waiters, &b.nentries, &b.capentries, turn)
                b.nwait += 1
                self._arm(blocked, t)
                if released_from >= 0:
                    self._arm(released_from, t)
                continue
            for k in range(q.nbuckets):
                _take(&self._buckets[q.buckets[k]], t)
            m = _heappop(q.items, &q.n)
            if q.n:
                turn.prio = q.items[0].prio
                turn.seq = self._seq
                self._seq += 1
                q.key_prio = turn.prio
                q.key_seq = turn.seq
                _heappush(&self._runnable, &self._nrunnable, &self._caprunnable, turn)
            else:
                q.state = _IDLE
            if released_from >= 0:
                self._arm(released_from, t)
            self._size -= 1
            return turn.qid, self._release(m.slot)

    def next_wakeup(self):
        """The earliest time ``pop`` may return a message: ``-math.inf`` if one may go now,
        ``math.inf`` if nothing waits for a time."""
        cdef double t
        cdef _Wake* w
        cdef _Bucket* b
        if self._nrunnable:
            return -INFINITY
        t = self._timers[0].due if self._ntimers else INFINITY
        while self._nwakeups:
            w = &self._wakeups[0]
            b = &self._buckets[w.bid]
            if w.gen == b.gen and b.armed:
                return w.at if w.at < t else t
            _heappop(self._wakeups, &self._nwakeups)
        return t

    def scheduled(self):
        """Messages pushed with a future ``due`` that has not come yet."""
        return self._ntimers

    def __len__(self):
        """Every message not yet popped."""
        return self._size
