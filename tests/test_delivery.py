"""Engine + delivery on virtual time: retries, expiry, partial outcomes, site isolation.

Sinks run in memory (``Sink.open_stream``), so trio's autojump clock only jumps when every
task truly waits, and hours of retries take milliseconds.
"""

from __future__ import annotations

import pytest
import trio

from sender.config import parse_config
from sender.engine import Engine
from sender.journal import Journal
from sender.sink import Sink, load_rules

from helpers import Sinks, start_engine as start, until


def make_config(tmp_path, routes, spool=None, **delivery):
    return parse_config({
        "spool": {"path": str(tmp_path / "spool"), "fsync": "never", **(spool or {})},
        "listen": {"smtp": ""},
        "delivery": {"retry_interval": 60, "max_retry_interval": 600, "max_age": 3600, **delivery},
        "route": [{"match": m, "relay": r} for m, r in routes],
        "bounces": {"notify": False},      # non-delivery reports: tests/test_ndr.py
    })


BODY = b"Subject: t\r\nMessage-ID: <t@x>\r\n\r\nhello\r\n.line starting with a dot\r\n"


async def test_deferred_message_is_retried_with_backoff_then_delivered(tmp_path, autojump_clock):
    sink = Sink(load_rules('[[rule]]\nmatch = "*@flaky.test"\naction = "defer"\nreply = "451 4.3.0 later"'))
    sink.messages = []
    sinks = Sinks(mx=sink)
    async with trio.open_nursery() as n:
        engine = await start(n, make_config(tmp_path, [("*", "mx:25")]), sinks)
        t0 = trio.current_time()
        await engine.submit("a@x.test", ["u@flaky.test"], BODY)
        await until(lambda: engine.counts["deferred"] == 2)
        # Two attempts failed; the second came 30..60 s after the first (jittered backoff).
        assert 30 <= trio.current_time() - t0 <= 60 + 1
        sink.rules = []
        await until(lambda: engine.counts["delivered"] == 1)
        # Third attempt: 30..120 s after the second (full jitter, never under half the base).
        assert 60 <= trio.current_time() - t0 <= 180 + 1
        assert sink.messages[0]["to"] == ["u@flaky.test"]
        n.cancel_scope.cancel()
    assert Journal(tmp_path / "spool").replay() == {}


async def test_message_expires_after_max_age(tmp_path, autojump_clock):
    sink = Sink(load_rules('[[rule]]\nmatch = "*"\naction = "defer"\nreply = "451 4.7.1 go away"'))
    async with trio.open_nursery() as n:
        engine = await start(n, make_config(tmp_path, [("*", "mx:25")]), Sinks(mx=sink))
        t0 = trio.current_time()
        await engine.submit("a@x.test", ["u@y.test"], BODY)
        await until(lambda: engine.counts["expired"] == 1, step=1)
        elapsed = trio.current_time() - t0
        n.cancel_scope.cancel()
    # The last attempt is made right at max_age, then the message expires.
    assert 3600 <= elapsed <= 3600 + 2
    # Backoff 60 s doubling to a 600 s cap, full jitter from 30 s: at least 7 attempts (every
    # wait at its longest), about 14 on average (23 at most in 20,000 simulated runs), and far
    # fewer than 60 (every wait at 60 s).
    assert 7 <= sink.stats.deferred <= 28
    assert Journal(tmp_path / "spool").replay() == {}


async def test_partial_acceptance_gives_one_outcome_per_recipient(tmp_path, autojump_clock):
    sink = Sink(load_rules(
        '[[rule]]\nmatch = "bad@*"\naction = "reject"\nreply = "550 5.1.1 no such user"\n'
        '[[rule]]\nmatch = "later@*"\naction = "defer"\nreply = "452 4.2.2 mailbox full"\n'))
    sink.messages = []
    async with trio.open_nursery() as n:
        engine = await start(n, make_config(tmp_path, [("*", "mx:25")]), Sinks(mx=sink))
        msg_id = await engine.submit("a@x.test", ["ok@y.test", "bad@y.test", "later@y.test"], BODY)
        await until(lambda: engine.counts["deferred"] == 1)
        assert engine.counts["delivered"] == 1 and engine.counts["bounced"] == 1
        assert sink.messages[0]["to"] == ["ok@y.test"]
        n.cancel_scope.cancel()
    live = Journal(tmp_path / "spool").replay()
    assert list(live) == [msg_id] and live[msg_id].rcpts == ["later@y.test"]


