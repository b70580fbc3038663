"""The SMTP injection listener over real loopback sockets.

An Engine delivers to an in-process Sink; the tests talk raw bytes to ``serve_smtp``.
Real sockets do not mix with the autojump clock, so these run on the real clock, each wait
bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import re
from contextlib import asynccontextmanager

import pytest
import trio

from sender.config import parse_config
from sender.engine import Engine
from sender.inject.smtpd import serve_smtp
from sender.journal import Journal
from sender.model import Accepted, Bounced
from sender.sink import Sink, load_rules

from helpers import RawSMTP, has_enhanced_code, journal_records

BOUND = 5.0  # seconds; every wait on the network is bounded by this
QUEUED = re.compile(r"^250 2\.0\.0 Ok: queued as ([0-9A-F]+)(?:;|$)")


def split_trace(body: bytes) -> tuple[bytes, bytes]:
    """(the Received: header the listener prepends, the message as the client sent it)."""
    assert body.startswith(b"Received: "), body[:80]
    end = 0
    while True:
        end = body.index(b"\r\n", end) + 2
        if body[end:end + 1] not in (b" ", b"\t"):  # not a folded continuation line
            return body[:end], body[end:]


class BodySink(Sink):
    """A sink that also keeps each accepted message's envelope and body (the body without
    the listener's Received: line, which goes to ``traces``)."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.received: list[tuple[str, list[str], bytes]] = []
        self.traces: list[bytes] = []

    def record(self, ev, peer: str, **kw) -> None:
        trace, body = split_trace(ev.body)
        self.received.append((ev.sender, list(ev.rcpts), body))
        self.traces.append(trace)
        super().record(ev, peer, **kw)


class Env:
    def __init__(self, engine: Engine, sink: BodySink, addr: tuple[str, int], spool) -> None:
        self.engine = engine
        self.sink = sink
        self.addr = addr
        self.spool = spool
        self.clients: list[RawSMTP] = []

    async def connect(self) -> RawSMTP:
        """A raw connection, closed when ``running`` exits."""
        c = await RawSMTP.connect(*self.addr)
        self.clients.append(c)
        return c

    async def client(self) -> RawSMTP:
        """A connection past the greeting and EHLO."""
        c = await self.connect()
        await c.hello()
        return c

    async def wait_received(self, n: int) -> None:
        with trio.fail_after(BOUND):
            while len(self.sink.received) < n:
                await trio.sleep(0.01)


@asynccontextmanager
async def running(tmp_path, *, spool=None, listen=None, rules: str = "", bounces=None, abuse=None):
    """Sink + Engine + listener on 127.0.0.1 free ports; clients closed and all cancelled on exit."""
    sink = BodySink(load_rules(rules))
    async with trio.open_nursery() as nursery:
        sink_host, sink_port = await nursery.start(sink.run, "127.0.0.1:0")
        config = parse_config({
            "spool": {"path": str(tmp_path / "spool"), "fsync": "batch", **(spool or {})},
            "listen": {"smtp": "", **(listen or {})},
            "delivery": {"starttls": "never", "retry_interval": 60},
            "route": [{"match": "*", "relay": f"{sink_host}:{sink_port}"}],
            "bounces": bounces or {},
            "abuse": abuse or {},
        })
        engine = await nursery.start(Engine(config).run)
        addr = await nursery.start(serve_smtp, engine, "127.0.0.1:0")
        env = Env(engine, sink, addr, tmp_path / "spool")
        try:
            yield env
        finally:
            with trio.CancelScope(shield=True):
                for c in env.clients:
                    await c.aclose()
            nursery.cancel_scope.cancel()


