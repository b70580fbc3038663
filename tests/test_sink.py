"""The programmable sink: rules, replies, drops, delays, statistics and the message log.

Rule tests run in memory on virtual time (``Sink.run_in_memory`` + ``Sink.open_stream``),
driven by the real delivery client, so they check what a client actually sees.
"""

from __future__ import annotations

import orjson
import pytest
import trio

from sender.config import ConfigError
from sender.errors import SessionError
from sender.model import Reply
from sender.sink import Sink, load_rules, parse_reply
from sender.smtp.client import open_session

BODY = b"Subject: t\r\nMessage-ID: <abc@client.test>\r\n\r\nhello\r\n"

RULES = """
[[rule]]
match = "vip@*"
action = "accept"
reply = "250 2.1.5 Welcome"

[[rule]]
match = "*@defer.test"
action = "defer"
reply = "451 4.3.0 Try again later"

[[rule]]
match = "*@reject.test"
action = "reject"
reply = "550 5.1.1 No such user here"

[[rule]]
match = "*@late.test"
action = "reject"
reply = "554 5.7.1 Refused at end of data"
at = "data"

[[rule]]
match = "*@drop.test"
action = "drop"

[[rule]]
match = "*@slow.test"
action = "delay"
delay = "30s"

[[rule]]
match = "*@slow-defer.test"
action = "defer"
delay = 10
"""


async def start(nursery, rules: str = RULES) -> Sink:
    sink = Sink(load_rules(rules))
    sink.messages = []
    await nursery.start(sink.run_in_memory)
    return sink


async def connect(sink: Sink):
    return await open_session("mx.test", 25, ehlo="client.test", open_stream=sink.open_stream)


async def test_rules_answer_per_recipient_with_the_configured_reply(autojump_clock):
    async with trio.open_nursery() as n:
        sink = await start(n)
        s = await connect(sink)
        res = await s.transaction("a@x.test", ["ok@y.test", "u@defer.test", "u@reject.test", "vip@reject.test",
                                               "U@DEFER.TEST"], BODY)
        await s.quit()
        n.cancel_scope.cancel()
    assert res.rcpts == [
        Reply(250, "Ok", "2.1.5"),                          # no rule matches: accepted
        Reply(451, "Try again later", "4.3.0"),
        Reply(550, "No such user here", "5.1.1"),
        Reply(250, "Welcome", "2.1.5"),                     # first match wins over *@reject.test
        Reply(451, "Try again later", "4.3.0"),             # patterns match case-insensitively
    ]
    assert res.data_started and res.final.code == 250
    assert [m["to"] for m in sink.messages] == [["ok@y.test", "vip@reject.test"]]
    st = sink.stats
    assert (st.connections, st.messages, st.recipients, st.deferred, st.rejected, st.dropped) == (1, 1, 2, 2, 1, 0)


async def test_default_replies_and_derived_enhanced_codes(autojump_clock):
    rules = ('[[rule]]\nmatch = "*@d.test"\naction = "defer"\n'
             '[[rule]]\nmatch = "*@r.test"\naction = "reject"\n'
             '[[rule]]\nmatch = "*@bare.test"\naction = "defer"\nreply = "421 closing soon"\n')
    async with trio.open_nursery() as n:
        sink = await start(n, rules)
        s = await connect(sink)
        res = await s.transaction("a@x.test", ["u@d.test", "u@r.test"], BODY)
        assert [(r.code, r.enhanced) for r in res.rcpts] == [(451, "4.3.0"), (550, "5.1.1")]
        assert not res.data_started  # no recipient accepted: the client reset instead
        await s.quit()
        n.cancel_scope.cancel()
    assert parse_reply("421 closing soon", "k") == (421, "4.0.0", "closing soon")
    assert sink.stats.messages == 0 and sink.messages == []


async def test_at_data_answers_at_end_of_data(autojump_clock):
    async with trio.open_nursery() as n:
        sink = await start(n)
        s = await connect(sink)
        res = await s.transaction("a@x.test", ["u@late.test", "ok@y.test"], BODY)
        # Both recipients were taken at RCPT; the rule answered the data, for the whole message.
        assert [r.code for r in res.rcpts] == [250, 250]
        assert res.data_started and res.final == Reply(554, "Refused at end of data", "5.7.1")
        # The session is still usable afterwards.
        ok = await s.transaction("a@x.test", ["ok@y.test"], BODY)
        assert ok.final.code == 250
        await s.quit()
        n.cancel_scope.cancel()
    assert [m["to"] for m in sink.messages] == [["ok@y.test"]]
    assert (sink.stats.messages, sink.stats.rejected) == (1, 1)


async def test_drop_closes_the_connection(autojump_clock):
    async with trio.open_nursery() as n:
        sink = await start(n)
        s = await connect(sink)
        with pytest.raises(SessionError):
            await s.transaction("a@x.test", ["u@drop.test"], BODY)
        await s.aclose()
        # A new connection works.
        s = await connect(sink)
        assert (await s.transaction("a@x.test", ["ok@y.test"], BODY)).final.code == 250
        await s.quit()
        n.cancel_scope.cancel()
    assert (sink.stats.connections, sink.stats.dropped, sink.stats.messages) == (2, 1, 1)


