"""Programmable SMTP sink for tests, benchmarks and demos.

Rules (TOML, ``[[rule]]`` tables, first match wins) pick what happens to a recipient::

    [[rule]]
    match = "*@defer.test"          # glob on the lower-cased recipient address
    action = "defer"                # accept | defer | reject | delay | drop
    reply = "451 4.3.0 Try again later"
    at = "rcpt"                     # answer at RCPT (default) or at the end of "data"
    delay = 0.5                     # seconds to wait first (any action; "delay" then accepts)

Recipients with no matching rule are accepted. With a log file, every accepted message is one
JSON line: message_id, from, to, peer, source (the peer's IP), size, tls, at.

A ``[simulate]`` table in the same file makes the sink answer like a mailbox provider before
the rules do (per source IP rate limits, block-listing, greylisting): see :mod:`sender.simulator`.
"""

from __future__ import annotations

import fnmatch
import re
import ssl
import time
import tomllib
from typing import Literal

import msgspec
import orjson
import trio

from .config import ConfigError, parse_duration, parse_hostport
from .simulator import ProviderSimulator, SimulateConfig, SimulatedTransaction
from .smtp.sockets import FastStream, open_listener
from .smtp.serve import Answer, DropConnection, IdleWatchdog, serve_session
from .smtp.server import MailFrom, MessageReceived, RcptTo, ServerProtocol

__all__ = ["Sink", "SinkConfig", "SinkRule", "SinkStatistics", "load_config", "load_rules", "parse_reply"]

_MESSAGE_ID = re.compile(rb"(?im)^message-id:[ \t]*(<[^>\r\n]*>|[^\s]+)")


class SinkRule(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    match: str
    action: Literal["accept", "defer", "reject", "delay", "drop"] = "accept"
    reply: str = ""
    at: Literal["rcpt", "data"] = "rcpt"
    delay: float | str = 0.0


class SinkConfig(msgspec.Struct, kw_only=True):
    """A rules file: ``[[rule]]`` tables and an optional ``[simulate]`` table."""

    rule: list[SinkRule] = []
    simulate: SimulateConfig | None = None


class SinkStatistics(msgspec.Struct):
    connections: int = 0
    messages: int = 0
    recipients: int = 0
    deferred: int = 0
    rejected: int = 0
    dropped: int = 0


def parse_reply(text: str, key: str) -> Answer:
    """ "451 4.3.0 Try later" -> (451, "4.3.0", "Try later")."""
    m = re.fullmatch(r"\s*([2-5]\d\d)(?:[ -]+([2-5]\.\d{1,3}\.\d{1,3}))?\s*(.*)", text or "")
    if not m:
        raise ConfigError(f"{key}: expected a reply like \"451 4.3.0 text\", got {text!r}")
    code = int(m.group(1))
    enhanced = m.group(2) or f"{code // 100}.0.0"
    return code, enhanced, m.group(3) or "Sink rule"


_DEFAULT_REPLY = {"defer": "451 4.3.0 Sink: try again later", "reject": "550 5.1.1 Sink: user unknown",
                  "accept": "250 2.0.0 Ok", "delay": "250 2.0.0 Ok", "drop": "421 4.4.2 dropped"}


class _Rule:
    def __init__(self, rule: SinkRule, i: int) -> None:
        key = f"rule[{i}]"
        self.match = rule.match.lower()
        self.action = rule.action
        self.at = rule.at
        self.delay = parse_duration(rule.delay, f"{key}.delay")
        self.answer = parse_reply(rule.reply or _DEFAULT_REPLY[rule.action], f"{key}.reply")
        want = {"defer": 4, "reject": 5}.get(self.action)
        if want and self.answer[0] // 100 != want:
            raise ConfigError(f"{key}.reply: action {self.action!r} needs a {want}xx reply, got {self.answer[0]}")


def load_config(data: bytes | str | None) -> SinkConfig:
    """Parse a rules file's TOML text.

    Raises:
      ConfigError: naming the rule and field (``rule[0].action``) or the simulate key
        (``simulate.rate_limit: ...``); also for text that is not UTF-8 TOML.
    """
    if not data:
        return SinkConfig()
    try:
        doc = tomllib.loads(data.decode() if isinstance(data, bytes) else data)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"sink rules: not a TOML file: {e}") from None
    try:
        config = msgspec.convert(doc, SinkConfig)
    except msgspec.ValidationError as e:
        raise ConfigError(_name_key(str(e))) from None
    if config.simulate is not None:
        ProviderSimulator(config.simulate)  # its checks, now rather than when the sink starts
    return config


