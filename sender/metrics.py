"""Prometheus metrics of one engine, served at ``/metrics`` on the HTTP listener.

Counters and histograms follow the event log (one subscriber, no work on the delivery path
beyond a label lookup); gauges are read from the engine when the page is scraped. Labels stay
few and bounded: event, category (a fixed vocabulary), provider (the configured ones, "" for
the rest) and the level of a rate limit's bucket, never a customer, domain or address.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from .events import Event
from .shaping import LEVELS

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds from acceptance to delivery: a second to a day.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400)
FSYNC_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1)
_OUTCOMES = ("delivered", "deferred", "bounced", "expired", "failed")


class Metrics:
    """The metrics of ``engine`` in a registry of their own (several engines can live in one
    process, as in the tests). Subscribe :meth:`observe` to the event log and pass
    :meth:`fsync_done` to the journal."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.registry = CollectorRegistry(auto_describe=True)
        self.accepted = Counter("sender_accepted", "Messages accepted (made durable)", registry=self.registry)
        self.outcomes = Counter("sender_outcomes", "Outcomes per recipient, by event, category and provider",
                                ["event", "category", "provider"], registry=self.registry)
        self.latency = Histogram("sender_delivery_latency_seconds", "From acceptance (or its scheduled time) "
                                 "to delivery, per recipient", ["provider"], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.fsync = Histogram("sender_journal_fsync_seconds", "Journal group-commit fsync time",
                               buckets=FSYNC_BUCKETS, registry=self.registry)
        self.registry.register(_EngineGauges(engine))

    def observe(self, ev: Event) -> None:
        if ev.event in _OUTCOMES:
            n = len(ev.rcpts) or 1
            self.outcomes.labels(ev.event, ev.category, ev.provider).inc(n)
            if ev.event == "delivered" and ev.age:
                latency = self.latency.labels(ev.provider)
                for _ in range(n):
                    latency.observe(ev.age)
        elif ev.event in ("accepted", "scheduled"):
            self.accepted.inc()

    def fsync_done(self, seconds: float) -> None:
        self.fsync.observe(seconds)

    def page(self) -> bytes:
        return generate_latest(self.registry)


class _EngineGauges:
    """What is true now: queue depth, connections and waiting mail per site, the journal,
    the rate limits holding mail (per level of bucket), webhooks waiting."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def describe(self):
        return []

    def collect(self):
        st = self.engine.statistics()
        live = GaugeMetricFamily("sender_queue_messages", "Messages in the queue")
        live.add_metric([], st.live_messages)
        yield live
        depth = GaugeMetricFamily("sender_queue_deliveries", "Deliveries (a message's recipients at one domain) "
                                  "by where they wait", labels=["state"])
        for state, n in self.engine.dispatcher.depth().items():
            depth.add_metric([state], n)
        yield depth
        sites = GaugeMetricFamily("sender_site_connections", "Open delivery connections per site (path)",
                                  labels=["site", "provider"])
        queued = GaugeMetricFamily("sender_site_queued", "Deliveries waiting for a connection per site (path)",
                                   labels=["site", "provider"])
        for s in st.sites:
            sites.add_metric([s.site, s.provider], s.workers)
            queued.add_metric([s.site, s.provider], s.queued)
        yield sites
        yield queued
        journal = GaugeMetricFamily("sender_journal_bytes", "Bytes of journal segments on disk")
        journal.add_metric([], st.journal.bytes)
        yield journal
        throttled = GaugeMetricFamily("sender_throttled_deliveries", "Deliveries held by a rate limit, by the "
                                      "level of the bucket holding them", labels=["level"])
        saturated = GaugeMetricFamily("sender_saturated_buckets", "Rate-limit buckets with mail waiting and no "
                                      "token, by level", labels=["level"])
        held = dict.fromkeys(LEVELS, 0)
        full = dict.fromkeys(LEVELS, 0)
        now = self.engine.dispatcher.now()
        for hold in self.engine.dispatcher.shaper.holding(now):
            held[hold.level] += hold.held
            full[hold.level] += hold.until > now
        for level in LEVELS:
            throttled.add_metric([level], held[level])
            saturated.add_metric([level], full[level])
        yield throttled
        yield saturated
        hooks = self.engine.webhooks
        if hooks is not None:
            w = hooks.statistics()
            pending = GaugeMetricFamily("sender_webhooks", "Webhook messages, by state", labels=["state"])
            pending.add_metric(["pending"], w["pending"])
            pending.add_metric(["dead"], w["dead"])
            yield pending
