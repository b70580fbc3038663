"""Idempotency keys, as Resend defines them: a request repeated with the same key gets the
first answer again, and sends nothing again, for 24 hours.

Keys belong to a customer. A request that carries one is looked up first:

- the same key with the same payload (a digest of method, path and body) -> the stored answer;
- the same key with another payload -> :class:`KeyReused` (HTTP 409 invalid_idempotent_request);
- the same key while the first request is still being answered -> :class:`KeyInFlight` (409
  concurrent_idempotent_requests);
- a key that is empty or over 256 characters -> :class:`KeyInvalid` (400).

Only successful answers are kept; a refused request leaves the key free for a corrected one.
Answers are kept in ``SPOOL/idempotency.log``, one JSON line each, fsynced before the answer
goes out, so they survive a restart; the file is rewritten without the expired ones each
time it has doubled. The messages of a request are durable before its key is: a crash in
between (one fsync) forgets the key, and a retry then queues the messages again.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import msgspec
import orjson
import trio

from .files import replace_file

__all__ = ["IdempotencyStore", "KeyInvalid", "KeyReused", "KeyInFlight", "TTL", "MAX_KEY", "digest"]

TTL = 24 * 3600.0
MAX_KEY = 256
REWRITE_MIN = 1000          # lines in the log before it is first rewritten


class KeyInvalid(ValueError):
    """The key is empty or longer than MAX_KEY characters."""


class KeyReused(Exception):
    """The key was used with another payload."""


class KeyInFlight(Exception):
    """The first request with this key is still being answered."""


class _Entry(msgspec.Struct, array_like=True):
    customer: str
    key: str
    digest: str
    status: int
    body: str                   # the answer's JSON, as sent
    at: float


def digest(*parts: bytes) -> str:
    """What identifies a request's payload (method, path, body...)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def check_key(key: str) -> str:
    if not 1 <= len(key) <= MAX_KEY:
        raise KeyInvalid(f"Idempotency-Key must be 1 to {MAX_KEY} characters, got {len(key)}")
    return key


class IdempotencyStore:
    """The answers of the last 24 hours by (customer, key), and the keys being answered.

    Args:
      path: the log file (created with its folder).
      ttl: how long an answer is kept.
    """

    def __init__(self, path: str | os.PathLike, ttl: float = TTL) -> None:
        self.path = Path(path)
        self.ttl = ttl
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._in_flight: set[tuple[str, str]] = set()
        self._lines = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._load()
        self._next_rewrite = max(REWRITE_MIN, 2 * self._lines)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def _load(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        decoder = msgspec.json.Decoder(_Entry)
        for line in data.split(b"\n"):
            try:
                entry = decoder.decode(line)
            except msgspec.DecodeError:
                continue                    # a torn last line after a crash
            self._entries[(entry.customer, entry.key)] = entry
            self._lines += 1
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as f:   # drop the torn tail before appending after it
                f.truncate(data.rfind(b"\n") + 1)

    def begin(self, customer: str, key: str, request_digest: str, now: float) -> tuple[int, str] | None:
        """The stored answer ``(status, body)`` for this key, or None: the caller answers the
        request and then calls :meth:`finish` or :meth:`abandon`.

        Raises:
          KeyInvalid, KeyReused, KeyInFlight.
        """
        check_key(key)
        k = (customer, key)
        entry = self._entries.get(k)
        if entry is not None and now - entry.at < self.ttl:
            if entry.digest != request_digest:
                raise KeyReused("this Idempotency-Key was already used with a different payload")
            return entry.status, entry.body
        if k in self._in_flight:
            raise KeyInFlight("the first request with this Idempotency-Key is still being processed")
        self._in_flight.add(k)
        return None

    def abandon(self, customer: str, key: str) -> None:
        """The request failed: the key is free again."""
        self._in_flight.discard((customer, key))

    async def finish(self, customer: str, key: str, request_digest: str, status: int, body: str,
                     now: float) -> None:
        """Keep the answer, durably, before it is sent."""
        entry = _Entry(customer, key, request_digest, status, body, now)
        try:
            os.write(self._fd, orjson.dumps(msgspec.to_builtins(entry)) + b"\n")
            await trio.to_thread.run_sync(os.fdatasync, self._fd)
            self._entries[(customer, key)] = entry
            self._lines += 1
        finally:
            self._in_flight.discard((customer, key))
        if self._lines >= self._next_rewrite:
            self._compact(now)

    def _compact(self, now: float) -> None:
        """Rewrite the log with the answers still kept."""
        self._entries = {k: e for k, e in self._entries.items() if now - e.at < self.ttl}
        replace_file(self.path, (orjson.dumps(msgspec.to_builtins(e)) + b"\n" for e in self._entries.values()))
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._lines = len(self._entries)
        self._next_rewrite = max(REWRITE_MIN, 2 * self._lines)     # amortized: the log at most doubles

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
