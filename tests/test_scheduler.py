"""Scheduler twins: every test runs on both via the ``sched`` fixture, and a
state machine drives both side by side to prove they agree result for result."""

import gc
import importlib
import math
import os
import random
import sys
import weakref

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

NO_EXTENSIONS = os.environ.get("SENDER_NO_EXTENSIONS") == "1"
NAN = math.nan
INF = math.inf

# ``sched`` is a module, not per-test state, so reusing it across examples is safe.
fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)


# --- TimerHeap ---------------------------------------------------------------


def test_orders_by_due(sched):
    h = sched.TimerHeap()
    for due, item in [(3.0, "c"), (1.0, "a"), (2.0, "b"), (-1.0, "neg"), (INF, "never")]:
        h.push(due, item)
    assert len(h) == 5
    assert h.peek_due() == -1.0
    assert [h.pop() for _ in range(5)] == ["neg", "a", "b", "c", "never"]


def test_equal_due_higher_priority_first_then_fifo(sched):
    h = sched.TimerHeap()
    h.push(5.0, "low-1", priority=-1)
    h.push(5.0, "mid-1")
    h.push(5.0, "high-1", priority=7)
    h.push(5.0, "mid-2", 0)
    h.push(5.0, "high-2", priority=7)
    h.push(4.0, "earlier", priority=-100)
    assert h.pop_due(5.0) == ["earlier", "high-1", "high-2", "mid-1", "mid-2", "low-1"]


def test_fifo_survives_many_equal_keys(sched):
    h = sched.TimerHeap()
    for i in range(1000):
        h.push(1.0, i)
    assert h.pop_due(1.0) == list(range(1000))


def test_pop_due_takes_only_due_items(sched):
    h = sched.TimerHeap()
    for due in [1.0, 2.0, 2.0, 3.0]:
        h.push(due, due)
    assert h.pop_due(0.5) == []
    assert h.pop_due(2.0) == [1.0, 2.0, 2.0]
    assert len(h) == 1
    assert h.peek_due() == 3.0


def test_pop_due_limit(sched):
    h = sched.TimerHeap()
    for i in range(5):
        h.push(float(i), i)
    assert h.pop_due(10.0, 0) == []
    assert h.pop_due(10.0, limit=2) == [0, 1]
    assert h.pop_due(10.0, limit=-1) == [2, 3, 4]
    assert h.pop_due(10.0, limit=5) == []


def test_empty_heap(sched):
    h = sched.TimerHeap()
    assert len(h) == 0
    assert not h
    assert h.peek_due() == INF
    assert h.pop_due(INF) == []
    with pytest.raises(IndexError, match=r"^pop from empty TimerHeap$"):
        h.pop()


def test_clear(sched):
    h = sched.TimerHeap()
    for i in range(100):
        h.push(i, i)
    h.clear()
    assert len(h) == 0
    assert h.peek_due() == INF
    h.push(1.0, "again")
    assert h.pop() == "again"


def test_bad_push_arguments(sched):
    h = sched.TimerHeap()
    with pytest.raises(ValueError, match="due"):
        h.push(NAN, "x")
    with pytest.raises(TypeError):
        h.push("1.0", "x")
    with pytest.raises(TypeError):
        h.push(1.0, "x", priority=1.5)
    with pytest.raises(OverflowError):
        h.push(1.0, "x", priority=2**63)
    assert len(h) == 0
    h.push(1, "int due", priority=True)  # ints and bools convert like C parameters
    assert h.peek_due() == 1.0


def test_items_are_never_compared(sched):
    h = sched.TimerHeap()
    a, b = {"x": 1}, {"x": 2}  # dicts do not support <
    h.push(1.0, a)
    h.push(1.0, b)
    assert h.pop() is a
    assert h.pop() is b


def test_matches_sorted_order(sched):
    rng = random.Random(1234)
    h = sched.TimerHeap()
    entries = []
    for seq in range(2000):
        due, prio = float(rng.randrange(50)), rng.randrange(-3, 4)
        h.push(due, seq, prio)
        entries.append((due, -prio, seq))
    entries.sort()
    assert h.pop_due(10.0, limit=100) == [seq for _, _, seq in entries[:100]]
    del entries[:100]
    # Push again so freed slots get reused.
    for seq in range(2000, 2500):
        due, prio = float(rng.randrange(50)), rng.randrange(-3, 4)
        h.push(due, seq, prio)
        entries.append((due, -prio, seq))
    assert h.pop_due(INF) == [seq for _, _, seq in sorted(entries)]


