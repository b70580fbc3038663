"""SMTP injection listener: apps hand messages to the engine over SMTP on localhost.

A message is acknowledged (``250 2.0.0 Ok: queued as ID``) only once the engine has made it
durable. When the spool is over its limit, MAIL and end-of-data answer ``452 4.3.1`` so that
clients hold their mail and retry (backpressure); nothing already acknowledged is touched.

A customer over its hourly or daily quota gets ``451 4.7.1`` (naming the quota, its limit and
when it resets): at MAIL when the listener knows the customer by then (``listen.customer``),
else at the end of DATA (the ``X-Sender-Customer`` header). Its ``max_recipients`` answers
``452 4.5.3`` at each RCPT beyond it when known by then, else ``554 5.5.3`` at the end of DATA.
"""

from __future__ import annotations

import email.utils
import logging
import re
import time
import trio

from ..config import parse_hostport
from ..engine import Blocked, Engine, QuotaExceeded, SpoolFull, Suppressed, TooManyRecipients
from ..errors import UsageError
from ..idempotency import KeyInFlight, KeyInvalid, KeyReused, digest
from ..smtp.sockets import FastListener, open_listener
from ..smtp.serve import Answer, IdleWatchdog, serve_session
from ..smtp.server import MailFrom, MessageReceived, RcptTo, ServerProtocol

__all__ = ["Listener", "serve_smtp", "take_control_headers"]

log = logging.getLogger("sender.smtpd")

_SPOOL_FULL: Answer = (452, "4.3.1", "Insufficient system storage: queue is full, try again later")


