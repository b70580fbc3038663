"""Delivery engine: the nursery tree that moves queued deliveries to remote sites.

::

    Dispatcher.run  (nursery)
     ├─ clock loop              retry timers; releases what the shaper lets go; backoff steps
     ├─ resolver tasks          one per recipient domain being resolved (routes first, then MX)
     └─ SitePool.run  (one per path: source IP and destination site, its own nursery)
         └─ connection workers  up to ``connection_limit``; each owns one SMTP session and
                                reuses it for up to ``max_deliveries_per_connection`` messages

A site is where mail goes: a configured relay ``host:port`` or the set of a domain's MX hosts,
so all domains a provider hosts share one site and its limits. Each path has its own queue and
workers, so a slow or failing site only ever holds its own messages.

Between routing and the site pool, every delivery waits in the :class:`~sender.shaping.Shaper`
until the customer, domain, provider, source IP and path buckets all let it go.

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

from .automation import Action
from .controls import Controls
from .config import Config, parse_hostport
from .dns import NullMX, Resolver
from .errors import ConnectError, DNSError, SessionError
from .model import Delivery, Reply
from .scheduler import TimerHeap, TokenBucket
from .classify import classify_reply
from .routing import Egress, Source
from .shaping import Hold, Rules, RetryPolicy, Shaper, is_rate_limited
from .smtp.client import OpenStream, SMTPSession, Timeouts, TransactionResult, open_session, opportunistic_tls_context

__all__ = ["ConnectionGate", "Dispatcher", "Outcomes", "Site", "SitePool", "PoolStatistics", "backoff", "match_route"]


class Outcomes(Protocol):
    """What the dispatcher reports; the engine journals each call."""

    # ``via``: the path the attempt took (source, site, provider); None for a failure before one.
    def delivered(self, d: Delivery, rcpts: list[str], reply: Reply, via: SitePool | None = None) -> None: ...
    def bounced(self, d: Delivery, rcpts: list[str], reply: Reply, category: str,
                via: SitePool | None = None) -> None: ...
    def deferred(self, d: Delivery, rcpts: list[str], reply: Reply, category: str,
                 via: SitePool | None = None) -> Delivery | None:
        """Journal a deferral; returns the delivery to retry, or None if it expired."""
    def message(self, d: Delivery) -> bytes:
        """The bytes to send (the accepted message, DKIM-signed when a key applies)."""
    def return_path(self, d: Delivery, source: str = "") -> str:
        """The MAIL FROM address of ``d`` sent from ``source`` (a VERP address when bounces
        are read)."""
    async def settle(self) -> None:
        """Return once the outcomes reported so far are as durable as the policy asks."""
    def action_taken(self, action: Action) -> None:
        """An automation rule fired (an event: ``sender explain`` shows it)."""
    def throttled(self, hold: Hold, now: float) -> None:
        """A bucket holds mail (an event, every THROTTLE_REPORT seconds while it does)."""


class PoolStatistics(msgspec.Struct, frozen=True):
    site: str
    queued: int
    workers: int
    idle: int
    sessions_opened: int
    transactions: int
    provider: str = ""
    backoff_rate: float | None = None        # messages/s while the path is in backoff


def backoff(attempts: int, base: float, cap: float) -> float:
    """Delay before retry number ``attempts`` (1-based): exponential up to ``cap``, with full
    jitter (uniform over the interval) so that the retries of a burst spread out, but never
    sooner than half the base interval (a greylisting server needs the wait)."""
    interval = min(cap, base * (2 ** min(attempts - 1, 30)))
    floor = min(base, interval) / 2
    return floor + random.random() * (interval - floor)


def match_route(domain: str, routes: list[tuple[str, tuple[str, int]]]) -> tuple[str, int] | None:
    """First matching route: exact domain, ".suffix" (subdomains only) or "*"."""
    for pattern, target in routes:
        if pattern == "*" or pattern == domain or (pattern.startswith(".") and domain.endswith(pattern)):
            return target
    return None


_LOCAL_TEMP = 451
# How long a domain's site is used before its MX is looked up again (the resolver's own
# cache answers within the records' TTL).
ROUTE_TTL = 300.0
# A path with no worker and nothing queued this long ends its task (it starts again on demand).
POOL_REST = 30.0
# While the shaper holds mail, the buckets holding it are reported (throttled events) this often.
THROTTLE_REPORT = 10.0


def _local_reply(code: int, enhanced: str, text: str) -> Reply:
    return Reply(code, text, enhanced)


class Site:
    """Where mail for a domain goes: a configured relay or the set of the domain's MX hosts.

    Args:
      key: its name, e.g. "mx1.example.com,mx2.example.com:25".
      hosts: (name, address or None, port, preference) of every way in, in MX order. The
        provider whose limits apply is the one that matches these names.
    """

    def __init__(self, key: str, hosts: list[tuple[str, str | None, int, int]], provider: str) -> None:
        self.key = key
        self.hosts = hosts
        self.names = tuple(sorted({h[0] for h in hosts}))
        self.provider = provider


class SitePool:
    """The queue and connection workers of one path: a source IP and a destination site.

    Args:
      site: where it goes.
      source: where it leaves from. The path's name is the site's, prefixed by "ADDRESS>"
        when the source has an address.
    """

    def __init__(self, site: Site, source: Source, dispatcher: "Dispatcher") -> None:
        self.site = site
        self.key = f"{source.address}>{site.key}" if source.address else site.key
        self.hosts = site.hosts
        self.names = site.names
        self.provider = site.provider
        self.source = source.address
        self.ehlo = source.ehlo
        self.d = dispatcher
        self.site_bucket = dispatcher.shaper.path_bucket(self, dispatcher.now())
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
        self._running = False
        self._rest = trio.Event()
        self.rest_since = 0.0
        self._no_tls: set[str] = set()
        self._connect_rate: TokenBucket | None = None
        self.suspended_until = 0.0
        self.suspended_reply: Reply | None = None

    @property
    def limits(self):
        return self.d.shaper.rules.site(self.provider)

    @property
    def connection_limit(self) -> int:
        """The provider's connection limit, or an automation cap on this pair if lower."""
        limit = self.limits.connection_limit
        cap = self.d.egress.connection_cap(self.source, self.provider, self.site.key)
        return min(limit, cap) if cap is not None else limit

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(self.key, len(self.queue), self.workers, len(self._idle),
                              self.sessions_opened, self.transactions, self.provider,
                              self.d.shaper.in_backoff(self))

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
        """A delivery the shaper let go: send it on an idle or a new connection."""
        if self.suspended_reply is not None:
            if self.d.now() < self.suspended_until:
                # Like Postfix's "delivery temporarily suspended": no connect per message.
                self.d.failed(d, d.rcpts, self.suspended_reply, "connection_failure")
                return
            self.suspended_reply = None
        self.queue.append(d)
        if self._idle:
            self._wake(next(iter(self._idle)), True)      # the longest idle first
        else:
            self.spawn()

    def spawn(self) -> bool:
        """Start a connection worker if work waits and both the path's and the provider's
        connection limits allow it; returns whether one started. A resting pool is started
        again, and spawns its workers itself."""
        if not self.queue or self.d.stopping:
            return False
        if self._nursery is None:
            self.start()
            return False
        if self.workers >= self.connection_limit or not self.d.connections.acquire(self):
            return False
        self.workers += 1
        self._nursery.start_soon(self._worker)
        return True

    def start(self) -> None:
        """Run the pool's nursery in the dispatcher's, unless it runs already."""
        if not self._running and self.d.nursery is not None:
            self._running = True
            self.d.nursery.start_soon(self.run)

    async def run(self) -> None:
        """Own the workers of this path until cancelled, or until the dispatcher lets it rest
        (no worker and nothing queued for ``POOL_REST`` seconds): a path costs no task while
        nothing goes there, so a hundred thousand quiet domains cost only their records."""
        self._rest = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                while self.spawn():
                    pass
                await self._rest.wait()
                self._nursery = None
        finally:
            self._nursery = None
            self._running = False
        if self.queue:                  # came in while the last workers were finishing
            self.start()

    def rest_if_quiet(self, now: float) -> bool:
        """End the pool's task if it has been quiet long enough; returns whether it is still
        a candidate (quiet, but not for long enough yet)."""
        if self.workers or self.queue:
            return False
        if now - self.rest_since < POOL_REST:
            return True
        self._rest.set()
        return False

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
                self.d.want_reaper()
                if not await trio.lowlevel.wait_task_rescheduled(abort):
                    break
        if self.queue and not self.d.stopping:
            return self.queue.popleft()
        return None

    def _connect_order(self) -> list[tuple[str, str | None, int, int]]:
        """MX preference order, shuffled among equal preference on every connection."""
        rank = {name: random.random() for name, _, _, _ in self.hosts}
        return sorted(self.hosts, key=lambda h: (h[3], rank[h[0]]))

    async def _wait_connect_rate(self) -> None:
        """Hold a new connection until ``max_connection_rate`` allows it."""
        rate = self.limits.max_connection_rate
        if rate is None:
            self._connect_rate = None
            return
        bucket = self._connect_rate
        if bucket is None:
            bucket = self._connect_rate = TokenBucket(rate.per_second, rate.burst, self.d.now())
        elif (bucket.rate, bucket.burst) != (rate.per_second, rate.burst):
            bucket.set_rate(rate.per_second, rate.burst, self.d.now())
        while not bucket.try_take(self.d.now()):
            await trio.sleep(bucket.delay(self.d.now()))

    async def _connect(self) -> SMTPSession:
        """A session to the first host that takes one, in MX order: on to the next host after
        a refused connection or a 4xx/5xx greeting."""

        def attempt(host: str, address: str | None, port: int, tls: bool):
            return open_session(host, port, ehlo=self.ehlo, source=self.source, timeouts=self.d.timeouts,
                                tls_context=self.d.tls_context if tls else None,
                                open_stream=self.d.open_stream, address=address)

        await self._wait_connect_rate()
        last: ConnectError | None = None
        for host, address, port, _ in self._connect_order():
            tls = self.d.tls_context is not None and host not in self._no_tls
            try:
                return await attempt(host, address, port, tls)
            except ConnectError as e:
                last = e
                if not e.tls_failed:
                    continue
            # Like Postfix: after a failed handshake, retry this host in clear text.
            self._no_tls.add(host)
            try:
                return await attempt(host, address, port, False)
            except ConnectError as e:
                last = e
        assert last is not None
        raise last

    async def _worker(self) -> None:
        finished = False
        try:
            await self._work()
            finished = True
        finally:
            self.workers -= 1
            self.d.connections.release(self)
            # A worker that ended normally (idle, connection used up, session lost) hands over
            # to a fresh one if work is left; never while being cancelled.
            if finished and self.workers == 0:
                if not self.spawn() and not self.queue:
                    self.rest_since = self.d.now()
                    self.d.quiet_pools.add(self)
                    self.d.want_reaper()

    async def _work(self) -> None:
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
                if e.reply is not None and is_rate_limited(e.reply):
                    self.d.backoff(self)
                self._fail(d, reply, "connection_failure")
                d = None
                if self.sessions_up == 0:
                    # Nobody can reach the site: defer what waits for it, and what comes in
                    # for a while, instead of trying one connection per message.
                    self.suspended_reply = _local_reply(reply.code, reply.enhanced,
                                                        f"delivery temporarily suspended: {reply.text}")
                    self.suspended_until = self.d.now() + self.d.config.delivery.retry_interval / 2
                    while self.queue:
                        lost = self.queue.popleft()
                        self.d.failed(lost, lost.rcpts, reply, "connection_failure")
                return
            self.sessions_up += 1
            self.sessions_opened += 1
            sent = 0
            limits = self.limits
            limit = limits.max_deliveries_per_connection

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
                        await session.pipeline(first, take_next, self.d.outcomes.message, self._report,
                                               self._return_path)
                    else:
                        self._report(first, await session.transaction(self._return_path(first), first.rcpts,
                                                                       self.d.outcomes.message(first)))
                except SessionError as e:
                    reply = _local_reply(_LOCAL_TEMP, "4.4.2", str(e))
                    for lost in e.unfinished if e.unfinished is not None else [first]:
                        self._fail(lost, reply, "connection_failure")
                    return
                finally:
                    await self.d.outcomes.settle()
                sent += 1
                if sent >= limit:
                    break
                d = await self._next(limits.idle_timeout)
                if d is None:
                    break
        finally:
            if d is not None:
                # Cancelled while holding a delivery that was never sent: put it back.
                self.queue.appendleft(d)
            if session is not None:
                self.sessions_up -= 1
                await session.quit()

    def _return_path(self, d: Delivery) -> str:
        return self.d.outcomes.return_path(d, self.source)

    def _fail(self, d: Delivery, reply: Reply, category: str = "") -> None:
        """The whole delivery failed before any reply about its recipients."""
        self.d.failed(d, d.rcpts, reply, category, self)

    def _report(self, d: Delivery, res: TransactionResult) -> None:
        """Turn one transaction's replies into an outcome per recipient."""
        out = self.d.outcomes
        self.transactions += 1
        per_rcpt = res.rcpts if res.mail.code // 100 == 2 else [res.mail] * len(d.rcpts)
        accepted: list[str] = []
        failed: dict[Reply, list[str]] = {}
        for rcpt, reply in zip(d.rcpts, per_rcpt):
            if reply.code // 100 == 2:
                accepted.append(rcpt)
            else:
                failed.setdefault(reply, []).append(rcpt)
        if accepted:
            final = res.final
            if res.data_started and final.code // 100 == 2:
                out.delivered(d, accepted, final, self)
                self.d.observe(self, d, "delivered", "", final)
            else:
                failed.setdefault(final, []).extend(accepted)
        for reply, rcpts in failed.items():
            self.d.failed(d, rcpts, reply, "", self)