def _name_key(message: str) -> str:
    """msgspec's "... - at `$.simulate.x`" becomes "simulate.x: ..."; rule errors keep their
    "sink rules: ... `rule[0]`" form."""
    m = re.fullmatch(r"(.*) - at `\$\.(simulate(?:\.\w+)?)`", message)
    if m is None:
        return f"sink rules: {message}".replace("`$.", "`")
    text, key = m.groups()
    unknown = re.fullmatch(r"Object contains unknown field `(\w+)`", text)
    if unknown:
        return f"{key}.{unknown.group(1)}: unknown key"
    return f"{key}: {text}"


def load_rules(data: bytes | str | None) -> list[SinkRule]:
    """The ``[[rule]]`` tables of a rules file (see :func:`load_config`)."""
    return load_config(data).rule


def _source_ip(peer: str) -> str:
    """ "127.0.0.3:0" -> "127.0.0.3"; IPv6 peers are written "::1:25" by the sink."""
    return peer.rpartition(":")[0] or peer


class _Session:
    def __init__(self, sink: "Sink", peer: str, proto: ServerProtocol) -> None:
        self.sink = sink
        self.peer = peer
        self.proto = proto
        self.source = _source_ip(peer)
        self.data_rules: list[_Rule] = []
        self.simulated: SimulatedTransaction | None = None

    async def on_mail(self, ev: MailFrom) -> Answer:
        self.data_rules = []
        sim = self.sink.simulator
        if sim is not None:
            self.simulated = sim.transaction(self.source, ev.address)
            refusal = self.simulated.on_mail()
            if refusal is not None:
                self.sink.count(refusal[0])
                return refusal
        return 250, "2.1.0", "Ok"

    async def on_rcpt(self, ev: RcptTo) -> Answer:
        simulated = self.simulated
        if simulated is not None:
            refusal = simulated.on_rcpt(ev.address)
            if refusal is not None:
                self.sink.count(refusal[0])
                return refusal
        answer = await self._rule_answer(ev.address)
        if simulated is not None:
            simulated.answered(answer[0])
        return answer

    async def _rule_answer(self, rcpt: str) -> Answer:
        rule = self.sink.rule_for(rcpt)
        if rule is None:
            return 250, "2.1.5", "Ok"
        if rule.at == "data":
            self.data_rules.append(rule)
            return 250, "2.1.5", "Ok"
        return await self.sink.apply(rule, self.flush)

    async def on_message(self, ev: MessageReceived) -> Answer:
        for rule in self.data_rules:
            answer = await self.sink.apply(rule, self.flush)
            if answer[0] >= 300:
                if answer[0] >= 500 and self.simulated is not None:
                    self.simulated.rejected_at_data(len(self.data_rules))
                return answer
        self.sink.record(ev, self.peer, tls=self.proto.tls, helo=self.proto.helo or "")
        if self.simulated is not None:
            self.simulated.delivered()
        return 250, "2.0.0", "Ok: queued"


class _Direction:
    """Bytes on their way from one end of an in-memory connection to the other."""

    __slots__ = ("data", "eof", "reader")

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False
        self.reader: trio.lowlevel.Task | None = None

    def wake(self) -> None:
        if self.reader is not None:
            task, self.reader = self.reader, None
            trio.lowlevel.reschedule(task)


class MemoryStream(trio.abc.HalfCloseableStream):
    """One end of an in-memory connection: what trio's ``memory_stream_pair`` does, minus
    its pumps and hooks (a virtual-time simulation moves every byte through here).

    A send never blocks (the buffer is unbounded: the peer is a sink, or a client that reads
    every reply); a receive waits for data or the peer's end of stream.
    """

    def __init__(self, inbound: _Direction, outbound: _Direction) -> None:
        self._in = inbound
        self._out = outbound
        self._closed = False

    @staticmethod
    def pair() -> tuple["MemoryStream", "MemoryStream"]:
        a, b = _Direction(), _Direction()
        return MemoryStream(a, b), MemoryStream(b, a)

    async def send_all(self, data) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        if self._out.eof:
            raise trio.BrokenResourceError("the other end is closed")
        self._out.data += data
        self._out.wake()
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        self._out.eof = True
        self._out.wake()
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        inbound = self._in
        if not inbound.data and not inbound.eof:
            if inbound.reader is not None:
                raise trio.BusyResourceError("another task is receiving")
            inbound.reader = trio.lowlevel.current_task()

            def abort(_):
                inbound.reader = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
            if self._closed:
                raise trio.ClosedResourceError("stream was closed")
        else:
            await trio.lowlevel.checkpoint()
        n = len(inbound.data) if max_bytes is None else min(max_bytes, len(inbound.data))
        out = bytes(inbound.data[:n])
        del inbound.data[:n]
        return out

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._out.eof = True                # the peer reads what is left, then the end
            self._out.wake()
            self._in.eof = True
            self._in.wake()
        await trio.lowlevel.checkpoint()


