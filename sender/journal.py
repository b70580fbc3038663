"""Append-only journal: the only durable state of the queue.

Layout: a spool directory of numbered segment files (``0000000001.seg``, ...). Each record is
one frame ``[u32 length][u32 crc32c(payload)][payload = msgpack of a JournalRecord]``, little
endian. Frames are only ever appended; a segment is sealed (fsynced) when the next one starts.
A segment's file is grown ahead of its frames in zero-filled steps of ``RUNWAY`` bytes: an
fdatasync that covers only blocks already allocated and written flushes data alone, without a
filesystem-journal commit for a new file size (about half the latency, and far steadier under
CPU load). So the data of a segment ends at the first all-zero frame header after which the
file holds only zeros; a header of zeros followed by anything else is damage like any other.

Every ``append()`` writes its frame at once (one ``write()`` into the page cache), so a record
survives a crash of this process as soon as ``append()`` returns. Durability against power loss
is group commit: ``await commit()`` waits for the writer task, which fsyncs once (on the
:class:`~sender.syncer.Syncer` thread, so the event loop keeps accepting) for everything written
since its last fsync, then wakes every waiter of that batch at once. Policies:

- ``batch`` (default): acknowledgements wait for the group fsync; outcome records ride along.
  A record that nobody waits for (``append()`` alone) does not start an fsync: it goes with
  the next commit's, or at the latest ``LAZY_SYNC`` seconds later. A drain with no intake thus
  costs one fsync a second instead of one per few deliveries; after a power loss, at most that
  last second's deliveries are made again (Postfix does not fsync a finished message at all).
- ``always``: like batch, and callers also wait for outcome records (no redelivery after a
  power loss); the engine decides which records it waits for.
- ``never``: no fsync at all; a commit returns once its frame is written.

Replay rebuilds the live queue from the segments: a torn or corrupt tail of the newest segment
is truncated with a warning naming the segment and offset; a corrupt frame anywhere else stops
start-up with :class:`JournalCorrupt` unless ``repair=True``, which skips to the next valid frame.

Bodies are not kept in memory: the queue holds (segment, offset, length) of each Accepted frame
and :meth:`Journal.read` fetches it with one ``pread`` when the message is delivered.

Compaction (driven by the engine, which knows which messages are live): only the oldest
segments are ever deleted, and only once no live message has its Accepted frame there. Deleting
strictly oldest-first keeps every final record newer than the Accepted record it finalizes, so
replay can never resurrect a finished message. Live messages in a sparse old segment are moved
forward by re-appending their Accepted record (with the remaining recipients) first.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal, NamedTuple

import msgspec
import trio
from crc32c import crc32c

from .model import Accepted, Deferred, Delivery, JournalRecord, Rec, Rescheduled
from .syncer import Syncer

__all__ = ["RUNWAY", "Journal", "JournalCorrupt", "JournalStatistics", "Location", "SEGMENT_SUFFIX"]

log = logging.getLogger("sender.journal")

SEGMENT_SUFFIX = ".seg"
LAZY_SYNC = 1.0     # seconds: the longest an appended record waits for an fsync nobody asked for
_HEADER = struct.Struct("<II")
_HEADER_SIZE = _HEADER.size
_MAX_FRAME = 1 << 30
_DROP_EVERY = 16 << 20   # replay unmaps what it has folded every this many bytes
RUNWAY = 1 << 20         # a segment file grows by this many zero bytes at a time
_ZEROS = bytes(RUNWAY)


class JournalCorrupt(Exception):
    """A frame in the middle of the journal fails its checksum; names segment and offset."""


class Location(NamedTuple):
    segment: int
    offset: int
    length: int  # whole frame, header included


class JournalStatistics(msgspec.Struct, frozen=True):
    segments: int
    bytes: int
    live_messages: int
    batches: int
    fsyncs: int
    last_fsync_seconds: float


class _AcceptedHead(Rec, tag="accepted"):
    """Accepted, decoded for replay without copying the body out."""

    id: str
    sender: str
    rcpts: list[str]
    received_at: float
    body: msgspec.Raw
    customer: str = ""
    attempts: int = 0
    next_at: float = 0.0
    message_type: str = ""


class _Final(Rec):
    id: str
    rcpts: list[str]


class _Delivered(_Final, tag="delivered"):
    pass


class _Bounced(_Final, tag="bounced"):
    pass


class _Expired(_Final, tag="expired"):
    pass


class _Canceled(_Final, tag="canceled"):
    pass


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(JournalRecord)
_replay_decoder = msgspec.msgpack.Decoder(_AcceptedHead | _Delivered | Deferred | _Bounced | _Expired | _Canceled
                                          | Rescheduled)


def encode_frame(rec: Rec, buf: bytearray) -> int:
    """Append one frame for ``rec`` to ``buf``; returns the frame length."""
    start = len(buf)
    _encoder.encode_into(rec, buf, start + _HEADER_SIZE)
    payload_len = len(buf) - start - _HEADER_SIZE
    _HEADER.pack_into(buf, start, payload_len, crc32c(memoryview(buf)[start + _HEADER_SIZE:]))
    return payload_len + _HEADER_SIZE


def segment_name(n: int) -> str:
    return f"{n:010d}{SEGMENT_SUFFIX}"


class Journal:
    """The spool directory's segments, one writer task, and the replayed live set.

    Args:
      path: spool directory (created if missing).
      fsync: "always" | "batch" | "never" (see the module docstring).
      segment_bytes: roll to a new segment once the current one would pass this size.
      batch_window: seconds the writer waits for more records before writing a batch.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        fsync: Literal["always", "batch", "never"] = "batch",
        segment_bytes: int = 64 * 1024 * 1024,
        batch_window: float = 0.0,
    ) -> None:
        if fsync not in ("always", "batch", "never"):
            raise ValueError(f"fsync: expected 'always', 'batch' or 'never', got {fsync!r}")
        self.path = Path(path)
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.batch_window = batch_window
        self.live: dict[int, int] = {}          # segment -> live Accepted frames in it
        self.accepted: dict[int, int] = {}      # segment -> all Accepted frames in it
        self._sizes: dict[int, int] = {}        # segment -> bytes of frames (pending included)
        self._alloc = 0                         # current segment's file size (frames + zeros)
        self._readers: dict[int, int] = {}      # segment -> read fd
        self._current = 1
        self._fd = -1
        self._buf = bytearray()
        self._dirty = False
        self._to_sync: dict[int, bool] = {}     # fd -> close it once synced (sealed segment)
        self._side: dict[int, int] = {}         # a side log's fd -> our dup of it, for the next batch
        self.on_fsync: Callable[[float], None] | None = None     # told each group fsync's seconds
        self._batch_done = trio.Event()
        self._appended = trio.Event()         # set by the first append after a batch
        self._urgent = trio.Event()           # set by commit() and wait_durable()
        self._replayed = False
        self._closed = False
        self._failed = False
        self._batches = 0
        self._fsyncs = 0
        self._last_fsync = 0.0

    # ---------------------------------------------------------------- replay

    def segments(self) -> list[int]:
        """Segment numbers on disk, oldest first."""
        out = []
        for p in self.path.glob("*" + SEGMENT_SUFFIX):
            try:
                out.append(int(p.name[: -len(SEGMENT_SUFFIX)]))
            except ValueError:
                continue
        return sorted(out)

    def replay(self, *, repair: bool = False, read_only: bool = False) -> dict[str, Delivery]:
        """Rebuild the live messages (one Delivery per message, all recipients) from disk.

        ``read_only`` (for inspecting a spool a daemon may be writing): a bad tail is only
        skipped, never truncated.

        Raises:
          JournalCorrupt: a corrupt frame before the tail of the newest segment (unless repair).
        """
        if not read_only:
            self.path.mkdir(parents=True, exist_ok=True)
        live: dict[str, Delivery] = {}
        segs = self.segments()
        for i, seg in enumerate(segs):
            self._replay_segment(seg, live, last=(i == len(segs) - 1), repair=repair, read_only=read_only)
        self.live = {}
        for d in live.values():
            self.live[d.segment] = self.live.get(d.segment, 0) + 1
        self._current = segs[-1] if segs else 1
        self._replayed = True
        return live

    def _replay_segment(self, seg: int, live: dict[str, Delivery], *, last: bool, repair: bool,
                        read_only: bool = False) -> None:
        """Fold one segment into ``live``. The file is mapped, not read: pages already folded
        are dropped from this process as it goes, so replaying a big spool does not hold a
        whole segment in memory."""
        file = self.path / segment_name(seg)
        size = file.stat().st_size
        end, truncate = size, False
        if size:
            with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                end, truncate = self._scan(seg, file.name, mm, size, live, last=last, repair=repair,
                                           read_only=read_only)
        if truncate:
            os.truncate(file, end)
        self._sizes[seg] = end

    def _scan(self, seg: int, name: str, mm: mmap.mmap, size: int, live: dict[str, Delivery], *,
              last: bool, repair: bool, read_only: bool) -> tuple[int, bool]:
        """The replay loop; returns where the segment's frames end and whether to truncate
        the file there (a torn tail)."""
        mv = memoryview(mm)
        unpack = _HEADER.unpack_from
        decode = _replay_decoder.decode
        intern = sys.intern
        accepted = 0
        dropped = 0
        off = 0
        rec = payload = None
        try:
            while off < size:
                if off - dropped >= _DROP_EVERY:
                    keep = off & ~(mmap.PAGESIZE - 1)
                    mm.madvise(mmap.MADV_DONTNEED, dropped, keep - dropped)
                    dropped = keep
                # Fast path: a whole frame with a good checksum that decodes.
                if off + _HEADER_SIZE <= size:
                    plen, crc = unpack(mm, off)
                    end = off + _HEADER_SIZE + plen
                    if 0 < plen <= _MAX_FRAME and end <= size:
                        payload = mv[off + _HEADER_SIZE: end]
                        if crc32c(payload) == crc:
                            try:
                                rec = decode(payload)
                            except msgspec.DecodeError:
                                pass
                            else:
                                if type(rec) is _AcceptedHead:
                                    live[rec.id] = Delivery(rec.id, intern(rec.sender), "", rec.rcpts, seg, off,
                                                            end - off, rec.received_at, rec.attempts,
                                                            rec.next_at, rec.customer, rec.message_type)
                                    accepted += 1
                                else:
                                    _apply(rec, live)
                                off = end
                                continue
                if _zeros_from(mm, off, size):
                    return off, False           # the unused end of the segment's runway
                # Slow path: say what is wrong, then truncate, stop, or skip.
                bad = self._check_frame(mv, off, size) or "undecodable record"
                nxt = self._next_valid_frame(mv, off + 1, size)
                where = f"segment {name} at offset {off}"
                if nxt is None and last:
                    if not read_only:
                        log.warning("journal: torn tail in %s (%s): truncated %d bytes", where, bad, size - off)
                        return off, True
                    return off, False
                if not repair:
                    raise JournalCorrupt(
                        f"journal: corrupt record in {where} ({bad}); valid records follow it, so this "
                        f"is not a torn tail. Start with --repair to skip it (records in it are lost)."
                    )
                skip_to = size if nxt is None else nxt
                log.warning("journal: --repair skipped %d bytes in %s (%s)", skip_to - off, where, bad)
                off = skip_to
            return size, False
        finally:
            self.accepted[seg] = self.accepted.get(seg, 0) + accepted
            del rec, payload
            mv.release()

    @staticmethod
    def _check_frame(mv: memoryview, off: int, size: int) -> str | None:
        if off + _HEADER_SIZE > size:
            return "partial header"
        length, crc = _HEADER.unpack_from(mv, off)
        if length == 0 or length > _MAX_FRAME:
            return f"bad length {length}"
        if off + _HEADER_SIZE + length > size:
            return "frame runs past end of file"
        if crc32c(mv[off + _HEADER_SIZE: off + _HEADER_SIZE + length]) != crc:
            return "checksum mismatch"
        return None

    def _next_valid_frame(self, mv: memoryview, start: int, size: int) -> int | None:
        """Scan for the next offset holding a whole valid frame (error path only)."""
        for off in range(start, size - _HEADER_SIZE):
            # A record is a msgpack array: cheap filter before the checksum.
            first = mv[off + _HEADER_SIZE] if off + _HEADER_SIZE < size else 0
            if not (0x90 <= first <= 0x9F or first == 0xDC):
                continue
            if self._check_frame(mv, off, size) is None:
                return off
        return None

    # ---------------------------------------------------------------- writing

    def append(self, rec: Rec) -> Location:
        """Write ``rec`` now (into the page cache, so it survives a crash of this process)
        and return where it is. Never awaits; durability against power loss comes from the
        writer's next fsync."""
        if self._closed:
            raise RuntimeError("journal is closed")
        if self._fd < 0:
            self._open_current()
        buf = self._buf
        del buf[:]
        length = encode_frame(rec, buf)
        seg = self._current
        offset = self._sizes.get(seg, 0)
        if offset and offset + length > self.segment_bytes:
            self._roll()
            seg, offset = self._current, 0
        end = offset + length
        if end > self._alloc:
            self._extend(end)
        _write_all(self._fd, buf, offset)
        self._sizes[seg] = end
        if not self._dirty:
            self._dirty = True
            self._appended.set()
        if isinstance(rec, Accepted):
            self.live[seg] = self.live.get(seg, 0) + 1
            self.accepted[seg] = self.accepted.get(seg, 0) + 1
        return Location(seg, offset, length)

    def _extend(self, end: int) -> None:
        """Grow the current file with zeros to the next ``RUNWAY`` boundary past ``end`` (not
        past the segment size unless one frame is bigger)."""
        target = max(end, min(-(-end // RUNWAY) * RUNWAY, self.segment_bytes))
        view = memoryview(_ZEROS)
        while self._alloc < target:
            self._alloc += os.pwrite(self._fd, view[: min(RUNWAY, target - self._alloc)], self._alloc)

    def _roll(self) -> None:
        """Start the next segment; the writer seals (fsyncs) and closes the old one."""
        self._to_sync[self._fd] = True
        self._fd = -1
        self._current += 1
        self._open_current()

    def sync_with(self, fd: int) -> None:
        """fsync ``fd`` (a side log, such as the webhook outbox) first in the next batch, so
        that what was written there before a record is durable no later than that record.
        The journal syncs a duplicate of ``fd``: its owner may close it meanwhile."""
        if self._closed or fd in self._side:
            return
        self._side[fd] = os.dup(fd)
        if not self._dirty:
            self._appended.set()

    async def commit(self, rec: Rec) -> Location:
        """Append ``rec`` and wait until it is durable under the fsync policy."""
        loc = self.append(rec)
        if self.fsync != "never":
            self._urgent.set()
            await self._batch_done.wait()
        return loc

    async def wait_durable(self) -> None:
        """Wait until everything appended so far is durable."""
        if self.fsync != "never" and (self._dirty or self._to_sync):
            self._urgent.set()
            await self._batch_done.wait()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The single fsync task (group commit). Runs until cancelled.

        Cancellation: the final sync in :meth:`close` is synchronous, so it completes anyway.
        """
        if not self._replayed:
            self.replay()
        if self._fd < 0:
            self._open_current()
        syncer = Syncer()
        task_status.started()
        try:
            while True:
                # At once for a waiter; records nobody waits for get up to LAZY_SYNC.
                while not self._urgent.is_set():
                    if self._dirty or self._to_sync or self._side:
                        with trio.move_on_after(LAZY_SYNC):     # once per batch, not per record
                            await self._urgent.wait()
                        break
                    await self._appended.wait()
                    self._appended = trio.Event()
                if self.batch_window:
                    await trio.sleep(self.batch_window)
                self._urgent = trio.Event()
                fds = dict.fromkeys(self._side.values(), True)     # side logs first
                fds.update(self._to_sync)
                self._side, self._to_sync = {}, {}
                if self._dirty:
                    fds.setdefault(self._fd, False)
                    self._dirty = False
                done, self._batch_done = self._batch_done, trio.Event()
                try:
                    if self.fsync != "never" and fds:
                        start = trio.current_time()
                        syncer.start(list(fds))
                        try:
                            await trio.lowlevel.wait_readable(syncer.ready_fd)
                        finally:
                            # Cancelled or not, the fsync runs to its end (this waits for it
                            # then), and its result must be read before the next request. (A
                            # shielded scope here would cost more than the rest of the batch.)
                            syncer.finish()
                        self._last_fsync = trio.current_time() - start
                        if self.on_fsync is not None:
                            self.on_fsync(self._last_fsync)
                        self._fsyncs += 1
                except trio.Cancelled:
                    done.set()          # the fsync did complete
                    raise
                except OSError:
                    # A failed fsync may have lost pages that a retry would call clean:
                    # acknowledge nothing more; the daemon stops with the error.
                    self._failed = True
                    raise
                finally:
                    for fd, close in fds.items():
                        if close:
                            os.close(fd)
                self._batches += 1
                done.set()
        finally:
            syncer.close()
            self.close()

    def _open_current(self) -> None:
        seg = self._current
        path = self.path / segment_name(seg)
        created = not path.exists()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        self._alloc = os.fstat(self._fd).st_size
        self._sizes.setdefault(seg, 0)
        if created and self.fsync != "never":
            dfd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Sync (per policy) and close every file; wakes all waiters. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        fds = dict.fromkeys(self._side.values(), True)
        fds.update(self._to_sync)
        self._side = {}
        if self._fd >= 0:
            fds[self._fd] = True
        try:
            if self.fsync != "never" and not self._failed:
                _fsync_all(list(fds))
        finally:
            for fd in fds:
                os.close(fd)
            self._fd = -1
            self._to_sync = {}
        if not self._failed:
            self._batch_done.set()
        for fd in self._readers.values():
            os.close(fd)
        self._readers.clear()

    # ---------------------------------------------------------------- reading

    def read(self, segment: int, offset: int, length: int) -> Accepted:
        """Fetch an Accepted record (with its body) from disk, checking its checksum."""
        fd = self._readers.get(segment)
        if fd is None:
            fd = self._readers[segment] = os.open(self.path / segment_name(segment), os.O_RDONLY)
        frame = os.pread(fd, length, offset)
        plen, crc = _HEADER.unpack_from(frame, 0)
        payload = memoryview(frame)[_HEADER_SIZE:]
        if len(frame) != length or plen != length - _HEADER_SIZE or crc32c(payload) != crc:
            raise JournalCorrupt(f"journal: bad frame at segment {segment_name(segment)} offset {offset}")
        rec = _decoder.decode(payload)
        if not isinstance(rec, Accepted):
            raise JournalCorrupt(f"journal: expected an accepted record at {segment_name(segment)}:{offset}")
        return rec

    # ---------------------------------------------------------------- compaction

    def release(self, segment: int) -> None:
        """A live message whose Accepted frame is in ``segment`` became final (or moved)."""
        n = self.live.get(segment, 0) - 1
        if n > 0:
            self.live[segment] = n
        else:
            self.live.pop(segment, None)

    def drop_dead_segments(self) -> list[int]:
        """Delete the oldest sealed segments while none of them holds a live message."""
        dropped = []
        for seg in sorted(self._sizes):
            if seg >= self._current or self.live.get(seg):
                break
            fd = self._readers.pop(seg, None)
            if fd is not None:
                os.close(fd)
            try:
                os.unlink(self.path / segment_name(seg))
            except FileNotFoundError:
                pass
            del self._sizes[seg]
            self.accepted.pop(seg, None)
            dropped.append(seg)
        return dropped

    def oldest_sealed(self) -> int | None:
        """The oldest segment that is no longer being written, if any."""
        segs = sorted(self._sizes)
        return segs[0] if segs and segs[0] < self._current else None

    @property
    def total_bytes(self) -> int:
        return sum(self._sizes.values())

    def statistics(self) -> JournalStatistics:
        return JournalStatistics(
            segments=len(self._sizes),
            bytes=self.total_bytes,
            live_messages=sum(self.live.values()),
            batches=self._batches,
            fsyncs=self._fsyncs,
            last_fsync_seconds=self._last_fsync,
        )


def _write_all(fd: int, buf: bytearray, offset: int) -> None:
    view = memoryview(buf)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _zeros_from(mm: mmap.mmap, start: int, end: int) -> bool:
    """Whether ``mm[start:end]`` holds only zero bytes (read a runway's worth at a time)."""
    for at in range(start, end, RUNWAY):
        chunk = mm[at: min(at + RUNWAY, end)]
        if chunk != _ZEROS[: len(chunk)]:
            return False
    return True


def _fsync_all(fds: list[int]) -> None:
    for fd in fds:
        os.fdatasync(fd)


def _apply(rec, live: dict[str, Delivery]) -> None:
    """Fold one replayed outcome record into the live set."""
    d = live.get(rec.id)
    if d is None:
        return
    if isinstance(rec, Deferred):
        d.attempts = max(d.attempts, rec.attempts)
        d.next_at = max(d.next_at, rec.next_at)
        return
    if isinstance(rec, Rescheduled):
        d.next_at = rec.next_at
        d.received_at = rec.next_at         # a scheduled message's max_age counts from its time
        return
    done = set(rec.rcpts)
    d.rcpts = [r for r in d.rcpts if r not in done]
    if not d.rcpts:
        del live[rec.id]
