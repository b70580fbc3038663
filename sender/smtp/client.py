"""trio transport around the sans-IO client: connect, EHLO, STARTTLS, pipelined transactions.

This is the only SMTP module that awaits sockets. Foreign errors (OSError, trio's broken
streams, ssl, timeouts) are translated here, once, into :mod:`sender.errors` types, so the
delivery engine only ever sees ``ConnectError`` (could not open a usable session) or
``SessionError`` (an open session broke or timed out).
"""

from __future__ import annotations

import operator
import ssl
from contextlib import contextmanager
from typing import Any, Awaitable, Callable, NamedTuple

import msgspec
import trio

from ..errors import ConnectError, RemoteProtocolError, SessionError
from ..model import Reply
from .sockets import connect_tcp
from .protocol import (
    NEED_DATA,
    ClientProtocol,
    Data,
    Ehlo,
    Helo,
    MailFrom,
    Message,
    Quit,
    RcptTo,
    Rset,
    StartTls,
)

__all__ = ["OpenStream", "PhaseWatch", "SMTPSession", "Timeouts", "TransactionResult", "open_session",
           "opportunistic_tls_context"]

_RECV = 65536

OpenStream = Callable[[str, int, str], Awaitable[trio.abc.Stream]]


class Timeouts(msgspec.Struct, frozen=True):
    """Seconds per phase (RFC 5321 4.5.3.2 minimums by default)."""

    connect: float = 30.0
    greeting: float = 300.0
    ehlo: float = 300.0
    mail: float = 300.0
    rcpt: float = 300.0
    data: float = 120.0
    data_block: float = 180.0
    data_done: float = 600.0
    quit: float = 10.0


class _Envelope(NamedTuple):
    sender: str
    rcpts: list[str]


class TransactionResult(msgspec.Struct):
    """Replies of one transaction. ``data_started`` is False when DATA was never accepted (no
    recipient taken, or MAIL refused); then ``final`` is the reply that ended it."""

    mail: Reply
    rcpts: list[Reply]
    final: Reply
    data_started: bool


