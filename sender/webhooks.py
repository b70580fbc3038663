"""Webhooks as Resend sends them: each event posted to the customer's endpoints, signed the
Svix way, retried on a schedule, and kept on disk until it is delivered or given up on.

A webhook message is one event for one endpoint. Its id (``svix-id``) and its body (the
event's JSON, serialized once when it is queued) are the same on every attempt; only
``svix-timestamp`` and the signature over ``"{id}.{timestamp}.{body}"`` change. A 2xx answer
delivers it; anything else (another status, a network error, no answer within
``webhooks.timeout``) fails the attempt. After attempt n failed, the next one comes
``retry_schedule[n-1]`` later (spread by up to 10% either way, so that the retries of many
events do not arrive together); when the attempt after the last wait fails too, the message
goes to the dead-letter list, where it stays until someone retries it (:meth:`Webhooks.retry_dead`).
Dead letters do not expire yet; an age limit would be a Dead record's ``died_at`` plus a TTL.

The outbox (``SPOOL/webhooks.log``) is a side log in the journal's frame format
(``[u32 length][u32 crc32c][msgpack record]``): a message queued (with its body, never the
secret), an attempt failed, delivered, dead, revived. Every record is written into the file
at once, so a crash of the process after :meth:`Webhooks.emit` returns loses nothing; the fsync
comes from the owner (``on_write``: the engine syncs the outbox with its journal's next batch)
or, without one, from a task of :meth:`Webhooks.run` within a second. A message in flight when
the process stops is sent again after the restart (at least once, like Svix). The secret is
looked up in the current config at each attempt: a message whose endpoint is gone is dead
at once.

Replay truncates a torn tail with a warning and skips a corrupt frame in the middle (also
with a warning): the outbox is an account of side effects, and losing one record of it must
not keep the daemon from starting. The file is rewritten with only the messages still needed
(pending and dead) once it is over ``COMPACT_BYTES`` and less than a quarter of its frames
are still needed.
"""

from __future__ import annotations

import base64
import collections
import datetime
import hashlib
import heapq
import hmac
import logging
import math
import os
import random
import secrets
import ssl
import string
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import orjson
import trio
from crc32c import crc32c

from .config import CustomerConfig, WebhooksConfig
from .files import replace_file
from .httpclient import request
from .journal import encode_frame

__all__ = ["COMPACT_BYTES", "DeadLetter", "Webhooks", "new_hook_id", "post_http", "read_outbox", "sign"]

log = logging.getLogger("sender.webhooks")

COMPACT_BYTES = 1 << 20     # the outbox is not rewritten while it is smaller than this
SYNC_DELAY = 1.0            # seconds: the longest an unsynced record waits (without on_write)
SPREAD = 0.1                # each retry wait is stretched or shrunk by up to this share
MAX_RESPONSE = 64 * 1024    # bytes of a response body read (and thrown away) at most
USER_AGENT = "sender-webhooks"

_HEADER = struct.Struct("<II")
_ID_ALPHABET = string.ascii_letters + string.digits

Post = Callable[[str, dict[str, str], bytes, float], Awaitable[int]]


# ---------------------------------------------------------------- signing


