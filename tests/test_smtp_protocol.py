"""Sans-IO SMTP client: bytes in, replies out; paired with the server state machine."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sender.errors import LocalProtocolError, RemoteProtocolError
from sender.model import Reply
from sender.smtp import server as srv
from sender.smtp.protocol import (
    NEED_DATA,
    ClientProtocol,
    Data,
    Ehlo,
    Helo,
    MailFrom,
    Message,
    Noop,
    Quit,
    RcptTo,
    Replied,
    Rset,
    StartTls,
    dot_stuff,
    parse_ehlo,
)

EHLO_REPLY = (
    b"250-mx.test Hello client.test\r\n"
    b"250-PIPELINING\r\n"
    b"250-SIZE 10485760\r\n"
    b"250-8BITMIME\r\n"
    b"250-SMTPUTF8\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250 STARTTLS\r\n"
)


def events(proto: ClientProtocol) -> list[Replied]:
    out = []
    while (ev := proto.next_event()) is not NEED_DATA:
        out.append(ev)
    return out


def ready_client(ehlo_reply: bytes = EHLO_REPLY) -> ClientProtocol:
    c = ClientProtocol()
    c.receive_data(b"220 mx.test ESMTP\r\n")
    assert events(c)[0].reply.code == 220
    c.send(Ehlo("client.test"))
    c.receive_data(ehlo_reply)
    [ev] = events(c)
    assert ev.reply.code == 250
    return c


class ProtocolPair:
    """A ClientProtocol wired to a ServerProtocol: what one writes, the other reads."""

    def __init__(self, decide=None, **server_kw) -> None:
        self.client = ClientProtocol()
        self.server = srv.ServerProtocol("mx.test", **server_kw)
        self.decide = decide or (lambda ev: (250, "2.0.0", "OK"))
        self.server_events: list = []
        self.client.receive_data(self.server.greeting())
        [self.greeting] = events(self.client)

    def send(self, *cmds) -> list[Replied]:
        """Write ``cmds`` as one pipelined buffer, let the server answer, return the replies."""
        self.server.receive_data(self.client.send_many(cmds))
        while (ev := self.server.next_event()) is not NEED_DATA:
            self.server_events.append(ev)
            if isinstance(ev, (srv.MailFrom, srv.RcptTo, srv.MessageReceived)):
                self.server.reply(*self.decide(ev))
            if isinstance(ev, (srv.Quit, srv.Closed)):
                break
        self.client.receive_data(self.server.data_to_send())
        return events(self.client)

    def messages(self) -> list[srv.MessageReceived]:
        return [e for e in self.server_events if isinstance(e, srv.MessageReceived)]


# --- greeting, EHLO, HELO -----------------------------------------------------------------


def test_greeting_then_multiline_ehlo():
    c = ClientProtocol()
    assert c.pending == 1
    assert c.next_event() is NEED_DATA
    c.receive_data(b"220 mx.test ESMTP ready\r\n")
    assert events(c) == [Replied(None, Reply(220, "mx.test ESMTP ready"))]
    assert c.send(Ehlo("client.test")) == b"EHLO client.test\r\n"
    c.receive_data(EHLO_REPLY)
    [ev] = events(c)
    assert ev.command == Ehlo("client.test")
    assert ev.reply.code == 250
    assert ev.reply.text.split("\n")[:2] == ["mx.test Hello client.test", "PIPELINING"]
    assert c.extensions == {
        "PIPELINING": "",
        "SIZE": "10485760",
        "8BITMIME": "",
        "SMTPUTF8": "",
        "ENHANCEDSTATUSCODES": "",
        "STARTTLS": "",
    }
    assert c.pipelining and c.smtputf8 and c.eightbitmime and c.starttls and c.enhanced_status_codes
    assert c.max_size == 10485760
    assert c.pending == 0


def test_size_without_limit_is_none():
    c = ready_client(b"250-mx.test\r\n250 SIZE\r\n")
    assert c.max_size is None
    c = ready_client(b"250-mx.test\r\n250 SIZE 0\r\n")
    assert c.max_size is None
    c = ready_client("250-mx.test\r\n250 SIZE \u00b2\r\n".encode())
    assert c.max_size is None
    assert not c.pipelining


def test_helo_fallback_after_ehlo_rejected():
    c = ClientProtocol()
    c.receive_data(b"220 old.test\r\n")
    events(c)
    c.send(Ehlo("client.test"))
    c.receive_data(b"502 5.5.1 Command not implemented\r\n")
    [ev] = events(c)
    assert ev.reply == Reply(502, "Command not implemented", "5.5.1")
    assert c.send(Helo("client.test")) == b"HELO client.test\r\n"
    c.receive_data(b"250 old.test\r\n")
    [ev] = events(c)
    assert ev.command == Helo("client.test") and ev.reply.code == 250
    assert c.extensions == {} and not c.pipelining
    c.send(MailFrom("a@x.test"))
    # No PIPELINING: the RCPT must wait for the MAIL reply.
    with pytest.raises(LocalProtocolError):
        c.send(RcptTo("b@y.test"))
    c.receive_data(b"250 ok\r\n")
    events(c)
    assert c.send(RcptTo("b@y.test")) == b"RCPT TO:<b@y.test>\r\n"


def test_helo_fallback_against_server():
    class NoEhlo(srv.ServerProtocol):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            del self._commands["EHLO"]

    p = ProtocolPair()
    p.server = NoEhlo("mx.test")
    [r] = p.send(Ehlo("client.test"))
    assert r.reply.code == 500
    [r] = p.send(Helo("client.test"))
    assert r.reply == Reply(250, "mx.test")
    assert [r.reply.code for r in p.send(MailFrom("a@x.test"))] == [250]
    assert [r.reply.code for r in p.send(RcptTo("b@y.test"))] == [250]
    assert [r.reply.code for r in p.send(Data())] == [354]
    assert [r.reply.code for r in p.send(Message(b"hi\r\n"))] == [250]
    assert p.messages()[0].body == b"hi\r\n"


# --- pipelining ---------------------------------------------------------------------------


def test_pipelined_transaction_with_partial_acceptance():
    c = ready_client()
    cmds = [
        MailFrom("a@x.test", ("SIZE=123", "BODY=8BITMIME")),
        RcptTo("b@y.test"),
        RcptTo("c@y.test"),
        RcptTo("d@y.test"),
        Data(),
    ]
    wire = c.send_many(cmds)
    assert wire == (
        b"MAIL FROM:<a@x.test> SIZE=123 BODY=8BITMIME\r\n"
        b"RCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\nRCPT TO:<d@y.test>\r\nDATA\r\n"
    )
    assert c.pending == 5
    with pytest.raises(LocalProtocolError):
        c.send(Message(b"too early\r\n"))  # no 354 yet
    c.receive_data(
        b"250 2.1.0 Sender ok\r\n250 2.1.5 ok\r\n550 5.1.1 No such user\r\n250 2.1.5 ok\r\n354 Go ahead\r\n"
    )
    evs = events(c)
    assert [e.command for e in evs] == cmds
    assert [e.reply.code for e in evs] == [250, 250, 550, 250, 354]
    assert evs[2].reply == Reply(550, "No such user", "5.1.1")
    accepted = [e.command.address for e in evs if isinstance(e.command, RcptTo) and e.reply.code == 250]
    assert accepted == ["b@y.test", "d@y.test"]
    assert c.send(Message(b"Hello\r\n")) == b"Hello\r\n.\r\n"
    # Pipelined after the end of data: the next transaction and a QUIT.
    c.send_many([MailFrom(""), RcptTo("e@y.test"), Data()])
    c.receive_data(b"250 2.0.0 queued as X\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    assert [e.reply.code for e in events(c)] == [250, 250, 250, 354]


def test_all_rcpts_rejected_data_554_back_to_ready():
    c = ready_client()
    c.send_many([MailFrom("a@x.test"), RcptTo("b@y.test"), RcptTo("c@y.test"), Data()])
    c.receive_data(b"250 ok\r\n550 5.1.1 no\r\n550 5.1.1 no\r\n554 5.5.1 No valid recipients\r\n")
    evs = events(c)
    assert evs[-1].reply == Reply(554, "No valid recipients", "5.5.1")
    with pytest.raises(LocalProtocolError):
        c.send(Message(b"x"))
    assert c.send(Rset()) == b"RSET\r\n"
    assert c.send(MailFrom("a@x.test")) == b"MAIL FROM:<a@x.test>\r\n"


def test_failed_mail_then_503_to_data_back_to_ready():
    c = ready_client()
    c.send_many([MailFrom("a@x.test"), RcptTo("b@y.test"), Data()])
    c.receive_data(b"451 4.3.0 try later\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n")
    assert [e.reply.code for e in events(c)] == [451, 503, 503]
    c.send(Quit())
    c.receive_data(b"221 2.0.0 bye\r\n")
    events(c)
    c.receive_data(b"")
    assert c.next_event() is NEED_DATA


def test_all_rcpts_rejected_against_server_then_next_message():
    def decide(ev):
        if isinstance(ev, srv.RcptTo) and ev.address.startswith("bad"):
            return 550, "5.1.1", "No such user"
        return 250, "2.0.0", "OK"

    p = ProtocolPair(decide)
    p.send(Ehlo("client.test"))
    evs = p.send(MailFrom("a@x.test"), RcptTo("bad1@y.test"), RcptTo("bad2@y.test"), Data())
    assert [e.reply.code for e in evs] == [250, 550, 550, 554]
    assert evs[-1].reply.enhanced == "5.5.1"
    evs = p.send(MailFrom("a@x.test"), RcptTo("ok@y.test"), Data())
    assert [e.reply.code for e in evs] == [250, 250, 354]
    assert p.send(Message(b"body\r\n"))[0].reply.code == 250
    assert p.messages()[0].rcpts == ["ok@y.test"]


def test_send_many_is_all_or_nothing():
    c = ready_client()
    with pytest.raises(LocalProtocolError):
        c.send_many([MailFrom("a@x.test"), RcptTo("b@y.test"), Message(b"x")])
    assert c.pending == 0
    assert c.send(MailFrom("a@x.test"))  # still READY


# --- local misuse ---------------------------------------------------------------------------


def test_rcpt_before_mail_is_local_error():
    c = ready_client()
    with pytest.raises(LocalProtocolError):
        c.send(RcptTo("b@y.test"))
    with pytest.raises(LocalProtocolError):
        c.send(Data())
    assert c.pending == 0


def test_message_before_354_is_local_error():
    c = ready_client()
    with pytest.raises(LocalProtocolError):
        c.send(Message(b"x"))
    c.send_many([MailFrom("a@x.test"), RcptTo("b@y.test"), Data()])
    with pytest.raises(LocalProtocolError):
        c.send(Message(b"x"))
    c.receive_data(b"250 ok\r\n250 ok\r\n")
    events(c)
    with pytest.raises(LocalProtocolError):
        c.send(Message(b"x"))
    c.receive_data(b"354 go\r\n")
    events(c)
    assert c.send(Message(b"x")) == b"x\r\n.\r\n"


def test_commands_before_greeting_and_hello_refused():
    c = ClientProtocol()
    with pytest.raises(LocalProtocolError):
        c.send(Ehlo("me"))
    c.receive_data(b"220 hi\r\n")
    events(c)
    with pytest.raises(LocalProtocolError):
        c.send(MailFrom("a@x.test"))


@pytest.mark.parametrize(
    "cmd",
    [MailFrom("a@x.test\r\nRCPT TO:<evil@x>"), RcptTo("b@y\n"), MailFrom("a@x", ("SIZE=1\r\n",)), Ehlo("x\ry")],
)
def test_cr_lf_in_arguments_refused(cmd):
    c = ready_client()
    if isinstance(cmd, RcptTo):
        c.send(MailFrom("a@x.test"))
    before = c.pending
    with pytest.raises(LocalProtocolError):
        c.send(cmd)
    assert c.pending == before


def test_command_rendering():
    c = ready_client()
    assert c.send(Noop()) == b"NOOP\r\n"
    assert c.send(Rset()) == b"RSET\r\n"
    assert c.send(MailFrom("")) == b"MAIL FROM:<>\r\n"
    assert c.send(RcptTo("j\u00f6rg@b\u00fccher.test")) == "RCPT TO:<j\u00f6rg@b\u00fccher.test>\r\n".encode()
    assert c.send(Rset()) == b"RSET\r\n"
    assert c.send(StartTls()) == b"STARTTLS\r\n"


# --- remote breakage ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"abc\r\n",
        b"250-first\r\n251 second\r\n",
        b"199 too low\r\n",
        b"600 too high\r\n",
        b"25\r\n",
        b"250x text\r\n",
        b"+25 text\r\n",
        b"2_5 text\r\n",
        b"250 " + b"x" * 9000 + b"\r\n",
    ],
)
def test_garbage_reply_is_remote_error(garbage):
    c = ClientProtocol()
    c.receive_data(garbage)
    with pytest.raises(RemoteProtocolError):
        c.next_event()
    with pytest.raises(RemoteProtocolError):  # stays broken
        c.next_event()
    with pytest.raises(LocalProtocolError):
        c.send(Quit())


def test_overlong_line_detected_before_its_end():
    c = ClientProtocol()
    c.receive_data(b"220 " + b"x" * 9000)
    with pytest.raises(RemoteProtocolError):
        c.next_event()


def test_endless_multiline_reply_is_remote_error():
    c = ClientProtocol()
    c.receive_data(b"220-x\r\n" * 20000)
    with pytest.raises(RemoteProtocolError):
        c.next_event()


def test_eof_mid_reply_is_remote_error():
    c = ClientProtocol()
    c.receive_data(b"220-mx.test\r\n220 mor")
    assert c.next_event() is NEED_DATA
    c.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        c.next_event()


def test_eof_with_replies_pending_is_remote_error():
    c = ready_client()
    c.send_many([MailFrom("a@x.test"), RcptTo("b@y.test")])
    c.receive_data(b"250 ok\r\n")
    c.receive_data(b"")
    assert c.next_event().reply.code == 250
    with pytest.raises(RemoteProtocolError, match="1 replies pending"):
        c.next_event()


def test_unexpected_reply_is_remote_error():
    c = ready_client()
    c.receive_data(b"250 nobody asked\r\n")
    with pytest.raises(RemoteProtocolError):
        c.next_event()


def test_421_closes_and_eof_is_then_expected():
    c = ready_client()
    c.send_many([MailFrom("a@x.test"), RcptTo("b@y.test"), Data()])
    c.receive_data(b"421 4.7.0 shutting down\r\n")
    c.receive_data(b"")
    [ev] = events(c)
    assert ev.reply.code == 421
    assert c.next_event() is NEED_DATA
    assert c.pending == 0
    with pytest.raises(LocalProtocolError):
        c.send(Rset())


def test_bare_lf_reply_lines_tolerated():
    c = ClientProtocol()
    c.receive_data(b"220-a\n220 b\n")
    assert events(c)[0].reply == Reply(220, "a\nb")


def test_enhanced_code_only_when_class_matches():
    c = ready_client()
    for _ in range(5):
        c.send(Noop())
    c.receive_data(
        b"250 5.1.1 not an enhanced code here\r\n"
        b"250 2.0.0\r\n"
        b"250-2.1.0 first\r\n250-second\r\n250 2.1.0 third\r\n"
        b"250 2.0 short\r\n"
        b"354 3.0.0 RFC 3463 has no class 3\r\n"
    )
    got = [e.reply for e in events(c)]
    assert got == [
        Reply(250, "5.1.1 not an enhanced code here"),
        Reply(250, "", "2.0.0"),
        Reply(250, "first\nsecond\nthird", "2.1.0"),
        Reply(250, "2.0 short"),
        Reply(354, "3.0.0 RFC 3463 has no class 3"),
    ]


# --- STARTTLS -------------------------------------------------------------------------------


def test_starttls_then_tls_started_requires_ehlo_again():
    c = ready_client()
    with pytest.raises(LocalProtocolError):
        c.tls_started()
    c.send(StartTls())
    with pytest.raises(LocalProtocolError):
        c.send(MailFrom("a@x.test"))
    c.receive_data(b"220 2.0.0 Ready to start TLS\r\n")
    [ev] = events(c)
    assert ev.command == StartTls() and ev.reply.code == 220
    with pytest.raises(LocalProtocolError):
        c.send(Quit())  # must wrap the stream first
    c.tls_started()
    assert c.extensions == {} and not c.starttls
    with pytest.raises(LocalProtocolError):
        c.send(MailFrom("a@x.test"))
    c.send(Ehlo("client.test"))
    c.receive_data(b"250-mx.test\r\n250 PIPELINING\r\n")
    events(c)
    assert c.pipelining and not c.starttls
    c.send(MailFrom("a@x.test"))


def test_starttls_refused_stays_in_clear():
    c = ready_client()
    c.send(StartTls())
    c.receive_data(b"454 4.7.0 TLS not available\r\n")
    events(c)
    with pytest.raises(LocalProtocolError):
        c.tls_started()
    c.send(MailFrom("a@x.test"))


def test_clear_text_after_starttls_220_is_remote_error():
    c = ready_client()
    c.send(StartTls())
    c.receive_data(b"220 go\r\n250 injected\r\n")
    assert c.next_event().reply.code == 220
    with pytest.raises(RemoteProtocolError):
        c.tls_started()


def test_starttls_against_server():
    p = ProtocolPair(starttls=True)
    p.send(Ehlo("client.test"))
    assert p.client.starttls
    [r] = p.send(StartTls())
    assert r.reply == Reply(220, "Ready to start TLS", "2.0.0")
    assert isinstance(p.server_events[-1], srv.StartTlsRequested)
    p.client.tls_started()
    p.server.tls_started()
    p.send(Ehlo("client.test"))
    assert not p.client.starttls and p.client.pipelining


# --- dot-stuffing ---------------------------------------------------------------------------


# The dot_stuff table itself is in test_wire.py (both twins).

BODIES = [
    b"",
    b"Subject: x\r\n\r\n.\r\n",
    b".\r\n.leading\r\n..two\r\nmid.dle\r\n.\r\n.",
    b"no final newline",
    b".",
    b"..\r\n...\r\n",
    b"\xff\xfe binary 8bit \x00\r\n",
]


@pytest.mark.parametrize("body", BODIES)
def test_dot_stuffing_round_trip_through_server(body):
    p = ProtocolPair()
    p.send(Ehlo("client.test"))
    assert [e.reply.code for e in p.send(MailFrom("a@x.test"), RcptTo("b@y.test"), Data())] == [250, 250, 354]
    [r] = p.send(Message(body))
    assert r.reply.code == 250
    expected = body if body.endswith(b"\r\n") or not body else body + b"\r\n"
    assert p.messages() == [srv.MessageReceived("a@x.test", ["b@y.test"], expected)]


# --- split feeds --------------------------------------------------------------------------

SCRIPT_REPLIES = (
    b"220-mx.test ESMTP\r\n220 ready\r\n"
    + EHLO_REPLY
    + b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 unknown\r\n354 go\r\n"
)


GROUPS = [[Ehlo("client.test")], [MailFrom("a@x.test"), RcptTo("b@y.test"), RcptTo("c@y.test"), Data()]]


def run_script(chunks) -> list[Replied]:
    """Feed ``chunks``; whenever every reply is in, send the next command group."""
    c = ClientProtocol()
    groups = iter(GROUPS)
    got = []
    for chunk in filter(None, chunks):  # b"" would mean EOF
        c.receive_data(chunk)
        while True:
            if c.pending == 0:
                c.send_many(next(groups, []))
            ev = c.next_event()
            if ev is NEED_DATA:
                break
            got.append(ev)
    return got


def test_replies_split_at_every_byte():
    whole = run_script([SCRIPT_REPLIES])
    assert [e.reply.code for e in whole] == [220, 250, 250, 250, 550, 354]
    assert [e.command for e in whole] == [None, *GROUPS[0], *GROUPS[1]]
    for i in range(len(SCRIPT_REPLIES) + 1):
        assert run_script([SCRIPT_REPLIES[:i], SCRIPT_REPLIES[i:]]) == whole, i
    assert run_script([bytes([b]) for b in SCRIPT_REPLIES]) == whole


def test_server_input_split_at_every_byte():
    body = b"line\r\n.dot\r\n..\r\n"
    client_bytes = (
        b"EHLO client.test\r\n"
        b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n" + dot_stuff(body) + b"MAIL FROM:<>\r\nQUIT\r\n"
    )

    def run(chunks):
        s = srv.ServerProtocol("mx.test")
        evs = []
        for chunk in filter(None, chunks):  # b"" would mean EOF
            s.receive_data(chunk)
            while (ev := s.next_event()) is not NEED_DATA:
                evs.append(ev)
                if isinstance(ev, (srv.MailFrom, srv.RcptTo, srv.MessageReceived)):
                    s.reply(250, "2.0.0", "OK")
                if isinstance(ev, (srv.Quit, srv.Closed)):
                    break
            if s.closed:
                break
        return evs, s.data_to_send()

    whole = run([client_bytes])
    kinds = [type(e).__name__ for e in whole[0]]
    assert kinds == ["Hello", "MailFrom", "RcptTo", "MessageReceived", "MailFrom", "Quit"]
    assert whole[0][3].body == body
    for i in range(len(client_bytes) + 1):
        assert run([client_bytes[:i], client_bytes[i:]]) == whole, i
    assert run([bytes([b]) for b in client_bytes]) == whole


# --- paired session -------------------------------------------------------------------------


def test_three_messages_over_one_session_with_rset_between():
    p = ProtocolPair()
    assert p.greeting == Replied(None, Reply(220, "mx.test ESMTP ready"))
    p.send(Ehlo("client.test"))
    assert p.client.pipelining
    bodies = [b"Subject: %d\r\n\r\nbody %d\r\n.\r\n" % (i, i) for i in range(3)]
    for i, body in enumerate(bodies):
        mail = MailFrom(f"s{i}@x.test", (f"SIZE={len(body)}",))
        evs = p.send(mail, RcptTo(f"r{i}@y.test"), RcptTo("all@y.test"), Data())
        assert [e.reply.code for e in evs] == [250, 250, 250, 354]
        [done] = p.send(Message(body))
        assert done.command == Message(body) and done.reply == Reply(250, "OK", "2.0.0")
        [rset] = p.send(Rset())
        assert rset.reply == Reply(250, "OK", "2.0.0")
    [bye] = p.send(Quit())
    assert bye.reply.code == 221 and p.server.closed
    got = p.messages()
    assert [(m.sender, m.rcpts, m.body) for m in got] == [
        (f"s{i}@x.test", [f"r{i}@y.test", "all@y.test"], bodies[i]) for i in range(3)
    ]
    assert p.server_events[1].params == {"SIZE": str(len(bodies[0]))}


# --- hypothesis -----------------------------------------------------------------------------

line_text = st.text(
    alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=60
).filter(lambda s: not s[:1].isdigit())


@st.composite
def replies(draw):
    code = draw(st.integers(200, 599))
    enhanced = ""
    if code // 100 != 3 and draw(st.booleans()):
        a, b = draw(st.integers(0, 999)), draw(st.integers(0, 999))
        enhanced = f"{code // 100}.{a}.{b}"
    lines = draw(st.lists(line_text, min_size=1, max_size=5))
    return Reply(code, "\n".join(lines), enhanced)


def render(reply: Reply) -> bytes:
    lines = reply.text.split("\n")
    out = []
    for i, line in enumerate(lines):
        sep = " " if i == len(lines) - 1 else "-"
        enh = f"{reply.enhanced} " if reply.enhanced else ""
        out.append(f"{reply.code}{sep}{enh}{line}\r\n")
    return "".join(out).encode()


@settings(max_examples=200)
@given(st.lists(replies(), min_size=1, max_size=6), st.data())
def test_reply_parser_round_trip(rs, data):
    c = ready_client()
    c.send_many([Noop()] * len(rs))
    wire = b"".join(render(r) for r in rs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    got = []
    for a, b in zip([0, *cuts], [*cuts, len(wire)]):
        if a < b:
            c.receive_data(wire[a:b])
        got += [e.reply for e in events(c)]
    assert got == rs


keyword = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9-]{0,15}", fullmatch=True)
param = st.from_regex(r"[\x21-\x7e]{1,10}", fullmatch=True)


@given(st.lists(st.tuples(keyword, st.lists(param, max_size=3)), max_size=8, unique_by=lambda kv: kv[0].upper()))
def test_parse_ehlo(exts):
    lines = ["mx.test says hi"] + [" ".join([kw, *ps]) for kw, ps in exts]
    expected = {kw.upper(): " ".join(ps) for kw, ps in exts}
    assert parse_ehlo(Reply(250, "\n".join(lines))) == expected
    c = ready_client(render(Reply(250, "\n".join(lines))))
    assert c.extensions == expected


# --- no I/O ---------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path, seen: set[Path]) -> set[str]:
    """Top-level modules imported by ``path`` and, transitively, by its relative imports."""
    if path in seen:
        return set()
    seen.add(path)
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                out.add(node.module.split(".")[0])
                continue
            base = path.parent
            for _ in range(node.level - 1):
                base = base.parent
            target = base.joinpath(*node.module.split(".")) if node.module else base
            for cand in (target.with_suffix(".py"), target / "__init__.py"):
                if cand.exists():
                    out |= _imports(cand, seen)
    return out


@pytest.mark.parametrize("name", ["protocol", "server"])
def test_sans_io_modules_do_not_import_trio(name):
    path = ROOT / "sender" / "smtp" / f"{name}.py"
    found = _imports(path, set())
    assert not found & {"trio", "socket", "ssl", "asyncio", "anyio"}, found
    # And at run time, without the top-level package __init__ (which may pull in the engine).
    code = (
        "import sys, types\n"
        f"pkg = types.ModuleType('sender'); pkg.__path__ = [{str(ROOT / 'sender')!r}]\n"
        "sys.modules['sender'] = pkg\n"
        f"import sender.smtp.{name}\n"
        "print('trio' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