def test_items_are_released(sched):
    class Item:
        pass

    h = sched.TimerHeap()
    kept = Item()
    before = sys.getrefcount(kept)
    h.push(1.0, kept)
    assert sys.getrefcount(kept) == before + 1
    assert h.pop() is kept
    assert sys.getrefcount(kept) == before

    dropped = Item()
    ref = weakref.ref(dropped)
    h.push(1.0, dropped)
    del dropped
    assert ref() is not None
    h.clear()
    assert ref() is None


def test_cycles_through_heap_are_collected(sched):
    class Timer:
        pass

    h = sched.TimerHeap()
    t = Timer()
    t.heap = h  # item -> heap -> item
    h.push(1.0, t)
    ref = weakref.ref(t)
    del h, t
    gc.collect()
    assert ref() is None


def test_subclass_may_define_init(sched):
    class Named(sched.TimerHeap):
        def __init__(self, name):
            super().__init__()
            self.name = name

    h = Named("retries")
    h.push(1.0, "x")
    assert (h.name, len(h)) == ("retries", 1)


# --- TokenBucket -------------------------------------------------------------


def test_bucket_refill_math(sched):
    b = sched.TokenBucket(rate=10.0, burst=5.0)
    assert [b.try_take(0.0) for _ in range(5)] == [True] * 5
    assert b.try_take(0.0) is False
    assert b.delay(0.0) == pytest.approx(0.1)
    assert b.tokens(0.0) == 0.0
    assert b.try_take(0.1) is True
    assert b.try_take(0.1) is False
    assert b.tokens(0.35) == pytest.approx(2.5)


def test_bucket_starts_full_and_caps_at_burst(sched):
    b = sched.TokenBucket(2.0, 3.0, now=100.0)
    assert b.tokens(100.0) == 3.0
    assert b.tokens(1e6) == 3.0
    assert b.delay(100.0, 3.0) == 0.0
    assert b.try_take(100.0, 3.0)
    assert b.delay(100.0, 3.0) == pytest.approx(1.5)


def test_bucket_takes_fractions_and_never_more_than_burst(sched):
    b = sched.TokenBucket(1.0, 2.0)
    assert b.try_take(0.0, 0.5)
    assert b.tokens(0.0) == 1.5
    assert b.try_take(0.0, 0.0)
    assert b.try_take(0.0, 2.5) is False
    assert b.delay(0.0, 2.5) == INF


def test_bucket_ignores_clock_going_back(sched):
    b = sched.TokenBucket(1.0, 1.0, now=10.0)
    assert b.try_take(10.0)
    assert b.tokens(5.0) == 0.0
    assert b.try_take(5.0) is False
    assert b.delay(10.0) == pytest.approx(1.0)
    assert b.try_take(11.0)


def test_set_rate(sched):
    b = sched.TokenBucket(10.0, 5.0)
    assert b.try_take(0.0, 1.0)  # 4 left
    b.set_rate(1.0, 2.0, now=0.0)
    assert (b.rate, b.burst) == (1.0, 2.0)
    assert b.tokens(0.0) == 2.0  # capped at the new burst
    b.set_rate(100.0, 50.0, now=0.0)
    assert b.tokens(0.0) == 2.0  # kept, not topped up
    assert b.tokens(0.1) == pytest.approx(12.0)  # new rate applies from now on


def test_set_rate_counts_elapsed_time_at_old_rate(sched):
    b = sched.TokenBucket(1.0, 10.0)
    assert b.try_take(0.0, 10.0)
    b.set_rate(100.0, 10.0, now=2.0)
    assert b.tokens(2.0) == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("rate", "burst", "name"),
    [(0.0, 5.0, "rate"), (-1.0, 5.0, "rate"), (NAN, 5.0, "rate"), (1.0, 0.5, "burst"), (1.0, NAN, "burst")],
)
def test_bucket_value_errors_name_the_argument(sched, rate, burst, name):
    with pytest.raises(ValueError, match=f"^{name} "):
        sched.TokenBucket(rate, burst)
    b = sched.TokenBucket(1.0, 1.0)
    with pytest.raises(ValueError, match=f"^{name} "):
        b.set_rate(rate, burst, 0.0)
    assert (b.rate, b.burst) == (1.0, 1.0)


