"""Trust and safety: a customer whose bounce or complaint rate passes its threshold is paused.

Per customer, a rolling window (``abuse.window``, in twelve slices) counts deliveries, hard
bounces (at the time or later) and complaints. Once the window holds ``abuse.min_messages``
outcomes, a bounce rate over ``abuse.max_bounce_rate`` or a complaint rate over
``abuse.max_complaint_rate`` pauses the customer, with the figures as the reason. The pause
stays until an operator lifts it (``sender ctl resume``): mail that bounces in bulk is a list
problem that waiting does not fix. The defaults follow the public sender guidelines: Gmail asks
for complaints under 0.3%, and Amazon SES pauses an account at a 10% bounce rate.
"""

from __future__ import annotations

import math

from .events import Event

__all__ = ["AbuseWatch"]

SLICES = 12


class AbuseWatch:
    """Rolling outcome counts per customer; :meth:`observe` says when one should be paused."""

    def __init__(self, window: float, min_messages: int, max_bounce_rate: float, max_complaint_rate: float) -> None:
        self.slice = window / SLICES
        self.min_messages = min_messages
        self.max_bounce_rate = max_bounce_rate
        self.max_complaint_rate = max_complaint_rate
        self._counts: dict[str, dict[int, list[int]]] = {}     # customer -> slice -> [delivered, bounced, complaints]

    def observe(self, ev: Event) -> str | None:
        """Count ``ev``; the reason to pause its customer now, if any."""
        kind = {"delivered": 0, "bounced": 1, "complained": 2}.get(ev.event)
        if kind is None or not ev.customer:
            return None
        now = math.floor(ev.time / self.slice)
        slices = self._counts.setdefault(ev.customer, {})
        for old in [s for s in slices if s <= now - SLICES]:
            del slices[old]
        slices.setdefault(now, [0, 0, 0])[kind] += len(ev.rcpts) or 1
        if kind == 0:
            return None
        delivered = sum(c[0] for c in slices.values())
        bounced = sum(c[1] for c in slices.values())
        complaints = sum(c[2] for c in slices.values())
        sent = delivered + bounced
        if sent < self.min_messages:
            return None
        minutes = self.slice * SLICES / 60
        if bounced / sent > self.max_bounce_rate:
            return (f"bounce rate {bounced / sent:.1%} ({bounced} of {sent}) over the last {minutes:g} minutes, "
                    f"over abuse.max_bounce_rate {self.max_bounce_rate:.1%}")
        if delivered and complaints / delivered > self.max_complaint_rate:
            return (f"complaint rate {complaints / delivered:.2%} ({complaints} of {delivered}) over the last "
                    f"{minutes:g} minutes, over abuse.max_complaint_rate {self.max_complaint_rate:.2%}")
        return None