class Sink:
    """A trio SMTP server that answers by rules and counts what it saw.

    Args:
      rules: parsed rules, first match wins.
      log_path: write one JSON line per accepted message there.
      simulate: answer like a mailbox provider first, per source IP, on every address the sink
        listens on; its counters are ``sink.simulator.statistics()``.
    """

    def __init__(self, rules: list[SinkRule] | None = None, *, log_path: str | None = None,
                 hostname: str = "sink.localhost", max_message_size: int = 64 * 1024 * 1024,
                 tls_context: ssl.SSLContext | None = None, simulate: SimulateConfig | None = None) -> None:
        self.rules = [_Rule(r, i) for i, r in enumerate(rules or [])]
        self.simulator = ProviderSimulator(simulate, hostname=hostname) if simulate is not None else None
        self.hostname = hostname
        self.max_message_size = max_message_size
        self.tls_context = tls_context  # offer STARTTLS with this server context
        self.stats = SinkStatistics()
        self.messages: list[dict] | None = None  # set to [] to keep accepted messages in memory
        self._log_path = log_path
        self._log = None
        self.address: tuple[str, int] | None = None
        self._memory_nursery: trio.Nursery | None = None
        self._watchdog = IdleWatchdog(300.0)

    def rule_for(self, rcpt: str) -> _Rule | None:
        rcpt = rcpt.lower()
        for rule in self.rules:
            if fnmatch.fnmatchcase(rcpt, rule.match):
                return rule
        return None

    async def apply(self, rule: _Rule, flush) -> Answer:
        if rule.delay:
            await flush()  # answers to earlier pipelined commands go out before the wait
            await trio.sleep(rule.delay)
        if rule.action == "drop":
            self.stats.dropped += 1
            raise DropConnection()
        self.count(rule.answer[0])
        return rule.answer

    def count(self, code: int) -> None:
        if code >= 500:
            self.stats.rejected += 1
        elif code >= 400:
            self.stats.deferred += 1

    def record(self, ev: MessageReceived, peer: str, *, tls: bool = False, helo: str = "") -> None:
        self.stats.messages += 1
        self.stats.recipients += len(ev.rcpts)
        if self._log is None and self.messages is None:
            return
        head = ev.body[: ev.body.find(b"\r\n\r\n") + 2]
        m = _MESSAGE_ID.search(head)
        entry = {"message_id": m.group(1).decode("utf-8", "replace") if m else None,
                 "from": ev.sender, "to": list(ev.rcpts), "peer": peer, "source": _source_ip(peer),
                 "helo": helo, "size": len(ev.body), "tls": tls, "at": time.time()}
        if self.messages is not None:
            self.messages.append(entry)
        if self._log is not None:
            self._log.write(orjson.dumps(entry) + b"\n")

    async def _handle(self, stream: FastStream) -> None:
        try:
            ip, port = stream.getpeername()[:2]
            peer = f"{ip}:{port}"
        except OSError:
            peer = "?"
        await self._serve(stream, peer)

    async def _serve(self, stream: trio.abc.Stream, peer: str) -> None:
        self.stats.connections += 1
        proto = ServerProtocol(self.hostname, max_message_size=self.max_message_size,
                               starttls=self.tls_context is not None)
        await serve_session(stream, proto, _Session(self, peer, proto), watchdog=self._watchdog,
                            tls_context=self.tls_context)

    async def run_in_memory(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve in-memory connections made with :meth:`open_stream` until cancelled
        (tests on virtual time, where real sockets would let the clock jump)."""
        async with trio.open_nursery() as nursery:
            self._memory_nursery = nursery
            nursery.start_soon(self._watchdog.run)
            task_status.started(self)
            try:
                await trio.sleep_forever()
            finally:
                self._memory_nursery = None

    async def open_stream(self, host: str, port: int, source: str = "") -> trio.abc.Stream:
        """Connect in memory; a drop-in for ``Engine(open_stream=...)``. A sink that is not
        running (or stopping) refuses the connection."""
        await trio.lowlevel.checkpoint()
        if self._memory_nursery is None:
            raise OSError(111, "Connection refused")
        client, server = MemoryStream.pair()
        self._memory_nursery.start_soon(self._serve, server, f"{source or '127.0.0.1'}:0")
        return client

    async def _flush_log(self) -> None:
        while True:
            await trio.sleep(0.2)
            self._log.flush()

    async def run(self, address: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve on ``address`` until cancelled.

        Args:
          task_status: started with the bound (host, port).
        """
        host, port = parse_hostport(address, "--listen")
        listener = open_listener(host, port)
        self.address = listener.socket.getsockname()[:2]
        if self._log_path:
            self._log = open(self._log_path, "ab")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watchdog.run)
                if self._log is not None:
                    nursery.start_soon(self._flush_log)
                task_status.started(self.address)
                await trio.serve_listeners(self._handle, [listener], handler_nursery=nursery)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
