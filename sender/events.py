"""Events: each change in a message's life as one typed record, for people and programs.

An :class:`Event` says when, what (``accepted``, ``scheduled``, ``delivered``, ``deferred``,
``bounced``, ``expired``, ``suppressed``, ``canceled``, ``rescheduled``, ``complained``),
which message and customer, where it went (recipient domain, provider, site, source address,
and why that source: ``chosen``) and what the remote host said (reply and category). Events
of no message tell why mail waits or goes elsewhere: ``throttled`` (a bucket holding mail:
``detail`` {bucket, held, until}, with the customer, domain, provider, source or site it
concerns), ``automation`` (a rule fired), and the operators' changes with who and why in
``detail``: ``paused``, ``resumed``, ``rerouted``, ``unrouted``, ``limited``, ``unlimited``,
``purged``, ``released``, ``quarantine_expired``, ``draining``, ``undrained``. A purge's
messages each get ``quarantined`` (and ``released``, or at the end ``bounced`` or
``canceled``). :class:`EventLog` writes them as JSON lines
to ``events/YYYY-MM-DDTHH.jsonl``, one file per UTC hour, deletes files past the retention,
keeps the most recent in memory, and hands each to its subscribers (webhooks, the API's email
status) as it happens.

Refusals at acceptance carry no message id (none was queued): ``blocked`` (category
``blocked_domain``, per recipient), ``suppressed`` (every recipient suppressed), and
``quota_exceeded`` (the customer's hourly or daily quota: the message's recipients, category
``quota``, ``detail`` {quota, limit, retry_at}); they make no webhook.

The journal is the queue's truth; events are its account. They are flushed to the file every
quarter of a second without fsync: a crash of the machine may lose that last moment of the
account, never a message. Lines are encoded by msgspec straight from the Struct (one pass, the
same speed as orjson on a dict, without building the dict).
"""

from __future__ import annotations

import calendar
import collections
import functools
import logging
import math
import mmap
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import trio

__all__ = ["FIELDS", "Event", "EventLog", "Query", "count", "event_files", "follow", "read_events", "select"]

log = logging.getLogger("sender.events")

FLUSH_EVERY = 0.25      # seconds between writes of buffered events
SUFFIX = ".jsonl"


class Event(msgspec.Struct, kw_only=True, omit_defaults=True):
    time: float                         # wall-clock seconds
    event: str
    id: str = ""                        # message id
    customer: str = ""
    rcpts: list[str] = msgspec.field(default_factory=list)
    domain: str = ""                    # recipient domain
    provider: str = ""
    site: str = ""                      # the MX set or relay it went to
    source: str = ""                    # the local address it left from
    message_type: str = ""
    reply: str = ""                     # "550 5.1.1 text"
    category: str = ""                  # classify.CATEGORIES
    attempts: int = 0
    next_at: float = 0.0                # deferred, scheduled, rescheduled: when it goes next
    age: float = 0.0                    # outcomes: seconds since acceptance (or the scheduled time)
    detail: dict[str, object] = msgspec.field(default_factory=dict)
    chosen: str = ""                    # outcomes: why that source was chosen (pool, candidates, left out)


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Event).decode


