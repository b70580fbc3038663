"""trio loop that runs one server-side SMTP session; the listener and the sink share it.

The sans-IO :class:`~sender.smtp.server.ServerProtocol` does the protocol; this loop moves
bytes and asks a handler for the three decisions (MAIL, RCPT, end of data). All replies that
pile up while a pipelined chunk is processed go out in one write.
"""

from __future__ import annotations

import math
import ssl
from typing import Protocol

import trio

from ..errors import ProtocolError
from .protocol import NEED_DATA
from .server import Closed, MailFrom, MessageReceived, Quit, RcptTo, ServerProtocol, StartTlsRequested

__all__ = ["DropConnection", "SessionHandler", "serve_session", "Answer"]

Answer = tuple[int, str, str]  # (code, enhanced, text)
_RECV = 65536


class DropConnection(Exception):
    """Raised by a handler to close the connection without a reply (sink rule "drop")."""


class SessionHandler(Protocol):
    async def on_mail(self, ev: MailFrom) -> Answer: ...
    async def on_rcpt(self, ev: RcptTo) -> Answer: ...
    async def on_message(self, ev: MessageReceived) -> Answer: ...


async def serve_session(
    stream: trio.abc.Stream,
    proto: ServerProtocol,
    handler: SessionHandler,
    *,
    idle_timeout: float = 300.0,
    tls_context: ssl.SSLContext | None = None,
) -> None:
    """Run one session until QUIT, EOF, a drop, an idle timeout or a broken connection.

    Never raises for network trouble; the stream is closed on return.
    """
    try:
        # One scope for the whole session; its deadline moves on every read (idle timeout).
        with trio.CancelScope() as idle:
            await stream.send_all(proto.greeting())
            while True:
                ev = proto.next_event()
                if ev is NEED_DATA:
                    out = proto.data_to_send()
                    if out:
                        await stream.send_all(out)
                    if proto.closed:
                        return
                    idle.deadline = trio.current_time() + idle_timeout
                    proto.receive_data(await stream.receive_some(_RECV))
                    idle.deadline = math.inf
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
        with trio.CancelScope(shield=True):
            try:
                await stream.aclose()
            except Exception:
                pass
