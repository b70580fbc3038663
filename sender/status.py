"""What became of each recent message: the answer of ``GET /emails/{id}`` and the facts a
webhook tells (sender, subject, tags) after the message has left the queue.

:class:`EmailStatus` follows the event log: a message's ``accepted`` (or ``scheduled``) event
gives its summary, and every later event its ``last_event``, in Resend's words. It holds the
newest ``capacity`` messages, and is rebuilt from the event files at start, so a restart does
not forget what was delivered before it.
"""

from __future__ import annotations

import collections
import datetime
import os

import msgspec

from .events import Event, event_files, read_events

__all__ = ["Email", "EmailStatus", "LAST_EVENT", "iso_utc"]

# Event -> Resend's last_event.
LAST_EVENT = {
    "accepted": "queued",
    "scheduled": "scheduled",
    "rescheduled": "scheduled",
    "delivered": "delivered",
    "deferred": "delivery_delayed",
    "bounced": "bounced",
    "expired": "bounced",
    "failed": "failed",
    "complained": "complained",
    "canceled": "canceled",
    "suppressed": "suppressed",
}
_BYTES_PER_EVENT = 400          # to pick how many event files a rebuild reads


def iso_utc(t: float) -> str:
    """Wall-clock seconds as Resend writes an email's times: ``2026-11-24T08:00:00.123456+00:00``."""
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat()


class Email(msgspec.Struct):
    id: str
    customer: str
    created_at: float
    sender: str                 # the From: field as written
    to: list[str]
    subject: str
    last_event: str
    scheduled_at: float = 0.0
    tags: dict[str, str] = {}


class EmailStatus:
    """The newest ``capacity`` messages by id; subscribe :meth:`observe` to the event log."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._emails: collections.OrderedDict[str, Email] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._emails)

    def get(self, msg_id: str) -> Email | None:
        return self._emails.get(msg_id)

    def observe(self, ev: Event) -> None:
        last = LAST_EVENT.get(ev.event)
        if last is None or not ev.id:
            return
        email = self._emails.get(ev.id)
        if email is None:
            if ev.event not in ("accepted", "scheduled") or not self.capacity:
                return
            d = ev.detail
            email = self._emails[ev.id] = Email(
                ev.id, ev.customer, ev.time, str(d.get("from", "")), list(ev.rcpts), str(d.get("subject", "")),
                last, ev.next_at if ev.event == "scheduled" else 0.0, dict(d.get("tags") or {}))
            if len(self._emails) > self.capacity:
                self._emails.popitem(last=False)
            return
        email.last_event = last
        if ev.event == "rescheduled":
            email.scheduled_at = ev.next_at

    def load(self, folder: str | os.PathLike) -> None:
        """Rebuild from the newest event files in ``folder`` (enough for ``capacity``)."""
        files = event_files(folder)
        budget = self.capacity * _BYTES_PER_EVENT
        start = len(files)
        while start > 0 and budget > 0:
            start -= 1
            budget -= files[start].stat().st_size
        for ev in read_events(files[start:]):
            self.observe(ev)
