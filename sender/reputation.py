"""How a sending IP is doing at one mailbox provider, and how fast it may send there.

:class:`Reputation` keeps rolling windows of outcomes per (source, provider) and turns them into
a health score; :class:`AIMD` is the closed-loop message rate of one (source, provider) pair.
Neither reads a clock: every call takes ``now`` in seconds, so tests and replays choose time.
"""

from __future__ import annotations

import math

import msgspec

from .config import AdaptiveRate, parse_duration, parse_rate

__all__ = ["AIMD", "COMPLAINT_WEIGHT", "Counts", "EVENTS", "OUTCOME_WEIGHTS", "Reputation"]

EVENTS = ("delivered", "deferred", "bounced", "complaint")

# What one deferral or bounce of a category costs, as a share of one attempt. Providers rate a
# sending IP mostly by what their filters and users think of its mail, so replies that say so
# (blocked, listed, judged spam, failed authentication, slowed down for reputation) cost most.
# Greylisting and failed connections happen to any sender and cost a little; recipient-list
# problems say more about the list than about the IP and cost little.
OUTCOME_WEIGHTS: dict[str, float] = {
    "blocklisted_ip": 4.0,
    "spam_content": 3.0,
    "policy_block": 3.0,
    "auth_failure": 2.0,
    "rate_limited": 2.0,
    "tls_required": 0.5,
    "relay_denied": 0.5,
    "transient_other": 0.5,
    "permanent_other": 0.5,
    "service_unavailable": 0.3,
    "connection_failure": 0.3,
    "dns_failure": 0.3,
    "expired": 0.3,
    "greylisted": 0.2,
    "invalid_recipient": 0.2,
    "bad_domain": 0.1,
    "inactive_mailbox": 0.1,
    "message_too_large": 0.1,
    "mailbox_full": 0.05,
}
_UNKNOWN_WEIGHT = 0.5

# One complaint costs this many attempts. Gmail and Yahoo ask bulk senders to stay below a 0.3%
# spam-complaint rate; at that rate the score loses 0.3, and 1% of complaints alone takes it to 0.
COMPLAINT_WEIGHT = 100.0


class Counts(msgspec.Struct):
    """Outcomes of one (source, provider) pair within the window; ``categories`` counts the
    deferrals and bounces by the classifier's category."""

    delivered: int = 0
    deferred: int = 0
    bounced: int = 0
    complaints: int = 0
    categories: dict[str, int] = msgspec.field(default_factory=dict)


class _SliceState(msgspec.Struct, array_like=True):
    start: float
    delivered: int
    deferred: int
    bounced: int
    complaints: int
    categories: dict[str, int]


class _PairState(msgspec.Struct, array_like=True):
    source: str
    provider: str
    slices: list[_SliceState]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[_PairState])

_FIELDS = {"delivered": 0, "deferred": 1, "bounced": 2, "complaint": 3}


class _Ring:
    """Per-slice counters of one pair plus their running totals.

    Slice ``i`` covers ``[i * width, (i + 1) * width)`` and lives in slot ``i % slots``. Moving
    ``head`` forward clears the slots it passes over and takes them off the totals, so a record
    costs O(1) amortized and a read costs O(1) once the ring has caught up with ``now``.
    """

    __slots__ = ("head", "counts", "categories", "totals", "total_categories")

    def __init__(self, slots: int) -> None:
        self.head = -math.inf
        self.counts = [[0, 0, 0, 0] for _ in range(slots)]
        self.categories: list[dict[str, int]] = [{} for _ in range(slots)]
        self.totals = [0, 0, 0, 0]
        self.total_categories: dict[str, int] = {}

    def advance(self, index: int) -> None:
        slots = len(self.counts)
        if index <= self.head:
            return
        first = index - slots + 1 if index - self.head >= slots else int(self.head) + 1
        for i in range(first, index + 1):
            slot = i % slots
            for f, n in enumerate(self.counts[slot]):
                self.totals[f] -= n
            self.counts[slot] = [0, 0, 0, 0]
            for cat, n in self.categories[slot].items():
                left = self.total_categories[cat] - n
                if left:
                    self.total_categories[cat] = left
                else:
                    del self.total_categories[cat]
            self.categories[slot] = {}
        self.head = index

    def add(self, index: int, field: int, category: str, n: int = 1) -> None:
        slot = index % len(self.counts)
        self.counts[slot][field] += n
        self.totals[field] += n
        if category:
            cats = self.categories[slot]
            cats[category] = cats.get(category, 0) + n
            self.total_categories[category] = self.total_categories.get(category, 0) + n