def test_bucket_rejects_negative_n(sched):
    b = sched.TokenBucket(1.0, 1.0)
    for fn in (b.try_take, b.delay):
        with pytest.raises(ValueError, match="^n "):
            fn(0.0, -1.0)
        with pytest.raises(ValueError, match="^n "):
            fn(0.0, NAN)


def test_rate_and_burst_are_read_only(sched):
    b = sched.TokenBucket(1.0, 2.0)
    with pytest.raises(AttributeError):
        b.rate = 5.0
    with pytest.raises(AttributeError):
        b.burst = 5.0
    assert isinstance(b.rate, float) and isinstance(b.burst, float)


@fixture_ok
@given(
    rate=st.floats(1e-3, 1e6),
    burst=st.floats(1.0, 1e6),
    start=st.floats(0.0, 1e9),
    drain=st.floats(0.0, 1.0),
    n_frac=st.floats(0.0, 1.0),
)
def test_waiting_delay_is_always_enough(sched, rate, burst, start, drain, n_frac):
    # A trio task sleeps delay() then retries; with autojump_clock it wakes at
    # exactly now + delay, so float rounding must not make the retry fail.
    b = sched.TokenBucket(rate, burst, now=start)
    assert b.try_take(start, burst * drain)
    n = burst * n_frac
    d = b.delay(start, n)
    assert d >= 0.0
    assert b.try_take(start + d, n)


# --- the twins agree ---------------------------------------------------------

dues = st.one_of(st.floats(-1e6, 1e6), st.sampled_from([0.0, 1.0, INF, -INF, NAN]))
priorities = st.one_of(st.integers(-3, 3), st.sampled_from([-(2**63), 2**63 - 1, 2**63]))
amounts = st.one_of(st.floats(0.0, 20.0), st.sampled_from([0.0, 1.0, -1.0, NAN, 1e9]))
rates = st.one_of(st.floats(0.01, 1e4), st.sampled_from([0.0, -1.0, NAN, INF]))
bursts = st.one_of(st.floats(1.0, 100.0), st.sampled_from([0.5, 1.0, NAN, INF]))


def outcome(fn, *args):
    """Result, or exception type and message, comparable across twins."""
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # noqa: BLE001 - the point is to compare any error
        return ("raised", type(exc), str(exc))


class TwinsAgree(RuleBasedStateMachine):
    """Same operations on both twins; every result and error must be identical."""

    def __init__(self):
        super().__init__()
        self.mods = [importlib.import_module(f"sender._scheduler_{n}") for n in ("c", "py")]
        self.heaps = [m.TimerHeap() for m in self.mods]
        self.buckets = None
        self.now = 0.0
        self.items = 0

    def same(self, method, *args, objs=None):
        got = [outcome(getattr(o, method), *args) for o in (objs or self.heaps)]
        assert got[0] == got[1], (method, args, got)
        return got[0]

    @rule(due=dues, priority=priorities)
    def push(self, due, priority):
        self.items += 1
        self.same("push", due, self.items, priority)

    @rule()
    def pop(self):
        self.same("pop")

    @rule(now=dues, limit=st.integers(-2, 6))
    def pop_due(self, now, limit):
        self.same("pop_due", now, limit)

    @rule()
    def clear(self):
        self.same("clear")

    @invariant()
    def heaps_look_alike(self):
        c, py = self.heaps
        assert len(c) == len(py)
        assert c.peek_due() == py.peek_due()

    @rule(rate=rates, burst=bursts, dt=st.floats(0.0, 10.0))
    def new_bucket(self, rate, burst, dt):
        got = [outcome(m.TokenBucket, rate, burst, self.now + dt) for m in self.mods]
        assert [g[0] for g in got] == [got[0][0]] * 2, got
        if got[0][0] == "raised":
            assert got[0][1:] == got[1][1:]
        else:
            self.buckets = [g[1] for g in got]

    @rule(dt=st.one_of(st.floats(0.0, 2.0), st.floats(-1.0, 0.0), st.just(0.0)))
    def tick(self, dt):
        self.now += dt

    @precondition(lambda self: self.buckets)
    @rule(n=amounts)
    def try_take(self, n):
        self.same("try_take", self.now, n, objs=self.buckets)

    @precondition(lambda self: self.buckets)
    @rule(n=amounts)
    def delay(self, n):
        self.same("delay", self.now, n, objs=self.buckets)

    @precondition(lambda self: self.buckets)
    @rule(rate=rates, burst=bursts)
    def set_rate(self, rate, burst):
        self.same("set_rate", rate, burst, self.now, objs=self.buckets)

    @invariant()
    def buckets_look_alike(self):
        if self.buckets:
            c, py = self.buckets
            assert (c.rate, c.burst, c.tokens(self.now)) == (py.rate, py.burst, py.tokens(self.now))