async def send_message(c: RawSMTP, sender: str, rcpts: list[str], wire_body: bytes) -> str:
    """One transaction, lock-step; ``wire_body`` is sent as is (already dot-stuffed, without
    the terminator). Returns the final reply."""
    assert (await c.cmd(f"MAIL FROM:<{sender}>")).startswith("250 ")
    for r in rcpts:
        assert (await c.cmd(f"RCPT TO:<{r}>")).startswith("250 ")
    assert (await c.cmd("DATA")).startswith("354 ")
    await c.send(wire_body + b".\r\n")
    return await c.reply()


# Dot-stuffed on the wire; the second and third lines must arrive as "." and ".leading".
WIRE = b"Subject: hi\r\nMessage-ID: <m1@client.test>\r\n\r\nfirst\r\n..\r\n..leading dot\r\nlast\r\n"
BODY = b"Subject: hi\r\nMessage-ID: <m1@client.test>\r\n\r\nfirst\r\n.\r\n.leading dot\r\nlast\r\n"


async def test_message_is_queued_then_delivered_with_body_intact(tmp_path):
    async with running(tmp_path) as env:
        with trio.fail_after(BOUND):
            c = await env.client()
            reply = await send_message(c, "app@x.test", ["user@y.test"], WIRE)
            m = QUEUED.match(reply)
            assert m, reply
            await env.wait_received(1)
            assert env.sink.received == [("app@x.test", ["user@y.test"], BODY)]
            # The listener added its trace line, naming the queue id and the recipient.
            trace = env.sink.traces[0].decode()
            assert f" id {m.group(1)}" in trace and "for <user@y.test>" in trace
            assert "from client.test ([127.0.0.1])" in trace and "by sender.localhost" in trace
            assert (await c.cmd("QUIT")).startswith("221 ")
        assert env.engine.counts["accepted"] == 1


async def test_message_is_in_the_journal_when_the_250_arrives(tmp_path):
    # Delivery is held back (the sink waits 0.5 s at RCPT), so the message is still live in the
    # journal right after the 250, and replay must find it with its unstuffed body.
    async with running(tmp_path, rules='[[rule]]\nmatch = "*"\naction = "delay"\ndelay = 0.5') as env:
        with trio.fail_after(BOUND):
            c = await env.client()
            reply = await send_message(c, "app@x.test", ["user@y.test"], WIRE)
            msg_id = QUEUED.match(reply).group(1)
            # Straight from the bytes on disk, before yielding to anything else.
            written = [r for r in journal_records(env.spool) if isinstance(r, Accepted)]
            live = Journal(env.spool).replay(read_only=True)
            assert [(r.id, r.sender, r.rcpts, split_trace(r.body)[1]) for r in written] == [
                (msg_id, "app@x.test", ["user@y.test"], BODY)]
            assert msg_id in live and live[msg_id].rcpts == ["user@y.test"]
            await env.wait_received(1)


@pytest.mark.parametrize("bare", [b"\n", b"\r"], ids=["LF", "CR"])
async def test_smuggled_message_is_refused_whole(tmp_path, bare):
    """SMTP smuggling (2023): a bare-LF (or bare-CR) "." line must not end the data, so the
    commands after it stay inside one message, and that message is refused outright."""
    smuggle = (b"Subject: innocent\r\n\r\nhello" + bare + b"." + bare
               + b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\n"
               + b"From: ceo@x.test\r\nSubject: smuggled\r\n\r\npay now\r\n")
    async with running(tmp_path) as env:
        with trio.fail_after(BOUND):
            c = await env.client()
            before = env.engine.counts["accepted"]
            reply = await send_message(c, "app@x.test", ["user@y.test"], smuggle)
            assert reply.startswith("550 5.5.2 "), reply
            assert env.engine.counts["accepted"] == before
            # Nothing more is pending on the wire: the next command gets its own reply.
            assert (await c.cmd("NOOP")).startswith("250 ")
            # The session still works for a clean transaction.
            reply = await send_message(c, "app@x.test", ["user@y.test"], b"Subject: clean\r\n\r\nok\r\n")
            assert QUEUED.match(reply), reply
            await env.wait_received(1)
            await trio.sleep(0.2)  # anything smuggled would have been delivered by now too
        assert env.engine.counts["accepted"] == before + 1
        assert env.sink.received == [("app@x.test", ["user@y.test"], b"Subject: clean\r\n\r\nok\r\n")]
        assert [r.sender for r in journal_records(env.spool) if isinstance(r, Accepted)] == ["app@x.test"]


