"""Per-customer quotas (messages accepted per UTC hour and per UTC day) and limits on
recipients per message (``[[customer]] hourly_quota, daily_quota, max_recipients``).

Counted at acceptance, on every way in (SMTP, HTTP, the Python API). At start the counts of
the current day are read back from the event files, so a restart hands out no fresh quota.
On a sharded daemon each process enforces 1/N of each quota (at least one).
"""

from __future__ import annotations

import time
from pathlib import Path

from .config import CustomerConfig
from .errors import UsageError
from .events import Query, event_files, file_name, select

__all__ = ["QuotaExceeded", "Quotas", "TooManyRecipients"]

HOUR, DAY = 3600, 86400


class QuotaExceeded(UsageError):
    """The customer's ``hourly_quota`` or ``daily_quota`` of accepted messages is used up;
    nothing was queued. ``quota`` is "hourly" or "daily", ``limit`` the number this process
    enforces (its share on a sharded daemon), ``left`` how many would still fit (a batch),
    ``retry_at`` (wall-clock seconds) when the quota resets: the next UTC hour or day."""

    def __init__(self, customer: str, quota: str, limit: int, retry_at: float, left: int = 0,
                 configured: int = 0) -> None:
        self.customer, self.quota, self.limit, self.retry_at, self.left = customer, quota, limit, retry_at, left
        share = f", this process's share of {configured:,}" if configured > limit else ""
        super().__init__(f"{quota} quota of customer {customer!r} reached ({limit:,} messages{share}); "
                         f"it resets at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(retry_at))}")


class TooManyRecipients(UsageError):
    """More recipients than the customer's ``max_recipients`` a message; nothing was queued."""

    def __init__(self, customer: str, limit: int, given: int) -> None:
        self.customer, self.limit = customer, limit
        super().__init__(f"too many recipients ({given}): customer {customer!r} may send to at most {limit:,} "
                         f"a message; send the rest in another message")


class Quotas:
    """The quotas and recipient limits of the customers that have them, and what each has
    taken this hour and this day."""

    def __init__(self, customers: list[CustomerConfig], shares: int = 1) -> None:
        # customer -> (hourly, daily) of this process (0 = none), then the configured two
        self.limits = {c.id: (max(1, c.hourly_quota // shares) if c.hourly_quota else 0,
                              max(1, c.daily_quota // shares) if c.daily_quota else 0, c.hourly_quota, c.daily_quota)
                       for c in customers if c.hourly_quota or c.daily_quota}
        self.max_recipients = {c.id: c.max_recipients for c in customers if c.max_recipients}
        self._taken: dict[str, list[int]] = {}      # [UTC hour, messages that hour, UTC day, that day]

    def check_recipients(self, customer: str, count: int) -> None:
        """Raise :class:`TooManyRecipients` when ``count`` is over the customer's ``max_recipients``."""
        limit = self.max_recipients.get(customer, 0)
        if limit and count > limit:
            raise TooManyRecipients(customer, limit, count)

    def over(self, customer: str, messages: int, now: float) -> QuotaExceeded | None:
        """Why ``messages`` more would pass the customer's quota now, or None if they fit.
        Over both quotas, the daily one is named (waiting for the next hour would not help)."""
        limits = self.limits.get(customer)
        if limits is None:
            return None
        hourly, daily, hourly_set, daily_set = limits
        taken = self._taken_now(customer, now)
        left = min(hourly - taken[1] if hourly else messages, daily - taken[3] if daily else messages)
        if messages <= left:
            return None
        left = max(0, left)
        if daily and taken[3] + messages > daily:
            return QuotaExceeded(customer, "daily", daily, (taken[2] + 1) * DAY, left, daily_set)
        return QuotaExceeded(customer, "hourly", hourly, (taken[0] + 1) * HOUR, left, hourly_set)

    def take(self, customer: str, now: float) -> None:
        """One message of ``customer`` accepted."""
        if customer in self.limits:
            taken = self._taken_now(customer, now)
            taken[1] += 1
            taken[3] += 1

    def taken(self, customer: str, now: float) -> tuple[int, int]:
        """Messages of ``customer`` accepted this UTC hour and this UTC day."""
        taken = self._taken_now(customer, now)
        return taken[1], taken[3]

    def _taken_now(self, customer: str, now: float) -> list[int]:
        hour, day = int(now // HOUR), int(now // DAY)
        taken = self._taken.get(customer)
        if taken is None:
            taken = self._taken[customer] = [hour, 0, day, 0]
        if taken[0] != hour:
            taken[0], taken[1] = hour, 0
        if taken[2] != day:
            taken[2], taken[3] = day, 0
        return taken

    def load(self, folder: Path, now: float) -> None:
        """Count this UTC day's accepted (and scheduled) messages of each customer with a quota
        from the event files, this hour's apart. Reads only the day's hourly files, and decodes
        only the lines of those events and customers."""
        if not self.limits:
            return
        day_start = now // DAY * DAY
        first = file_name(day_start)
        files = [f for f in event_files(folder) if f.name >= first]
        query = Query(match={"event": ["accepted", "scheduled"], "customer": sorted(self.limits)}, since=day_start)
        for ev, _ in select(files, query, fields=("customer",)):
            taken = self._taken_now(ev.customer, now)
            taken[3] += 1
            if ev.time // HOUR == taken[0]:
                taken[1] += 1
