"""Sans-IO SMTP server: bytes in, events out; the app decides, the protocol answers the rest.

Shared by the injection listener and the test sink, so both enforce the same rules. No I/O:

    conn.send_all(proto.greeting())
    while True:
        ev = proto.next_event()
        if ev is NEED_DATA:
            await conn.send_all(proto.data_to_send())   # pipelined replies in one write
            proto.receive_data(await conn.receive_some(65536))
        elif isinstance(ev, (MailFrom, RcptTo, MessageReceived)):
            proto.reply(250, "2.1.0", "OK")              # the app's decision
        elif isinstance(ev, Closed):
            await conn.send_all(proto.data_to_send())
            break

Every reply the protocol writes itself carries an RFC 3463 enhanced code (except the banner,
HELO/EHLO and 354, which RFC 2034 leaves without one). DATA is collected at the bytes level:
only CRLF "." CRLF ends it, and a message with a bare CR or LF is refused whole, so no
"smuggled" second message can hide inside one (the SMTP smuggling attack of 2023).
"""

from __future__ import annotations

import functools

import msgspec

from ..errors import LocalProtocolError
from .protocol import NEED_DATA
from .wire import BARE_LINE_END, unstuff

__all__ = [
    "NEED_DATA",
    "Hello",
    "MailFrom",
    "RcptTo",
    "MessageReceived",
    "StartTlsRequested",
    "Quit",
    "Closed",
    "Event",
    "ServerProtocol",
]


class Hello(msgspec.Struct, frozen=True, gc=False):
    """HELO/EHLO accepted; the 250 (with extensions for EHLO) is already queued."""

    name: str
    extended: bool


class MailFrom(msgspec.Struct, frozen=True):
    """Decide with reply(): 2xx opens the transaction. ``address`` is "" for ``<>``."""

    address: str
    params: dict[str, str]


class RcptTo(msgspec.Struct, frozen=True):
    """Decide with reply(): 2xx adds the recipient to the envelope."""

    address: str
    params: dict[str, str]


class MessageReceived(msgspec.Struct, frozen=True):
    """Decide with reply(); the transaction ends either way. ``body`` is unstuffed, CRLF lines."""

    sender: str
    rcpts: list[str]
    body: bytes


class StartTlsRequested(msgspec.Struct, frozen=True, gc=False):
    """The 220 is queued: flush it, do the TLS handshake, then call tls_started()."""


class Quit(msgspec.Struct, frozen=True, gc=False):
    """The 221 is queued and ``closed`` is set: flush, then close."""


class Closed(msgspec.Struct, frozen=True, gc=False):
    """The session is over: the peer hung up, or the protocol gave up (421 queued)."""


Event = Hello | MailFrom | RcptTo | MessageReceived | StartTlsRequested | Quit | Closed

_DECISIONS = (MailFrom, RcptTo, MessageReceived)
_UNIMPLEMENTED = frozenset({"EXPN", "TURN", "ETRN", "ATRN", "AUTH", "BDAT", "SEND", "SOML", "SAML"})
_TERMINATOR = b"\r\n.\r\n"


def _is_mailbox(address: str) -> bool:
    """Loose local@domain check: enough to refuse junk, not a full RFC 5321 grammar."""
    local, at, domain = address.rpartition("@")
    return bool(local and at and domain) and address.isprintable() and " " not in address and "<" not in address


def _parse_path(arg: str, prefix: str) -> tuple[str, dict[str, str]] | None:
    """``FROM:<addr> K=V ...`` -> (addr, {K: V}), or None on a syntax error.

    A space after the colon is tolerated; a source route ``<@a,@b:user@c>`` is dropped
    (RFC 5321 4.1.2, its use is deprecated).
    """
    n = len(prefix)
    if arg[:n].upper() != prefix:
        return None
    rest = arg[n:].lstrip(" ")
    if rest[:1] != "<":
        return None
    gt = rest.find(">")
    if gt < 0:
        return None
    address, tail = rest[1:gt], rest[gt + 1 :]
    if tail and tail[0] != " ":
        return None
    if address[:1] == "@":
        _, colon, address = address.partition(":")
        if not colon:
            return None
    params = {}
    for p in tail.split():
        key, _, value = p.partition("=")
        params[key.upper()] = value
    return address, params


@functools.lru_cache(maxsize=256)  # apps answer with a handful of codes, over and over
def _check_enhanced(code: int, enhanced: str) -> bool:
    parts = enhanced.split(".")
    return (
        len(parts) == 3
        and parts[0] == str(code)[0]
        and all(0 < len(p) <= 3 and p.isascii() and p.isdigit() for p in parts)
    )