async def test_full_spool_answers_452_and_keeps_what_it_accepted(tmp_path):
    body = b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 20  # one takes the spool past 1 KiB
    async with running(tmp_path, spool={"max_bytes": "1KiB"}) as env:
        with trio.fail_after(BOUND):
            a, b = await env.client(), await env.client()
            # b opens its transaction while there is room, and ends it after the spool filled.
            assert (await b.cmd("MAIL FROM:<b@x.test>")).startswith("250 ")
            assert (await b.cmd("RCPT TO:<u@y.test>")).startswith("250 ")
            assert (await b.cmd("DATA")).startswith("354 ")
            first = await send_message(a, "a@x.test", ["u@y.test"], body)
            first_id = QUEUED.match(first).group(1)
            assert env.engine.spool_full
            # New transactions are refused at MAIL, with a transient code (clients retry).
            refused = await a.cmd("MAIL FROM:<a@x.test>")
            assert refused.startswith("452 4.3.1 "), refused
            # The transaction already open is refused at end of data.
            await b.send(body + b".\r\n")
            late = await b.reply()
            assert late.startswith("452 4.3.1 "), late
            assert env.engine.counts["accepted"] == 1
            # What was acknowledged is not lost: it is delivered.
            await env.wait_received(1)
            assert env.sink.received == [("a@x.test", ["u@y.test"], body)]
            assert [r.id for r in journal_records(env.spool) if isinstance(r, Accepted)] == [first_id]
            # The refusal left both sessions usable.
            assert (await a.cmd("RSET")).startswith("250 ")
            assert (await b.cmd("NOOP")).startswith("250 ")


async def test_oversized_message_gets_552(tmp_path):
    async with running(tmp_path, listen={"max_message_size": "1KiB"}) as env:
        with trio.fail_after(BOUND):
            c = await env.client()
            assert "SIZE 1024" in await c.cmd("EHLO again.test")
            # Declared too big: refused at MAIL.
            early = await c.cmd("MAIL FROM:<a@x.test> SIZE=5000")
            assert early.startswith("552 5.3.4 "), early
            # Undeclared, and too big: the data is read to its end, then refused.
            big = b"Subject: big\r\n\r\n" + (b"y" * 98 + b"\r\n") * 20
            reply = await send_message(c, "a@x.test", ["u@y.test"], big)
            assert reply.startswith("552 5.3.4 "), reply
            # The limit is the only problem: a small message on the same session goes through.
            reply = await send_message(c, "a@x.test", ["u@y.test"], b"Subject: small\r\n\r\nok\r\n")
            assert QUEUED.match(reply), reply
            await env.wait_received(1)
        assert env.engine.counts["accepted"] == 1


async def test_recipients_over_the_limit_get_452_and_the_rest_is_delivered(tmp_path):
    async with running(tmp_path, listen={"max_recipients": 2}) as env:
        with trio.fail_after(BOUND):
            c = await env.client()
            assert (await c.cmd("MAIL FROM:<a@x.test>")).startswith("250 ")
            replies = [await c.cmd(f"RCPT TO:<u{i}@y.test>") for i in range(4)]
            assert [r[:9] for r in replies] == ["250 2.1.5", "250 2.1.5", "452 4.5.3", "452 4.5.3"], replies
            assert (await c.cmd("DATA")).startswith("354 ")
            await c.send(b"Subject: t\r\n\r\nhi\r\n.\r\n")
            assert QUEUED.match(await c.reply())
            await env.wait_received(1)
        assert env.sink.received[0][1] == ["u0@y.test", "u1@y.test"]


