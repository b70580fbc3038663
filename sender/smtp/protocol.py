"""Sans-IO SMTP client: commands in, bytes out; bytes in, replies out.

No I/O happens here (``smtp/client.py`` owns the socket), so every rule is testable with bytes:

    proto = ClientProtocol()
    proto.receive_data(await stream.receive_some(65536))
    while (ev := proto.next_event()) is not NEED_DATA:
        handle(ev.command, ev.reply)
    await stream.send_all(proto.send_many([MailFrom(a), RcptTo(b), Data()]))

Pipelining (RFC 2920) lives here: ``send`` moves the state optimistically and queues the
command, and each parsed reply is paired, in order, with the command that caused it. Only the
replies to greeting, EHLO/HELO, DATA, STARTTLS and QUIT move the state again; everything that
can change state sits in the two tables below.
"""

from __future__ import annotations

from collections import deque

import msgspec

from ..errors import LocalProtocolError, RemoteProtocolError
from ..model import Reply
from .wire import MAX_REPLY_LINE, dot_stuff, parse_reply

__all__ = [
    "NEED_DATA",
    "Ehlo",
    "Helo",
    "StartTls",
    "MailFrom",
    "RcptTo",
    "Data",
    "Message",
    "Rset",
    "Noop",
    "Quit",
    "Command",
    "Replied",
    "ClientProtocol",
    "dot_stuff",
    "parse_ehlo",
    "MAX_REPLY_LINE",
]