TestTwinsAgree = pytest.mark.skipif(NO_EXTENSIONS, reason="SENDER_NO_EXTENSIONS=1")(TwinsAgree.TestCase)
TestTwinsAgree.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)


# --- Scheduler: queues behind token buckets ------------------------------------


def drain(s, now=0.0, until=INF):
    """Pop everything that can go before ``until``, jumping the clock to each wake-up as a trio
    task sleeping on ``next_wakeup()`` would; returns [(time, queue, item)]."""
    out = []
    while len(s):
        got = s.pop(now)
        if got is None:
            now = s.next_wakeup()
            assert now > -INF
            if now == INF or now >= until:
                break
            continue
        out.append((now, *got))
    return out


def test_domain_limit_never_exceeded_in_any_minute(sched):
    s = sched.Scheduler()
    domain = s.add_bucket("domain:example.com", 10 / 60, 1.0, 0.0)
    q = s.add_queue([domain])
    for i in range(1000):
        s.push(q, i, 0.0)
    sent = drain(s)
    assert [item for _, _, item in sent] == list(range(1000))
    times = [t for t, _, _ in sent]
    j = 0
    for i, t in enumerate(times):       # every window [t, t + 60)
        while j < len(times) and times[j] < t + 60:
            j += 1
        assert j - i <= 10
    assert times[-1] == pytest.approx(999 * 6.0)       # and the limit is used in full


def test_a_blocked_queue_never_delays_another(sched):
    s = sched.Scheduler()
    slow = s.add_bucket("provider:slow", 1 / 3600, 1.0, 0.0)
    s_q, fast_q = s.add_queue([slow]), s.add_queue([])
    for i in range(100):
        s.push(s_q, ("slow", i), 0.0)
        s.push(fast_q, ("fast", i), 0.0)
    first = drain(s, until=1.0)
    assert [item for _, q, item in first if q == fast_q] == [("fast", i) for i in range(100)]
    assert [item for _, q, item in first if q == s_q] == [("slow", 0)]
    assert all(t == 0.0 for t, _, _ in first)
    assert s.held(s_q, 0.0) == (slow, pytest.approx(3600.0))
    assert s.bucket_name(s.held(s_q, 0.0)[0]) == "provider:slow"
    assert s.held(fast_q, 0.0) is None
    assert s.bucket_waiters(slow) == 1


def test_shared_bucket_holds_across_queues_which_take_turns(sched):
    s = sched.Scheduler()
    customer = s.add_bucket("customer:acme", 2.0, 1.0, 0.0)
    queues = [s.add_queue([customer, s.add_bucket(f"domain:{d}", 100.0, 1.0, 0.0)]) for d in "abc"]
    for q in queues:
        for i in range(4):
            s.push(q, i, 0.0)
    sent = drain(s)
    assert [t for t, _, _ in sent] == pytest.approx([i * 0.5 for i in range(12)])
    assert [q for _, q, _ in sent] == queues * 4           # round robin, no queue starves


def test_higher_priority_goes_first_within_the_same_limits(sched):
    s = sched.Scheduler()
    customer = s.add_bucket("customer:acme", 1.0, 1.0, 0.0)
    marketing, receipts = s.add_queue([customer]), s.add_queue([customer])
    for i in range(5):
        s.push(marketing, ("bulk", i), 0.0, priority=0)
    s.push(marketing, ("urgent-same-queue", 0), 0.0, priority=5)
    for i in range(3):
        s.push(receipts, ("receipt", i), 0.0, priority=10)
    order = [item for _, _, item in drain(s)]
    assert order[:4] == [("receipt", 0), ("receipt", 1), ("receipt", 2), ("urgent-same-queue", 0)]
    assert order[4:] == [("bulk", i) for i in range(5)]


def test_future_due_waits_in_the_timer_heap(sched):
    s = sched.Scheduler()
    q = s.add_queue([])
    s.push(q, "later", 0.0, due=30.0)
    s.push(q, "now", 0.0)
    assert s.scheduled() == 1 and len(s) == 2 and s.queue_length(q) == 1
    assert s.pop(0.0) == (q, "now")
    assert s.pop(29.9) is None
    assert s.next_wakeup() == 30.0
    assert s.pop(30.0) == (q, "later")
    assert len(s) == 0 and s.next_wakeup() == INF