@pytest.mark.parametrize("rcpt", ["nodomain", "user@", "user@y.test@", "user@localhost", "a b@y.test"])
async def test_bad_recipient_syntax_gets_501_5_1_3(tmp_path, rcpt):
    async with running(tmp_path) as env:
        with trio.fail_after(BOUND):
            c = await env.client()
            assert (await c.cmd("MAIL FROM:<a@x.test>")).startswith("250 ")
            reply = await c.cmd(f"RCPT TO:<{rcpt}>")
            assert reply.startswith("501 5.1.3 "), reply
            # No recipient was taken.
            no_rcpt = await c.cmd("DATA")
            assert no_rcpt[:1] in "45" and not no_rcpt.startswith("354"), no_rcpt
        assert env.engine.counts["accepted"] == 0


async def test_every_negative_reply_carries_an_enhanced_code(tmp_path):
    async with running(tmp_path, spool={"max_bytes": "1KiB"}, listen={"max_recipients": 1}) as env:
        with trio.fail_after(BOUND):
            c = await env.connect()
            assert (await c.reply()).startswith("220 ")
            negative = []

            async def cmd(line: str) -> str:
                reply = await c.cmd(line)
                if reply[0] in "45":
                    negative.append((line, reply))
                return reply

            await cmd("MAIL FROM:<a@x.test>")          # before EHLO
            await cmd("EHLO")                          # missing argument
            await cmd("FROB")                          # unknown command
            await cmd("AUTH PLAIN x")                  # not implemented
            await cmd("x" * 600)                       # over-long command line
            await cmd("EHLO client.test")
            await cmd("RCPT TO:<u@y.test>")            # before MAIL
            await cmd("DATA")                          # before MAIL
            await cmd("MAIL FROM:a@x.test")            # no angle brackets
            await cmd("MAIL FROM:<bad sender>")
            await cmd("MAIL FROM:<a@x.test> FOO=1")    # unknown parameter
            await cmd("MAIL FROM:<a@x.test>")
            await cmd("MAIL FROM:<a@x.test>")          # nested
            await cmd("RCPT TO:<>")                    # null recipient
            await cmd("RCPT TO:<u@y.test> NOTIFY=NEVER")
            await cmd("RCPT TO:<u@y.test>")
            await cmd("RCPT TO:<v@y.test>")            # over max_recipients
            await cmd("DATA x")
            assert (await cmd("DATA")).startswith("354")
            await c.send(b"Subject: t\r\n\r\nbare\nLF\r\n.\r\n")
            reply = await c.reply()
            negative.append(("<bare LF data>", reply))
            await cmd("RSET x")
            await cmd("VRFY")
            await cmd("STARTTLS")                      # not offered
            # Fill the spool, then MAIL is refused.
            await cmd("MAIL FROM:<a@x.test>")
            await cmd("RCPT TO:<u@y.test>")
            await cmd("DATA")
            await c.send(b"Subject: t\r\n\r\n" + (b"z" * 98 + b"\r\n") * 12 + b".\r\n")
            assert QUEUED.match(await c.reply())
            assert (await cmd("MAIL FROM:<a@x.test>")).startswith("452 4.3.1 ")
        assert len(negative) >= 20, negative
        missing = [(line, reply) for line, reply in negative if not has_enhanced_code(reply)]
        assert missing == []
        codes = {reply[:3] for _, reply in negative}
        assert {"500", "501", "502", "503", "550", "555", "452"} <= codes


async def test_control_headers_set_customer_and_type_and_never_reach_the_recipient(tmp_path):
    wire = (b"X-Sender-Customer: acme \r\nSubject: hi\r\nx-sender-message-type: transactional\r\n\r\n"
            b"X-Sender-Customer: body text stays\r\n")
    async with running(tmp_path) as env:
        with trio.fail_after(BOUND):
            c = await env.client()
            assert QUEUED.match(await send_message(c, "app@x.test", ["user@y.test"], wire))
            await env.wait_received(1)
    assert env.sink.received[0][2] == b"Subject: hi\r\n\r\nX-Sender-Customer: body text stays\r\n"
    (rec,) = [r for r in journal_records(env.spool) if isinstance(r, Accepted)]
    assert (rec.customer, rec.message_type) == ("acme", "transactional")