class ServerProtocol:
    """One SMTP server session.

    Decision events (MailFrom, RcptTo, MessageReceived) must be answered with reply() before
    the next next_event(). Everything else is answered here. When ``closed`` turns True, flush
    data_to_send() and close the connection.
    """

    def __init__(
        self,
        hostname: str,
        *,
        max_message_size: int = 10 * 1024 * 1024,
        max_recipients: int = 1000,
        max_line_length: int = 1000,
        max_command_length: int = 512,
        starttls: bool = False,
        pipelining: bool = True,
        smtputf8: bool = True,
        eightbitmime: bool = True,
        max_errors: int = 20,
    ) -> None:
        if not hostname or not hostname.isprintable() or " " in hostname:
            raise LocalProtocolError(f"bad hostname {hostname!r}")
        self.hostname = hostname
        self.max_message_size = max_message_size
        self.max_recipients = max_recipients
        self.max_line_length = max_line_length
        self.max_command_length = max_command_length
        self.starttls = starttls
        self.pipelining = pipelining
        self.smtputf8 = smtputf8
        self.eightbitmime = eightbitmime
        self.max_errors = max_errors
        self.closed = False
        self.tls = False
        self._buf = bytearray()
        self._out = bytearray()
        self._eof = False
        self._errors = 0
        self._hello: str | None = None
        self._extended = False
        self._tls_pending = False
        self._decision: MailFrom | RcptTo | MessageReceived | None = None
        self._skipping = False  # discarding the rest of an over-long command line
        self._data: bytearray | None = None  # b"\r\n" + raw DATA so far, while in DATA
        self._reset()
        self._commands = {
            "EHLO": self._ehlo,
            "HELO": self._helo,
            "MAIL": self._mail,
            "RCPT": self._rcpt,
            "DATA": self._data_cmd,
            "RSET": self._rset,
            "NOOP": self._noop,
            "QUIT": self._quit,
            "VRFY": self._vrfy,
            "HELP": self._help,
            "STARTTLS": self._starttls,
        }

    def _reset(self) -> None:
        self._sender: str | None = None
        self._rcpts: list[str] = []
        self._rcpt_tries = 0
        self._utf8 = False

    # -- the caller's side

    @property
    def in_transaction(self) -> bool:
        """Between an accepted MAIL and the end of its message (or RSET)."""
        return self._sender is not None

    @property
    def helo(self) -> str | None:
        """The name the client gave in its last HELO/EHLO (for the Received: trace line)."""
        return self._hello

    @property
    def extended(self) -> bool:
        return self._extended

    def greeting(self) -> bytes:
        return f"220 {self.hostname} ESMTP ready\r\n".encode()

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the client; ``b""`` means it closed its side."""
        if self._eof:
            raise LocalProtocolError("receive_data() after EOF")
        if not data:
            self._eof = True
        elif self.closed:
            pass  # nothing more will be read
        elif self._data is not None and not self._buf:
            self._data += data  # straight into the message: one copy fewer on the hot path
        else:
            self._buf += data

    def data_to_send(self) -> bytes:
        """All replies queued so far, so pipelined replies go out in one write."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_event(self):
        """The next event, or NEED_DATA once all buffered input is handled.

        Raises:
          LocalProtocolError: the last decision event was not answered with reply().
        """
        if self._decision is not None:
            raise LocalProtocolError(f"reply() to {type(self._decision).__name__} first")
        while True:
            if self.closed:
                return Closed()
            if self._tls_pending:
                ev = NEED_DATA  # never act on clear text sent after STARTTLS
            elif self._data is not None:
                ev = self._read_data()
            else:
                ev = self._read_command()
            if ev is NEED_DATA:
                if self._eof:
                    self.closed = True
                    return Closed()
                return NEED_DATA
            if ev is not None:
                return ev

    def reply(self, code: int, enhanced: str, text: str) -> None:
        """Answer the pending decision event. ``text`` may hold "\\n" for a multi-line reply.

        2xx to MailFrom opens the transaction, 2xx to RcptTo adds the recipient; any reply to
        MessageReceived ends the transaction; 421 closes the session.
        """
        ev = self._decision
        if ev is None:
            raise LocalProtocolError("reply() with no decision pending")
        if not (type(code) is int and 200 <= code <= 599):
            raise LocalProtocolError(f"reply code {code!r} out of range")
        if enhanced and not _check_enhanced(code, enhanced):
            raise LocalProtocolError(f"bad enhanced status code {enhanced!r} for {code}")
        if "\r" in text:
            raise LocalProtocolError("CR in reply text")
        self._queue(code, enhanced, text)
        self._decision = None
        ok = 200 <= code < 300
        if type(ev) is MailFrom:
            if ok:
                self._sender = ev.address
                self._utf8 = "SMTPUTF8" in ev.params
        elif type(ev) is RcptTo:
            if ok:
                self._rcpts.append(ev.address)
        else:
            self._reset()
        if code == 421:
            self.closed = True

    def tls_started(self) -> None:
        """The handshake after StartTlsRequested is done: start afresh (RFC 3207 4.2).

        Any clear text buffered after the STARTTLS line is dropped, never executed
        (CVE-2011-0411 style command injection). Call before feeding decrypted bytes.
        """
        if not self._tls_pending:
            raise LocalProtocolError("tls_started() without StartTlsRequested")
        self._tls_pending = False
        self.tls = True
        self._buf.clear()
        self._hello = None
        self._extended = False
        self._reset()

    # -- replies

    def _queue(self, code: int, enhanced: str, text: str) -> None:
        prefix = f"{code} {enhanced} " if enhanced else f"{code} "
        if "\n" not in text:
            self._out += (prefix + text + "\r\n").encode()
            return
        more = f"{code}-{enhanced} " if enhanced else f"{code}-"
        lines = text.split("\n")
        out = [more + line + "\r\n" for line in lines[:-1]]
        out.append(prefix + lines[-1] + "\r\n")
        self._out += "".join(out).encode()

    def _error(self, code: int, enhanced: str, text: str) -> None:
        """A protocol error by the client; too many and we hang up."""
        self._errors += 1
        if self._errors > self.max_errors:
            self._queue(421, "4.7.0", f"{self.hostname} Too many errors, closing connection")
            self.closed = True
        else:
            self._queue(code, enhanced, text)

    # -- commands

    def _read_command(self):
        buf = self._buf
        nl = buf.find(b"\r\n")
        if self._skipping:
            if nl < 0:
                del buf[: -1 if buf[-1:] == b"\r" else len(buf)]
                return NEED_DATA
            del buf[: nl + 2]
            self._skipping = False
            return self._error(500, "5.5.2", "Line too long")
        if nl < 0:
            if len(buf) > self.max_command_length:
                self._skipping = True
                return None
            return NEED_DATA
        line = bytes(buf[:nl])
        del buf[: nl + 2]
        if nl + 2 > self.max_command_length:
            return self._error(500, "5.5.2", "Line too long")
        if b"\r" in line or b"\n" in line:
            return self._error(500, "5.5.2", "Bare CR or LF in command")
        try:
            text = line.decode()
        except UnicodeDecodeError:
            return self._error(500, "5.5.2", "Invalid UTF-8 in command")
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        handler = self._commands.get(verb)
        if handler is None:
            if verb in _UNIMPLEMENTED:
                return self._error(502, "5.5.1", "Command not implemented")
            return self._error(500, "5.5.2", "Command unrecognized")
        return handler(arg.strip())

    def _ehlo(self, arg: str):
        if not arg:
            return self._error(501, "5.5.4", "Syntax: EHLO hostname")
        self._reset()
        self._hello, self._extended = arg, True
        lines = [f"{self.hostname} Hello {arg}"]
        if self.pipelining:
            lines.append("PIPELINING")
        lines.append(f"SIZE {self.max_message_size}")
        if self.eightbitmime:
            lines.append("8BITMIME")
        if self.smtputf8:
            lines.append("SMTPUTF8")
        lines.append("ENHANCEDSTATUSCODES")
        if self.starttls and not self.tls:
            lines.append("STARTTLS")
        self._queue(250, "", "\n".join(lines))
        return Hello(arg, True)

    def _helo(self, arg: str):
        if not arg:
            return self._error(501, "5.5.4", "Syntax: HELO hostname")
        self._reset()
        self._hello, self._extended = arg, False
        self._queue(250, "", self.hostname)
        return Hello(arg, False)

    def _mail(self, arg: str):
        if self._hello is None:
            return self._error(503, "5.5.1", "Send HELO or EHLO first")
        if self._sender is not None:
            return self._error(503, "5.5.1", "Nested MAIL command")
        parsed = _parse_path(arg, "FROM:")
        if parsed is None:
            return self._error(501, "5.5.4", "Syntax: MAIL FROM:<address>")
        address, params = parsed
        if address and not _is_mailbox(address):
            return self._error(501, "5.1.7", "Bad sender address syntax")
        if params and not self._extended:
            return self._error(555, "5.5.4", "MAIL parameters need EHLO")
        for key, value in params.items():
            if key == "SIZE":
                if not (value.isascii() and value.isdigit()):
                    return self._error(501, "5.5.4", "Syntax: SIZE=<bytes>")
                if int(value) > self.max_message_size:
                    self._queue(552, "5.3.4", "Message size exceeds fixed maximum message size")
                    return None
            elif key == "BODY" and self.eightbitmime:
                if value.upper() not in ("7BIT", "8BITMIME"):
                    return self._error(501, "5.5.4", "Syntax: BODY=7BIT or BODY=8BITMIME")
            elif not (key == "SMTPUTF8" and self.smtputf8 and not value):
                return self._error(555, "5.5.4", f"MAIL parameter {key} not recognized")
        if not address.isascii() and "SMTPUTF8" not in params:
            self._queue(553, "5.6.7", "Non-ASCII address needs SMTPUTF8")
            return None
        self._decision = ev = MailFrom(address, params)
        return ev

    def _rcpt(self, arg: str):
        if self._sender is None:
            return self._error(503, "5.5.1", "Need MAIL before RCPT")
        self._rcpt_tries += 1
        parsed = _parse_path(arg, "TO:")
        if parsed is None:
            return self._error(501, "5.5.4", "Syntax: RCPT TO:<address>")
        address, params = parsed
        if not address:
            return self._error(501, "5.1.3", "Null recipient not allowed")
        if not _is_mailbox(address) and address.lower() != "postmaster":
            return self._error(501, "5.1.3", "Bad recipient address syntax")
        if params:
            return self._error(555, "5.5.4", "RCPT parameters not recognized")
        if len(self._rcpts) >= self.max_recipients:
            self._queue(452, "4.5.3", "Too many recipients")
            return None
        if not address.isascii() and not self._utf8:
            self._queue(553, "5.6.7", "Non-ASCII address needs SMTPUTF8")
            return None
        self._decision = ev = RcptTo(address, params)
        return ev

    def _data_cmd(self, arg: str):
        if arg:
            return self._error(501, "5.5.4", "Syntax: DATA")
        if self._sender is None:
            return self._error(503, "5.5.1", "Need MAIL command")
        if not self._rcpts:
            if not self._rcpt_tries:
                return self._error(503, "5.5.1", "Need RCPT command")
            # Normal under pipelining (every RCPT refused). Reset, so the client's next MAIL
            # works whether or not it sends RSET first.
            self._reset()
            self._queue(554, "5.5.1", "No valid recipients")
            return None
        self._queue(354, "", "End data with <CR><LF>.<CR><LF>")
        data = self._data = bytearray(b"\r\n")  # virtual CRLF: a leading "." is a line start
        data += self._buf
        self._buf.clear()
        self._scan = 0  # where the terminator search resumes
        self._oversize = False
        return None

    def _rset(self, arg: str):
        if arg:
            return self._error(501, "5.5.4", "Syntax: RSET")
        self._reset()
        self._queue(250, "2.0.0", "OK")

    def _noop(self, arg: str):
        self._queue(250, "2.0.0", "OK")

    def _quit(self, arg: str):
        self._queue(221, "2.0.0", f"{self.hostname} closing connection")
        self.closed = True
        return Quit()

    def _vrfy(self, arg: str):
        if not arg:
            return self._error(501, "5.5.4", "Syntax: VRFY address")
        self._queue(252, "2.5.0", "Cannot VRFY user, but will accept message")

    def _help(self, arg: str):
        verbs = " ".join(v for v in self._commands if v != "STARTTLS" or self.starttls)
        self._queue(214, "2.0.0", f"Commands: {verbs}")

    def _starttls(self, arg: str):
        if not self.starttls:
            return self._error(502, "5.5.1", "STARTTLS not available")
        if arg:
            return self._error(501, "5.5.4", "Syntax: STARTTLS")
        if self.tls:
            return self._error(503, "5.5.1", "TLS already active")
        self._queue(220, "2.0.0", "Ready to start TLS")
        self._tls_pending = True
        return StartTlsRequested()

    # -- message data

    def _read_data(self):
        """Collect DATA until CRLF "." CRLF, scanning only bytes not yet searched."""
        data = self._data
        if self._buf:
            data += self._buf
            self._buf.clear()
        end = data.find(_TERMINATOR, self._scan)
        if end < 0:
            if not self._oversize and len(data) - 2 > self.max_message_size:
                self._oversize = True  # stop buffering; keep looking for the end only
            if self._oversize:
                del data[:-4]
            self._scan = max(len(data) - 4, 0)
            return NEED_DATA
        self._data = None
        if len(data) > end + 5:
            self._buf += memoryview(data)[end + 5 :]  # pipelined commands after the data
        if self._oversize or end > self.max_message_size:
            self._queue(552, "5.3.4", "Message size exceeds fixed limit")
            self._reset()
            return None
        # The message with its final CRLF, after the virtual CRLF that _data_cmd put first.
        body = unstuff(data, 2, end + 2, self.max_line_length)
        if type(body) is bytes:
            self._decision = ev = MessageReceived(self._sender or "", self._rcpts, body)
            return ev
        if body == BARE_LINE_END:
            self._queue(550, "5.5.2", "Message contains bare CR or LF")
        else:
            self._queue(550, "5.5.2", "Line too long")
        self._reset()
        return None