def file_name(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H", time.gmtime(t)) + SUFFIX


def event_files(folder: str | os.PathLike) -> list[Path]:
    """The event files in ``folder``, oldest first (their names sort by time)."""
    try:
        return sorted(p for p in Path(folder).iterdir() if p.name.endswith(SUFFIX))
    except FileNotFoundError:
        return []


def file_hour(path: Path) -> float | None:
    """The start of the UTC hour a file holds (from its name), or None for a name we did not write."""
    try:
        return calendar.timegm(time.strptime(path.name[:13], "%Y-%m-%dT%H"))
    except ValueError:
        return None


# Fields a query may match exactly (several values: any of them).
FIELDS = ("id", "event", "customer", "domain", "provider", "site", "source", "message_type", "category")


class Query(msgspec.Struct, kw_only=True):
    """Which events: each field given must match (one of its values); times are wall-clock."""

    match: dict[str, list[str]] = {}        # field (of FIELDS) -> accepted values
    since: float = 0.0
    until: float = math.inf

    def needles(self) -> list[list[bytes]]:
        """Per field, the bytes one of which a matching line must contain (``"customer":"acme"``):
        a line without them is skipped without being decoded."""
        return [[b'"' + name.encode() + b'":' + _encode(v) for v in values] for name, values in self.match.items()
                if "" not in values]         # an empty value is left out of the line: no bytes to look for

    def accepts(self, ev: Event) -> bool:
        return self.since <= ev.time < self.until and all(
            getattr(ev, name) in values for name, values in self.match.items())


def select(files: list[Path], query: Query, fields: tuple[str, ...] | None = None) -> Iterator[tuple[Event, bytes]]:
    """The events of ``files`` that ``query`` accepts, in order, each with its line. Files whose
    hour lies outside the query's times are not opened; a line must contain the query's bytes
    before it is decoded, so a narrow query over a big log costs little more than reading it.

    Args:
      fields: decode only these (and the query's) fields: faster, for counting.
    """
    decode = _decode if fields is None else _partial_decoder(tuple(sorted({"time", *fields, *query.match})))
    needles = query.needles()
    # With a field of one value, its bytes are searched for through the whole file, as grep
    # does, and only the lines holding them are looked at.
    scan = min((alternatives[0] for alternatives in needles if len(alternatives) == 1), key=len, default=None)
    for path in files:
        hour = file_hour(path)
        if hour is not None and (hour + 3600 <= query.since or hour >= query.until):
            continue
        if not path.stat().st_size:
            continue
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            lines = iter(data.readline, b"") if scan is None else _lines_holding(data, scan)
            for line in lines:
                if needles and not all(any(n in line for n in alternatives) for alternatives in needles):
                    continue
                try:
                    ev = decode(line)
                except msgspec.DecodeError:
                    continue
                if query.accepts(ev):
                    yield ev, line


@functools.lru_cache(maxsize=8)
def _partial_decoder(fields: tuple[str, ...]):
    """A decoder of just ``fields`` of an event (the others are skipped, not built)."""
    spec = []
    for f in msgspec.structs.fields(Event):
        if f.name in fields:
            if f.default is not msgspec.NODEFAULT:
                spec.append((f.name, f.type, f.default))
            elif f.default_factory is not msgspec.NODEFAULT:
                spec.append((f.name, f.type, msgspec.field(default_factory=f.default_factory)))
            else:
                spec.append((f.name, f.type))
    return msgspec.json.Decoder(msgspec.defstruct("PartialEvent", spec, kw_only=True)).decode


def _lines_holding(data: mmap.mmap, needle: bytes) -> Iterator[bytes]:
    """The lines of ``data`` that contain ``needle``, in order, each once."""
    at = data.find(needle)
    while at >= 0:
        start = data.rfind(b"\n", 0, at) + 1
        end = data.find(b"\n", at)
        end = len(data) if end < 0 else end + 1
        yield data[start:end]
        at = data.find(needle, end)


def count(events: Iterator[Event], fields: list[str]) -> collections.Counter[tuple]:
    """How many events per combination of ``fields`` (e.g. provider, category)."""
    return collections.Counter(tuple(getattr(ev, f) for f in fields) for ev in events)


def follow(folder: str | os.PathLike, query: Query, *, poll: float = 0.25,
           stop: Callable[[], bool] = lambda: False) -> Iterator[tuple[Event, bytes]]:
    """Events as they are written from this call on (the end of the newest file is taken
    now), moving on to each new hourly file, until ``stop()`` says so. Blocks between polls."""
    folder = Path(folder)
    files = event_files(folder)
    path = files[-1] if files else None
    return _follow(folder, query, path, path.stat().st_size if path is not None else 0, poll, stop)


def _follow(folder: Path, query: Query, path: Path | None, offset: int, poll: float,
            stop: Callable[[], bool]) -> Iterator[tuple[Event, bytes]]:
    rest = b""
    while not stop():
        files = event_files(folder)
        if files and (path is None or files[-1].name > path.name):
            if path is not None:                # the end of the old hour first
                yield from _lines(path, offset, query, rest)
            path, offset, rest = files[-1], 0, b""
            continue
        if path is not None and path.stat().st_size > offset:
            with open(path, "rb") as f:
                f.seek(offset)
                data = rest + f.read()
                offset = f.tell()
            *whole, rest = data.split(b"\n")
            yield from _matching(whole, query)
            continue
        time.sleep(poll)


def _lines(path: Path, offset: int, query: Query, rest: bytes) -> Iterator[tuple[Event, bytes]]:
    with open(path, "rb") as f:
        f.seek(offset)
        yield from _matching((rest + f.read()).split(b"\n"), query)


def _matching(lines: list[bytes], query: Query) -> Iterator[tuple[Event, bytes]]:
    for line in lines:
        if not line:
            continue
        try:
            ev = _decode(line)
        except msgspec.DecodeError:
            continue
        if query.accepts(ev):
            yield ev, line + b"\n"


def read_events(files: list[Path]) -> Iterator[Event]:
    """Every event in ``files``, in order; a line that does not decode (a torn last line
    after a crash) is skipped."""
    for path in files:
        with open(path, "rb") as f:
            for line in f:
                try:
                    yield _decode(line)
                except msgspec.DecodeError:
                    continue


class EventLog:
    """Events to files, to memory and to subscribers.

    Args:
      folder: where the hourly files go (created when the first event is written).
      retention: seconds a file is kept after its hour.
      recent: how many events :attr:`recent` holds.
      now: the wall clock that names the hourly files (the engine's, so a simulation's
        virtual days get their own files).
    """

    def __init__(self, folder: str | os.PathLike, *, retention: float = 7 * 86400.0, recent: int = 10_000,
                 now: Callable[[], float] = time.time) -> None:
        self.folder = Path(folder)
        self.now = now
        self.retention = retention
        self.recent: collections.deque[Event] = collections.deque(maxlen=recent)
        self.subscribers: list[Callable[[Event], None]] = []
        self.written = 0
        self._buf = bytearray()
        self._name = ""
        self._file = None
        self._pending = trio.Event()
        self._pruned_hour = -1

    def emit(self, ev: Event) -> None:
        """Record ``ev``; never awaits. A subscriber that fails is logged, not propagated:
        the delivery that made the event goes on."""
        self.recent.append(ev)
        self._buf += _encode(ev)
        self._buf += b"\n"
        if not self._pending.is_set():
            self._pending.set()
        for fn in self.subscribers:
            try:
                fn(ev)
            except Exception:
                log.exception("event subscriber %r failed on %s of %s", fn, ev.event, ev.id)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Write buffered events every FLUSH_EVERY seconds (asleep while there are none)
        until cancelled, then write what is left."""
        task_status.started()
        try:
            while True:
                await self._pending.wait()
                await trio.sleep(FLUSH_EVERY)
                self._pending = trio.Event()
                self.flush()
        finally:
            self.close()

    def flush(self) -> None:
        """Append the buffered events to the current hour's file."""
        if not self._buf:
            return
        now = self.now()
        name = file_name(now)
        if name != self._name:
            self._open(name, now)
        try:
            self._file.write(self._buf)
            self._file.flush()
        except OSError as e:
            log.error("events: cannot write %s: %s (%d bytes of events dropped)", self._name, e, len(self._buf))
        self.written += self._buf.count(b"\n")
        del self._buf[:]

    def _open(self, name: str, now: float) -> None:
        if self._file is not None:
            self._file.close()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._name = name
        self._file = open(self.folder / name, "ab")
        hour = int(now // 3600)
        if hour != self._pruned_hour:
            self._pruned_hour = hour
            self.prune(now)

    def prune(self, now: float) -> None:
        """Delete files whose hour ended more than ``retention`` ago."""
        oldest = file_name(now - self.retention)
        for path in event_files(self.folder):
            if path.name >= oldest:
                break
            path.unlink(missing_ok=True)

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None
            self._name = ""