def opportunistic_tls_context() -> ssl.SSLContext:
    """TLS without certificate checks: RFC 7435 opportunistic security, as SMTP relays do."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@contextmanager
def _session_errors(phase: str, peer: str):
    try:
        yield
    except trio.TooSlowError as e:
        raise SessionError(f"{peer}: timeout during {phase}") from e
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError) as e:
        raise SessionError(f"{peer}: connection lost during {phase}: {e}") from e
    except RemoteProtocolError as e:
        raise SessionError(f"{peer}: protocol error during {phase}: {e}") from e


class PhaseWatch:
    """Per-phase timeouts of pipelined sessions, without a cancel scope per message.

    Entering a cancel scope and moving its deadline cost about 16 and 4 µs in trio, several
    times per message. Instead a session notes when its current phase must end
    (``phase_until``), and one system task per trio run checks once a second and closes the
    stream of a session past it: its pending send or receive then fails, and the session
    reports a timeout. Timeouts are minutes (RFC 5321 4.5.3.2), so a second is precision enough.
    """

    _current: trio.lowlevel.RunVar["PhaseWatch"] = trio.lowlevel.RunVar("sender_phase_watch")

    def __init__(self) -> None:
        self.sessions: set["SMTPSession"] = set()
        self._work = trio.Event()

    def add(self, session: "SMTPSession") -> None:
        self.sessions.add(session)
        if not self._work.is_set():
            self._work.set()

    @classmethod
    def current(cls) -> "PhaseWatch":
        try:
            return cls._current.get()
        except LookupError:
            watch = cls()
            cls._current.set(watch)
            trio.lowlevel.spawn_system_task(watch._run, name="sender.phase_watch")
            return watch

    async def _run(self) -> None:
        while True:
            if not self.sessions:           # nothing to watch: no ticks (days of virtual time are cheap)
                self._work = trio.Event()
                await self._work.wait()
            await trio.sleep(1)
            now = trio.current_time()
            for session in [s for s in self.sessions if s.phase_until <= now]:
                self.sessions.discard(session)
                session.timed_out = True
                try:
                    await trio.aclose_forcefully(session.stream)
                except Exception:
                    pass


class SMTPSession:
    """One open SMTP session, reusable for many transactions.

    Not safe for concurrent use: one connection worker owns it.
    """

    def __init__(self, stream: trio.abc.Stream, peer: str, timeouts: Timeouts) -> None:
        self.stream = stream
        self.peer = peer
        self.timeouts = timeouts
        self.proto = ClientProtocol()
        self.greeting: Reply | None = None
        self.tls = False
        self.transactions = 0
        self.phase_until = 0.0      # see PhaseWatch
        self.timed_out = False

    async def _send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _replies(self, n: int) -> list[Reply]:
        """Read the next ``n`` replies (pipelined replies arrive in order)."""
        proto = self.proto
        out: list[Reply] = []
        while len(out) < n:
            ev = proto.next_event()
            if ev is NEED_DATA:
                if proto.closing_reply is not None:
                    # The server said 421 and is closing: that is the answer to every
                    # command still waiting for a reply.
                    out.extend([proto.closing_reply] * (n - len(out)))
                    break
                data = await self.stream.receive_some(_RECV)
                proto.receive_data(data)
                continue
            out.append(ev.reply)
        return out

    async def _one(self, phase: str, timeout: float) -> Reply:
        with _session_errors(phase, self.peer), trio.fail_after(timeout):
            return (await self._replies(1))[0]

    async def handshake(self, ehlo: str, *, tls_context: ssl.SSLContext | None, server_hostname: str) -> None:
        """Greeting, EHLO (HELO fallback), and STARTTLS when offered and wanted.

        Raises:
          ConnectError: the greeting or EHLO/HELO was refused, or TLS failed to start.
        """
        t = self.timeouts
        self.greeting = await self._one("greeting", t.greeting)
        if self.greeting.code != 220:
            raise ConnectError(f"{self.peer}: greeting refused: {self.greeting}", reply=self.greeting)
        await self._hello(ehlo)
        if tls_context is not None and self.proto.starttls and not self.tls:
            with _session_errors("STARTTLS", self.peer), trio.fail_after(t.ehlo):
                await self._send(self.proto.send(StartTls()))
                reply = (await self._replies(1))[0]
            if reply.code != 220:
                return  # opportunistic: carry on in clear text
            tls_stream = trio.SSLStream(self.stream, tls_context, server_hostname=server_hostname or None)
            try:
                with trio.fail_after(t.ehlo):
                    await tls_stream.do_handshake()
            except (trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError, OSError) as e:
                raise ConnectError(f"{self.peer}: TLS handshake failed: {e}", tls_failed=True) from e
            self.stream = tls_stream
            self.tls = True
            self.proto.tls_started()
            await self._hello(ehlo)

    async def _hello(self, ehlo: str) -> None:
        t = self.timeouts
        with _session_errors("EHLO", self.peer), trio.fail_after(t.ehlo):
            await self._send(self.proto.send(Ehlo(ehlo)))
            reply = (await self._replies(1))[0]
            if reply.code == 250:
                return
            if reply.code >= 500:
                await self._send(self.proto.send(Helo(ehlo)))
                reply = (await self._replies(1))[0]
                if reply.code == 250:
                    return
        raise ConnectError(f"{self.peer}: EHLO/HELO refused: {reply}", reply=reply)

    def _mail_params(self, sender: str, rcpts: list[str], body: bytes) -> tuple[str, ...]:
        p = self.proto
        params = []
        if p.max_size is not None:
            params.append(f"SIZE={len(body)}")
        if p.eightbitmime and not body.isascii():
            params.append("BODY=8BITMIME")
        if p.smtputf8 and not (sender.isascii() and all(r.isascii() for r in rcpts)):
            params.append("SMTPUTF8")
        return tuple(params)

    async def transaction(self, sender: str, rcpts: list[str], body: bytes) -> TransactionResult:
        """Send one message: MAIL, RCPT..., DATA in one pipelined write when the server offers
        PIPELINING (RFC 2920, through :meth:`pipeline`), else one command at a time; then the
        dot-stuffed body.

        Raises:
          SessionError: the session broke or a phase timed out; the outcome is unknown.
        """
        if self.proto.pipelining:
            results: list[TransactionResult] = []
            try:
                await self.pipeline(_Envelope(sender, rcpts), lambda: None, lambda _: body,
                                    lambda _, res: results.append(res))
            except SessionError:
                if not results:         # else the server answered, then closed (421)
                    raise
            return results[0]
        p, t = self.proto, self.timeouts
        self.transactions += 1
        mail_cmd = MailFrom(sender, self._mail_params(sender, rcpts, body))
        phase = "MAIL/RCPT/DATA"
        result = None
        try:
            # One cancel scope for the transaction; its deadline moves with each phase
            # (RFC 5321 4.5.3.2), which costs far less than a scope per phase.
            with trio.CancelScope(deadline=trio.current_time() + t.mail + t.rcpt + t.data) as scope:
                mail, rcpt_replies, data = await self._lockstep(mail_cmd, rcpts)
                if data is None or data.code != 354:
                    # Nothing to send: end the transaction so the session stays reusable.
                    phase = "RSET"
                    await self._send(p.send(Rset()))
                    await self._replies(1)
                    result = TransactionResult(mail, rcpt_replies or [mail] * len(rcpts), data or mail, False)
                else:
                    phase = "DATA block"
                    scope.deadline = trio.current_time() + t.data_block
                    await self._send(p.send(Message(body)))
                    phase = "end of DATA"
                    scope.deadline = trio.current_time() + t.data_done
                    final = (await self._replies(1))[0]
                    result = TransactionResult(mail, rcpt_replies, final, True)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError) as e:
            raise SessionError(f"{self.peer}: connection lost during {phase}: {e}") from e
        except RemoteProtocolError as e:
            raise SessionError(f"{self.peer}: protocol error during {phase}: {e}") from e
        if result is None:
            raise SessionError(f"{self.peer}: timeout during {phase}")
        return result

    def _envelope(self, sender: str, rcpts: list[str], body: bytes) -> bytes:
        cmds = [MailFrom(sender, self._mail_params(sender, rcpts, body)), *(RcptTo(r) for r in rcpts), Data()]
        return self.proto.send_many(cmds)

    async def pipeline(
        self,
        first: Any,
        take_next: Callable[[], Any],
        body_of: Callable[[Any], bytes],
        on_result: Callable[[Any, TransactionResult], None],
        sender_of: Callable[[Any], str] = operator.attrgetter("sender"),
    ) -> None:
        """Send ``first`` and then each message ``take_next()`` returns, until it returns None.

        Each message's body goes out in the same write as the next message's MAIL, RCPT and
        DATA (RFC 2920 allows the end of data to start a new group), so a busy connection
        costs one round trip per message instead of two. Items need ``rcpts``, and a
        ``sender`` unless ``sender_of`` gives the return path; ``on_result`` gets each item
        with its replies, in order.

        Only for servers that offer PIPELINING; callers use :meth:`transaction` otherwise.

        Raises:
          SessionError: the session broke or timed out; ``unfinished`` on it lists the items
            whose outcome is unknown.
        """
        p, t = self.proto, self.timeouts
        cur, cur_body = first, body_of(first)
        unfinished = [first]
        phase = "MAIL/RCPT/DATA"
        watch = PhaseWatch.current()
        self.phase_until = trio.current_time() + t.mail + t.rcpt + t.data
        watch.add(self)
        try:
            await self._send(self._envelope(sender_of(cur), cur.rcpts, cur_body))
            while True:
                replies = await self._replies(len(cur.rcpts) + 2)
                mail, rcpt_replies, data = replies[0], replies[1:-1], replies[-1]
                if p.closing_reply is not None:
                    unfinished.remove(cur)
                    on_result(cur, TransactionResult(mail, rcpt_replies, data, False))
                    break
                nxt = take_next()
                if nxt is not None:
                    unfinished.append(nxt)
                    nxt_body = body_of(nxt)
                started = data.code == 354
                out = p.send(Message(cur_body)) if started else p.send(Rset())
                if nxt is not None:
                    out += self._envelope(sender_of(nxt), nxt.rcpts, nxt_body)
                phase = "end of DATA" if started else "RSET"
                self.phase_until = trio.current_time() + (t.data_block + t.data_done if started else t.mail)
                await self._send(out)
                final = (await self._replies(1))[0]
                self.transactions += 1
                unfinished.remove(cur)
                on_result(cur, TransactionResult(mail, rcpt_replies, final if started else data, started))
                if p.closing_reply is not None:
                    break
                if nxt is None:
                    return
                cur, cur_body = nxt, nxt_body
                phase = "MAIL/RCPT/DATA"
                self.phase_until = trio.current_time() + t.mail + t.rcpt + t.data
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError) as e:
            error = (f"timeout during {phase}" if self.timed_out
                     else f"connection lost during {phase}: {e}")
        except RemoteProtocolError as e:
            error = f"protocol error during {phase}: {e}"
        else:
            error = f"server closed the session: {p.closing_reply}"
        finally:
            watch.sessions.discard(self)
        raise SessionError(f"{self.peer}: {error}", unfinished=unfinished)

    async def _lockstep(self, mail_cmd: MailFrom, rcpts: list[str]) -> tuple[Reply, list[Reply], Reply | None]:
        """MAIL, RCPT..., DATA one at a time, for servers without PIPELINING."""
        p = self.proto
        await self._send(p.send(mail_cmd))
        mail = (await self._replies(1))[0]
        rcpt_replies: list[Reply] = []
        if mail.code != 250:
            return mail, rcpt_replies, None
        for r in rcpts:
            await self._send(p.send(RcptTo(r)))
            rcpt_replies.append((await self._replies(1))[0])
        if not any(200 <= x.code < 300 for x in rcpt_replies):
            return mail, rcpt_replies, None
        await self._send(p.send(Data()))
        return mail, rcpt_replies, (await self._replies(1))[0]

    async def quit(self) -> None:
        """Say QUIT and close; never raises.

        Cancellation: shielded, bounded by the quit timeout, so shutdown is polite but quick.
        """
        with trio.move_on_after(self.timeouts.quit, shield=True):
            try:
                if self.proto.pending == 0:
                    await self._send(self.proto.send(Quit()))
                    await self._replies(1)
            except Exception:
                pass
        await self.aclose()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            try:
                await self.stream.aclose()
            except Exception:
                pass


async def open_session(
    host: str,
    port: int,
    *,
    ehlo: str,
    source: str = "",
    timeouts: Timeouts = Timeouts(),
    tls_context: ssl.SSLContext | None = None,
    open_stream: OpenStream | None = None,
    address: str | None = None,
) -> SMTPSession:
    """Connect (from ``source`` when given), read the greeting, EHLO and maybe STARTTLS.

    Args:
      open_stream: replaces the TCP connect (tests pass in-memory streams here).
      address: the IP address to connect to, already resolved; ``host`` then only names the
        server (TLS server name, messages).

    Raises:
      ConnectError: no session could be established; ``reply`` is set when the server refused.
    """
    target = address or host
    peer = f"{host}[{address}]:{port}" if address and address != host else f"{host}:{port}"
    try:
        with trio.fail_after(timeouts.connect):
            if open_stream is not None:
                stream = await open_stream(target, port, source)
            else:
                stream = await connect_tcp(target, port, source=source)
    except trio.TooSlowError as e:
        raise ConnectError(f"{peer}: connect timeout after {timeouts.connect:g}s") from e
    except OSError as e:
        raise ConnectError(f"{peer}: connect failed: {e.strerror or e}") from e
    session = SMTPSession(stream, peer, timeouts)
    try:
        await session.handshake(ehlo, tls_context=tls_context, server_hostname=host)
    except SessionError as e:
        await session.aclose()
        raise ConnectError(str(e)) from e
    except BaseException:
        await session.aclose()
        raise
    return session
