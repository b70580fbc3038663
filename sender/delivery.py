"""Delivery engine: the nursery tree that moves queued deliveries to remote sites.

::

    Dispatcher.run  (nursery)
     ├─ retry timer loop        deferred deliveries wait in a TimerHeap until due
     ├─ resolver tasks          one per recipient domain being resolved (routes first, then MX)
     └─ SitePool.run  (one per destination site, its own nursery)
         └─ connection workers  up to ``connection_limit``; each owns one SMTP session and
                                reuses it for up to ``max_deliveries_per_connection`` messages

A site is where mail goes: a configured relay ``host:port`` or a domain's MX host list. Each
site has its own queue and workers, so a slow or failing site only ever holds its own messages.

Outcomes are decided per recipient from the replies (RCPT, then the final reply to the data)
and reported to the owner through ``Outcomes`` callbacks, which journal them.
"""

from __future__ import annotations

import math
import random
from collections import deque
from typing import Callable, Protocol

import msgspec
import outcome
import trio

from .config import Config, parse_hostport
from .dns import make_resolver, resolve_mx
from .errors import ConnectError, DNSError, SessionError
from .model import Delivery, Reply
from .scheduler import TimerHeap
from .smtp.client import OpenStream, SMTPSession, Timeouts, TransactionResult, open_session, opportunistic_tls_context

__all__ = ["Dispatcher", "Outcomes", "SitePool", "PoolStatistics", "backoff", "match_route"]


class Outcomes(Protocol):
    """What the dispatcher reports; the engine journals each call."""

    def delivered(self, d: Delivery, rcpts: list[str], reply: Reply) -> None: ...
    def bounced(self, d: Delivery, rcpts: list[str], reply: Reply) -> None: ...
    def deferred(self, d: Delivery, rcpts: list[str], reply: Reply) -> Delivery | None:
        """Journal a deferral; returns the delivery to retry, or None if it expired."""
    def body(self, d: Delivery) -> bytes: ...
    async def settle(self) -> None:
        """Return once the outcomes reported so far are as durable as the policy asks."""


class PoolStatistics(msgspec.Struct, frozen=True):
    site: str
    queued: int
    workers: int
    idle: int
    sessions_opened: int
    transactions: int


def backoff(attempts: int, base: float, cap: float) -> float:
    """Delay before retry number ``attempts`` (1-based): exponential, capped, jittered over its
    upper half so that retries of a burst spread out but never come early."""
    interval = min(cap, base * (2 ** min(attempts - 1, 30)))
    return interval / 2 + random.random() * interval / 2


def match_route(domain: str, routes: list[tuple[str, tuple[str, int]]]) -> tuple[str, int] | None:
    """First matching route: exact domain, ".suffix" (subdomains only) or "*"."""
    for pattern, target in routes:
        if pattern == "*" or pattern == domain or (pattern.startswith(".") and domain.endswith(pattern)):
            return target
    return None


_LOCAL_TEMP = 451


def _local_reply(code: int, enhanced: str, text: str) -> Reply:
    return Reply(code, text, enhanced)