async def test_delay_waits_then_answers(autojump_clock):
    async with trio.open_nursery() as n:
        sink = await start(n)
        s = await connect(sink)
        t0 = trio.current_time()
        res = await s.transaction("a@x.test", ["u@slow.test"], BODY)
        slow = trio.current_time() - t0
        assert res.rcpts[0].code == 250 and res.final.code == 250
        t0 = trio.current_time()
        res = await s.transaction("a@x.test", ["u@slow-defer.test"], BODY)
        deferred_after = trio.current_time() - t0
        assert res.rcpts[0].code == 451
        t0 = trio.current_time()
        await s.transaction("a@x.test", ["ok@y.test"], BODY)
        fast = trio.current_time() - t0
        await s.quit()
        n.cancel_scope.cancel()
    assert 30 <= slow < 31
    assert 10 <= deferred_after < 11
    assert fast < 1
    assert (sink.stats.messages, sink.stats.deferred) == (2, 1)


async def test_message_records_carry_the_envelope(autojump_clock):
    async with trio.open_nursery() as n:
        sink = await start(n, "")
        s = await connect(sink)
        await s.transaction("a@x.test", ["u1@y.test", "u2@z.test"], BODY)
        await s.transaction("", ["u3@y.test"], b"Subject: no id\r\n\r\nx\r\n")
        await s.quit()
        n.cancel_scope.cancel()
    first, second = sink.messages
    assert {k: first[k] for k in ("message_id", "from", "to", "size")} == {
        "message_id": "<abc@client.test>", "from": "a@x.test", "to": ["u1@y.test", "u2@z.test"],
        "size": len(BODY)}
    assert first["peer"].startswith("127.0.0.1:")
    assert second["message_id"] is None and second["from"] == ""
    assert sink.stats.recipients == 3


async def test_log_file_has_one_json_line_per_accepted_message(tmp_path):
    # The --log file is written by the socket server only, so this one uses loopback.
    log = tmp_path / "sink.jsonl"
    sink = Sink(load_rules('[[rule]]\nmatch = "*@reject.test"\naction = "reject"'), log_path=str(log))
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            host, port = await n.start(sink.run, "127.0.0.1:0")
            s = await open_session(host, port, ehlo="client.test")
            for i in range(3):
                body = b"Message-ID: <m%d@client.test>\r\n\r\nbody %d\r\n" % (i, i)
                res = await s.transaction("a@x.test", [f"u{i}@y.test", "no@reject.test"], body)
                assert res.final.code == 250
            await s.transaction("a@x.test", ["no@reject.test"], BODY)  # refused: not logged
            local_port = s.stream.socket.getsockname()[1]
            await s.quit()
            n.cancel_scope.cancel()
    lines = log.read_bytes().splitlines()
    entries = [orjson.loads(line) for line in lines]
    assert [e["message_id"] for e in entries] == [f"<m{i}@client.test>" for i in range(3)]
    for i, e in enumerate(entries):
        assert {"message_id", "from", "to", "peer", "size", "at"} <= set(e)
        assert e["from"] == "a@x.test" and e["to"] == [f"u{i}@y.test"]
        assert e["peer"] == f"127.0.0.1:{local_port}"
        assert e["size"] == len(b"Message-ID: <m0@client.test>\r\n\r\nbody 0\r\n")
        assert isinstance(e["at"], float)
    assert (sink.stats.messages, sink.stats.rejected) == (3, 4)


@pytest.mark.parametrize("rules, key", [
    ('[[rule]]\nmatch = "*"\naction = "defer"\nreply = "550 5.1.1 no"', "rule[0].reply"),
    ('[[rule]]\nmatch = "*"\n[[rule]]\nmatch = "*"\naction = "reject"\nreply = "451 later"', "rule[1].reply"),
    ('[[rule]]\nmatch = "*"\nreply = "hello"', "rule[0].reply"),
    ('[[rule]]\nmatch = "*"\ndelay = "soon"', "rule[0].delay"),
    ('[[rule]]\nmatch = "*"\naction = "bounce"', "rule[0]"),
    ('[[rule]]\nmatch = "*"\nfrobnicate = 1', "rule[0]"),
    ('[[rule]]\naction = "accept"', "rule[0]"),
])
def test_bad_rules_name_the_rule_and_field(rules, key):
    with pytest.raises(ConfigError) as e:
        Sink(load_rules(rules))
    assert key in str(e.value)


async def test_a_delay_does_not_hold_back_the_reply_to_an_earlier_pipelined_message(autojump_clock):
    async with trio.open_nursery() as nursery:
        sink = await start(nursery)
        session = await open_session("mx", 25, ehlo="client.test", open_stream=sink.open_stream)
        t0 = trio.current_time()
        finished: dict[str, float] = {}

        class Item:
            def __init__(self, rcpt):
                self.sender, self.rcpts = "a@x.test", [rcpt]

        first, second = Item("u@fast.test"), Item("u@slow.test")
        queue = [second]
        # first's body goes out in the same write as second's MAIL/RCPT/DATA (pipelining).
        await session.pipeline(first, lambda: queue.pop() if queue else None, lambda _: BODY,
                               lambda item, res: finished.setdefault(item.rcpts[0], trio.current_time() - t0))
        await session.quit()
        nursery.cancel_scope.cancel()
    assert finished["u@fast.test"] < 1.0       # answered at once, not after the 30 s delay
    assert finished["u@slow.test"] >= 30


async def test_a_silent_client_is_disconnected_after_the_idle_timeout(autojump_clock):
    async with trio.open_nursery() as nursery:
        sink = await start(nursery)
        session = await open_session("mx", 25, ehlo="client.test", open_stream=sink.open_stream)
        await trio.sleep(299)
        ok = await session.transaction("a@x.test", ["u@fine.test"], BODY)   # still open at 299 s
        assert ok.final.code == 250
        await trio.sleep(400)                                               # silent past 300 s
        with pytest.raises(SessionError):
            await session.transaction("a@x.test", ["u@fine.test"], BODY)
        await session.aclose()
        nursery.cancel_scope.cancel()