class Reputation:
    """Rolling windows of delivery outcomes per (source, provider).

    Args:
      window: seconds of history a score looks at.
      slots: how many slices the window is cut into; history leaves a slice at a time, so the
        window really covers between ``window - window / slots`` and ``window`` seconds.
      min_samples: attempts needed before the score means anything; with fewer, health is 1.0.
    """

    def __init__(self, window: float = 3600.0, slots: int = 60, min_samples: int = 20) -> None:
        if window <= 0 or slots < 1:
            raise ValueError("window must be positive and slots at least 1")
        self.window = float(window)
        self.slots = slots
        self.min_samples = min_samples
        self._width = self.window / slots
        self._rings: dict[tuple[str, str], _Ring] = {}

    def _index(self, now: float) -> int:
        return int(now // self._width)

    def record(self, source: str, provider: str, event: str, category: str, now: float) -> None:
        """Count one outcome. ``category`` is the classifier's, for deferrals and bounces.

        Raises:
          ValueError: ``event`` is not one of :data:`EVENTS`.
        """
        field = _FIELDS.get(event)
        if field is None:
            raise ValueError(f"unknown event {event!r}, expected one of {', '.join(EVENTS)}")
        self._add(source, provider, field, category if field in (1, 2) else "", now, 1)

    def _add(self, source: str, provider: str, field: int, category: str, now: float, n: int) -> None:
        ring = self._rings.get((source, provider))
        if ring is None:
            ring = self._rings[(source, provider)] = _Ring(self.slots)
        index = self._index(now)
        ring.advance(index)
        if index > ring.head - self.slots:      # a late record still inside the window counts
            ring.add(index, field, category, n)

    def _ring(self, source: str, provider: str, now: float) -> _Ring | None:
        ring = self._rings.get((source, provider))
        if ring is not None:
            ring.advance(self._index(now))
        return ring

    def counts(self, source: str, provider: str, now: float) -> Counts:
        ring = self._ring(source, provider, now)
        if ring is None:
            return Counts()
        d, f, b, c = ring.totals
        return Counts(d, f, b, c, dict(ring.total_categories))

    def health(self, source: str, provider: str, now: float) -> float:
        """1.0 for a clean record or too little evidence, down to 0.0.

        The score is 1 minus the weighted share of bad outcomes among attempts (delivered,
        deferred and bounced): each deferral or bounce weighs :data:`OUTCOME_WEIGHTS` of its
        category, each complaint :data:`COMPLAINT_WEIGHT` (complaints are reported about mail
        that was delivered, so they add to the cost but not to the attempts).
        """
        ring = self._ring(source, provider, now)
        if ring is None:
            return 1.0
        delivered, deferred, bounced, complaints = ring.totals
        attempts = delivered + deferred + bounced
        if attempts < max(self.min_samples, 1):
            return 1.0
        cost = complaints * COMPLAINT_WEIGHT
        categorized = 0
        for category, n in ring.total_categories.items():
            cost += n * OUTCOME_WEIGHTS.get(category, _UNKNOWN_WEIGHT)
            categorized += n
        cost += (deferred + bounced - categorized) * _UNKNOWN_WEIGHT
        return max(0.0, 1.0 - cost / attempts)

    def snapshot(self) -> bytes:
        """Every non-empty slice with its start time, as msgpack, for :meth:`restore`."""
        pairs = []
        for (source, provider), ring in self._rings.items():
            if ring.head == -math.inf:
                continue
            head = int(ring.head)
            slices = []
            for i in range(head - self.slots + 1, head + 1):
                slot = i % self.slots
                d, f, b, c = ring.counts[slot]
                if d or f or b or c:
                    slices.append(_SliceState(i * self._width, d, f, b, c, dict(ring.categories[slot])))
            if slices:
                pairs.append(_PairState(source, provider, slices))
        return _encoder.encode(pairs)

    @classmethod
    def restore(cls, data: bytes, window: float = 3600.0, slots: int = 60, min_samples: int = 20) -> Reputation:
        """Rebuild from :meth:`snapshot`, possibly with other window settings: each slice is
        counted again at its start time, and slices older than the window drop out on the
        next read.

        Raises:
          msgspec.DecodeError: ``data`` is not a snapshot.
        """
        rep = cls(window, slots, min_samples)
        for pair in _decoder.decode(data):
            for s in sorted(pair.slices, key=lambda s: s.start):
                for field, n in ((0, s.delivered), (3, s.complaints)):
                    if n:
                        rep._add(pair.source, pair.provider, field, "", s.start, n)
                rep._restore_bad(pair.source, pair.provider, s)
        return rep

    def _restore_bad(self, source: str, provider: str, s: _SliceState) -> None:
        """Deferrals and bounces of one slice. A slice keeps one category table for both, so
        categories are handed out to deferrals first; the totals come out the same."""
        cats = dict(s.categories)
        for field, n in ((1, s.deferred), (2, s.bounced)):
            for cat in list(cats):
                if not n:
                    break
                take = min(n, cats[cat])
                self._add(source, provider, field, cat, s.start, take)
                cats[cat] -= take
                n -= take
                if not cats[cat]:
                    del cats[cat]
            if n:
                self._add(source, provider, field, "", s.start, n)


class AIMD:
    """Additive-increase, multiplicative-decrease message rate of one (source, provider).

    The rate is cut by ``decrease`` on a rate-limiting reply and grows by ``increase`` after each
    ``step`` of clean replies, always within ``[min_rate, max_rate]`` (messages per second).

    A cut counts for a whole ``step``: the replies to messages already in flight when the first
    rate-limiting reply came carry the same news, and must not cut the rate again. They still
    count as rate-limiting replies for that step, which then earns no increase.

    ``tick`` closes a step; call it at :attr:`next_at`.
    """

    def __init__(self, min_rate: float, max_rate: float, start: float, increase: float, decrease: float,
                 step: float, now: float) -> None:
        if not 0 < min_rate <= max_rate:
            raise ValueError(f"need 0 < min_rate <= max_rate, got {min_rate} and {max_rate}")
        if not 0 < decrease <= 1:
            raise ValueError(f"decrease must be in (0, 1], got {decrease}")
        if step <= 0 or increase < 0:
            raise ValueError("step must be positive and increase not negative")
        self.min_rate = min_rate
        self.max_rate = max_rate
        self.increase = increase
        self.decrease = decrease
        self.step = step
        self.rate = min(max(start, min_rate), max_rate)
        self._step_start = now
        self._last_cut = -math.inf
        self._clean = False
        self._limited = False

    @classmethod
    def from_config(cls, cfg: AdaptiveRate, now: float, key: str = "adaptive_rate") -> AIMD:
        """Build from an ``adaptive_rate`` block; rate strings become messages per second.

        Raises:
          ConfigError: a rate or the step does not parse (named by ``key``).
        """
        low = parse_rate(cfg.min, f"{key}.min").per_second
        high = parse_rate(cfg.max, f"{key}.max").per_second
        start = parse_rate(cfg.start, f"{key}.start").per_second if cfg.start else low
        return cls(low, high, start, parse_rate(cfg.increase, f"{key}.increase").per_second, cfg.decrease,
                   parse_duration(cfg.step, f"{key}.step"), now)

    @property
    def next_at(self) -> float:
        """When :meth:`tick` may next change the rate."""
        return self._step_start + self.step

    def on_reply(self, rate_limited: bool, now: float) -> bool:
        """Take one reply into account; True if the rate changed."""
        if not rate_limited:
            self._clean = True
            return False
        self._limited = True
        if now - self._last_cut < self.step:
            return False
        self._last_cut = now
        old = self.rate
        self.rate = max(self.min_rate, self.rate * self.decrease)
        self._start_step(now)
        return self.rate != old

    def tick(self, now: float) -> bool:
        """Close the step if it is over: grow after a clean one; True if the rate changed."""
        if now < self.next_at:
            return False
        grow = self._clean and not self._limited
        self._start_step(now)
        if not grow:
            return False
        old = self.rate
        self.rate = min(self.max_rate, self.rate + self.increase)
        return self.rate != old

    def _start_step(self, now: float) -> None:
        self._step_start = now
        self._clean = False
        self._limited = False