class SitePool:
    """The queue and connection workers of one destination site."""

    def __init__(self, key: str, hosts: list[tuple[str, int]], dispatcher: "Dispatcher") -> None:
        self.key = key
        self.hosts = hosts
        self.d = dispatcher
        self.queue: deque[Delivery] = deque()
        self.workers = 0
        self.sessions_up = 0
        self.sessions_opened = 0
        self.transactions = 0
        # Idle workers -> when their idle_timeout is up. Parked without a cancel scope (one
        # costs ~16 µs, and a worker parks between most messages); the dispatcher's reaper
        # wakes the expired ones once a second.
        self._idle: dict[trio.lowlevel.Task, float] = {}
        self._nursery: trio.Nursery | None = None
        self._no_tls: set[str] = set()
        self.suspended_until = 0.0
        self.suspended_reply: Reply | None = None

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(self.key, len(self.queue), self.workers, len(self._idle),
                              self.sessions_opened, self.transactions)

    def wake_all(self) -> None:
        """Wake idle workers (so they notice the dispatcher is stopping)."""
        for task in list(self._idle):
            self._wake(task, True)

    def reap(self, now: float) -> bool:
        """Wake the workers idle past their timeout; returns whether others still wait."""
        for task, until in list(self._idle.items()):
            if until <= now:
                self._wake(task, False)
        return bool(self._idle)

    def _wake(self, task: trio.lowlevel.Task, work: bool) -> None:
        del self._idle[task]
        trio.lowlevel.reschedule(task, outcome.Value(work))

    def push(self, d: Delivery) -> None:
        if self.suspended_reply is not None:
            if self.d.now() < self.suspended_until:
                # Like Postfix's "delivery temporarily suspended": no connect per message.
                self._fail(d, self.suspended_reply)
                return
            self.suspended_reply = None
        self.queue.append(d)
        if self._idle:
            self._wake(next(iter(self._idle)), True)      # the longest idle first
        elif self.workers < self.d.connection_limit and self._nursery is not None and not self.d.stopping:
            self.workers += 1
            self._nursery.start_soon(self._worker)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Own the workers of this site until cancelled.

        Args:
          task_status: started with the pool once workers can be spawned.
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started(self)
            while self.queue and self.workers < self.d.connection_limit:
                self.workers += 1
                nursery.start_soon(self._worker)
            await trio.sleep_forever()

    async def _next(self, idle_timeout: float) -> Delivery | None:
        """The next delivery, or None after ``idle_timeout`` seconds without one (to within
        the reaper's second) or when stopping."""
        if not self.queue and idle_timeout > 0:
            until = self.d.now() + idle_timeout
            task = trio.lowlevel.current_task()

            def abort(_):
                self._idle.pop(task, None)
                return trio.lowlevel.Abort.SUCCEEDED

            while not self.queue and not self.d.stopping:
                self._idle[task] = until
                self.d.idle_pools.add(self)
                if not await trio.lowlevel.wait_task_rescheduled(abort):
                    break
        if self.queue and not self.d.stopping:
            return self.queue.popleft()
        return None

    async def _connect(self) -> SMTPSession:
        """A session to the first host that takes one, in MX order."""
        cfg = self.d.config.delivery

        def attempt(host: str, port: int, tls: bool):
            return open_session(host, port, ehlo=cfg.ehlo, source=cfg.source, timeouts=self.d.timeouts,
                                tls_context=self.d.tls_context if tls else None,
                                open_stream=self.d.open_stream)

        last: ConnectError | None = None
        for host, port in self.hosts:
            tls = self.d.tls_context is not None and host not in self._no_tls
            try:
                return await attempt(host, port, tls)
            except ConnectError as e:
                last = e
                if not e.tls_failed:
                    continue
            # Like Postfix: after a failed handshake, retry this host in clear text.
            self._no_tls.add(host)
            try:
                return await attempt(host, port, False)
            except ConnectError as e:
                last = e
        assert last is not None
        raise last

    async def _worker(self) -> None:
        finished = False
        try:
            await self._work(self.d.config.delivery)
            finished = True
        finally:
            self.workers -= 1
            # A worker that ended normally (idle, connection used up, session lost) hands over
            # to a fresh one if work is left; never while being cancelled.
            if finished and self.queue and self.workers == 0 and not self.d.stopping:
                self.workers += 1
                self._nursery.start_soon(self._worker)

    async def _work(self, cfg) -> None:
        session: SMTPSession | None = None
        d: Delivery | None = None
        try:
            d = await self._next(0)
            if d is None:
                return
            try:
                session = await self._connect()
            except ConnectError as e:
                # Connection-level refusals never bounce (a 5xx greeting is skipped as
                # Postfix's smtp_skip_5xx_greeting does): the message is deferred.
                reply = _local_reply(_LOCAL_TEMP, "4.4.1", str(e))
                self._fail(d, reply)
                d = None
                if self.sessions_up == 0:
                    # Nobody can reach the site: defer what waits for it, and what comes in
                    # for a while, instead of trying one connection per message.
                    self.suspended_reply = _local_reply(reply.code, reply.enhanced,
                                                        f"delivery temporarily suspended: {reply.text}")
                    self.suspended_until = self.d.now() + self.d.config.delivery.retry_interval / 2
                    while self.queue:
                        self._fail(self.queue.popleft(), reply)
                return
            self.sessions_up += 1
            self.sessions_opened += 1
            sent = 0
            limit = cfg.max_deliveries_per_connection

            def take_next() -> Delivery | None:
                nonlocal sent
                if sent + 1 >= limit or not self.queue or self.d.stopping:
                    return None
                sent += 1
                return self.queue.popleft()

            while True:
                first, d = d, None
                try:
                    if session.proto.pipelining:
                        await session.pipeline(first, take_next, self.d.outcomes.body, self._report)
                    else:
                        self._report(first, await session.transaction(first.sender, first.rcpts,
                                                                       self.d.outcomes.body(first)))
                except SessionError as e:
                    reply = _local_reply(_LOCAL_TEMP, "4.4.2", str(e))
                    for lost in e.unfinished or [first]:
                        self._fail(lost, reply)
                    return
                finally:
                    await self.d.outcomes.settle()
                sent += 1
                if sent >= limit:
                    break
                d = await self._next(cfg.idle_timeout)
                if d is None:
                    break
        finally:
            if d is not None:
                # Cancelled while holding a delivery that was never sent: put it back.
                self.queue.appendleft(d)
            if session is not None:
                self.sessions_up -= 1
                await session.quit()

    def _fail(self, d: Delivery, reply: Reply) -> None:
        """The whole delivery failed before any reply about its recipients."""
        out = self.d.outcomes
        if reply.is_permanent:
            out.bounced(d, d.rcpts, reply)
        else:
            self.d.retry(out.deferred(d, d.rcpts, reply))

    def _report(self, d: Delivery, res: TransactionResult) -> None:
        """Turn one transaction's replies into an outcome per recipient."""
        out = self.d.outcomes
        self.transactions += 1
        per_rcpt = res.rcpts if res.mail.code // 100 == 2 else [res.mail] * len(d.rcpts)
        accepted: list[str] = []
        soft: list[tuple[str, Reply]] = []
        hard: list[tuple[str, Reply]] = []
        for rcpt, reply in zip(d.rcpts, per_rcpt):
            if reply.code // 100 == 2:
                accepted.append(rcpt)
            elif reply.is_permanent:
                hard.append((rcpt, reply))
            else:
                soft.append((rcpt, reply))
        if accepted:
            final = res.final
            if res.data_started and final.code // 100 == 2:
                out.delivered(d, accepted, final)
            elif final.is_permanent:
                hard.extend((r, final) for r in accepted)
            else:
                soft.extend((r, final) for r in accepted)
        for group, report in ((hard, out.bounced), (soft, None)):
            by_reply: dict[Reply, list[str]] = {}
            for rcpt, reply in group:
                by_reply.setdefault(reply, []).append(rcpt)
            for reply, rcpts in by_reply.items():
                if report is not None:
                    report(d, rcpts, reply)
                else:
                    self.d.retry(out.deferred(d, rcpts, reply))