class _Sentinel:
    """A named singleton; identity-hashed so table lookups stay cheap."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")

# States. Waiting states (HELLO_SENT, DATA_SENT, TLS_SENT) accept almost nothing because the
# reply decides what the server expects next.
GREETING = _Sentinel("GREETING")  # waiting for the 220 banner
CONNECTED = _Sentinel("CONNECTED")  # greeted (or TLS just started): EHLO/HELO needed
HELLO_SENT = _Sentinel("HELLO_SENT")
READY = _Sentinel("READY")  # no transaction open
MAIL = _Sentinel("MAIL")  # MAIL sent
RCPT = _Sentinel("RCPT")  # at least one RCPT sent
DATA_SENT = _Sentinel("DATA_SENT")  # waiting for 354
DATA = _Sentinel("DATA")  # 354 received: only the message may follow
TLS_SENT = _Sentinel("TLS_SENT")  # waiting for 220 to STARTTLS
TLS = _Sentinel("TLS")  # 220 received: wrap the stream, then tls_started()
QUIT_SENT = _Sentinel("QUIT_SENT")
CLOSED = _Sentinel("CLOSED")  # server said goodbye (221, 421): EOF is expected
ERROR = _Sentinel("ERROR")  # the peer broke the protocol


# --- Commands ---------------------------------------------------------------------------


def _line(text: str) -> bytes:
    if "\r" in text or "\n" in text:
        raise LocalProtocolError(f"CR or LF in command argument: {text!r}")
    return text.encode() + b"\r\n"


class Ehlo(msgspec.Struct, frozen=True, gc=False):
    name: str

    def _encode(self) -> bytes:
        return _line("EHLO " + self.name)


class Helo(msgspec.Struct, frozen=True, gc=False):
    name: str

    def _encode(self) -> bytes:
        return _line("HELO " + self.name)


class StartTls(msgspec.Struct, frozen=True, gc=False):
    def _encode(self) -> bytes:
        return b"STARTTLS\r\n"


class MailFrom(msgspec.Struct, frozen=True, gc=False):
    """``MailFrom("")`` is the null reverse-path ``<>`` used by bounces."""

    address: str
    params: tuple[str, ...] = ()

    def _encode(self) -> bytes:
        if self.params:
            return _line(f"MAIL FROM:<{self.address}> {' '.join(self.params)}")
        return _line(f"MAIL FROM:<{self.address}>")


class RcptTo(msgspec.Struct, frozen=True, gc=False):
    address: str
    params: tuple[str, ...] = ()

    def _encode(self) -> bytes:
        if self.params:
            return _line(f"RCPT TO:<{self.address}> {' '.join(self.params)}")
        return _line(f"RCPT TO:<{self.address}>")


class Data(msgspec.Struct, frozen=True, gc=False):
    def _encode(self) -> bytes:
        return b"DATA\r\n"


class Message(msgspec.Struct, frozen=True, gc=False):
    """The message after a 354: CRLF lines, not yet dot-stuffed."""

    body: bytes

    def _encode(self) -> bytes:
        return dot_stuff(self.body)


class Rset(msgspec.Struct, frozen=True, gc=False):
    def _encode(self) -> bytes:
        return b"RSET\r\n"


class Noop(msgspec.Struct, frozen=True, gc=False):
    def _encode(self) -> bytes:
        return b"NOOP\r\n"


class Quit(msgspec.Struct, frozen=True, gc=False):
    def _encode(self) -> bytes:
        return b"QUIT\r\n"


Command = Ehlo | Helo | StartTls | MailFrom | RcptTo | Data | Message | Rset | Noop | Quit


class Replied(msgspec.Struct, frozen=True, gc=False):
    """A complete reply, paired with the command it answers (None for the greeting)."""

    command: Command | None
    reply: Reply


# --- Transitions: everything that changes state is in these two tables -----------------

# state -> {command type: state right after sending it}. Anything else is LocalProtocolError.
TRANSITIONS: dict[_Sentinel, dict[type, _Sentinel]] = {
    GREETING: {Quit: QUIT_SENT},
    CONNECTED: {Ehlo: HELLO_SENT, Helo: HELLO_SENT, Rset: CONNECTED, Noop: CONNECTED, Quit: QUIT_SENT},
    HELLO_SENT: {Quit: QUIT_SENT},
    READY: {
        MailFrom: MAIL,
        Ehlo: HELLO_SENT,
        Helo: HELLO_SENT,
        StartTls: TLS_SENT,
        Rset: READY,
        Noop: READY,
        Quit: QUIT_SENT,
    },
    MAIL: {RcptTo: RCPT, Rset: READY, Noop: MAIL, Quit: QUIT_SENT},
    RCPT: {RcptTo: RCPT, Data: DATA_SENT, Rset: READY, Noop: RCPT, Quit: QUIT_SENT},
    DATA_SENT: {},
    DATA: {Message: READY},  # READY at once, so the next MAIL can follow the end of data
    TLS_SENT: {},
    TLS: {},
    QUIT_SENT: {},
    CLOSED: {},
    ERROR: {},
}

# (state when the reply arrives, type of the command it answers)
#   -> (reply class that means yes, state on yes, state on anything else).
# Pairs not listed leave the state alone: e.g. a failed MAIL while RCPTs and DATA are already
# pipelined is settled by the server's reply to DATA (554/503), which lands here as a "no".
ON_REPLY: dict[tuple[_Sentinel, type], tuple[int, _Sentinel, _Sentinel]] = {
    (GREETING, type(None)): (2, CONNECTED, CONNECTED),  # a 554 banner: caller sends QUIT
    (HELLO_SENT, Ehlo): (2, READY, CONNECTED),  # 5xx to EHLO: HELO fallback is allowed
    (HELLO_SENT, Helo): (2, READY, CONNECTED),
    (DATA_SENT, Data): (3, DATA, READY),
    (TLS_SENT, StartTls): (2, TLS, READY),
    (QUIT_SENT, Quit): (2, CLOSED, CLOSED),
}
# And any 421 (RFC 5321 3.8: the server is closing the channel) moves to CLOSED.


# --- Replies ------------------------------------------------------------------------------


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """EHLO extensions: upper-cased keyword -> its parameters ("" if none).

    The first line is the server's name and greeting, not an extension.
    """
    out = {}
    for line in reply.text.split("\n")[1:]:
        kw, _, params = line.strip().partition(" ")
        if kw:
            out[kw.upper()] = params.strip()
    return out


# --- The state machine --------------------------------------------------------------------


class ClientProtocol:
    """One SMTP client session, from the banner to QUIT.

    ``send``/``send_many`` raise LocalProtocolError and leave the state untouched when a
    command is not allowed now; ``next_event`` raises RemoteProtocolError (and stays broken)
    when the server sends garbage or hangs up with replies owed.
    """

    def __init__(self) -> None:
        self._state = GREETING
        self._buf = bytearray()
        self._pending: deque[Command | None] = deque([None])  # None: the greeting
        self._eof = False
        # The server's 421 (RFC 5321 3.8): it closes the channel, so no other reply will come.
        self.closing_reply: Reply | None = None
        self._error: str | None = None
        self.extensions: dict[str, str] = {}

    # -- sending

    @property
    def state(self) -> _Sentinel:
        return self._state

    @property
    def pending(self) -> int:
        """Replies still owed by the server."""
        return len(self._pending)

    def send(self, cmd: Command) -> bytes:
        """The bytes for ``cmd``; its reply will come back paired with it.

        Raises:
          LocalProtocolError: not allowed in this state, a reply is still owed and the server
            did not offer PIPELINING, or an argument holds CR or LF.
        """
        state = self._state
        nxt = TRANSITIONS[state].get(type(cmd))
        if nxt is None:
            raise LocalProtocolError(f"{type(cmd).__name__} not allowed in state {state!r}")
        if self._pending and "PIPELINING" not in self.extensions and state is not GREETING:
            raise LocalProtocolError(f"{type(cmd).__name__} would pipeline without PIPELINING")
        data = cmd._encode()
        self._state = nxt
        self._pending.append(cmd)
        return data

    def send_many(self, cmds) -> bytes:
        """All of ``cmds`` as one write (a pipelined group); all or nothing on error."""
        state, n = self._state, len(self._pending)
        try:
            return b"".join([self.send(c) for c in cmds])
        except LocalProtocolError:
            self._state = state
            while len(self._pending) > n:
                self._pending.pop()
            raise

    def tls_started(self) -> None:
        """The stream is now TLS: forget everything said in clear text (RFC 3207 4.2).

        Raises:
          LocalProtocolError: no 220 to STARTTLS was received.
          RemoteProtocolError: the server sent bytes in clear after its 220 (an injection).
        """
        if self._state is not TLS:
            raise LocalProtocolError(f"tls_started() in state {self._state!r}, expected after 220 to STARTTLS")
        if self._buf:
            # Bytes sent in clear after the 220 could be an injection (CVE-2011-0411 style).
            self._fail("data received between the 220 to STARTTLS and the TLS handshake")
        self._state = CONNECTED
        self.extensions = {}

    # -- receiving

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the server; ``b""`` means it closed the connection."""
        if self._eof:
            raise LocalProtocolError("receive_data() after EOF")
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_event(self) -> Replied | _Sentinel:
        """The next complete reply, or NEED_DATA.

        Raises:
          RemoteProtocolError: malformed reply, a reply nobody asked for, or EOF while a reply
            is owed (unless the server had already said 221/421).
        """
        if self._error is not None:
            raise RemoteProtocolError(self._error)
        buf = self._buf
        try:
            parsed = parse_reply(buf) if buf else None
        except RemoteProtocolError as e:
            parsed = e
        if type(parsed) is RemoteProtocolError:
            self._fail(str(parsed))
        if parsed is None:
            if self._eof:
                if buf:
                    self._fail("connection closed in the middle of a reply")
                if self._pending:
                    if self._state is not CLOSED:
                        self._fail(f"connection closed with {len(self._pending)} replies pending")
                    self._pending.clear()
            return NEED_DATA
        reply, used = parsed
        del buf[:used]
        if not self._pending:
            self._fail(f"unexpected reply: {reply}")
        cmd = self._pending.popleft()
        cmd_type = type(cmd)
        rule = ON_REPLY.get((self._state, cmd_type))
        if rule is not None:
            ok = reply.code // 100 == rule[0]
            self._state = rule[1] if ok else rule[2]
            if cmd_type is Ehlo or cmd_type is Helo:
                self.extensions = parse_ehlo(reply) if ok and cmd_type is Ehlo else {}
        if reply.code == 421:
            self._state = CLOSED
            self.closing_reply = reply
        return Replied(cmd, reply)

    def _fail(self, msg: str):
        self._state = ERROR
        self._error = msg
        raise RemoteProtocolError(msg)

    # -- what the server offered in its last EHLO

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.extensions

    @property
    def max_size(self) -> int | None:
        """The SIZE limit (RFC 1870), or None when not announced or 0 (no fixed limit)."""
        size = self.extensions.get("SIZE")
        if size and size.isascii() and size.isdigit() and int(size) > 0:
            return int(size)
        return None

    @property
    def smtputf8(self) -> bool:
        return "SMTPUTF8" in self.extensions

    @property
    def eightbitmime(self) -> bool:
        return "8BITMIME" in self.extensions

    @property
    def starttls(self) -> bool:
        return "STARTTLS" in self.extensions

    @property
    def enhanced_status_codes(self) -> bool:
        return "ENHANCEDSTATUSCODES" in self.extensions
