"""Journal: framing, group commit, replay, torn tails, corruption, compaction."""

from __future__ import annotations

import logging
import os
import time

import pytest

import trio
import trio.testing

from sender.journal import LAZY_SYNC, RUNWAY, Journal, JournalCorrupt, segment_name
from sender.model import Accepted, Bounced, Deferred, Delivered, Reply


def accepted(i: int, rcpts=None, body=None) -> Accepted:
    return Accepted(id=f"M{i:05d}", sender="a@x.test", rcpts=rcpts or [f"u{i}@y.test"],
                    received_at=1000.0 + i, body=body or (b"Subject: %d\r\n\r\nhello\r\n" % i))


async def write_all(path, records, **kw) -> list:
    j = Journal(path, **kw)
    j.replay()
    locs = []
    async with trio.open_nursery() as n:
        await n.start(j.run)
        for r in records:
            locs.append(await j.commit(r))
        n.cancel_scope.cancel()
    return locs


@pytest.mark.parametrize("policy", ["always", "batch", "never"])
async def test_commit_then_replay_round_trip(tmp_path, policy):
    recs = [accepted(i) for i in range(10)]
    locs = await write_all(tmp_path, recs + [Delivered("M00003", ["u3@y.test"], 2000.0, Reply(250, "ok", "2.0.0"))],
                           fsync=policy)
    j = Journal(tmp_path)
    live = j.replay()
    assert sorted(live) == [f"M{i:05d}" for i in range(10) if i != 3]
    d = live["M00005"]
    assert (d.segment, d.offset, d.length) == tuple(locs[5])
    assert j.read(d.segment, d.offset, d.length).body == recs[5].body
    j.close()


async def test_group_commit_wakes_every_waiter_with_one_fsync(tmp_path):
    j = Journal(tmp_path, fsync="batch")
    j.replay()
    async with trio.open_nursery() as n:
        await n.start(j.run)
        async with trio.open_nursery() as writers:
            for i in range(200):
                writers.start_soon(j.commit, accepted(i))
        stats = j.statistics()
        n.cancel_scope.cancel()
    assert stats.live_messages == 200
    # 200 concurrent commits were made durable by far fewer fsyncs.
    assert 1 <= stats.fsyncs < 20


async def test_a_record_nobody_waits_for_is_synced_lazily(tmp_path, autojump_clock):
    """Outcome records do not start an fsync of their own: they go with the next commit's,
    or LAZY_SYNC seconds later at the latest."""
    j = Journal(tmp_path, fsync="batch")
    j.replay()
    done = Delivered("M00000", ["u0@y.test"], 2000.0, Reply(250, "ok", "2.0.0"))
    async with trio.open_nursery() as n:
        await n.start(j.run)
        await j.commit(accepted(0))
        base = j.statistics().fsyncs
        j.append(done)
        await trio.sleep(LAZY_SYNC / 2)
        await trio.testing.wait_all_tasks_blocked()
        assert j._dirty and j.statistics().fsyncs == base   # nobody waits: not taken yet
        real_deadline = time.monotonic() + 30           # the fsync itself takes real time,
        while j.statistics().fsyncs == base and time.monotonic() < real_deadline:
            await trio.sleep(0.05)                      # while virtual time jumps ahead
        assert j.statistics().fsyncs == base + 1
        j.append(done)
        await j.commit(accepted(1))                     # a commit takes it along at once
        assert j.statistics().fsyncs == base + 2
        n.cancel_scope.cancel()


async def test_partial_recipients_and_deferral_survive_replay(tmp_path):
    rec = accepted(1, rcpts=["a@y.test", "b@y.test", "c@z.test"])
    await write_all(tmp_path, [
        rec,
        Delivered(rec.id, ["a@y.test"], 1.0),
        Bounced(rec.id, ["c@z.test"], 1.0, Reply(550, "no such user", "5.1.1")),
        Deferred(rec.id, ["b@y.test"], 2.0, next_at=500.0, attempts=3),
    ])
    live = Journal(tmp_path).replay()
    d = live[rec.id]
    assert d.rcpts == ["b@y.test"] and d.attempts == 3 and d.next_at == 500.0