def sign(secret: str, hook_id: str, timestamp: int, body: bytes) -> str:
    """The ``svix-signature`` header: ``"v1,"`` + base64 of HMAC-SHA256 over
    ``"{hook_id}.{timestamp}.{body}"``, keyed with the base64 after the secret's ``whsec_``."""
    return _sign(_key(secret), hook_id, timestamp, body)


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def _sign(key: bytes, hook_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(key, f"{hook_id}.{timestamp}.".encode(), hashlib.sha256)
    mac.update(body)
    return "v1," + base64.b64encode(mac.digest()).decode()


def new_hook_id() -> str:
    """A webhook message id: ``"msg_"`` and 27 random letters and digits."""
    return "msg_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(27))


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------- records


class _Record(msgspec.Struct, tag_field="t", frozen=True, array_like=True):
    """Base of the outbox records; never written itself. Fields are only appended, with
    defaults (older outboxes must keep decoding)."""


class Queued(_Record, tag="queued"):
    id: str
    customer: str
    url: str
    type: str
    body: bytes                 # the exact bytes every attempt sends
    created_at: float           # the event's time


class Attempted(_Record, tag="attempted"):
    """Attempt ``attempts`` failed; the next one is due at ``next_at`` (wall clock)."""

    id: str
    attempts: int
    next_at: float
    last_error: str = ""


class Done(_Record, tag="done"):
    id: str
    at: float = 0.0


class Dead(_Record, tag="dead"):
    id: str
    attempts: int
    died_at: float
    last_error: str = ""


class Revived(_Record, tag="revived"):
    """A dead letter sent again: pending, attempts counted from 0, due at ``at``."""

    id: str
    at: float


OutboxRecord = Queued | Attempted | Done | Dead | Revived
_decoder = msgspec.msgpack.Decoder(OutboxRecord)


class DeadLetter(msgspec.Struct, frozen=True):
    """A webhook message given up on (what the dead-letter list shows)."""

    id: str
    customer: str
    url: str
    type: str
    attempts: int
    created_at: float
    died_at: float
    last_error: str
    body: str                   # the event's JSON, as sent


class _Hook(msgspec.Struct, gc=False):
    """One message's state in memory (scalars only: no cycles)."""

    id: str
    customer: str
    url: str
    type: str
    body: bytes
    created_at: float
    attempts: int = 0
    next_at: float = 0.0        # 0: due at once
    last_error: str = ""
    dead: bool = False
    died_at: float = 0.0
    seq: int = 0                # the heap entry that is current (older ones are skipped)

    def letter(self) -> DeadLetter:
        return DeadLetter(self.id, self.customer, self.url, self.type, self.attempts, self.created_at,
                          self.died_at, self.last_error, self.body.decode("utf-8", "replace"))


def _apply(rec: _Record, hooks: dict[str, _Hook]) -> None:
    """Fold one replayed record into ``hooks``."""
    if isinstance(rec, Queued):
        hooks[rec.id] = _Hook(rec.id, rec.customer, rec.url, rec.type, rec.body, rec.created_at)
        return
    hook = hooks.get(rec.id)
    if hook is None:
        return
    if isinstance(rec, Attempted):
        hook.attempts, hook.next_at, hook.last_error = rec.attempts, rec.next_at, rec.last_error
    elif isinstance(rec, Done):
        del hooks[rec.id]
    elif isinstance(rec, Dead):
        hook.dead, hook.attempts, hook.died_at, hook.last_error = True, rec.attempts, rec.died_at, rec.last_error
    elif isinstance(rec, Revived):
        hook.dead, hook.attempts, hook.next_at = False, 0, rec.at


def _frame_end(data: memoryview, off: int) -> int | None:
    """Where the whole frame with a good checksum at ``off`` ends, or None."""
    if off + _HEADER.size > len(data):
        return None
    length, crc = _HEADER.unpack_from(data, off)
    end = off + _HEADER.size + length
    if length == 0 or end > len(data) or crc32c(data[off + _HEADER.size: end]) != crc:
        return None
    return end


def _next_frame(data: memoryview, start: int) -> int | None:
    """The next offset holding a valid frame (error path only)."""
    for off in range(start, len(data) - _HEADER.size):
        # A record is a short msgpack array: a cheap filter before the checksum.
        if 0x90 <= data[off + _HEADER.size] <= 0x9F and _frame_end(data, off) is not None:
            return off
    return None


def _replay(data: bytes, name: str, *, read_only: bool) -> tuple[dict[str, _Hook], int, int]:
    """The messages in an outbox's bytes; also the number of good frames and where they end
    (a torn tail starts there)."""
    hooks: dict[str, _Hook] = {}
    frames = 0
    off = 0
    with memoryview(data) as mv:
        while off < len(mv):
            end = _frame_end(mv, off)
            if end is not None:
                try:
                    rec = _decoder.decode(mv[off + _HEADER.size: end])
                except msgspec.DecodeError as e:
                    # Framed and checksummed, so whole: a record this version does not know.
                    log.warning("webhooks: skipped an undecodable record in %s at offset %d (%s)", name, off, e)
                else:
                    _apply(rec, hooks)
                    frames += 1
                off = end
                continue
            nxt = _next_frame(mv, off + 1)
            if nxt is None:
                if not read_only:
                    log.warning("webhooks: torn tail in %s at offset %d: truncated %d bytes", name, off,
                                len(mv) - off)
                return hooks, frames, off
            log.warning("webhooks: corrupt record in %s at offset %d: skipped %d bytes", name, off, nxt - off)
            off = nxt
    return hooks, frames, len(data)


def read_outbox(path: str | os.PathLike) -> tuple[int, list[DeadLetter]]:
    """The number of pending messages and the dead letters of an outbox, without changing it
    (a daemon may be writing it)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return 0, []
    hooks, _, _ = _replay(data, str(path), read_only=True)
    dead = sorted((h.letter() for h in hooks.values() if h.dead), key=lambda d: d.died_at)
    return len(hooks) - len(dead), dead


# ---------------------------------------------------------------- HTTP client


async def post_http(url: str, headers: dict[str, str], body: bytes, timeout: float, *,
                    ssl_context: ssl.SSLContext | None = None) -> int:
    """POST ``body`` to ``url``; returns the status (see :func:`sender.httpclient.request`)."""
    answer = await request("POST", url, headers, body, timeout, ssl_context=ssl_context, max_body=MAX_RESPONSE)
    return answer.status


# ---------------------------------------------------------------- the outbox and its sender


class Webhooks:
    """Webhook messages of every customer: queued durably, sent, retried, or dead-lettered.

    The outbox is replayed when the object is made (a torn tail is cut off before anything is
    appended after it): :meth:`dead_letters` and :meth:`statistics` answer at once, and
    :meth:`emit` may be called before :meth:`run` starts.

    Args:
      customers: ``CustomerConfig`` list; each ``.webhook`` entry is an endpoint.
      config: ``WebhooksConfig``, already parsed (``retry_schedule`` in seconds).
      path: the outbox file (created if missing; its folder must exist).
      now: wall-clock seconds, following trio's clock (MockClock warps it).
      post: ``await post(url, headers, body, timeout) -> status``; default :func:`post_http`.
      on_write: called after each record is written (the owner fsyncs :attr:`fd` then);
        None: :meth:`run` fsyncs the outbox within ``SYNC_DELAY`` of an unsynced write.
    """

    def __init__(self, customers: list[CustomerConfig], config: WebhooksConfig, path: Path,
                 now: Callable[[], float], *, post: Post | None = None,
                 on_write: Callable[[], None] | None = None) -> None:
        self.path = Path(path)
        self.now = now
        self._post = post or post_http
        self._on_write = on_write
        self._schedule = [float(w) for w in config.retry_schedule]
        self._timeout = float(config.timeout)
        self._max_in_flight = config.max_in_flight
        # customer -> [(url, event types or None for all)]; (customer, url) -> signing key
        self._endpoints: dict[str, list[tuple[str, frozenset[str] | None]]] = {}
        self._keys: dict[tuple[str, str], bytes] = {}
        for customer in customers:
            for hook in customer.webhook:
                self._endpoints.setdefault(customer.id, []).append(
                    (hook.url, frozenset(hook.events) if hook.events else None))
                self._keys.setdefault((customer.id, hook.url), _key(hook.secret))
        self._hooks: dict[str, _Hook] = {}
        self._dead = 0
        self._heap: list[tuple[float, int, _Hook]] = []
        self._seq = 0
        self._ready: dict[str, collections.deque[_Hook]] = {}    # url -> due, waiting for a slot
        self._in_flight: dict[str, int] = {}
        self._wake = trio.Event()
        self._unsynced = trio.Event()
        self._dirty = False
        self._buf = bytearray()
        self._frames = 0
        self._size = 0
        self._delivered = 0
        self._failed_attempts = 0
        self._fd = -1
        self._open()

    # ---------------------------------------------------------------- the file

    def _open(self) -> None:
        """Open the outbox, replay it, cut off a torn tail, and schedule what is pending."""
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        if created:
            _fsync_dir(self.path.parent)
        size = os.fstat(self._fd).st_size
        data = os.pread(self._fd, size, 0) if size else b""
        self._hooks, self._frames, end = _replay(data, self.path.name, read_only=False)
        if end < size:
            os.ftruncate(self._fd, end)
            os.fdatasync(self._fd)
        self._size = end
        for hook in self._hooks.values():
            if hook.dead:
                self._dead += 1
            else:
                self._due(hook, hook.next_at)
        self._maybe_compact()

    @property
    def fd(self) -> int:
        """The outbox's file descriptor, for the owner's fsync (-1 once closed; another
        number after a compaction)."""
        return self._fd

    def _reopen(self) -> None:
        # After close(): records still reach the file (a late event during shutdown); the
        # next close() syncs and closes it again.
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def _write(self, rec: _Record) -> None:
        buf = self._buf
        buf.clear()
        n = encode_frame(rec, buf)
        if self._fd < 0:
            self._reopen()
        view = memoryview(buf)
        while view:
            view = view[os.write(self._fd, view):]
        view.release()
        self._size += n
        self._frames += 1
        self._dirty = True
        if self._on_write is not None:
            self._on_write()
        else:
            self._unsynced.set()

    def _maybe_compact(self) -> None:
        if self._size > COMPACT_BYTES and 4 * len(self._hooks) < self._frames:
            self._compact()

    def _compact(self) -> None:
        """Rewrite the outbox with the state of the messages still needed (synchronous: no
        record can be written meanwhile and lost with the old file)."""
        buf = bytearray()
        frames = 0
        for h in self._hooks.values():
            frames += 1
            encode_frame(Queued(h.id, h.customer, h.url, h.type, h.body, h.created_at), buf)
            if h.attempts:
                frames += 1
                encode_frame(Attempted(h.id, h.attempts, h.next_at, h.last_error), buf)
            if h.dead:
                frames += 1
                encode_frame(Dead(h.id, h.attempts, h.died_at, h.last_error), buf)
        before = self._size
        replace_file(self.path, [bytes(buf)])
        _fsync_dir(self.path.parent)
        # Open the new file before closing the old one, so that it gets another number: an
        # owner that syncs a duplicate of ``fd`` must not take the new file for the old one.
        old = self._fd
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        if old >= 0:
            os.close(old)
        self._size, self._frames, self._dirty = len(buf), frames, False
        log.info("webhooks: outbox compacted from %d to %d bytes (%d messages kept)", before, len(buf),
                 len(self._hooks))

    def close(self) -> None:
        """fsync and close the outbox; safe to call twice."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            if self._dirty:
                self._dirty = False
                os.fdatasync(fd)
        finally:
            os.close(fd)

    async def _sync_loop(self) -> None:
        """fsync the outbox at most ``SYNC_DELAY`` after an unsynced write (asleep while
        there is none)."""
        while True:
            await self._unsynced.wait()
            await trio.sleep(SYNC_DELAY)            # once per second, not once per record
            self._unsynced = trio.Event()
            if not self._dirty or self._fd < 0:
                continue
            self._dirty = False
            fd = os.dup(self._fd)                   # compaction may close ours meanwhile
            try:
                await trio.to_thread.run_sync(os.fdatasync, fd)
            finally:
                os.close(fd)

    # ---------------------------------------------------------------- queueing

    def wants(self, customer: str, event_type: str) -> bool:
        """Whether any endpoint of ``customer`` takes events of ``event_type``."""
        return any(events is None or event_type in events for _, events in self._endpoints.get(customer, ()))

    def emit(self, customer: str, event_type: str, data: dict, created_at: float) -> None:
        """Queue the event for each endpoint of ``customer`` that takes ``event_type``: one
        message each, written to the outbox before this returns, due now. Never awaits."""
        urls = list(dict.fromkeys(url for url, events in self._endpoints.get(customer, ())
                                  if events is None or event_type in events))
        if not urls:
            return
        body = orjson.dumps({"type": event_type, "created_at": _iso(created_at), "data": data})
        now = self.now()
        for url in urls:
            hook = _Hook(new_hook_id(), customer, url, event_type, body, created_at, next_at=now)
            self._write(Queued(hook.id, customer, url, event_type, body, created_at))
            self._hooks[hook.id] = hook
            self._due(hook, now)

    def _due(self, hook: _Hook, at: float) -> None:
        self._seq += 1
        hook.seq = self._seq
        heapq.heappush(self._heap, (at, self._seq, hook))
        self._wake.set()

    def dead_letters(self) -> list[DeadLetter]:
        """The messages given up on, oldest death first."""
        return sorted((h.letter() for h in self._hooks.values() if h.dead), key=lambda d: d.died_at)

    def retry_dead(self, hook_id: str) -> bool:
        """Send a dead letter again: pending, due now, attempts counted from 0. Returns
        False if there is no such dead letter."""
        hook = self._hooks.get(hook_id)
        if hook is None or not hook.dead:
            return False
        now = self.now()
        self._write(Revived(hook_id, now))
        hook.dead, hook.attempts, hook.next_at = False, 0, now
        self._dead -= 1
        self._due(hook, now)
        return True

    def statistics(self) -> dict[str, int]:
        """``pending`` and ``dead`` messages; ``delivered`` and ``failed_attempts`` since start."""
        return {"pending": len(self._hooks) - self._dead, "dead": self._dead, "delivered": self._delivered,
                "failed_attempts": self._failed_attempts}

    # ---------------------------------------------------------------- sending

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Send due messages until cancelled, at most ``max_in_flight`` attempts at once per
        endpoint URL, each in a nursery owned here; closes the outbox on the way out.

        Cancellation: an attempt cut short writes nothing, so its message stays pending and
        is sent again after a restart.
        """
        try:
            async with trio.open_nursery() as nursery:
                if self._on_write is None:
                    nursery.start_soon(self._sync_loop)
                task_status.started()
                await self._dispatch(nursery)
        finally:
            self.close()

    async def _dispatch(self, nursery: trio.Nursery) -> None:
        heap, ready, in_flight, cap = self._heap, self._ready, self._in_flight, self._max_in_flight
        while True:
            now = self.now()
            while heap and heap[0][0] <= now:
                _, seq, hook = heapq.heappop(heap)
                if hook.seq == seq and not hook.dead and hook.id in self._hooks:
                    ready.setdefault(hook.url, collections.deque()).append(hook)
            for url in list(ready):
                queue = ready[url]
                while queue and in_flight.get(url, 0) < cap:
                    in_flight[url] = in_flight.get(url, 0) + 1
                    nursery.start_soon(self._attempt, queue.popleft())
                if not queue:
                    del ready[url]
            # No checkpoint since the heap was read: nothing can have been queued unseen.
            self._wake = trio.Event()
            with trio.move_on_after(heap[0][0] - now if heap else math.inf):
                await self._wake.wait()

    async def _attempt(self, hook: _Hook) -> None:
        finished = False
        try:
            key = self._keys.get((hook.customer, hook.url))
            if key is None:
                self._bury(hook, "endpoint no longer configured")
            else:
                error = await self._send(hook, key)
                if error is None:
                    self._write(Done(hook.id, self.now()))
                    del self._hooks[hook.id]
                    self._delivered += 1
                else:
                    self._fail(hook, error)
                self._maybe_compact()
            finished = True
        finally:
            self._in_flight[hook.url] -= 1
            if not self._in_flight[hook.url]:
                del self._in_flight[hook.url]
            if not finished and hook.id in self._hooks:
                self._due(hook, self.now())     # cut short: still pending
            self._wake.set()

    async def _send(self, hook: _Hook, key: bytes) -> str | None:
        """One attempt; None when delivered, else what went wrong."""
        timestamp = int(self.now())
        headers = {"content-type": "application/json", "user-agent": USER_AGENT, "svix-id": hook.id,
                   "svix-timestamp": str(timestamp), "svix-signature": _sign(key, hook.id, timestamp, hook.body)}
        timed_out = f"no answer within {self._timeout:g}s"
        try:
            with trio.move_on_after(self._timeout) as scope:
                status = await self._post(hook.url, headers, hook.body, self._timeout)
        except trio.TooSlowError:
            return timed_out
        except Exception as e:      # any failure of one attempt is a failed attempt, not ours
            return f"{type(e).__name__}: {e}"[:300]
        if scope.cancelled_caught:
            return timed_out
        return None if 200 <= status < 300 else f"HTTP {status}"

    def _fail(self, hook: _Hook, error: str) -> None:
        self._failed_attempts += 1
        hook.attempts += 1
        hook.last_error = error
        log.info("webhook %s to %s: attempt %d failed: %s", hook.id, hook.url, hook.attempts, error)
        if hook.attempts > len(self._schedule):
            self._bury(hook, error)
            return
        wait = self._schedule[hook.attempts - 1] * random.uniform(1 - SPREAD, 1 + SPREAD)
        hook.next_at = self.now() + wait
        self._write(Attempted(hook.id, hook.attempts, hook.next_at, error))
        self._due(hook, hook.next_at)

    def _bury(self, hook: _Hook, error: str) -> None:
        hook.dead, hook.died_at, hook.last_error = True, self.now(), error
        self._dead += 1
        self._write(Dead(hook.id, hook.attempts, hook.died_at, error))
        log.info("webhook %s to %s: dead letter after %d attempts: %s", hook.id, hook.url, hook.attempts, error)


def _fsync_dir(folder: Path) -> None:
    """Make a new name (a created or replaced file) in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