def test_next_wakeup_is_minus_inf_when_something_can_go(sched):
    s = sched.Scheduler()
    q = s.add_queue([])
    assert s.next_wakeup() == INF
    s.push(q, 1, 0.0)
    assert s.next_wakeup() == -INF


def test_rate_change_retimes_the_waiters(sched):
    s = sched.Scheduler()
    b = s.add_bucket("ip:127.0.0.2", 1 / 100, 1.0, 0.0)
    q = s.add_queue([b])
    s.push(q, 1, 0.0)
    s.push(q, 2, 0.0)
    assert s.pop(0.0) == (q, 1) and s.pop(0.0) is None
    assert s.next_wakeup() == pytest.approx(100.0)
    s.set_bucket(b, 1.0, 1.0, 10.0)      # 10 s at 0.01/s = 0.1 token, then 1/s: 0.9 s more
    assert s.bucket_rate(b) == 1.0
    assert s.next_wakeup() == pytest.approx(10.9)
    assert s.pop(10.9) == (q, 2)
    s.set_bucket(b, INF, 1.0, 11.0)       # lifted: unlimited
    for i in range(100):
        s.push(q, i, 11.0)
    assert len(drain(s, 11.0, until=11.0)) == 100


def test_pause_holds_a_bucket_until_it_ends(sched):
    s = sched.Scheduler()
    b = s.add_bucket("site:mx.example", INF, 1.0, 0.0)
    q = s.add_queue([b])
    s.pause_bucket(b, 60.0, 0.0)
    s.push(q, "x", 0.0)
    assert s.pop(0.0) is None
    assert s.held(q, 0.0) == (b, 60.0)
    assert s.pop(59.0) is None
    assert s.pop(60.0) == (q, "x")
    s.pause_bucket(b, INF, 60.0)
    s.push(q, "y", 60.0)
    assert s.pop(1e9) is None and s.next_wakeup() == INF
    s.pause_bucket(b, -INF, 100.0)         # lifted by hand
    assert s.next_wakeup() == 100.0
    assert s.pop(100.0) == (q, "y")


def test_new_buckets_for_a_queue_release_it(sched):
    s = sched.Scheduler()
    old = s.add_bucket("domain:old", 1 / 3600, 1.0, 0.0)
    q = s.add_queue([old])
    for i in range(3):
        s.push(q, i, 0.0)
    assert s.pop(0.0) == (q, 0) and s.pop(0.0) is None
    s.set_queue_buckets(q, [], 1.0)
    assert s.bucket_waiters(old) == 0
    assert [item for _, _, item in drain(s, 1.0, until=1.0)] == [1, 2]


def test_scheduler_errors_name_what_is_wrong(sched):
    s = sched.Scheduler()
    with pytest.raises(ValueError, match="^rate "):
        s.add_bucket("x", 0.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="^burst "):
        s.add_bucket("x", 1.0, 0.0, 0.0)
    with pytest.raises(IndexError, match="no bucket 3"):
        s.add_queue([3])
    q = s.add_queue([])
    with pytest.raises(IndexError, match="no queue 7"):
        s.push(7, "x", 0.0)
    with pytest.raises(ValueError, match="due must not be NaN"):
        s.push(q, "x", 0.0, due=NAN)
    with pytest.raises(TypeError):
        s.push(q, "x", "now")
    assert len(s) == 0


def test_scheduler_releases_items(sched):
    class Item:
        pass

    s = sched.Scheduler()
    q = s.add_queue([])
    refs = []
    for due in (0.0, 5.0):
        item = Item()
        refs.append(weakref.ref(item))
        s.push(q, item, 0.0, due=due)
        del item
    assert s.pop(0.0) is not None and s.pop(5.0) is not None
    gc.collect()
    assert [r() for r in refs] == [None, None]


