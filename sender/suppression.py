"""Per-customer suppression lists: addresses that must not be mailed again, and why.

A permanent ``invalid_recipient``, ``bad_domain`` or ``inactive_mailbox`` outcome, or a
complaint, adds the recipient to the list of the customer whose message it was; one
customer's bounce never suppresses another customer's recipient. Entries expire by category:
complaints and invalid recipients never (unless removed by hand), a bad domain or an inactive
mailbox after ``suppression.bad_domain_ttl`` / ``inactive_mailbox_ttl``.

The list is journaled in its own file (``SPOOL/suppression.log``): frames of
``[u32 length][u32 crc32c][msgpack]``, an entry added or removed per frame. A write reaches
the file at once with ``O_APPEND`` (a crash of the process loses nothing) and is fsynced
within a second (a power loss can forget the last second's additions, which the next bounce
would add again). The shards of a sharded daemon share the file: each appends its own
changes and reads the others' (``refresh``) once a second. The file is rewritten without its
dead frames at start-up, when one process owns it.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable
from pathlib import Path

import msgspec
from crc32c import crc32c

from .files import replace_file

__all__ = ["SUPPRESSING_CATEGORIES", "Entry", "SuppressionList"]

# Outcomes that suppress, when permanent; and complaints.
SUPPRESSING_CATEGORIES = frozenset({"invalid_recipient", "bad_domain", "inactive_mailbox", "complaint"})

_HEADER = struct.Struct("<II")


class Entry(msgspec.Struct, frozen=True, array_like=True, tag="add"):
    customer: str
    address: str                 # lower-cased
    reason: str                  # the category ("complaint" for a complaint, "manual" by hand)
    added_at: float
    expires_at: float = math.inf
    source: str = ""             # the message id whose outcome added it, or who added it by hand
    detail: str = ""             # the reply or report that said so


class _Removed(msgspec.Struct, frozen=True, array_like=True, tag="remove"):
    customer: str
    address: str
    at: float


_Record = Entry | _Removed
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_Record)


class SuppressionList:
    """The suppression lists of every customer, replayed from ``path``.

    Args:
      path: the log file (created if missing).
      ttl: seconds an entry of a category lasts (categories not named: for good).
    """

    def __init__(self, path: str | os.PathLike, ttl: dict[str, float] | None = None, *,
                 shared: bool = False, on_write: Callable[[], None] | None = None) -> None:
        self.path = Path(path)
        self.on_write = on_write       # told after each local write (the owner schedules a sync)
        self.ttl = dict(ttl or {})
        self._entries: dict[tuple[str, str], Entry] = {}
        self._frames = 0
        self._offset = 0               # bytes of the file read so far
        self._dirty = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        self.refresh()
        if not shared:
            if self._offset < os.fstat(self._fd).st_size:
                os.ftruncate(self._fd, self._offset)     # a torn tail from a crash
            if self._frames > 2 * len(self._entries) + 100:
                self._rewrite()

    def refresh(self) -> None:
        """Read the frames appended since the last read (by this process or a sibling)."""
        size = os.fstat(self._fd).st_size
        if size <= self._offset:
            return
        data = os.pread(self._fd, size - self._offset, self._offset)
        off = 0
        while off + _HEADER.size <= len(data):
            length, crc = _HEADER.unpack_from(data, off)
            payload = data[off + _HEADER.size: off + _HEADER.size + length]
            if length == 0 or len(payload) < length or crc32c(payload) != crc:
                break                  # not whole yet (a sibling's write in progress, or torn)
            try:
                rec = _decoder.decode(payload)
            except msgspec.DecodeError:
                break
            key = (rec.customer, rec.address)
            if isinstance(rec, Entry):
                self._entries[key] = rec
            else:
                self._entries.pop(key, None)
            self._frames += 1
            off += _HEADER.size + length
        self._offset += off

    def _write(self, rec: _Record) -> None:
        payload = _encoder.encode(rec)
        os.write(self._fd, _HEADER.pack(len(payload), crc32c(payload)) + payload)
        self._dirty = True
        self.refresh()                  # applies it, after whatever a sibling appended first
        if self.on_write is not None:
            self.on_write()

    # ---------------------------------------------------------------- queries

    def check(self, customer: str, address: str, now: float) -> Entry | None:
        """The entry that suppresses ``address`` for ``customer`` at ``now``, if any."""
        entry = self._entries.get((customer, address.lower()))
        if entry is None or entry.expires_at <= now:
            return None
        return entry

    def entries(self, now: float, customer: str | None = None) -> list[Entry]:
        """Entries in force, oldest first; one customer's, or everyone's."""
        return sorted((e for e in self._entries.values()
                       if e.expires_at > now and (customer is None or e.customer == customer)),
                      key=lambda e: (e.added_at, e.customer, e.address))

    def __len__(self) -> int:
        return len(self._entries)

    # ---------------------------------------------------------------- changes

    def add(self, customer: str, address: str, reason: str, now: float, *, source: str = "",
            detail: str = "", ttl: float | None = None) -> Entry:
        """Suppress ``address`` for ``customer``; an entry already there is replaced (the
        newest reason and expiry win)."""
        ttl = self.ttl.get(reason, math.inf) if ttl is None else ttl
        entry = Entry(customer, address.lower(), reason, now, now + ttl, source, detail)
        self._write(entry)
        return entry

    def remove(self, customer: str, address: str, now: float) -> bool:
        """Lift a suppression; returns whether there was one."""
        key = (customer, address.lower())
        if key not in self._entries:
            return False
        self._write(_Removed(customer, key[1], now))
        return True

    def sync(self) -> None:
        """fdatasync what this process wrote (thread-safe: writes may go on meanwhile)."""
        if self._dirty:
            self._dirty = False
            os.fdatasync(self._fd)

    def _rewrite(self) -> None:
        """Write the live entries to a new file and swap it in atomically."""
        replace_file(self.path, (_HEADER.pack(len(p), crc32c(p)) + p
                                 for p in map(_encoder.encode, self._entries.values())))
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        self._frames = len(self._entries)
        self._offset = os.fstat(self._fd).st_size

    def close(self) -> None:
        self.sync()
        os.close(self._fd)