async def test_one_message_to_two_domains_goes_to_two_sites(tmp_path, autojump_clock):
    a, b = Sink(), Sink()
    a.messages, b.messages = [], []
    async with trio.open_nursery() as n:
        engine = await start(n, make_config(tmp_path, [("a.test", "mxa:25"), ("b.test", "mxb:25")]),
                             Sinks(mxa=a, mxb=b))
        await engine.submit("s@x.test", ["1@a.test", "2@b.test", "3@a.test"], BODY)
        await until(lambda: engine.counts["delivered"] == 3)
        n.cancel_scope.cancel()
    assert a.messages[0]["to"] == ["1@a.test", "3@a.test"] and b.messages[0]["to"] == ["2@b.test"]
    assert Journal(tmp_path / "spool").replay() == {}


async def test_a_site_that_only_answers_451_does_not_slow_another(tmp_path, autojump_clock):
    slow = Sink(load_rules('[[rule]]\nmatch = "*"\naction = "defer"\ndelay = 20\nreply = "451 4.3.0 slow"'))
    fast = Sink()
    config = make_config(tmp_path, [("slow.test", "slow:25"), ("fast.test", "fast:25")], connection_limit=5)
    async with trio.open_nursery() as n:
        engine = await start(n, config, Sinks(slow=slow, fast=fast))
        t0 = trio.current_time()
        for i in range(200):
            domain = "slow.test" if i % 2 else "fast.test"
            await engine.submit("s@x.test", [f"u{i}@{domain}"], BODY)
        await until(lambda: fast.stats.messages == 100, step=0.01)
        fast_done = trio.current_time() - t0
        await until(lambda: engine.counts["deferred"] >= 100, step=1)
        slow_done = trio.current_time() - t0
        n.cancel_scope.cancel()
    # 100 messages at 20 s per reply over 5 connections take 400 s; the other site is
    # served at once, in virtual time well under the slow site's first reply.
    assert fast_done < 1.0
    assert slow_done >= 400


async def test_unreachable_site_defers_its_whole_queue_after_one_connect(tmp_path, autojump_clock):
    sinks = Sinks()  # no sink: every connect is refused
    async with trio.open_nursery() as n:
        engine = await start(n, make_config(tmp_path, [("*", "down:25")], connection_limit=1), sinks)
        for i in range(20):
            await engine.submit("s@x.test", [f"u{i}@y.test"], BODY)
        await until(lambda: engine.counts["deferred"] >= 20)
        n.cancel_scope.cancel()
    assert len(sinks.connects) <= 2


async def test_queue_survives_restart_and_is_delivered_after(tmp_path, autojump_clock):
    config = make_config(tmp_path, [("*", "mx:25")], retry_interval=10)
    async with trio.open_nursery() as n:
        engine = await start(n, config, Sinks())  # site down
        ids = [await engine.submit("s@x.test", [f"u{i}@y.test"], BODY) for i in range(10)]
        await until(lambda: engine.counts["deferred"] >= 10)
        n.cancel_scope.cancel()
    sink = Sink()
    sink.messages = []
    async with trio.open_nursery() as n:
        engine = await start(n, config, Sinks(mx=sink))
        await until(lambda: engine.counts["delivered"] == 10)
        n.cancel_scope.cancel()
    assert sorted(m["to"][0] for m in sink.messages) == sorted(f"u{i}@y.test" for i in range(10))
    assert len(set(ids)) == 10


async def test_submit_refuses_bad_recipients(tmp_path, autojump_clock):
    from sender.errors import UsageError

    async with trio.open_nursery() as n:
        engine = await start(n, make_config(tmp_path, [("*", "mx:25")]), Sinks())
        with pytest.raises(UsageError, match="rcpts"):
            await engine.submit("s@x.test", [], BODY)
        with pytest.raises(UsageError, match="invalid recipient"):
            await engine.submit("s@x.test", ["no-domain"], BODY)
        n.cancel_scope.cancel()


@pytest.mark.parametrize("starttls, expect_tls", [("opportunistic", True), ("never", False)])
async def test_starttls_offered_by_the_site(tmp_path, autojump_clock, starttls, expect_tls):
    import ssl

    import trustme

    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.test").configure_cert(server_ctx)
    sink = Sink(tls_context=server_ctx)
    sink.messages = []
    async with trio.open_nursery() as n:
        engine = await start(n, make_config(tmp_path, [("*", "mx:25")], starttls=starttls), Sinks(mx=sink))
        await engine.submit("a@x.test", ["u@y.test"], BODY)
        await until(lambda: engine.counts["delivered"] == 1)
        n.cancel_scope.cancel()
    assert sink.messages[0]["tls"] is expect_tls


async def test_fsync_always_waits_for_outcomes_and_delivers(tmp_path):
    # On the real clock: the fsync thread is real I/O, and a virtual clock would race past
    # the messages' max_age while it runs (the Python twin of the syncer needs the GIL).
    sink = Sink()
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            engine = await start(n, make_config(tmp_path, [("*", "mx:25")], spool={"fsync": "always"}),
                                 Sinks(mx=sink))
            for i in range(20):
                await engine.submit("s@x.test", [f"u{i}@y.test"], BODY)
            await until(lambda: engine.counts["delivered"] == 20)
            fsyncs = engine.journal.statistics().fsyncs
            n.cancel_scope.cancel()
    assert fsyncs >= 2
    assert Journal(tmp_path / "spool").replay() == {}


