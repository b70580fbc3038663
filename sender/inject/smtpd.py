"""SMTP injection listener: apps hand messages to the engine over SMTP on localhost.

A message is acknowledged (``250 2.0.0 Ok: queued as ID``) only once the engine has made it
durable. When the spool is over its limit, MAIL and end-of-data answer ``452 4.3.1`` so that
clients hold their mail and retry (backpressure); nothing already acknowledged is touched.
"""

from __future__ import annotations

import logging
import trio

from ..config import parse_hostport
from ..engine import Engine, SpoolFull
from ..errors import UsageError
from ..smtp.sockets import open_listener
from ..smtp.serve import Answer, IdleWatchdog, serve_session
from ..smtp.server import MailFrom, MessageReceived, RcptTo, ServerProtocol

__all__ = ["Listener", "serve_smtp"]

log = logging.getLogger("sender.smtpd")

_SPOOL_FULL: Answer = (452, "4.3.1", "Insufficient system storage: queue is full, try again later")


class Listener:
    """Session handler bound to an engine."""

    def __init__(self, engine: Engine, watchdog: IdleWatchdog) -> None:
        self.engine = engine
        self.watchdog = watchdog
        self.sessions = 0

    async def on_mail(self, ev: MailFrom) -> Answer:
        if self.engine.spool_full:
            return _SPOOL_FULL
        return 250, "2.1.0", "Ok"

    async def on_rcpt(self, ev: RcptTo) -> Answer:
        local, at, domain = ev.address.rpartition("@")
        if not at or not local or not domain or "." not in domain.strip("[]") and not domain.startswith("["):
            return 501, "5.1.3", f"Bad recipient address syntax: {ev.address}"
        return 250, "2.1.5", "Ok"

    async def on_message(self, ev: MessageReceived) -> Answer:
        try:
            msg_id = await self.engine.submit(ev.sender, list(ev.rcpts), ev.body)
        except SpoolFull:
            return _SPOOL_FULL
        except UsageError as e:
            return 554, "5.5.4", str(e)
        return 250, "2.0.0", f"Ok: queued as {msg_id}"

    async def handle(self, stream: trio.abc.Stream) -> None:
        cfg = self.engine.config.listen
        proto = ServerProtocol(cfg.hostname, max_message_size=cfg.max_message_size,
                               max_recipients=cfg.max_recipients, max_line_length=cfg.max_line_length)
        self.sessions += 1
        try:
            await serve_session(stream, proto, self, watchdog=self.watchdog)
        finally:
            self.sessions -= 1


async def serve_smtp(engine: Engine, address: str, *, reuse_port: bool = False,
                     task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Listen on ``address`` ("host:port"; port 0 picks one) until cancelled.

    Args:
      reuse_port: share the port with sibling processes (sharded daemon).
      task_status: started with the bound (host, port).
    """
    host, port = parse_hostport(address, "listen.smtp")
    listener = open_listener(host, port, reuse_port=reuse_port)
    bound = listener.socket.getsockname()[:2]
    log.info("SMTP listener on %s:%d", *bound)
    watchdog = IdleWatchdog(engine.config.listen.idle_timeout)
    handler = Listener(engine, watchdog)
    limiter = trio.CapacityLimiter(engine.config.listen.max_connections)

    async def limited(stream: trio.abc.Stream) -> None:
        async with limiter:
            await handler.handle(stream)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watchdog.run)
        task_status.started(bound)
        await trio.serve_listeners(limited, [listener], handler_nursery=nursery)
