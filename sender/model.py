"""Records shared by every layer: replies, journal records, queue entries.

Journal records are one tagged union of frozen, ``array_like`` Structs so that they encode
small and decode with validation. Schema evolution follows msgspec's rules: new fields are
appended with defaults, fields are never retyped or reordered.
"""

from __future__ import annotations

import msgspec

__all__ = [
    "Reply",
    "Rec",
    "Accepted",
    "Delivered",
    "Deferred",
    "Bounced",
    "Expired",
    "JournalRecord",
    "Canceled",
    "Rescheduled",
    "Delivery",
    "FINAL_RECORDS",
]


class Reply(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One SMTP reply: the basic code, the RFC 3463 enhanced code ("" if none), the text.

    ``text`` holds every line of a multi-line reply joined by "\\n", without the codes.
    """

    code: int
    text: str = ""
    enhanced: str = ""

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        enh = f"{self.enhanced} " if self.enhanced else ""
        return f"{self.code} {enh}{self.text}".rstrip()


class Rec(msgspec.Struct, tag_field="t", tag=str.lower, frozen=True, array_like=True):
    """Base of every journal record; never written itself."""


class Accepted(Rec):
    """A message made durable. Written once at injection, and again when compaction moves a
    live message forward out of an old segment (then ``rcpts`` holds only the recipients still
    pending and ``attempts`` carries over)."""

    id: str
    sender: str
    rcpts: list[str]
    received_at: float
    body: bytes
    customer: str = ""
    attempts: int = 0
    next_at: float = 0.0
    message_type: str = ""          # e.g. "transactional": sets the priority (shaping.priority)
    tags: dict[str, str] = {}       # the HTTP API's tags: told back in webhooks


class Delivered(Rec):
    id: str
    rcpts: list[str]
    at: float
    reply: Reply | None = None


class Deferred(Rec):
    id: str
    rcpts: list[str]
    at: float
    next_at: float
    attempts: int
    reply: Reply | None = None
    category: str = ""          # classify.CATEGORIES


class Bounced(Rec):
    id: str
    rcpts: list[str]
    at: float
    reply: Reply | None = None
    category: str = ""


class Expired(Rec):
    """Retries ran past ``max_age``: final, and a bounce toward the sender."""

    id: str
    rcpts: list[str]
    at: float
    reply: Reply | None = None
    category: str = "expired"


class Canceled(Rec):
    """A scheduled message called off before its time (the HTTP API's cancel): final."""

    id: str
    rcpts: list[str]
    at: float


class Rescheduled(Rec):
    """A scheduled message given another time."""

    id: str
    at: float
    next_at: float


JournalRecord = Accepted | Delivered | Deferred | Bounced | Expired | Canceled | Rescheduled
FINAL_RECORDS = (Delivered, Bounced, Expired, Canceled)


class Delivery(msgspec.Struct, gc=False):
    """One message's pending recipients at one recipient domain: the unit the queue moves.

    The body stays on disk: ``segment``/``offset``/``length`` locate the Accepted frame.
    """

    id: str
    sender: str
    domain: str
    rcpts: list[str]
    segment: int
    offset: int
    length: int
    received_at: float
    attempts: int = 0
    next_at: float = 0.0
    customer: str = ""
    message_type: str = ""
    chosen: str = ""            # why its source was chosen (Choice.reason): for the outcome events