@pytest.mark.parametrize("damage", ["cut", "zeroed"])
async def test_torn_tail_is_truncated_and_earlier_records_kept(tmp_path, caplog, damage):
    # "cut": the file ends mid-way through the last record; "zeroed": the record's second half
    # never reached the disk, and the runway's zeros follow it.
    locs = await write_all(tmp_path, [accepted(i) for i in range(20)])
    seg = tmp_path / segment_name(1)
    last = locs[-1]
    half = last.offset + last.length // 2
    if damage == "cut":
        os.truncate(seg, half)
    else:
        with open(seg, "r+b") as f:
            f.seek(half)
            f.write(bytes(last.length - last.length // 2))
    with caplog.at_level(logging.WARNING, logger="sender.journal"):
        live = Journal(tmp_path).replay()
    assert sorted(live) == [f"M{i:05d}" for i in range(19)]
    assert seg.stat().st_size == last.offset
    assert segment_name(1) in caplog.text and f"offset {last.offset}" in caplog.text


async def test_torn_header_only(tmp_path):
    locs = await write_all(tmp_path, [accepted(i) for i in range(3)])
    seg = tmp_path / segment_name(1)
    with open(seg, "r+b") as f:
        f.seek(locs[-1].offset + locs[-1].length)
        f.write(b"\x10\x00")            # two bytes of a next header
    assert sorted(Journal(tmp_path).replay()) == ["M00000", "M00001", "M00002"]


async def test_segment_files_grow_by_zeroed_runway_and_appends_resume_at_the_data_end(tmp_path, caplog):
    locs = await write_all(tmp_path, [accepted(i) for i in range(3)])
    seg = tmp_path / segment_name(1)
    assert seg.stat().st_size == RUNWAY             # zeros ahead of the frames
    end = locs[-1].offset + locs[-1].length
    assert seg.read_bytes()[end:] == bytes(RUNWAY - end)
    with caplog.at_level(logging.WARNING, logger="sender.journal"):
        more = await write_all(tmp_path, [accepted(i) for i in range(3, 6)])
        live = Journal(tmp_path).replay()
    assert more[0].offset == end                    # the second run wrote after the data, not the zeros
    assert sorted(live) == [f"M{i:05d}" for i in range(6)]
    assert caplog.text == ""                        # a runway's zeros are not damage
    # A frame bigger than the runway is written whole, and the file grows past it.
    big = await write_all(tmp_path, [accepted(9, body=b"b" * (RUNWAY + 10))])
    assert seg.stat().st_size >= big[0].offset + big[0].length
    assert Journal(tmp_path).replay()["M00009"].length == big[0].length


async def test_corrupt_record_in_the_middle_stops_start_up(tmp_path):
    locs = await write_all(tmp_path, [accepted(i) for i in range(5)])
    seg = tmp_path / segment_name(1)
    data = bytearray(seg.read_bytes())
    data[locs[2].offset + 20] ^= 0xFF   # flip a byte inside record 2's payload
    seg.write_bytes(bytes(data))
    with pytest.raises(JournalCorrupt) as e:
        Journal(tmp_path).replay()
    assert segment_name(1) in str(e.value) and f"offset {locs[2].offset}" in str(e.value)
    assert "--repair" in str(e.value)
    # --repair skips exactly the bad record and keeps the rest.
    live = Journal(tmp_path).replay(repair=True)
    assert sorted(live) == ["M00000", "M00001", "M00003", "M00004"]


async def test_segments_roll_and_dead_ones_are_dropped(tmp_path):
    body = b"x" * 3000
    recs = [accepted(i, body=body) for i in range(12)]
    j = Journal(tmp_path, segment_bytes=10_000)
    j.replay()
    async with trio.open_nursery() as n:
        await n.start(j.run)
        locs = [await j.commit(r) for r in recs]
        assert len({loc.segment for loc in locs}) >= 4
        assert all(j.read(*loc).body == body for loc in locs)
        first = locs[0].segment
        for r, loc in zip(recs, locs):
            if loc.segment == first:
                j.append(Delivered(r.id, r.rcpts, 1.0))
                j.release(loc.segment)
        await j.wait_durable()
        assert j.drop_dead_segments() == [first]
        # The next segment still has live messages: nothing more goes.
        assert j.drop_dead_segments() == []
        n.cancel_scope.cancel()
    assert not (tmp_path / segment_name(first)).exists()
    live = Journal(tmp_path).replay()
    assert sorted(live) == sorted(r.id for r, loc in zip(recs, locs) if loc.segment != first)


async def test_read_detects_a_bad_frame(tmp_path):
    locs = await write_all(tmp_path, [accepted(1)])
    seg = tmp_path / segment_name(1)
    data = bytearray(seg.read_bytes())
    data[locs[0].offset + locs[0].length - 3] ^= 0x01
    seg.write_bytes(bytes(data))
    j = Journal(tmp_path)
    with pytest.raises(JournalCorrupt):
        j.read(*locs[0])


def test_bad_fsync_policy_is_named():
    with pytest.raises(ValueError, match="fsync"):
        Journal("/nonexistent", fsync="sometimes")


async def test_a_failed_fsync_acknowledges_nothing(tmp_path, monkeypatch):
    import sender.journal as journal_module

    j = Journal(tmp_path, fsync="batch")
    j.replay()

    class SyncsAPipe(journal_module.Syncer):
        """fdatasync on a pipe fails for real (EINVAL), through the real fsync thread."""

        def start(self, fds):
            self.pipe = os.pipe()
            super().start([self.pipe[0]])

        def finish(self):
            try:
                super().finish()
            finally:
                for fd in self.pipe:
                    os.close(fd)

    monkeypatch.setattr(journal_module, "Syncer", SyncsAPipe)
    acked = []

    async def commit_one():
        await j.commit(accepted(1))
        acked.append(1)

    with pytest.raises(BaseExceptionGroup) as e:
        async with trio.open_nursery() as n:
            await n.start(j.run)
            n.start_soon(commit_one)
    assert e.group_contains(OSError)
    assert acked == []


def test_records_written_before_fields_were_appended_still_decode():
    # Schema evolution: fields are only ever appended with defaults, so a frame from an
    # older writer (here an Accepted record without customer/attempts/next_at) decodes.
    import msgspec

    from sender.journal import _decoder

    old = msgspec.msgpack.encode(["accepted", "M1", "a@x.test", ["b@y.test"], 5.0, b"body"])
    rec = _decoder.decode(old)
    assert isinstance(rec, Accepted) and rec.body == b"body"
    assert (rec.customer, rec.attempts, rec.next_at) == ("", 0, 0.0)


async def test_a_side_log_is_synced_first_in_the_next_batch_even_if_its_owner_closed_it(tmp_path, monkeypatch):
    import sender.journal as journal_mod
    synced: list[list[int]] = []
    real_start = journal_mod.Syncer.start

    def start(self, fds):
        synced.append([os.readlink(f"/proc/self/fd/{fd}") for fd in fds])
        real_start(self, fds)

    monkeypatch.setattr(journal_mod.Syncer, "start", start)
    j = Journal(tmp_path / "spool")
    side = tmp_path / "side.log"
    fd = os.open(side, os.O_WRONLY | os.O_CREAT, 0o600)
    async with trio.open_nursery() as nursery:
        await nursery.start(j.run)
        os.write(fd, b"hook")
        j.sync_with(fd)
        j.sync_with(fd)                 # once per batch
        os.close(fd)                    # the journal holds its own duplicate
        await j.commit(Accepted(id="a", sender="s@x.test", rcpts=["r@y.test"], received_at=0.0, body=b"x"))
        nursery.cancel_scope.cancel()
    assert synced and synced[0][0] == str(side) and synced[0].count(str(side)) == 1
    assert any(p.endswith(".seg") for p in synced[0][1:])