def test_control_headers_are_only_read_from_the_header_block():
    from sender.inject.smtpd import take_control_headers

    body = b"Subject: x\r\n\r\nX-Sender-Customer: evil\r\n"
    assert take_control_headers(body) == (body, {})
    assert take_control_headers(b"X-Sender-Customer: a\r\n\r\n") == (b"\r\n", {"customer": "a"})


async def test_suppressed_recipients_are_refused_for_their_customer_only(tmp_path):
    def wire(customer: str) -> bytes:
        return f"X-Sender-Customer: {customer}\r\nSubject: s\r\n\r\nhi\r\n".encode()

    async with running(tmp_path) as env:
        env.engine.suppression.add("acme", "gone@y.test", "invalid_recipient", env.engine.now(), source="M0")
        with trio.fail_after(BOUND):
            c = await env.client()
            refused = await send_message(c, "app@x.test", ["gone@y.test"], wire("acme"))
            assert refused.startswith("550 5.7.1 ") and "gone@y.test (invalid_recipient since" in refused
            assert QUEUED.match(await send_message(c, "app@x.test", ["gone@y.test"], wire("other")))
            partial = await send_message(c, "app@x.test", ["gone@y.test", "ok@y.test"], wire("acme"))
            assert QUEUED.match(partial) and "suppressed, not queued: gone@y.test" in partial
            await env.wait_received(2)
    assert sorted(r for _, rcpts, _ in env.sink.received for r in rcpts) == ["gone@y.test", "ok@y.test"]
    assert env.engine.counts["suppressed"] == 2


def dsn_for(verp: str, rcpt: str, reply: str, status: str) -> bytes:
    """A bounce as a remote MTA sends it to the return path (RFC 3464)."""
    return (f"From: MAILER-DAEMON@mx.y.test\r\nTo: <{verp}>\r\nSubject: Undelivered Mail\r\n"
            "MIME-Version: 1.0\r\n"
            'Content-Type: multipart/report; report-type=delivery-status; boundary="b1"\r\n\r\n'
            "--b1\r\nContent-Type: text/plain\r\n\r\nYour mail could not be delivered.\r\n"
            "--b1\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.y.test\r\n\r\n"
            f"Final-Recipient: rfc822; {rcpt}\r\nAction: failed\r\nStatus: {status}\r\n"
            f"Diagnostic-Code: smtp; {reply}\r\n"
            "--b1\r\nContent-Type: text/rfc822-headers\r\n\r\nSubject: s\r\n--b1--\r\n").encode()


async def test_a_bounce_at_the_bounce_domain_updates_its_message_and_the_customers_list(tmp_path):
    domain = "bounces.sender.test"
    async with running(tmp_path, bounces={"domain": domain, "notify": False}) as env:
        with trio.fail_after(BOUND):
            c = await env.client()
            reply = await send_message(c, "app@x.test", ["user@y.test"],
                                       b"X-Sender-Customer: acme\r\nSubject: s\r\n\r\nhi\r\n")
            msg_id = QUEUED.match(reply).group(1)
            await env.wait_received(1)
            verp = env.sink.received[0][0]
            assert verp == f"bounces+{msg_id}{b'acme'.hex()}@{domain}"     # VERP: message and customer
            got = await send_message(c, "", [verp], dsn_for(verp, "user@y.test", "550 5.1.1 user unknown", "5.1.1"))
            assert got == "250 2.0.0 Ok: bounce read, 1 recipients"
            refused = await send_message(c, "app@x.test", ["user@y.test"],
                                         b"X-Sender-Customer: acme\r\nSubject: s\r\n\r\nagain\r\n")
            assert refused.startswith("550 5.7.1 ") and "invalid_recipient" in refused
            other = await send_message(c, "app@x.test", ["user@y.test"],
                                       b"X-Sender-Customer: other\r\nSubject: s\r\n\r\nhi\r\n")
            assert QUEUED.match(other)
    entry = env.engine.suppression.check("acme", "user@y.test", env.engine.now())
    assert (entry.reason, entry.source) == ("invalid_recipient", msg_id)
    later = [r for r in journal_records(env.spool) if isinstance(r, Bounced)]
    assert [(r.id, r.rcpts, r.category, r.reply.enhanced) for r in later] == [
        (msg_id, ["user@y.test"], "invalid_recipient", "5.1.1")]
    assert env.engine.counts["bounced_later"] == 1