class SchedulersAgree(RuleBasedStateMachine):
    """Same operations on both Scheduler twins: identical pops, holds, wake-ups and errors."""

    def __init__(self):
        super().__init__()
        self.twins = [importlib.import_module(f"sender._scheduler_{n}").Scheduler() for n in ("c", "py")]
        self.now = 0.0
        self.n_buckets = 0
        self.n_queues = 0
        self.items = 0

    def same(self, method, *args):
        got = [outcome(getattr(s, method), *args) for s in self.twins]
        assert got[0] == got[1], (method, args, got)
        return got[0]

    @rule(rate=st.one_of(st.floats(0.01, 100.0), st.sampled_from([INF, 0.0, NAN])),
          burst=st.one_of(st.floats(1.0, 5.0), st.sampled_from([1.0, 0.5])))
    def add_bucket(self, rate, burst):
        if self.same("add_bucket", f"b{self.n_buckets}", rate, burst, self.now)[0] == "ok":
            self.n_buckets += 1

    @rule(data=st.data())
    def add_queue(self, data):
        ids = data.draw(st.lists(st.integers(0, self.n_buckets), max_size=4, unique=True))
        if self.same("add_queue", ids)[0] == "ok":
            self.n_queues += 1

    @precondition(lambda self: self.n_queues)
    @rule(data=st.data(), priority=st.integers(-2, 2), later=st.one_of(st.just(0.0), st.floats(0.0, 20.0)))
    def push(self, data, priority, later):
        self.items += 1
        qid = data.draw(st.integers(0, self.n_queues))
        self.same("push", qid, self.items, self.now, priority, self.now + later)

    @rule(n=st.integers(1, 8))
    def pop(self, n):
        for _ in range(n):
            self.same("pop", self.now)

    @rule(dt=st.one_of(st.floats(0.0, 5.0), st.just(0.0)))
    def tick(self, dt):
        self.now += dt

    @rule()
    def jump_to_wakeup(self):
        t = self.same("next_wakeup")[1]
        if self.now < t < INF:
            self.now = t

    @precondition(lambda self: self.n_buckets)
    @rule(data=st.data(), rate=st.one_of(st.floats(0.01, 100.0), st.just(INF)), burst=st.floats(1.0, 5.0))
    def set_bucket(self, data, rate, burst):
        self.same("set_bucket", data.draw(st.integers(0, self.n_buckets - 1)), rate, burst, self.now)

    @precondition(lambda self: self.n_buckets)
    @rule(data=st.data(), pause=st.one_of(st.floats(0.0, 30.0), st.sampled_from([-INF, INF])))
    def pause_bucket(self, data, pause):
        self.same("pause_bucket", data.draw(st.integers(0, self.n_buckets - 1)), self.now + pause, self.now)

    @precondition(lambda self: self.n_queues)
    @rule(data=st.data())
    def set_queue_buckets(self, data):
        qid = data.draw(st.integers(0, self.n_queues - 1))
        ids = data.draw(st.lists(st.integers(0, max(self.n_buckets - 1, 0)), max_size=3, unique=True))
        self.same("set_queue_buckets", qid, ids if self.n_buckets else [], self.now)

    @precondition(lambda self: self.n_queues)
    @rule(data=st.data())
    def drain(self, data):
        self.same("drain", data.draw(st.integers(0, self.n_queues)), self.now)

    @invariant()
    def look_alike(self):
        c, py = self.twins
        assert (len(c), c.scheduled(), c.next_wakeup()) == (len(py), py.scheduled(), py.next_wakeup())
        for qid in range(self.n_queues):
            assert c.held(qid, self.now) == py.held(qid, self.now)
            assert c.queue_length(qid) == py.queue_length(qid)
        for bid in range(self.n_buckets):
            assert c.bucket_tokens(bid, self.now) == py.bucket_tokens(bid, self.now)
            assert c.bucket_waiters(bid) == py.bucket_waiters(bid)


TestSchedulersAgree = pytest.mark.skipif(NO_EXTENSIONS, reason="SENDER_NO_EXTENSIONS=1")(SchedulersAgree.TestCase)
TestSchedulersAgree.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)