class ConnectionGate:
    """Connections open per provider, against ``provider_connection_limit``. A path that finds
    its provider at the limit waits in line and is called back when a connection closes."""

    def __init__(self, dispatcher: "Dispatcher") -> None:
        self.d = dispatcher
        self.open: dict[str, int] = {}
        self.waiting: dict[str, deque[SitePool]] = {}

    def acquire(self, pool: SitePool) -> bool:
        limit = self.d.shaper.rules.provider_connection_limits.get(pool.provider) if pool.provider else None
        n = self.open.get(pool.provider, 0)
        if limit is not None and n >= limit:
            line = self.waiting.setdefault(pool.provider, deque())
            if pool not in line:
                line.append(pool)
            return False
        self.open[pool.provider] = n + 1
        return True

    def rematch(self, pool: SitePool, provider: str) -> None:
        """The rules now put ``pool`` under another provider: its open connections move along."""
        self.open[pool.provider] = self.open.get(pool.provider, 0) - pool.workers
        self.open[provider] = self.open.get(provider, 0) + pool.workers
        line = self.waiting.get(pool.provider)
        if line and pool in line:
            line.remove(pool)
        pool.provider = provider

    def release(self, pool: SitePool) -> None:
        self.open[pool.provider] -= 1
        line = self.waiting.get(pool.provider)
        while line:
            if line.popleft().spawn():
                break