async def test_compaction_moves_the_last_live_messages_and_deletes_old_segments(tmp_path, autojump_clock):
    sink = Sink(load_rules('[[rule]]\nmatch = "*@later.test"\naction = "defer"\nreply = "451 4.3.0 later"'))
    config = make_config(tmp_path, [("*", "mx:25")], spool={"segment_bytes": "4KiB", "compact_live_ratio": 0.5})
    async with trio.open_nursery() as n:
        engine = await start(n, config, Sinks(mx=sink))
        kept = [await engine.submit("s@x.test", ["keep@later.test"], BODY)]
        for i in range(60):
            await engine.submit("s@x.test", [f"u{i}@y.test"], BODY)
        kept.append(await engine.submit("s@x.test", ["keep2@later.test"], BODY))
        await until(lambda: engine.counts["delivered"] == 60 and engine.counts["deferred"] >= 2)
        first = min(engine.journal.segments())
        with trio.fail_after(600):  # virtual seconds: the compactor runs every second
            await until(lambda: first not in engine.journal.segments(), step=1)
        n.cancel_scope.cancel()
    live = Journal(tmp_path / "spool").replay()
    assert sorted(live) == sorted(kept)           # moved forward, not lost
    assert all(d.segment > first for d in live.values())


async def test_a_phase_timeout_defers_the_message_and_drops_the_session(tmp_path, autojump_clock):
    # The sink sits on the end of data for 900 s; RFC 5321's 10 minutes for "end of DATA"
    # run out first. The outcome is unknown, so the message is deferred, never bounced.
    sink = Sink(load_rules('[[rule]]\nmatch = "*@tarpit.test"\naction = "delay"\nat = "data"\ndelay = 900'))
    config = make_config(tmp_path, [("*", "mx:25")], timeouts={"data_done": "10m"})
    async with trio.open_nursery() as n:
        engine = await start(n, config, Sinks(mx=sink))
        t0 = trio.current_time()
        await engine.submit("s@x.test", ["u@tarpit.test"], BODY)
        await until(lambda: engine.counts["deferred"] == 1, step=1)
        elapsed = trio.current_time() - t0
        n.cancel_scope.cancel()
    assert 600 <= elapsed < 900
    live = Journal(tmp_path / "spool").replay()
    assert len(live) == 1 and next(iter(live.values())).attempts == 1


async def test_connections_leave_from_the_configured_source_address(tmp_path):
    # Real loopback sockets (no virtual clock): 127.0.0.2 stands in for a sending IP.
    sink = Sink()
    sink.messages = []
    async with trio.open_nursery() as n:
        host, port = await n.start(sink.run, "127.0.0.1:0")
        config = make_config(tmp_path, [("*", f"{host}:{port}")], source="127.0.0.2")
        engine = await n.start(Engine(config).run)
        await engine.submit("s@x.test", ["u@y.test"], BODY)
        with trio.fail_after(10):
            await until(lambda: engine.counts["delivered"] == 1, step=0.01)
        n.cancel_scope.cancel()
    assert sink.messages[0]["peer"].startswith("127.0.0.2:")


async def test_an_idle_session_is_reused_then_closed_after_idle_timeout(tmp_path, autojump_clock):
    sink = Sink([])
    async with trio.open_nursery() as n:
        engine = await start(n, make_config(tmp_path, [("*", "mx:25")], idle_timeout=5), Sinks(mx=sink))

        def pool():
            (stats,) = engine.dispatcher.statistics()
            return stats

        await engine.submit("a@x.test", ["u1@y.test"], BODY)
        await until(lambda: engine.counts["delivered"] == 1)
        await until(lambda: pool().idle == 1)
        await trio.sleep(3)                          # within idle_timeout: the session is reused
        await engine.submit("a@x.test", ["u2@y.test"], BODY)
        await until(lambda: engine.counts["delivered"] == 2)
        assert pool().sessions_opened == 1
        await until(lambda: pool().idle == 1)
        idle_since = trio.current_time()
        with trio.fail_after(30):
            await until(lambda: pool().workers == 0)  # QUIT after idle_timeout (reaped each second)
        assert 5 <= trio.current_time() - idle_since <= 6.5
        await engine.submit("a@x.test", ["u3@y.test"], BODY)
        await until(lambda: engine.counts["delivered"] == 3)
        assert pool().sessions_opened == 2
        n.cancel_scope.cancel()