class Dispatcher:
    """Routes deliveries to site pools and runs the retry timer.

    Args:
      config: the daemon config (delivery section, routes, dns).
      outcomes: where results go (journaling, bodies).
      now: wall-clock seconds (derived from trio's clock, so tests can warp it).
      open_stream: replaces TCP connects (in-memory streams in tests).
    """

    def __init__(self, config: Config, outcomes: Outcomes, now: Callable[[], float],
                 open_stream: OpenStream | None = None) -> None:
        self.config = config
        self.open_stream = open_stream
        self.outcomes = outcomes
        self.now = now
        dc = config.delivery
        self.connection_limit = dc.connection_limit
        self.timeouts = Timeouts(**{k: getattr(dc.timeouts, k) for k in Timeouts.__struct_fields__})
        self.tls_context = opportunistic_tls_context() if dc.starttls != "never" else None
        self.routes = [(r.match.lower(), parse_hostport(r.relay, "route.relay", dc.port)) for r in config.route]
        self.pools: dict[str, SitePool] = {}
        self.idle_pools: set[SitePool] = set()      # pools with parked workers, for the reaper
        self.stopping = False
        self._domain_site: dict[str, SitePool] = {}
        self._resolving: dict[str, list[Delivery]] = {}
        self._timers = TimerHeap()
        self._timer_wakeup = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._resolver = None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._timer_loop)
            nursery.start_soon(self._reap_idle)
            task_status.started(self)

    # ------------------------------------------------------------------ intake

    def submit(self, d: Delivery, now: float | None = None) -> None:
        """Queue a delivery now, or at ``d.next_at`` if that is in the future."""
        if d.next_at > (self.now() if now is None else now):
            self._timers.push(d.next_at, d)
            if d.next_at <= self._timers.peek_due():
                self._timer_wakeup.set()
            return
        pool = self._domain_site.get(d.domain)
        if pool is not None:
            pool.push(d)
            return
        waiting = self._resolving.get(d.domain)
        if waiting is not None:
            waiting.append(d)
            return
        target = match_route(d.domain, self.routes)
        if target is not None:
            pool = self._pool(f"{target[0]}:{target[1]}", [target])
            self._domain_site[d.domain] = pool
            pool.push(d)
            return
        self._resolving[d.domain] = [d]
        assert self._nursery is not None
        self._nursery.start_soon(self._resolve, d.domain)

    def retry(self, d: Delivery | None) -> None:
        if d is not None:
            self.submit(d)

    def _pool(self, key: str, hosts: list[tuple[str, int]]) -> SitePool:
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = SitePool(key, hosts, self)
            assert self._nursery is not None
            self._nursery.start_soon(pool.run)
        return pool

    async def _resolve(self, domain: str) -> None:
        if self._resolver is None:
            self._resolver = make_resolver(self.config.dns.nameservers, self.config.dns.timeout)
        port = self.config.delivery.port
        try:
            hosts = await resolve_mx(domain, self._resolver)
        except DNSError as e:
            waiting = self._resolving.pop(domain, [])
            enhanced = "5.1.2" if getattr(e, "permanent", False) else "4.4.3"
            reply = _local_reply(550 if getattr(e, "permanent", False) else 451, enhanced, str(e))
            for d in waiting:
                if reply.is_permanent:
                    self.outcomes.bounced(d, d.rcpts, reply)
                else:
                    self.retry(self.outcomes.deferred(d, d.rcpts, reply))
            return
        pool = self._pool(",".join(hosts) + f":{port}", [(h, port) for h in hosts])
        self._domain_site[domain] = pool
        for d in self._resolving.pop(domain, []):
            pool.push(d)

    # ------------------------------------------------------------------ timers

    async def _timer_loop(self) -> None:
        while True:
            now = self.now()
            for d in self._timers.pop_due(now):
                d.next_at = 0.0
                self.submit(d)
            due = self._timers.peek_due()
            with trio.move_on_after(due - self.now() if due != math.inf else math.inf):
                await self._timer_wakeup.wait()
            self._timer_wakeup = trio.Event()

    async def _reap_idle(self) -> None:
        """Once a second, end the idle workers whose idle_timeout is up."""
        while True:
            await trio.sleep(1)
            now = self.now()
            for pool in list(self.idle_pools):
                if not pool.reap(now):
                    self.idle_pools.discard(pool)

    # ------------------------------------------------------------------ control

    def queued(self) -> int:
        return (sum(len(p.queue) for p in self.pools.values()) + len(self._timers)
                + sum(len(w) for w in self._resolving.values()))

    def waiting_retry(self) -> int:
        """Deliveries deferred and waiting for their next attempt."""
        return len(self._timers)

    def in_flight(self) -> int:
        return sum(p.workers for p in self.pools.values())

    def stop(self) -> None:
        """Stop starting transactions; workers finish the one they are in, then QUIT."""
        self.stopping = True
        for p in self.pools.values():
            p.wake_all()

    def statistics(self) -> list[PoolStatistics]:
        return [p.statistics() for p in self.pools.values()]