async def test_resend_idempotency_key_queues_a_message_once(tmp_path):
    def wire(key: str, subject: str = "s") -> bytes:
        return f"Resend-Idempotency-Key: {key}\r\nX-Sender-Customer: acme\r\nSubject: {subject}\r\n\r\nhi\r\n".encode()

    async with running(tmp_path) as env:
        with trio.fail_after(BOUND):
            c = await env.client()
            first = await send_message(c, "app@x.test", ["u@y.test"], wire("order-9"))
            msg_id = QUEUED.match(first).group(1)
            again = await send_message(c, "app@x.test", ["u@y.test"], wire("order-9"))
            assert again == f"250 2.0.0 Ok: queued as {msg_id} (before, with this Resend-Idempotency-Key)"
            changed = await send_message(c, "app@x.test", ["u@y.test"], wire("order-9", "other"))
            assert changed.startswith("554 5.7.0 Resend-Idempotency-Key: ") and has_enhanced_code(changed)
            bad = await send_message(c, "app@x.test", ["u@y.test"], wire("k" * 257))
            assert bad.startswith("501 5.5.4 Resend-Idempotency-Key: ")
            await env.wait_received(1)
    assert env.engine.counts["accepted"] == 1
    # The header is read by the listener and never delivered.
    assert b"Resend-Idempotency-Key" not in env.sink.received[0][2]


async def test_a_blocked_domain_is_refused_with_550_5_7_1(tmp_path):
    async with running(tmp_path, abuse={"blocked_domains": ["trap.example"]}) as env:
        with trio.fail_after(BOUND):
            c = await env.client()
            refused = await send_message(c, "app@x.test", ["a@trap.example"], b"Subject: s\r\n\r\nhi\r\n")
            assert refused.startswith("550 5.7.1 every recipient is at a blocked domain")
            assert QUEUED.match(await send_message(c, "app@x.test", ["a@trap.example", "b@y.test"],
                                                   b"Subject: s\r\n\r\nhi\r\n"))
            await env.wait_received(1)
    assert [rcpts for _, rcpts, _ in env.sink.received] == [["b@y.test"]]


async def test_a_drain_refuses_new_mail_with_421_finishes_the_open_transaction_and_empties(tmp_path):
    async with running(tmp_path) as env:
        with trio.fail_after(BOUND):
            a, b = await env.client(), await env.client()
            assert (await b.cmd("MAIL FROM:<b@x.test>")).startswith("250 ")
            assert (await b.cmd("RCPT TO:<u@y.test>")).startswith("250 ")
            env.engine.drain("ops", "deploy")
            refused = await a.cmd("MAIL FROM:<a@x.test>")
            assert refused.startswith("421 4.3.2 "), refused
            assert (await b.cmd("DATA")).startswith("354 ")        # the open transaction finishes
            await b.send(WIRE + b".\r\n")
            assert QUEUED.match(await b.reply())
            await env.engine.drained.wait()                     # set once it was delivered
            assert len(env.sink.received) == 1 and env.engine.statistics().live_messages == 0