async def test_a_quiet_path_rests_without_a_task_and_wakes_for_new_mail(tmp_path, autojump_clock):
    sink = Sink()
    async with trio.open_nursery() as n:
        engine = await start(n, make_config(tmp_path, [("*", "mx:25")]), Sinks(mx=sink))
        await engine.submit("a@x.test", ["u@y.test"], BODY)
        await until(lambda: engine.counts["delivered"] == 1)
        (pool,) = engine.dispatcher.pools.values()
        tasks = len(engine.dispatcher.nursery.child_tasks)
        await trio.sleep(60)
        assert not pool._running and len(engine.dispatcher.nursery.child_tasks) == tasks - 1
        await engine.submit("a@x.test", ["v@y.test"], BODY)
        await until(lambda: engine.counts["delivered"] == 2)
        assert pool._running
        n.cancel_scope.cancel()
    assert sink.stats.messages == 2


async def test_a_scheduled_message_goes_at_its_time_even_after_a_restart(tmp_path, autojump_clock):
    sink = Sink()
    sink.messages = []
    sinks = Sinks(mx=sink)
    config = make_config(tmp_path, [("*", "mx:25")])
    epoch = 1_800_000_000.0         # both engines read the same (virtual) wall clock
    async with trio.open_nursery() as n:
        await n.start(sink.run_in_memory)
        engine = await n.start(Engine(config, open_stream=sinks.open_stream, epoch=epoch).run)
        await engine.submit("s@x.test", ["later@y.test"], BODY, not_before=epoch + 3600)
        await trio.sleep(1800)
        assert sink.messages == []
        n.cancel_scope.cancel()
    async with trio.open_nursery() as n:
        await n.start(sink.run_in_memory)
        engine = await n.start(Engine(config, open_stream=sinks.open_stream, epoch=epoch).run)
        await until(lambda: engine.counts["delivered"] == 1, step=1)
        assert 3600 <= trio.current_time() <= 3602
        n.cancel_scope.cancel()


async def test_submit_many_commits_a_batch_at_once_and_answers_for_each(tmp_path):
    from sender.engine import Submission

    sink = Sink()
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            engine = await start(n, make_config(tmp_path, [("*", "mx:25")], spool={"fsync": "batch"}),
                                 Sinks(mx=sink))
            engine.suppression.add("", "gone@y.test", "invalid_recipient", engine.now())
            before = engine.journal.statistics().fsyncs
            got = await engine.submit_many([Submission("s@x.test", [f"u{i}@y.test"], BODY) for i in range(50)]
                                           + [Submission("s@x.test", ["gone@y.test"], BODY),
                                              Submission("s@x.test", [], BODY)])
            fsyncs = engine.journal.statistics().fsyncs - before
            await until(lambda: engine.counts["delivered"] == 50)
            n.cancel_scope.cancel()
    assert all(isinstance(x, str) for x in got[:50]) and len(set(got[:50])) == 50
    assert type(got[50]).__name__ == "Suppressed" and type(got[51]).__name__ == "UsageError"
    assert fsyncs <= 2                       # one group commit for the 50, not 50
    assert Journal(tmp_path / "spool").replay() == {}


async def test_rescheduled_and_canceled_messages_keep_their_new_fate_across_a_restart(tmp_path, autojump_clock):
    sink = Sink()
    sink.messages = []
    sinks = Sinks(mx=sink)
    config = make_config(tmp_path, [("*", "mx:25")], max_age=86400)
    epoch = 1_800_000_000.0
    async with trio.open_nursery() as n:
        await n.start(sink.run_in_memory)
        engine = await n.start(Engine(config, open_stream=sinks.open_stream, epoch=epoch).run)
        later = await engine.submit("s@x.test", ["later@y.test"], BODY, not_before=epoch + 600)
        sooner = await engine.submit("s@x.test", ["sooner@y.test"], BODY, not_before=epoch + 600)
        gone = await engine.submit("s@x.test", ["gone@y.test"], BODY, not_before=epoch + 600)
        await engine.reschedule(later, "", epoch + 7200)
        await engine.reschedule(sooner, "", epoch + 300)
        await engine.cancel(gone)
        await trio.sleep(700)                         # past the first time of all three
        assert [m["to"] for m in sink.messages] == [["sooner@y.test"]]
        n.cancel_scope.cancel()
    async with trio.open_nursery() as n:
        await n.start(sink.run_in_memory)
        engine = await n.start(Engine(config, open_stream=sinks.open_stream, epoch=epoch).run)
        assert set(engine._live) == {later}
        await until(lambda: engine.counts["delivered"] == 1, step=1)
        assert 7200 <= trio.current_time() <= 7202
        await trio.sleep(3600)
        n.cancel_scope.cancel()
    assert [m["to"] for m in sink.messages] == [["sooner@y.test"], ["later@y.test"]]