class Dispatcher:
    """Routes deliveries through the shaper to site pools and runs the clock loop.

    Args:
      config: the daemon config (delivery section, routes, dns, shaping).
      outcomes: where results go (journaling, bodies).
      now: wall-clock seconds (derived from trio's clock, so tests can warp it).
      open_stream: replaces TCP connects (in-memory streams in tests).
      state_path: where the egress state (warmup counts, automation actions...) is kept.
    """

    def __init__(self, config: Config, outcomes: Outcomes, now: Callable[[], float],
                 open_stream: OpenStream | None = None, state_path: str | None = None) -> None:
        self.config = config
        self.open_stream = open_stream
        self.outcomes = outcomes
        self.now = now
        dc = config.delivery
        self.timeouts = Timeouts(**{k: getattr(dc.timeouts, k) for k in Timeouts.__struct_fields__})
        self.tls_context = opportunistic_tls_context() if dc.starttls != "never" else None
        self.routes = [(r.match.lower(), parse_hostport(r.relay, "route.relay", dc.port)) for r in config.route]
        self.shaper = Shaper(Rules(config), 0.0)
        self.connections = ConnectionGate(self)
        self.egress = Egress(config, state_path)
        self.pools: dict[str, SitePool] = {}
        self.idle_pools: set[SitePool] = set()      # pools with parked workers, for the reaper
        self.quiet_pools: set[SitePool] = set()     # pools with no worker, to let rest
        self.stopping = False
        # domain -> (site, when to look it up again)
        self._domain_site: dict[str, tuple[Site, float]] = {}
        self._sites: dict[str, Site] = {}
        self._resolving: dict[str, list[Delivery]] = {}
        self._timers = TimerHeap()
        self.controls: Controls | None = None      # operators' pauses (set by the engine)
        self._paused: list[tuple[Delivery, SitePool]] = []     # held by a pause, in the order they came
        self._wakeup = trio.Event()
        self._sleep_until = -math.inf               # when the clock loop wakes by itself
        self._reaper_wanted = trio.Event()
        self.nursery: trio.Nursery | None = None
        self.resolver = Resolver(config.dns.nameservers, timeout=config.dns.timeout)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        now = self.now()
        self.egress.start(now)
        for source, provider in {(a.source, a.provider) for a in self.egress.automation.active()}:
            self._apply_pair_rate(source, provider, now)
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._clock_loop)
                nursery.start_soon(self._reap_idle)
                task_status.started(self)
        finally:
            self.egress.save(self.now(), force=True)

    # ------------------------------------------------------------------ intake

    def submit(self, d: Delivery, now: float | None = None) -> None:
        """Queue a delivery now, or at ``d.next_at`` if that is in the future."""
        if now is None:
            now = self.now()
        if d.next_at > now:
            self._timers.push(d.next_at, d)
            self._poke(d.next_at)
            return
        entry = self._domain_site.get(d.domain)
        if entry is not None and entry[1] > now:
            self._route(d, entry[0], now)
            self._release(now)
            return
        waiting = self._resolving.get(d.domain)
        if waiting is not None:
            waiting.append(d)
            return
        target = match_route(d.domain, self.routes)
        if target is not None:
            host, port = target
            site = self._site(f"{host}:{port}", [(host, None, port, 0)])
            self._domain_site[d.domain] = (site, math.inf)
            self._route(d, site, now)
            self._release(now)
            return
        self._resolving[d.domain] = [d]
        assert self.nursery is not None
        self.nursery.start_soon(self._resolve, d.domain)

    def retry(self, d: Delivery | None) -> None:
        if d is not None:
            self.submit(d)

    def failed(self, d: Delivery, rcpts: list[str], reply: Reply, category: str = "",
               pool: SitePool | None = None) -> None:
        """``rcpts`` of ``d`` failed with ``reply``. A remote reply is classified: its category
        decides whether it bounces now or is retried, and a rate-limiting one slows the path
        down. A reply made here comes with its ``category`` and is permanent if it says 5xx."""
        if category:
            permanent = reply.is_permanent
        else:
            c = classify_reply(reply)
            category, permanent = c.category, c.permanent
            if pool is not None and is_rate_limited(reply):
                self.backoff(pool)
        if pool is not None:
            self.observe(pool, d, "bounced" if permanent else "deferred", category, reply)
        if permanent:
            self.outcomes.bounced(d, rcpts, reply, category, pool)
        else:
            self.retry(self.outcomes.deferred(d, rcpts, reply, category, pool))

    def observe(self, pool: SitePool, d: Delivery, event: str, category: str, reply: Reply) -> None:
        """An outcome of an attempt on ``pool``'s path: feedback to the egress (reputation,
        adaptive rates and warmup, automation rules)."""
        now = self.now()
        fired = self.egress.observe(pool.source, pool.provider, pool.site.key, d, event, category, reply, now)
        self.want_reaper()                      # to save the egress state
        if pool.provider and self.egress.adaptive.get(pool.provider) is not None:
            self._apply_pair_rate(pool.source, pool.provider, now)
        for action in fired:
            self.outcomes.action_taken(action)
            self._take(action, now)

    def reputation_later(self, source: str, rcpt: str, kind: str, category: str, now: float) -> None:
        """A bounce after delivery or a complaint about mail ``source`` sent to ``rcpt``:
        it counts against that source's reputation with the recipient's provider."""
        entry = self._domain_site.get(rcpt.rpartition("@")[2].lower())
        provider = entry[0].provider if entry is not None else ""
        if provider:
            self.egress.record_later(source, provider, "complaint" if kind == "complaint" else "bounced",
                                     category, now)
            self.want_reaper()

    def _take(self, action: Action, now: float) -> None:
        """Put a new automation action into effect."""
        if action.kind == "max_message_rate":
            self._apply_pair_rate(action.source, action.provider, now)
            self._apply_site_caps(action.source, now)
        elif action.kind == "connection_limit":
            return                              # SitePool.connection_limit asks for every new worker
        else:
            # Suspended here (or moved to another pool): what waits for these paths is routed
            # again, to the pool's other sources or to wait for the end.
            for pool in list(self.pools.values()):
                if pool.source == action.source and (
                        pool.site.key == action.site if action.site else pool.provider == action.provider):
                    waiting = self.shaper.drain(pool, now) + list(pool.queue)
                    pool.queue.clear()
                    for d in waiting:
                        self._route(d, pool.site, now)
            self._release(now)

    def _apply_pair_rate(self, source: str, provider: str, now: float) -> None:
        self.shaper.set_pair_rate(source, provider, self.egress.pair_rate(source, provider, now), now)

    def _apply_site_caps(self, source: str, now: float) -> None:
        for pool in self.pools.values():
            if pool.source == source:
                self.shaper.cap_path(pool, self.egress.site_cap(source, pool.provider, pool.site.key), now)

    def retry_policy(self, domain: str) -> RetryPolicy:
        entry = self._domain_site.get(domain)
        return self.shaper.rules.retry_policy(domain, entry[0].provider if entry else "")

    def _site(self, key: str, hosts: list[tuple[str, str | None, int, int]]) -> Site:
        site = self._sites.get(key)
        if site is None or site.hosts != hosts:
            site = self._sites[key] = Site(key, hosts, self.shaper.rules.provider_of(tuple(sorted({h[0] for h in hosts}))))
            for pool in self.pools.values():
                if pool.site.key == key:        # the MX addresses changed: the paths take them on
                    pool.site, pool.hosts = site, hosts
        return site

    def _path(self, site: Site, source: Source) -> SitePool:
        key = f"{source.address}>{site.key}" if source.address else site.key
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = SitePool(site, source, self)
            cap = self.egress.site_cap(source.address, site.provider, site.key)
            if cap is not None:
                self.shaper.cap_path(pool, cap, self.now())
            pool.start()
        return pool

    def _route(self, d: Delivery, site: Site, now: float) -> None:
        """Pick the source ``d`` leaves from and queue it on that path, or hold it until a
        source may send (warmup caps, suspensions)."""
        choice = self.egress.choose(d, site.provider, site.key, now)
        d.chosen = choice.reason                # why this source (the outcome events carry it)
        if self.egress.dirty:
            self.want_reaper()
        if choice.source is None:
            d.next_at = choice.wait_until
            self._timers.push(d.next_at, d)
            self._poke(d.next_at)
            return
        path = self._path(site, choice.source)
        if self.controls is not None and self.controls.pauses and self.controls.holds(d, path):
            self._paused.append((d, path))      # held before the shaper: it takes no one's tokens
            return
        self.shaper.push(d, path, now)

    async def _resolve(self, domain: str) -> None:
        port = self.config.delivery.port
        try:
            mxs = await self.resolver.mx(domain)
        except DNSError as e:
            waiting = self._resolving.pop(domain, [])
            if isinstance(e, NullMX):           # RFC 7505 section 4.3
                reply = _local_reply(556, "5.1.10", str(e))
            elif e.permanent:
                reply = _local_reply(550, "5.1.2", str(e))
            else:
                reply = _local_reply(451, "4.4.3", str(e))
            for d in waiting:
                self.failed(d, d.rcpts, reply, getattr(e, "category", "dns_failure"))
            return
        names = tuple(sorted({mx.name for mx in mxs}))
        hosts = [(mx.name, addr, port, mx.preference) for mx in mxs for addr in mx.addresses]
        site = self._site(",".join(names) + f":{port}", hosts)
        now = self.now()
        self._domain_site[domain] = (site, now + ROUTE_TTL)
        for d in self._resolving.pop(domain, []):
            self._route(d, site, now)
        self._release(now)

    # ------------------------------------------------------------------ shaping and timers

    def _release(self, now: float) -> None:
        """Hand every delivery the shaper lets go now to its path; expire the ones that
        waited past their max_age."""
        shaper = self.shaper
        while (got := shaper.pop(now)) is not None:
            pool, d = got
            if self.controls is not None and self.controls.pauses and self.controls.holds(d, pool):
                self._paused.append((d, pool))
                continue
            if now >= d.received_at + self.shaper.rules.retry_policy(d.domain, pool.provider).max_age:
                held = f" (held by {pool.key})" if d.attempts == 0 else ""
                self.failed(d, d.rcpts, _local_reply(_LOCAL_TEMP, "4.4.7", f"message expired in the queue{held}"),
                            "expired")
                continue
            pool.push(d)
        self._poke(shaper.next_wakeup())

    def _poke(self, at: float) -> None:
        """Wake the clock loop if something is due before it would wake by itself."""
        if at < self._sleep_until:
            self._sleep_until = at
            self._wakeup.set()

    def backoff(self, pool: SitePool) -> None:
        """A rate-limiting reply on ``pool``'s path: slow the whole path down."""
        now = self.now()
        self.shaper.backoff(pool, now)
        self._poke(self.shaper.next_wakeup())

    def replace_rules(self, config: Config) -> None:
        """New shaping rules at run time (SIGHUP, admin API): limits, providers, priorities
        and retry policy change in place; queued mail keeps its place."""
        rules = Rules(config)
        for site in self._sites.values():
            site.provider = rules.provider_of(site.names)
        for pool in self.pools.values():
            provider = rules.provider_of(pool.names)
            if provider != pool.provider:
                self.connections.rematch(pool, provider)
        self.shaper.replace(rules, self.now())
        self.egress.configure(config)
        for pool in self.pools.values():
            while pool.spawn():
                pass
        self._release(self.now())

    async def _clock_loop(self) -> None:
        """Move due retries on, take backoff steps, release what the shaper lets go; then
        sleep until the next of those is due or a poke says something came sooner.

        While the shaper holds mail, the buckets holding it are reported (a throttled event
        each) when the loop is awake and the last report is THROTTLE_REPORT seconds old. It
        wakes for a report only when more mail waits than at the last one (or since): a bucket
        draining slowly is told at its own tokens, a new hold within THROTTLE_REPORT (or at
        its bucket's next wake-up, which the loop sleeps until anyway), and holding nothing
        adds no wake-up."""
        report_at = -math.inf                       # the next throttle report, at the earliest
        low = 0                                     # the least mail held since the last report
        while True:
            self._sleep_until = -math.inf           # awake: pokes are not needed
            now = self.now()
            for d in self._timers.pop_due(now):
                if not d.rcpts or d.next_at == 0.0:
                    continue                    # canceled, or an older timer of a rescheduled one
                if d.next_at > now:
                    self._timers.push(d.next_at, d)     # rescheduled later
                    continue
                d.next_at = 0.0
                self.submit(d, now)
            self.shaper.tick(now)
            changed, ended = self.egress.tick(now)
            for source, provider in changed:
                self._apply_pair_rate(source, provider, now)
            for action in ended:
                if action.kind == "max_message_rate":
                    self._apply_pair_rate(action.source, action.provider, now)
                    self._apply_site_caps(action.source, now)
            self._release(now)
            holding = len(self.shaper)              # after a release, all of it waits for a token
            if holding and now >= report_at:
                self._report_throttles(now)
                report_at, low = now + THROTTLE_REPORT, holding
            elif holding < low:
                low = holding
            # Retry timers fire on whole seconds: the retries of a second go in one pass
            # (they are minutes apart anyway), not one wake-up each.
            due = self._timers.peek_due()
            wake = min(math.ceil(due) if due < math.inf else due, self.shaper.next_wakeup(),
                       self.egress.next_wakeup(), report_at if holding > low else math.inf)
            self._wakeup = trio.Event()
            self._sleep_until = wake
            # The clock moved on while releasing: the next token may be due already.
            with trio.move_on_after(max(0.0, wake - self.now())):
                await self._wakeup.wait()

    def want_reaper(self) -> None:
        if not self._reaper_wanted.is_set():
            self._reaper_wanted.set()

    async def _reap_idle(self) -> None:
        """Once a second, end the idle workers whose idle_timeout is up, let the pools rest
        that have been quiet for POOL_REST seconds, and save the egress state. With none of
        that to do it sleeps until there is (days of virtual time then cost nothing)."""
        while True:
            if not (self.idle_pools or self.quiet_pools or self.egress.dirty):
                self._reaper_wanted = trio.Event()
                await self._reaper_wanted.wait()
            await trio.sleep(1)
            now = self.now()
            for pool in list(self.idle_pools):
                if not pool.reap(now):
                    self.idle_pools.discard(pool)
            for pool in list(self.quiet_pools):
                if not pool.rest_if_quiet(now):
                    self.quiet_pools.discard(pool)
            self.egress.save(now)

    # ------------------------------------------------------------------ control

    def queued(self) -> int:
        return (sum(len(p.queue) for p in self.pools.values()) + len(self._timers) + len(self.shaper)
                + sum(len(w) for w in self._resolving.values()))

    def controls_changed(self) -> None:
        """A pause was set or lifted: take what it now holds out of the sites' queues (a
        transaction under way finishes), and send on what no pause holds any more."""
        controls = self.controls
        assert controls is not None
        now = self.now()
        # Out of the shaper, so that held mail takes no tokens the others need.
        self._paused += self.shaper.drain_where(
            lambda customer, domain, pool: controls.holding(customer, domain, pool.provider, pool.source) is not None,
            now)
        self._paused += self._out_of_site_queues(controls.holds)
        waiting, self._paused = self._paused, []
        for d, pool in waiting:
            if controls.holds(d, pool):
                self._paused.append((d, pool))
            elif d.rcpts:               # (gone meanwhile, e.g. expired: nothing to send)
                self.submit(d, now)     # through the shaper again: its limits apply from now

    def rerouted(self, domain: str = "", provider: str = "") -> None:
        """An operator's reroute of ``domain`` or ``provider`` was set or lifted: what waits
        for a path toward it is routed again (the source is chosen anew, from the new pool)."""
        now = self.now()

        def concerned(d_domain: str, pool: SitePool) -> bool:
            return d_domain == domain if domain else pool.provider == provider

        waiting = self.shaper.drain_where(lambda customer, d_domain, pool: concerned(d_domain, pool), now)
        waiting += self._out_of_site_queues(lambda d, pool: concerned(d.domain, pool))
        kept = [(d, pool) for d, pool in self._paused if not concerned(d.domain, pool)]
        waiting += [(d, pool) for d, pool in self._paused if concerned(d.domain, pool)]
        self._paused = kept
        for d, pool in waiting:
            if d.rcpts:
                self._route(d, pool.site, now)
        self._release(now)

    def site_of(self, domain: str) -> Site | None:
        """``domain``'s MX site, None while it is not known."""
        entry = self._domain_site.get(domain)
        return entry[0] if entry is not None else None

    def provider_of(self, domain: str) -> str:
        """The provider of ``domain``'s MX site, "" while it is not known."""
        site = self.site_of(domain)
        return site.provider if site is not None else ""

    def take(self, wanted: list[Delivery]) -> list[Delivery]:
        """Take ``wanted`` out of the queue, wherever each waits (a retry timer, an MX lookup,
        the shaper, a pause, a site's queue), for a purge; returns those taken. One in a
        transaction under way is not taken: its outcome comes as usual."""
        now = self.now()
        ids = {id(d) for d in wanted}
        taken = [d for d, _ in self._paused if id(d) in ids]
        self._paused = [(d, pool) for d, pool in self._paused if id(d) not in ids]
        for domain, waiting in self._resolving.items():
            taken += [d for d in waiting if id(d) in ids]
            self._resolving[domain] = [d for d in waiting if id(d) not in ids]
        taken += [d for d, _ in self._out_of_site_queues(lambda d, pool: id(d) in ids)]
        keys = {(d.customer, d.domain) for d in wanted}
        for d, pool in self.shaper.drain_where(lambda customer, domain, pool: (customer, domain) in keys, now):
            if id(d) in ids:
                taken.append(d)
            else:
                self.shaper.push(d, pool, now)      # (in its order: its whole queue went out)
        found = {id(d) for d in taken}
        for d in wanted:
            # Not found elsewhere with a time set: it waits in the timer heap, which skips it
            # once its time is cleared. With none, a transaction has it.
            if id(d) not in found and d.next_at != 0.0:
                d.next_at = 0.0
                taken.append(d)
        self._poke(self.shaper.next_wakeup())
        return taken

    def _out_of_site_queues(self, wanted: Callable[[Delivery, SitePool], bool]) -> list[tuple[Delivery, SitePool]]:
        """Take the deliveries ``wanted`` out of the sites' queues, each with its path."""
        out: list[tuple[Delivery, SitePool]] = []
        for pool in self.pools.values():
            mine = [d for d in pool.queue if wanted(d, pool)]
            if mine:
                gone = {id(d) for d in mine}
                pool.queue = deque(d for d in pool.queue if id(d) not in gone)
                out += [(d, pool) for d in mine]
        return out

    def paused(self) -> int:
        return len(self._paused)

    def where(self, d: Delivery, now: float) -> dict:
        """Where a queued delivery waits, and why (for explain): its retry timer (or scheduled
        time), an MX lookup, the bucket that holds it and until when, a site's queue, or none
        of these (a transaction under way)."""
        for p, pool in self._paused:
            if p is d:
                pause = self.controls.holds(d, pool) if self.controls is not None else None
                return {"state": "paused", "site": pool.site.key, "source": pool.source,
                        **({"scope": pause.scope, "value": pause.value, "by": pause.who, "reason": pause.reason}
                           if pause is not None else {})}
        if d.next_at > now:
            return {"state": "timer", "until": d.next_at}
        if any(w is d for w in self._resolving.get(d.domain, ())):
            return {"state": "resolving"}
        entry = self._domain_site.get(d.domain)
        for pool in self.pools.values():
            if entry is None or pool.site is not entry[0]:
                continue
            where = {"site": pool.site.key, "source": pool.source, "provider": pool.provider}
            if any(q is d for q in pool.queue):
                return {"state": "ready", **where}
            held = self.shaper.held(d, pool, now)
            if held is not None:
                return {"state": "throttled", "bucket": held[0], "until": held[1], **where}
            if self.shaper.has_queue(d, pool):
                return {"state": "shaper", **where}     # its turn in the shaper's queue (or being sent)
        return {"state": "in_flight"}

    def depth(self) -> dict[str, int]:
        """Deliveries by where they wait: a retry timer (or a scheduled time), the shaper's
        buckets, an MX lookup, a site's queue, or a transaction under way."""
        return {"timer": len(self._timers), "throttled": len(self.shaper), "paused": len(self._paused),
                "resolving": sum(len(w) for w in self._resolving.values()),
                "ready": sum(len(p.queue) for p in self.pools.values()), "in_flight": self.busy()}

    def waiting_retry(self) -> int:
        """Deliveries deferred and waiting for their next attempt."""
        return len(self._timers)

    def in_flight(self) -> int:
        """Connection workers, busy or idle."""
        return sum(p.workers for p in self.pools.values())

    def busy(self) -> int:
        """Connection workers not parked idle: in a transaction, or connecting for one."""
        return sum(p.workers - len(p._idle) for p in self.pools.values())

    def stop(self) -> None:
        """Stop starting transactions; workers finish the one they are in, then QUIT."""
        self.stopping = True
        for p in self.pools.values():
            p.wake_all()

    def statistics(self) -> list[PoolStatistics]:
        return [p.statistics() for p in self.pools.values()]

    def throttles(self) -> list[Hold]:
        """The buckets holding mail now, with how many deliveries each holds and until when."""
        return self.shaper.holding(self.now())

    def _report_throttles(self, now: float) -> None:
        """A throttled event per bucket holding mail (the clock loop's report)."""
        for hold in self.shaper.holding(now):
            self.outcomes.throttled(hold, now)