class _Clock:
    """RFC 5322 date of the current second, formatted once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def now(self) -> str:
        t = int(time.time())
        if t != self._second:
            self._second, self._text = t, email.utils.formatdate(t, localtime=True)
        return self._text


class Listener:
    """Shared state of the injection listener; one :class:`_Session` per connection."""

    def __init__(self, engine: Engine, watchdog: IdleWatchdog) -> None:
        self.engine = engine
        self.watchdog = watchdog
        self.sessions = 0
        self.protocols: set[ServerProtocol] = set()
        self.clock = _Clock()

    def busy(self) -> bool:
        """Whether a client is in a transaction (a drain lets it finish)."""
        return any(p.in_transaction for p in self.protocols)

    async def handle(self, stream: trio.abc.Stream) -> None:
        cfg = self.engine.config.listen
        proto = ServerProtocol(cfg.hostname, max_message_size=cfg.max_message_size,
                               max_recipients=cfg.max_recipients, max_line_length=cfg.max_line_length)
        try:
            peer = stream.getpeername()[0]
        except (AttributeError, OSError):
            peer = "unknown"
        self.sessions += 1
        self.protocols.add(proto)
        try:
            await serve_session(stream, proto, _Session(self, proto, peer), watchdog=self.watchdog)
        finally:
            self.sessions -= 1
            self.protocols.discard(proto)


_CONTROL = re.compile(rb"^(x-sender-customer|x-sender-message-type|resend-idempotency-key):[ \t]*([^\r\n]*?)[ \t]*\r\n",
                      re.I | re.M)


def take_control_headers(body: bytes) -> tuple[bytes, dict[str, str]]:
    """Read and remove the ``X-Sender-Customer``, ``X-Sender-Message-Type`` and
    ``Resend-Idempotency-Key`` headers: how an application says over SMTP whose mail it is,
    what kind, and that a retry must not send it twice. They never reach the recipient (like
    PowerMTA's x-virtual-mta)."""
    end = body.find(b"\r\n\r\n")
    end = end + 2 if end >= 0 else len(body)
    if _CONTROL.search(body, 0, end) is None:     # the common case: no copy of anything
        return body, {}
    head = body[:end]
    meta = {m.group(1).decode().lower().removeprefix("x-sender-"): m.group(2).decode("utf-8", "replace")
            for m in _CONTROL.finditer(head)}
    return _CONTROL.sub(b"", head) + body[end:], meta


class _Session:
    def __init__(self, listener: Listener, proto: ServerProtocol, peer: str) -> None:
        self.listener = listener
        self.engine = listener.engine
        self.proto = proto
        self.peer = peer
        # Known before DATA only with listen.customer; otherwise the message's header says.
        self.customer = listener.engine.config.listen.customer
        self.rcpts = 0                  # recipients taken in this transaction

    async def on_mail(self, ev: MailFrom) -> Answer:
        if self.engine.spool_full:
            return _SPOOL_FULL
        if self.engine.draining is not None:
            return 421, "4.3.2", "Service shutting down (draining), try again later or another host"
        self.rcpts = 0
        # Not for the null sender: reports to bounces.domain come that way, and are no mail of
        # the customer's (its own null-sender mail is still counted and refused at the DATA's end).
        if self.customer and ev.address:
            try:
                self.engine.check_quota(self.customer)
            except QuotaExceeded as e:
                return 451, "4.7.1", str(e)
        return 250, "2.1.0", "Ok"

    async def on_rcpt(self, ev: RcptTo) -> Answer:
        local, at, domain = ev.address.rpartition("@")
        if not at or not local or not domain or "." not in domain.strip("[]") and not domain.startswith("["):
            return 501, "5.1.3", f"Bad recipient address syntax: {ev.address}"
        limit = self.engine.quotas.max_recipients.get(self.customer, 0) if self.customer else 0
        if limit and self.rcpts >= limit:
            # RFC 5321 4.5.3.1.10: the client sends the rest in another transaction.
            return 452, "4.5.3", f"Too many recipients: at most {limit} a message for customer {self.customer}"
        self.rcpts += 1
        return 250, "2.1.5", "Ok"

    def _received(self, msg_id: str, rcpts: list[str]) -> bytes:
        """The Received: trace line that RFC 5321 section 4.4 asks of a relay."""
        p = self.proto
        proto_name = ("ESMTPS" if p.tls else "ESMTP") if p.extended else "SMTP"
        for_clause = f"\r\n\tfor <{rcpts[0]}>" if len(rcpts) == 1 else ""
        line = (f"Received: from {p.helo or 'unknown'} ([{self.peer}])\r\n\tby {p.hostname} (sender) "
                f"with {proto_name} id {msg_id}{for_clause};\r\n\t{self.listener.clock.now()}\r\n")
        return line.encode("utf-8", "surrogateescape")

    async def on_message(self, ev: MessageReceived) -> Answer:
        msg_id = self.engine.new_id()
        rcpts = list(ev.rcpts)
        domain = self.engine.config.bounces.domain
        if domain and all(r.lower().endswith("@" + domain.lower()) for r in rcpts):
            # For the bounce domain: a bounce or complaint to read, not mail to relay.
            report = self.engine.take_report(rcpts, ev.body)
            return 250, "2.0.0", f"Ok: {report.kind} read, {len(report.recipients)} recipients"
        body, meta = take_control_headers(ev.body)
        customer = self.customer or meta.get("customer", "")
        key = meta.get("resend-idempotency-key")
        if key is not None:
            store = self.engine.idempotency
            request_digest = digest(b"smtp", ev.sender.encode(), "\n".join(rcpts).encode(), body)
            try:
                stored = store.begin(customer, key, request_digest, self.engine.now())
            except KeyInvalid as e:
                return 501, "5.5.4", f"Resend-Idempotency-Key: {e}"
            except KeyReused as e:
                return 554, "5.7.0", f"Resend-Idempotency-Key: {e}"
            except KeyInFlight as e:
                return 451, "4.3.0", f"Resend-Idempotency-Key: {e}; try again"
            if stored is not None:
                return 250, "2.0.0", f"Ok: queued as {stored[1]} (before, with this Resend-Idempotency-Key)"
        skipped = self.engine.suppressed(customer, rcpts)
        try:
            await self.engine.submit(ev.sender, rcpts, self._received(msg_id, rcpts) + body, msg_id=msg_id,
                                     customer=customer, message_type=meta.get("message-type", ""))
        except (SpoolFull, Suppressed, UsageError) as e:
            if key is not None:
                store.abandon(customer, key)
            if isinstance(e, SpoolFull):
                return _SPOOL_FULL
            if isinstance(e, (Suppressed, Blocked)):
                return 550, "5.7.1", str(e)
            if isinstance(e, QuotaExceeded):
                return 451, "4.7.1", str(e)
            if isinstance(e, TooManyRecipients):
                return 554, "5.5.3", str(e)
            return 554, "5.5.4", str(e)
        except BaseException:
            if key is not None:
                store.abandon(customer, key)
            raise
        if key is not None:
            await store.finish(customer, key, request_digest, 250, msg_id, self.engine.now())
        if skipped:
            return 250, "2.0.0", f"Ok: queued as {msg_id}; suppressed, not queued: {', '.join(skipped)}"
        return 250, "2.0.0", f"Ok: queued as {msg_id}"


async def serve_smtp(engine: Engine, address: str, *, listener: FastListener | None = None,
                     task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Listen on ``address`` ("host:port"; port 0 picks one) until cancelled.

    Args:
      listener: a socket already listening (a shard's, shared with its siblings), instead of
        binding ``address``.
      task_status: started with the bound (host, port).
    """
    if listener is None:
        listener = open_listener(*parse_hostport(address, "listen.smtp"))
    bound = listener.socket.getsockname()[:2]
    log.info("SMTP listener on %s:%d", *bound)
    watchdog = IdleWatchdog(engine.config.listen.idle_timeout)
    handler = Listener(engine, watchdog)
    limiter = trio.CapacityLimiter(engine.config.listen.max_connections)

    async def limited(stream: trio.abc.Stream) -> None:
        try:
            async with limiter:
                await handler.handle(stream)
        finally:
            if listener.balance is not None:
                listener.balance.closed()

    engine.intake_busy.append(handler.busy)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watchdog.run)
            task_status.started(bound)
            await trio.serve_listeners(limited, [listener], handler_nursery=nursery)
    finally:
        engine.intake_busy.remove(handler.busy)