def test_drain_takes_a_queue_out_best_first_and_the_bucket_serves_the_others(sched):
    s = sched.Scheduler()
    b = s.add_bucket("path", 1.0, 1.0, 0.0)
    q1, q2 = s.add_queue([b]), s.add_queue([b])
    for item, prio in (("a1", 0), ("a2", 5), ("a3", 0), ("a4", 5)):
        s.push(q1, item, 0.0, priority=prio)
    s.push(q2, "b1", 0.0)
    s.push(q1, "later", 0.0, due=50.0)
    assert s.pop(0.0) == (q1, "a2")
    assert s.pop(0.0) is None                       # both queues wait for the bucket
    assert s.drain(q1, 0.5) == ["a4", "a1", "a3"]
    assert s.queue_length(q1) == 0 and len(s) == 2  # b1 and the one due later
    assert s.pop(1.0) == (q2, "b1")                 # the bucket still serves q2
    assert s.drain(q2, 1.0) == []
    assert s.pop(50.0) == (q1, "later")             # a future push stays where it was
    s.push(q1, "again", 60.0)
    assert s.pop(60.0) == (q1, "again")


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["push", "pop", "drain", "tick"]), st.integers(0, 5),
                              st.integers(-1, 1)), max_size=60))
def test_after_drains_every_message_still_leaves_once(ops):
    """Liveness: draining a queue never strands the queues waiting on the same buckets."""
    for name in (("c", "py") if not NO_EXTENSIONS else ("py",)):
        s = importlib.import_module(f"sender._scheduler_{name}").Scheduler()
        # Buckets whose tokens come due together, so one pop wakes several queues.
        b = [s.add_bucket(f"b{i}", 1.0, 1.0, 0.0) for i in range(2)]
        queues = [s.add_queue([b[i % 2]]) for i in range(5)] + [s.add_queue(b)]
        now, pushed, out = 0.0, set(), []
        for op, q, prio in ops:
            if op == "push":
                pushed.add(len(pushed))
                s.push(queues[q], len(pushed) - 1, now, prio)
            elif op == "pop":
                got = s.pop(now)
                out += [got[1]] if got else []
            elif op == "drain":
                out += s.drain(queues[q], now)
            else:
                now += 1.0
        while len(s):
            got = s.pop(now)
            if got is None:
                now = s.next_wakeup()
                assert now < INF, "a queue is stranded"
            else:
                out.append(got[1])
        assert sorted(out) == sorted(pushed)


def test_drain_of_a_queue_a_bucket_just_woke_passes_the_wake_up_on(sched):
    """One pop can wake a queue on each of two buckets and serve only one of them; the other
    is runnable with the bucket's turn. Drained then, it must hand that turn on."""
    s = sched.Scheduler()
    b0, b1 = s.add_bucket("b0", 1.0, 1.0, 0.0), s.add_bucket("b1", 1.0, 1.0, 0.0)
    a0, a1, a2, a3 = s.add_queue([b0]), s.add_queue([b1]), s.add_queue([b1]), s.add_queue([b0])
    for q, item in ((a1, "m0"), (a3, "m1"), (a0, "m2"), (a2, "m3")):
        s.push(q, item, 0.0)
    assert s.pop(0.0) == (a1, "m0")
    s.push(a1, "m4", 0.0)
    assert s.pop(0.0) == (a3, "m1")
    assert s.pop(0.0) is None                       # m2 waits on b0; m3 and m4 on b1
    assert s.pop(1.0) == (a0, "m2")                 # both buckets woke a queue; b0's went
    assert s.drain(a2, 1.0) == ["m3"]               # b1 had let a2 go: a1 is next in line
    assert s.pop(1.0) == (a1, "m4")


def test_a_waiting_queue_moves_up_when_a_more_urgent_message_comes(sched):
    s = sched.Scheduler()
    qa, qb = s.add_queue([]), s.add_queue([])
    s.push(qa, "a-bulk", 0.0, priority=0)
    for i in range(3):
        s.push(qb, f"b-mid{i}", 0.0, priority=5)
    s.push(qa, "a-urgent", 0.0, priority=10)
    assert [s.pop(0.0)[1] for _ in range(5)] == ["a-urgent", "b-mid0", "b-mid1", "b-mid2", "a-bulk"]
    # The same for queues parked on a bucket.
    b = s.add_bucket("customer:acme", 1.0, 1.0, 0.0)
    qc, qd = s.add_queue([b]), s.add_queue([b])
    s.push(qc, "c-bulk0", 0.0)
    s.push(qc, "c-bulk1", 0.0)
    for i in range(3):
        s.push(qd, f"d-mid{i}", 0.0, priority=5)
    assert s.pop(0.0) == (qd, "d-mid0") and s.pop(0.0) is None
    s.push(qc, "c-urgent", 0.0, priority=10)
    assert s.bucket_waiters(b) == 2
    assert [item for _, _, item in drain(s)] == ["c-urgent", "d-mid1", "d-mid2", "c-bulk0", "c-bulk1"]
