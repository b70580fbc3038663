"""trio loop that runs one server-side SMTP session; the listener and the sink share it.

The sans-IO :class:`~sender.smtp.server.ServerProtocol` does the protocol; this loop moves
bytes and asks a handler for the three decisions (MAIL, RCPT, end of data). All replies that
pile up while a pipelined chunk is processed go out in one write.
"""

from __future__ import annotations

import math
import ssl
from typing import Awaitable, Callable, Protocol

import trio

from ..errors import ProtocolError
from .protocol import NEED_DATA
from .server import Closed, MailFrom, MessageReceived, Quit, RcptTo, ServerProtocol, StartTlsRequested

__all__ = ["Answer", "DropConnection", "IdleWatchdog", "SessionHandler", "serve_session"]

Answer = tuple[int, str, str]  # (code, enhanced, text)
_RECV = 65536


class DropConnection(Exception):
    """Raised by a handler to close the connection without a reply (sink rule "drop")."""


class _Watched:
    __slots__ = ("scope", "seen", "reading")

    def __init__(self, scope: trio.CancelScope, seen: int) -> None:
        self.scope = scope
        self.seen = seen        # watchdog tick when the session last started to wait for input
        self.reading = False    # only a session waiting for its client can be idle


class IdleWatchdog:
    """Cancels sessions that saw no input for ``timeout`` seconds.

    A ticker, instead of a trio deadline moved on every read: the hot loop only stores an
    int, and one task checks all sessions once a second (timeouts are minutes, not ms).
    """

    def __init__(self, timeout: float) -> None:
        self.timeout_ticks = max(1, math.ceil(timeout))
        self.tick = 0
        self._sessions: set[_Watched] = set()
        self._work = trio.Event()

    def watch(self, scope: trio.CancelScope) -> _Watched:
        w = _Watched(scope, self.tick)
        self._sessions.add(w)
        if not self._work.is_set():
            self._work.set()
        return w

    def forget(self, w: _Watched) -> None:
        self._sessions.discard(w)

    async def run(self) -> None:
        while True:
            if not self._sessions:          # nothing to watch: no ticks
                self._work = trio.Event()
                await self._work.wait()
            await trio.sleep(1)
            self.tick += 1
            for w in self._sessions:
                if w.reading and self.tick - w.seen > self.timeout_ticks:
                    w.scope.cancel()


class SessionHandler(Protocol):
    """The three decisions of a session. A handler that is about to wait on purpose (a delay
    rule) first awaits the ``flush`` that :func:`serve_session` gives it, so replies to
    earlier pipelined commands are not held back by the wait."""

    flush: "Callable[[], Awaitable[None]]"

    async def on_mail(self, ev: MailFrom) -> Answer: ...
    async def on_rcpt(self, ev: RcptTo) -> Answer: ...
    async def on_message(self, ev: MessageReceived) -> Answer: ...


async def serve_session(
    stream: trio.abc.Stream,
    proto: ServerProtocol,
    handler: SessionHandler,
    *,
    watchdog: IdleWatchdog,
    tls_context: ssl.SSLContext | None = None,
) -> None:
    """Run one session until QUIT, EOF, a drop, an idle timeout or a broken connection.

    Args:
      watchdog: closes the session once it has been idle too long.

    Never raises for network trouble; the stream is closed on return.
    """
    watched = None

    async def flush() -> None:
        out = proto.data_to_send()
        if out:
            await stream.send_all(out)

    handler.flush = flush
    try:
        with trio.CancelScope() as scope:
            watched = watchdog.watch(scope)
            await stream.send_all(proto.greeting())
            while True:
                ev = proto.next_event()
                if ev is NEED_DATA:
                    out = proto.data_to_send()
                    if out:
                        await stream.send_all(out)
                    if proto.closed:
                        return
                    watched.seen, watched.reading = watchdog.tick, True
                    data = await stream.receive_some(_RECV)
                    watched.reading = False
                    proto.receive_data(data)
                elif isinstance(ev, RcptTo):
                    proto.reply(*await handler.on_rcpt(ev))
                elif isinstance(ev, MailFrom):
                    proto.reply(*await handler.on_mail(ev))
                elif isinstance(ev, MessageReceived):
                    proto.reply(*await handler.on_message(ev))
                elif isinstance(ev, StartTlsRequested):
                    await stream.send_all(proto.data_to_send())
                    if tls_context is None:
                        return
                    stream = trio.SSLStream(stream, tls_context, server_side=True)
                    await stream.do_handshake()
                    proto.tls_started()
                elif isinstance(ev, (Quit, Closed)):
                    out = proto.data_to_send()
                    if out:
                        await stream.send_all(out)
                    return
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError,
            ssl.SSLError, DropConnection, ProtocolError):
        return
    finally:
        if watched is not None:
            watchdog.forget(watched)
        with trio.CancelScope(shield=True):
            try:
                await stream.aclose()
            except Exception:
                pass
