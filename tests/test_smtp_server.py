"""Sans-IO SMTP server: every rule checked from raw bytes."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sender.errors import LocalProtocolError
from sender.smtp.server import (
    NEED_DATA,
    Closed,
    Hello,
    MailFrom,
    MessageReceived,
    Quit,
    RcptTo,
    ServerProtocol,
    StartTlsRequested,
)

DECISIONS = (MailFrom, RcptTo, MessageReceived)
ENHANCED_LINE = re.compile(rb"^\d{3}[ -]\d\.\d{1,3}\.\d{1,3} ")


class Session:
    """Feeds bytes to a ServerProtocol, answers decisions, and records events and reply lines."""

    def __init__(self, decide=None, **kw) -> None:
        self.proto = ServerProtocol("mx.test", **kw)
        self.decide = decide or (lambda ev: (250, "2.0.0", "OK"))
        self.events: list = []

    def feed(self, data: bytes) -> list[bytes]:
        """Feed ``data``; return the reply lines it produced (CRLF stripped)."""
        self.proto.receive_data(data)
        while (ev := self.proto.next_event()) is not NEED_DATA:
            self.events.append(ev)
            if isinstance(ev, DECISIONS):
                self.proto.reply(*self.decide(ev))
            if isinstance(ev, (Quit, Closed)):
                break
        out = self.proto.data_to_send()
        assert out == b"" or out.endswith(b"\r\n")
        return out[:-2].split(b"\r\n") if out else []

    def hello(self) -> "Session":
        self.feed(b"EHLO client.test\r\n")
        return self

    def messages(self) -> list[MessageReceived]:
        return [e for e in self.events if isinstance(e, MessageReceived)]


def codes(lines: list[bytes]) -> list[bytes]:
    """'250 2.0.0' style prefixes of the last line of each reply."""
    return [line[:9] for line in lines if line[3:4] == b" "]


# --- basics -----------------------------------------------------------------------------------


def test_greeting_and_ehlo_extensions():
    s = Session(max_message_size=5000)
    assert s.proto.greeting() == b"220 mx.test ESMTP ready\r\n"
    lines = s.feed(b"ehlo client.test\r\n")
    assert lines == [
        b"250-mx.test Hello client.test",
        b"250-PIPELINING",
        b"250-SIZE 5000",
        b"250-8BITMIME",
        b"250-SMTPUTF8",
        b"250 ENHANCEDSTATUSCODES",
    ]
    assert s.events == [Hello("client.test", True)]


def test_ehlo_respects_options():
    s = Session(pipelining=False, smtputf8=False, eightbitmime=False, starttls=True)
    lines = s.feed(b"EHLO c\r\n")
    assert b"250-PIPELINING" not in lines and b"250-SMTPUTF8" not in lines and b"250-8BITMIME" not in lines
    assert lines[-1] == b"250 STARTTLS"


def test_helo():
    s = Session()
    assert s.feed(b"HELO client.test\r\n") == [b"250 mx.test"]
    assert s.events == [Hello("client.test", False)]
    # Parameters need EHLO.
    assert codes(s.feed(b"MAIL FROM:<a@x.test> SIZE=10\r\n")) == [b"555 5.5.4"]


def test_one_transaction():
    s = Session().hello()
    lines = s.feed(b"MAIL FROM:<a@x.test> SIZE=100 BODY=8BITMIME\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
    assert lines == [b"250 2.0.0 OK", b"250 2.0.0 OK", b"354 End data with <CR><LF>.<CR><LF>"]
    assert s.events[1] == MailFrom("a@x.test", {"SIZE": "100", "BODY": "8BITMIME"})
    assert s.events[2] == RcptTo("b@y.test", {})
    assert s.feed(b"Subject: hi\r\n\r\nbody\r\n.\r\n") == [b"250 2.0.0 OK"]
    assert s.messages() == [MessageReceived("a@x.test", ["b@y.test"], b"Subject: hi\r\n\r\nbody\r\n")]
    # The transaction is over: RCPT needs a new MAIL.
    assert codes(s.feed(b"RCPT TO:<b@y.test>\r\n")) == [b"503 5.5.1"]


def test_case_insensitive_and_space_after_colon():
    s = Session().hello()
    lines = s.feed(b"mail from: <a@x.test>\r\nrcpt To: <b@y.test>\r\ndata\r\n")
    assert codes(lines) == [b"250 2.0.0", b"250 2.0.0", b"354 End d"]
    assert s.events[1].address == "a@x.test" and s.events[2].address == "b@y.test"


def test_null_sender_allowed_null_recipient_refused():
    s = Session().hello()
    assert codes(s.feed(b"MAIL FROM:<>\r\n")) == [b"250 2.0.0"]
    assert s.events[-1] == MailFrom("", {})
    assert codes(s.feed(b"RCPT TO:<>\r\n")) == [b"501 5.1.3"]
    assert codes(s.feed(b"RCPT TO:<Postmaster>\r\n")) == [b"250 2.0.0"]


def test_source_route_is_dropped():
    s = Session().hello()
    s.feed(b"MAIL FROM:<@relay.test,@b.test:a@x.test>\r\n")
    assert s.events[-1].address == "a@x.test"


def test_app_decisions_shape_the_envelope():
    def decide(ev):
        if isinstance(ev, RcptTo) and ev.address.startswith("no"):
            return 550, "5.1.1", "No such user"
        return 250, "2.1.5", "OK"

    s = Session(decide).hello()
    lines = s.feed(
        b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<no@y.test>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n"
    )
    assert codes(lines) == [b"250 2.1.5", b"250 2.1.5", b"550 5.1.1", b"250 2.1.5", b"354 End d"]
    s.feed(b"x\r\n.\r\n")
    assert s.messages()[0].rcpts == ["b@y.test", "c@y.test"]


def test_mail_refused_by_app_leaves_no_transaction():
    s = Session(lambda ev: (451, "4.7.1", "Try later")).hello()
    assert codes(s.feed(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n")) == [b"451 4.7.1", b"503 5.5.1"]


def test_multiline_app_reply():
    s = Session(lambda ev: (250, "2.0.0", "one\ntwo")).hello()
    assert s.feed(b"MAIL FROM:<a@x.test>\r\n") == [b"250-2.0.0 one", b"250 2.0.0 two"]


def test_empty_message():
    s = Session().hello()
    s.feed(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n.\r\n")
    assert s.messages()[0].body == b""


def test_dot_unstuffing():
    s = Session().hello()
    s.feed(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
    s.feed(b"..first\r\n..\r\nmid\r\n...\r\n.single\r\n.\r\n")
    assert s.messages()[0].body == b".first\r\n.\r\nmid\r\n..\r\nsingle\r\n"


def test_commands_pipelined_after_data_terminator():
    s = Session().hello()
    lines = s.feed(
        b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n"
        b"one\r\n.\r\nMAIL FROM:<c@x.test>\r\nRCPT TO:<d@y.test>\r\nDATA\r\ntwo\r\n.\r\nQUIT\r\n"
    )
    assert codes(lines) == [b"250 2.0.0", b"250 2.0.0", b"354 End d", b"250 2.0.0"] * 2 + [b"221 2.0.0"]
    assert [(m.sender, m.body) for m in s.messages()] == [("a@x.test", b"one\r\n"), ("c@x.test", b"two\r\n")]
    assert s.proto.closed


def test_automatic_replies():
    s = Session()
    assert s.feed(b"NOOP\r\n") == [b"250 2.0.0 OK"]
    assert codes(s.feed(b"RSET\r\n")) == [b"250 2.0.0"]
    assert codes(s.feed(b"VRFY someone\r\n")) == [b"252 2.5.0"]
    assert codes(s.feed(b"HELP\r\n")) == [b"214 2.0.0"]
    assert s.events == []


def test_rset_resets_the_transaction():
    s = Session().hello()
    s.feed(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nRSET\r\n")
    assert codes(s.feed(b"DATA\r\n")) == [b"503 5.5.1"]
    assert codes(s.feed(b"MAIL FROM:<a@x.test>\r\n")) == [b"250 2.0.0"]


def test_quit_and_eof():
    s = Session()
    assert s.feed(b"QUIT\r\nNOOP\r\n") == [b"221 2.0.0 mx.test closing connection"]
    assert s.events == [Quit()] and s.proto.closed
    assert s.proto.next_event() == Closed()
    s = Session().hello()
    s.feed(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\npartial")
    s.feed(b"")
    assert s.events[-1] == Closed() and s.proto.closed and s.messages() == []


# --- the app's side of the contract --------------------------------------------------------


def test_reply_required_before_next_event():
    p = ServerProtocol("mx.test")
    p.receive_data(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\n")
    assert isinstance(p.next_event(), Hello)
    with pytest.raises(LocalProtocolError):
        p.reply(250, "2.0.0", "no decision pending")
    assert isinstance(p.next_event(), MailFrom)
    with pytest.raises(LocalProtocolError):
        p.next_event()
    for bad in [(199, "", "x"), (250, "5.0.0", "class mismatch"), (250, "2.0", "short"), (250, "2.0.0", "a\rb")]:
        with pytest.raises(LocalProtocolError):
            p.reply(*bad)
    p.reply(250, "2.1.0", "OK")
    assert p.next_event() is NEED_DATA


def test_421_from_app_closes():
    s = Session(lambda ev: (421, "4.3.2", "Shutting down")).hello()
    assert codes(s.feed(b"MAIL FROM:<a@x.test>\r\nNOOP\r\n")) == [b"421 4.3.2"]
    assert s.proto.closed and s.events[-1] == Closed()


# --- errors: every automatic error carries an enhanced code ---------------------------------


@pytest.mark.parametrize(
    "setup, line, expected",
    [
        (b"", b"MAIL FROM:<a@x.test>", b"503 5.5.1"),  # before HELO/EHLO
        (b"EHLO c\r\n", b"RCPT TO:<b@y.test>", b"503 5.5.1"),  # before MAIL
        (b"EHLO c\r\n", b"DATA", b"503 5.5.1"),  # before MAIL
        (b"EHLO c\r\nMAIL FROM:<a@x.test>\r\n", b"DATA", b"503 5.5.1"),  # before RCPT
        (b"EHLO c\r\nMAIL FROM:<a@x.test>\r\n", b"MAIL FROM:<a@x.test>", b"503 5.5.1"),  # nested
        (b"EHLO c\r\n", b"MAIL FROM:", b"501 5.5.4"),
        (b"EHLO c\r\n", b"MAIL FROM:a@x.test", b"501 5.5.4"),
        (b"EHLO c\r\n", b"MAIL TO:<a@x.test>", b"501 5.5.4"),
        (b"EHLO c\r\n", b"MAIL FROM:<a@x.test", b"501 5.5.4"),
        (b"EHLO c\r\n", b"MAIL FROM:<a@x.test>SIZE=1", b"501 5.5.4"),
        (b"EHLO c\r\n", b"MAIL FROM:<a@x.test> SIZE=abc", b"501 5.5.4"),
        (b"EHLO c\r\n", b"MAIL FROM:<a@x.test> BODY=9BIT", b"501 5.5.4"),
        (b"EHLO c\r\n", b"MAIL FROM:<a@x.test> FOO=BAR", b"555 5.5.4"),
        (b"EHLO c\r\n", b"MAIL FROM:<not an address>", b"501 5.1.7"),
        (b"EHLO c\r\nMAIL FROM:<a@x.test>\r\n", b"RCPT TO:<>", b"501 5.1.3"),
        (b"EHLO c\r\nMAIL FROM:<a@x.test>\r\n", b"RCPT TO:<nodomain>", b"501 5.1.3"),
        (b"EHLO c\r\nMAIL FROM:<a@x.test>\r\n", b"RCPT TO:<b@y.test> NOTIFY=NEVER", b"555 5.5.4"),
        (b"EHLO c\r\nMAIL FROM:<a@x.test>\r\n", b"RCPT TO b@y.test", b"501 5.5.4"),
        (b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n", b"DATA now", b"501 5.5.4"),
        (b"", b"EHLO", b"501 5.5.4"),
        (b"", b"HELO", b"501 5.5.4"),
        (b"", b"VRFY", b"501 5.5.4"),
        (b"", b"RSET now", b"501 5.5.4"),
        (b"", b"FOO", b"500 5.5.2"),
        (b"", b"", b"500 5.5.2"),
        (b"", b"EXPN list", b"502 5.5.1"),
        (b"", b"AUTH PLAIN", b"502 5.5.1"),
        (b"", b"STARTTLS", b"502 5.5.1"),  # not offered
        (b"", b"NOOP\xff\xfe", b"500 5.5.2"),  # not UTF-8
        (b"", b"NOOP\nNOOP", b"500 5.5.2"),  # bare LF inside a command line
        (b"EHLO c\r\n", b"MAIL FROM:<a@x.test> SIZE=99999999999", b"552 5.3.4"),
        (b"EHLO c\r\n", "MAIL FROM:<j\u00f6rg@x.test>".encode(), b"553 5.6.7"),
        (b"EHLO c\r\nMAIL FROM:<a@x.test>\r\n", "RCPT TO:<j\u00f6rg@y.test>".encode(), b"553 5.6.7"),
        (b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n", b"MAIL FROM:<a@x.test>", b"503 5.5.1"),
    ],
)
def test_automatic_errors(setup, line, expected):
    s = Session()
    if setup:
        s.feed(setup)
    lines = s.feed(line + b"\r\n")
    assert codes(lines) == [expected]
    assert all(ENHANCED_LINE.match(x) for x in lines)
    assert not s.proto.closed
    assert s.feed(b"NOOP\r\n") == [b"250 2.0.0 OK"]  # the session carries on


def test_smtputf8_addresses_with_param():
    s = Session().hello()
    lines = s.feed("MAIL FROM:<j\u00f6rg@x.test> SMTPUTF8\r\nRCPT TO:<\u00fc@y.test>\r\n".encode())
    assert codes(lines) == [b"250 2.0.0", b"250 2.0.0"]
    assert s.events[1] == MailFrom("j\u00f6rg@x.test", {"SMTPUTF8": ""})
    assert s.events[2].address == "\u00fc@y.test"
    s = Session(smtputf8=False).hello()
    assert codes(s.feed(b"MAIL FROM:<a@x.test> SMTPUTF8\r\n")) == [b"555 5.5.4"]


def test_data_without_accepted_recipient_554_then_next_mail():
    s = Session(lambda ev: (550, "5.1.1", "No") if isinstance(ev, RcptTo) else (250, "2.0.0", "OK")).hello()
    lines = s.feed(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
    assert codes(lines) == [b"250 2.0.0", b"550 5.1.1", b"554 5.5.1"]
    assert codes(s.feed(b"MAIL FROM:<a@x.test>\r\n")) == [b"250 2.0.0"]


def test_too_many_recipients():
    s = Session(max_recipients=2).hello()
    lines = s.feed(b"MAIL FROM:<a@x.test>\r\n" + b"RCPT TO:<b@y.test>\r\n" * 3 + b"DATA\r\nx\r\n.\r\n")
    assert codes(lines) == [b"250 2.0.0", b"250 2.0.0", b"250 2.0.0", b"452 4.5.3", b"354 End d", b"250 2.0.0"]
    assert len(s.messages()[0].rcpts) == 2


def test_too_many_errors_421():
    s = Session(max_errors=3)
    lines = s.feed(b"FOO\r\n" * 5)
    assert codes(lines) == [b"500 5.5.2"] * 3 + [b"421 4.7.0"]
    assert s.proto.closed and s.events == [Closed()]


# --- line limits ----------------------------------------------------------------------------


def test_long_command_line():
    s = Session()
    ok = b"NOOP " + b"x" * (512 - 7) + b"\r\n"
    assert len(ok) == 512 and s.feed(ok) == [b"250 2.0.0 OK"]
    assert codes(s.feed(b"NOOP " + b"x" * (512 - 6) + b"\r\n")) == [b"500 5.5.2"]
    # Streamed without CRLF: the buffer must not grow, and one 500 answers the whole line.
    for _ in range(100):
        assert s.feed(b"y" * 1000) == []
    assert len(s.proto._buf) <= 1000 + 512
    assert codes(s.feed(b"yyy\r")) == []
    assert codes(s.feed(b"\nNOOP\r\n")) == [b"500 5.5.2", b"250 2.0.0"]


def _open_data(s: Session) -> None:
    assert codes(s.feed(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n"))[-1] == b"354 End d"


def test_long_data_line_rejected_at_end():
    s = Session(max_line_length=100).hello()
    _open_data(s)
    ok = b"a" * 98 + b"\r\n"
    assert s.feed(ok * 3 + b".\r\n") == [b"250 2.0.0 OK"]
    _open_data(s)
    assert s.feed(ok + b"b" * 99 + b"\r\n" + ok + b".\r\n") == [b"550 5.5.2 Line too long"]
    _open_data(s)
    # The long line arrives a byte at a time, and is the very first line.
    for b in b"c" * 150 + b"\r\n":
        s.feed(bytes([b]))
    assert s.feed(b".\r\n") == [b"550 5.5.2 Line too long"]
    assert len(s.messages()) == 1
    _open_data(s)
    assert s.feed(ok + b".\r\n") == [b"250 2.0.0 OK"]  # and the session carries on


@given(st.lists(st.integers(0, 130), min_size=1, max_size=30), st.integers(1, 400))
def test_long_line_check_matches_naive(lengths, chunk):
    body = b"".join(b"x" * n + b"\r\n" for n in lengths)
    s = Session(max_line_length=100).hello()
    _open_data(s)
    wire = body + b".\r\n"
    out = []
    for i in range(0, len(wire), chunk):
        out += s.feed(wire[i : i + chunk])
    too_long = any(n + 2 > 100 for n in lengths)
    assert out == ([b"550 5.5.2 Line too long"] if too_long else [b"250 2.0.0 OK"])


def test_size_param_over_limit():
    s = Session(max_message_size=1000).hello()
    lines = s.feed(b"MAIL FROM:<a@x.test> SIZE=1001\r\n")
    assert lines == [b"552 5.3.4 Message size exceeds fixed maximum message size"]
    assert codes(s.feed(b"MAIL FROM:<a@x.test> SIZE=1000\r\n")) == [b"250 2.0.0"]


def test_message_over_limit_not_buffered():
    s = Session(max_message_size=1000).hello()
    _open_data(s)
    for _ in range(200):
        assert s.feed(b"x" * 70 + b"\r\n") == []
        assert len(s.proto._data) < 1100  # stopped buffering past the limit
    assert s.feed(b".\r\nNOOP\r\n") == [b"552 5.3.4 Message size exceeds fixed limit", b"250 2.0.0 OK"]
    assert s.messages() == []
    _open_data(s)
    assert s.feed(b"small\r\n.\r\n") == [b"250 2.0.0 OK"]


def test_message_exactly_at_limit():
    body = b"y" * 998 + b"\r\n"
    s = Session(max_message_size=len(body)).hello()
    _open_data(s)
    assert s.feed(body + b".\r\n") == [b"250 2.0.0 OK"]
    _open_data(s)
    assert codes(s.feed(body + b"z\r\n.\r\n")) == [b"552 5.3.4"]


# --- SMTP smuggling ---------------------------------------------------------------------------

SMUGGLED = b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\nforged\r\n"


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r"])
def test_smuggling_rejected(fake_end):
    s = Session().hello()
    _open_data(s)
    lines = s.feed(b"legit\r\n" + fake_end + SMUGGLED)
    assert lines == []  # the fake end did not end the data
    lines = s.feed(b".\r\n")
    assert lines == [b"550 5.5.2 Message contains bare CR or LF"]
    assert s.messages() == []
    assert [e.address for e in s.events if isinstance(e, MailFrom)] == ["a@x.test"]
    # The next transaction on the same session works.
    _open_data(s)
    assert s.feed(b"clean\r\n.\r\n") == [b"250 2.0.0 OK"]
    assert s.messages()[0].body == b"clean\r\n"


def test_smuggling_split_across_chunks():
    s = Session().hello()
    _open_data(s)
    wire = b"legit\r\n\n.\n" + SMUGGLED + b".\r\n"
    out = []
    for b in wire:
        out += s.feed(bytes([b]))
    assert out == [b"550 5.5.2 Message contains bare CR or LF"]


def test_terminator_split_at_every_point():
    wire = b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\nbody\r\n..dot\r\n.\r\nNOOP\r\n"
    for i in range(len(wire) + 1):
        s = Session().hello()
        lines = s.feed(wire[:i]) if i else []
        lines += s.feed(wire[i:]) if i < len(wire) else []
        assert codes(lines) == [b"250 2.0.0", b"250 2.0.0", b"354 End d", b"250 2.0.0", b"250 2.0.0"], i
        assert s.messages()[0].body == b"body\r\n.dot\r\n"


# --- STARTTLS ---------------------------------------------------------------------------------


def test_starttls_flow_and_injection_dropped():
    s = Session(starttls=True).hello()
    lines = s.feed(b"STARTTLS\r\nMAIL FROM:<injected@x.test>\r\n")
    assert lines == [b"220 2.0.0 Ready to start TLS"]
    assert s.events[-1] == StartTlsRequested()
    with pytest.raises(LocalProtocolError):
        ServerProtocol("mx.test").tls_started()
    s.proto.tls_started()
    assert not any(isinstance(e, MailFrom) for e in s.events)
    assert codes(s.feed(b"MAIL FROM:<a@x.test>\r\n")) == [b"503 5.5.1"]  # EHLO again first
    lines = s.feed(b"EHLO c\r\n")
    assert b"250 STARTTLS" not in lines and b"250-STARTTLS" not in lines
    assert codes(s.feed(b"STARTTLS\r\n")) == [b"503 5.5.1"]
    assert codes(s.feed(b"MAIL FROM:<a@x.test>\r\n")) == [b"250 2.0.0"]


# --- fuzz -------------------------------------------------------------------------------------

FRAGMENTS = [
    b"EHLO c\r\n",
    b"HELO c\r\n",
    b"MAIL FROM:<a@x.test>\r\n",
    b"MAIL FROM:<> SIZE=5 BODY=8BITMIME SMTPUTF8\r\n",
    b"RCPT TO:<b@y.test>\r\n",
    b"DATA\r\n",
    b".\r\n",
    b"\r\n.\r\n",
    b"\n.\n",
    b"..\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"STARTTLS\r\n",
    b"QUIT\r\n",
    b"\r\n",
    b"\r",
    b"\n",
    b"x" * 600,
]


def _allowed(line: bytes, hostname: bytes = b"mx.test") -> bool:
    """Reply lines must carry an enhanced code, except HELO/EHLO answers and 354."""
    if ENHANCED_LINE.match(line) or line.startswith(b"354 "):
        return True
    return bool(re.match(rb"^250[ -](" + re.escape(hostname) + rb"( |$)|[A-Z0-9]+( \d+)?$)", line))


@settings(max_examples=300)
@given(
    st.lists(st.one_of(st.binary(max_size=40), st.sampled_from(FRAGMENTS)), max_size=25),
    st.sampled_from([(250, "2.0.0", "OK"), (550, "5.7.1", "No"), (451, "4.3.0", "Later")]),
    st.booleans(),
)
def test_server_never_crashes_on_arbitrary_bytes(chunks, decision, starttls):
    p = ServerProtocol("mx.test", max_message_size=300, max_line_length=50, max_command_length=100, starttls=starttls)
    out = b""
    for chunk in [*chunks, b""]:
        p.receive_data(chunk)
        while (ev := p.next_event()) is not NEED_DATA:
            if isinstance(ev, DECISIONS):
                p.reply(*decision)
            elif isinstance(ev, StartTlsRequested):
                p.tls_started()
            elif isinstance(ev, Closed):
                break
        out += p.data_to_send()
        if p.closed:
            break
    assert out == b"" or out.endswith(b"\r\n")
    for line in out[:-2].split(b"\r\n") if out else []:
        assert b"\r" not in line and b"\n" not in line
        assert _allowed(line), line
