"""Egress decisions in isolation (adaptive warmup, caps, health, reroutes, suspensions,
persistence, adaptive rates), then two paths end to end: automation connection limits and the
adaptive rate of a (source, provider) pair.

Unit tests drive :class:`sender.routing.Egress` with plain ``now`` floats; the end-to-end ones
run an Engine against in-memory sinks on trio's autojump clock.
"""

from __future__ import annotations

import datetime
import itertools
import random
from collections import Counter

import msgspec
import pytest
import trio

from sender.config import parse_config
from sender.model import Delivery, Reply
from sender.routing import DAY, RESUME_SPREAD, RESUME_SPREAD_MAX, RESUME_SPREAD_MIN, Egress
from sender.simulator import SimulateConfig
from sender.sink import Sink, SinkRule

from helpers import Sinks, start_engine as start, until

START = "2026-03-02"
T0 = datetime.datetime(2026, 3, 2, 10, tzinfo=datetime.timezone.utc).timestamp()   # plan day 1, 10:00
DAY0 = int(T0 // DAY)
SOURCES = {f"ip{i}": {"address": f"127.0.0.{i}"} for i in range(2, 8)}
SITES = {"google": "gmail-smtp-in.l.google.com", "microsoft": "example-com.mail.protection.outlook.com",
         "yahoo": "mta5.am0.yahoodns.net"}
DEFERRED = Reply(451, "Try again later", "4.7.0")
OK = Reply(250, "Ok: queued", "2.0.0")


def egress(*, sources=None, pools=None, state_path=None, now=T0, **extra) -> Egress:
    """An Egress over ``sources`` (default: ip2..ip7, no plans) and ``pools`` (default: one
    shared pool of ip2), with no built-in automation rules unless ``automation`` says so."""
    automation = {"default_rules": False, **extra.pop("automation", {})}
    e = Egress(parse_config({
        "source": sources or SOURCES,
        "pool": pools or {"shared": {"sources": ["ip2"]}},
        "egress": {"default_pool": "shared", **extra.pop("egress", {})},
        "automation": automation,
        **extra,
    }), state_path)
    e.start(now)
    return e


def planned(*names, plan="w", start=START):
    """SOURCES, with the sources ``names`` on warmup ``plan`` from ``start``."""
    return {**SOURCES, **{name: {**SOURCES[name], "warmup": plan, "warmup_start": start} for name in names}}


_ids = itertools.count()


def delivery(provider="google", customer="", message_type="") -> Delivery:
    domain = {"google": "gmail.test", "microsoft": "outlook.test", "yahoo": "yahoo.test"}[provider]
    return Delivery(f"m{next(_ids)}", "s@app.test", domain, [f"u@{domain}"], 0, 0, 0, T0,
                    customer=customer, message_type=message_type)


def feedback(e: Egress, source: str, provider: str, now: float, *, accepted=0, deferred=0,
             category="transient_other", reply=DEFERRED, customer="") -> list:
    """Report ``accepted`` deliveries and ``deferred`` deferrals of ``source``'s mail to
    ``provider``; returns the automation actions that fired."""
    fired = []
    for _ in range(accepted):
        fired += e.observe(source, provider, SITES[provider], delivery(provider, customer), "delivered", "", OK, now)
    for _ in range(deferred):
        fired += e.observe(source, provider, SITES[provider], delivery(provider, customer), "deferred", category,
                           reply, now)
    return fired


def choose(e: Egress, provider: str, now: float, n: int = 1, customer: str = "") -> list:
    return [e.choose(delivery(provider, customer), provider, SITES[provider], now) for _ in range(n)]


# ---------------------------------------------------------------------- adaptive warmup


def test_adaptive_warmup_moves_per_provider_on_yesterdays_replies():
    e = egress(sources=planned("ip2"), warmup={"w": {"days": [10, 20, 40], "adaptive": True}})
    src = e.sources["ip2"]

    def cap(day, provider="google"):
        total, per_provider = e.cap(src, provider, DAY0 + day)
        assert total is None                # an adaptive plan caps per provider only
        return per_provider

    at = lambda day: T0 + day * DAY
    assert (cap(0), cap(0, "yahoo")) == (10, 10)
    feedback(e, "127.0.0.2", "google", at(0), accepted=10)
    # Google took a full day's cap: on. Yahoo saw no mail: holds.
    assert (cap(1), cap(1, "yahoo")) == (20, 10)
    feedback(e, "127.0.0.2", "google", at(1), accepted=18, deferred=4)         # 18% deferred
    feedback(e, "127.0.0.2", "yahoo", at(1), accepted=10)
    assert (cap(2), cap(2, "yahoo")) == (10, 20)                               # back / on
    feedback(e, "127.0.0.2", "google", at(2), accepted=4)                      # under half the cap
    assert cap(3) == 10
    feedback(e, "127.0.0.2", "google", at(3), accepted=10, deferred=1)         # 9%: some deferrals
    assert cap(4) == 10
    caps = []
    for day in (4, 5, 6, 7):
        caps.append(cap(day))
        feedback(e, "127.0.0.2", "google", at(day), accepted=caps[-1] or 100)
    assert caps == [10, 20, 40, None]                                         # past the last stage
    assert cap(7, "yahoo") == 20
    assert e.state.stages == {"127.0.0.2>google": 4, "127.0.0.2>yahoo": 2}


def test_adaptive_cap_binds_choose_for_that_provider_only():
    e = egress(sources=planned("ip2"), warmup={"w": {"days": [3, 6], "adaptive": True}},
               pools={"shared": {"sources": ["ip2"], "overflow": "wait"}})
    google = choose(e, "google", T0, 4)
    assert [c.source is not None for c in google] == [True, True, True, False]
    assert google[3].wait_until >= (DAY0 + 1) * DAY and "warmup cap" in google[3].reason
    assert all(c.source is not None for c in choose(e, "microsoft", T0, 3))


# ---------------------------------------------------------------------- calendar warmup


def test_calendar_plan_caps_per_provider_and_in_total():
    e = egress(sources=planned("ip2"), warmup={"w": {"days": [10, 20], "provider": {"google": [3, 6]}}},
               pools={"shared": {"sources": ["ip2"], "overflow": "wait"}})
    src = e.sources["ip2"]
    assert [e.cap(src, "google", DAY0 + d) for d in (0, 1, 2)] == [(10, 3), (20, 6), (None, None)]
    assert e.cap(src, "microsoft", DAY0) == (10, None)
    got = choose(e, "google", T0, 4)
    assert [c.source is not None for c in got] == [True, True, True, False]    # Google's 3
    got = choose(e, "microsoft", T0, 8)
    assert [c.source is not None for c in got] == [True] * 7 + [False]        # 10 in all
    assert e.state.sent == {"127.0.0.2": 10, "127.0.0.2>google": 3, "127.0.0.2>microsoft": 7}
    # Tomorrow the counts start again under day 2's caps; after the last day nothing holds.
    assert sum(c.source is not None for c in choose(e, "google", T0 + DAY, 10)) == 6
    assert all(c.source is not None for c in choose(e, "google", T0 + 2 * DAY, 100))


def test_sources_without_a_plan_or_starting_later():
    e = egress(sources={**planned("ip3", start="2030-01-01"), "ip2": SOURCES["ip2"]},
               warmup={"w": {"days": [10, 20]}})
    assert e.cap(e.sources["ip2"], "google", DAY0) == (None, None)
    assert all(c.source is not None for c in choose(e, "google", T0, 500))
    assert e.state.sent == {}                         # nothing counted for a source with no plan
    # A start date in the future counts as day 1, for as long as it is in the future.
    late = e.sources["ip3"]
    assert e.cap(late, "google", DAY0) == e.cap(late, "google", DAY0 + 300) == (10, None)


# ---------------------------------------------------------------------- health


def test_an_unhealthy_source_gets_little_of_that_providers_mail_only():
    random.seed(7)
    e = egress(pools={"shared": {"sources": ["ip2", "ip3"]}})
    feedback(e, "127.0.0.2", "google", T0, accepted=20, deferred=10, category="blocklisted_ip")
    feedback(e, "127.0.0.3", "google", T0, accepted=30)
    assert e.reputation.health("127.0.0.2", "google", T0) < 0.1
    google = Counter(c.source.address for c in choose(e, "google", T0 + 1, 2000))
    microsoft = Counter(c.source.address for c in choose(e, "microsoft", T0 + 1, 2000))
    assert google["127.0.0.2"] < 40                   # weight x health**2: a trickle, not none
    assert google["127.0.0.2"] > 0
    assert 900 < microsoft["127.0.0.2"] < 1100


# ---------------------------------------------------------------------- automation


REROUTE = {"name": "move-google", "text": "try another pool", "provider": ["google"], "count": 1,
           "action": "reroute", "pool": "b", "duration": "1h"}


def test_a_reroute_moves_that_pools_mail_to_that_provider_only():
    e = egress(pools={"a": {"sources": ["ip2", "ip3"]}, "b": {"sources": ["ip4", "ip5"]},
                      "d": {"sources": ["ip6"], "dedicated": True}},
               customer=[{"id": "ca", "pool": "a"}, {"id": "cd", "pool": "d"}],
               egress={"default_pool": "a"}, automation={"rule": [REROUTE]})
    refusal = Reply(451, "Too much mail, try another pool", "4.7.0")
    [action] = feedback(e, "127.0.0.2", "google", T0, deferred=1, reply=refusal, customer="ca")
    assert (action.kind, action.pool, action.target, action.provider) == ("reroute", "a", "b", "google")
    feedback(e, "127.0.0.6", "google", T0, deferred=1, reply=refusal, customer="cd")

    def sources(provider, customer):
        return {c.source.address for c in choose(e, provider, T0 + 1, 200, customer)}

    assert sources("google", "ca") == sources("google", "") == {"127.0.0.4", "127.0.0.5"}
    assert sources("microsoft", "ca") == {"127.0.0.2", "127.0.0.3"}
    assert sources("google", "cd") == {"127.0.0.6"}           # a dedicated pool's mail stays put
    assert choose(e, "google", T0 + 1, customer="ca")[0].reason == (
        "from pool b (rerouted from pool a toward google by rule 'move-google'): 2 sources")
    assert choose(e, "microsoft", T0 + 1, customer="ca")[0].reason == "from pool a (the customer's pool): 2 sources"
    e.tick(T0 + 3600)                                         # the reroute ends
    assert sources("google", "ca") == {"127.0.0.2", "127.0.0.3"}


def test_with_every_source_suspended_mail_waits_for_the_first_to_end_plus_a_spread():
    random.seed(3)
    rule = {"name": "blocked-here", "text": "blocked", "count": 1, "action": "suspend", "duration": "1h"}
    e = egress(pools={"shared": {"sources": ["ip2", "ip3"]}}, automation={"rule": [rule]})
    refusal = Reply(554, "Client host blocked", "5.7.1")
    [first] = feedback(e, "127.0.0.2", "google", T0, deferred=1, reply=refusal)
    [second] = feedback(e, "127.0.0.3", "google", T0 + 600, deferred=1, reply=refusal)
    assert (first.until, second.until) == (T0 + 3600, T0 + 4200)
    now = T0 + 1200
    spread = min(RESUME_SPREAD_MAX, max(RESUME_SPREAD_MIN, (first.until - now) * RESUME_SPREAD))
    waits = choose(e, "google", now, 200)
    assert all(c.source is None for c in waits)
    assert all(first.until <= c.wait_until <= first.until + spread for c in waits)
    assert max(c.wait_until for c in waits) - min(c.wait_until for c in waits) > spread / 2   # spread out
    assert "127.0.0.2 suspended for google by rule 'blocked-here'" == waits[0].reason
    assert all(c.source is not None for c in choose(e, "microsoft", now, 10))


# ---------------------------------------------------------------------- adaptive rate


ADAPTIVE = {"min": "1/s", "max": "20/s", "start": "20/s", "increase": "1/s", "step": "1m"}


def test_adaptive_rate_halves_on_a_rate_limit_and_grows_after_a_clean_step():
    e = egress(shaping={"provider": {"google": {"adaptive_rate": ADAPTIVE}}})
    assert e.pair_rate("127.0.0.2", "google", T0) == 20
    assert e.pair_rate("127.0.0.2", "microsoft", T0) is None          # no adaptive rate there
    feedback(e, "127.0.0.2", "google", T0 + 1, deferred=1, category="rate_limited")
    feedback(e, "127.0.0.2", "google", T0 + 2, deferred=3, category="rate_limited")   # same step: one cut
    assert e.pair_rate("127.0.0.2", "google", T0 + 2) == 10
    assert e.next_wakeup() == T0 + 61
    feedback(e, "127.0.0.2", "google", T0 + 30, accepted=5)
    # The step of the cut saw rate-limiting replies: no increase at its end.
    assert e.tick(T0 + 61)[0] == []
    feedback(e, "127.0.0.2", "google", T0 + 90, accepted=5)
    assert e.tick(T0 + 121)[0] == [("127.0.0.2", "google")]
    assert e.pair_rate("127.0.0.2", "google", T0 + 121) == 11
    assert e.tick(T0 + 181)[0] == []                                  # a step with no replies: holds
    assert e.pair_rate("127.0.0.2", "google", T0 + 181) == 11
    assert e.state.rates == {"127.0.0.2>google": 11}


# ---------------------------------------------------------------------- persistence


def test_state_survives_a_save_and_start(tmp_path):
    path = tmp_path / "egress.state"
    rule = {"name": "go-away", "text": "go away", "count": 1, "action": "suspend", "duration": "1h"}
    kw = dict(sources=planned("ip2"), warmup={"w": {"days": [10, 20], "adaptive": True}},
              automation={"rule": [rule]}, shaping={"provider": {"google": {"adaptive_rate": ADAPTIVE}}})
    e = egress(state_path=path, **kw)
    assert all(c.source is not None for c in choose(e, "google", T0, 4))
    feedback(e, "127.0.0.2", "google", T0, accepted=4, deferred=1, category="rate_limited")
    [action] = feedback(e, "127.0.0.2", "microsoft", T0, deferred=1, reply=Reply(554, "go away", "5.7.1"))
    e.save(T0, force=True)

    again = egress(state_path=path, now=T0 + 10, **kw)
    assert again.state.sent == e.state.sent == {"127.0.0.2": 4, "127.0.0.2>google": 4}
    assert again.state.stages == {"127.0.0.2>google": 1}
    assert again.state.outcomes == {f"{DAY0}>127.0.0.2>google": [4, 1], f"{DAY0}>127.0.0.2>microsoft": [0, 1]}
    assert again.automation.active() == [action]
    assert choose(again, "microsoft", T0 + 10)[0].source is None
    assert again.pair_rate("127.0.0.2", "google", T0 + 10) == e.pair_rate("127.0.0.2", "google", T0) == 10
    assert again.reputation.counts("127.0.0.2", "google", T0 + 10) == e.reputation.counts(
        "127.0.0.2", "google", T0 + 10)
    assert again.reputation.counts("127.0.0.2", "google", T0 + 10).delivered == 4
    # The next day's stage is decided from the restored counts.
    assert again.cap(again.sources["ip2"], "google", DAY0 + 1) == (None, 10)   # 20% deferred: holds


@pytest.mark.parametrize("content", [b"", b"\xc1 not msgpack", msgspec.msgpack.encode([1, 2, 3]),
                                     msgspec.msgpack.encode({"sent": "many"})])
def test_an_unreadable_state_file_starts_from_zero(tmp_path, content):
    path = tmp_path / "egress.state"
    path.write_bytes(content)
    e = egress(state_path=path, sources=planned("ip2"), warmup={"w": {"days": [2]}})
    assert e.state.sent == {} and e.automation.active() == []
    assert [c.source is not None for c in choose(e, "google", T0, 3)] == [True, True, False]


def test_a_damaged_reputation_snapshot_starts_from_zero(tmp_path):
    path = tmp_path / "egress.state"
    path.write_bytes(msgspec.msgpack.encode({"day": DAY0, "sent": {"127.0.0.2": 1}, "reputation": b"\xc1\xc1"}))
    e = egress(state_path=path)
    assert e.reputation.counts("127.0.0.2", "google", T0).delivered == 0


# ---------------------------------------------------------------------- end to end

BODY = b"Subject: t\r\n\r\nhello\r\n"
GOOGLE_MX = SITES["google"]
OTHER_MX = "mx.other.test"


class OpenSink(Sink):
    """Counts the sessions it has open at once, per source IP."""

    def __init__(self, rules=None, **kw) -> None:
        super().__init__(rules, **kw)
        self.open: Counter = Counter()
        self.most_open: Counter = Counter()

    async def _serve(self, stream, peer) -> None:
        ip = peer.rpartition(":")[0]
        self.open[ip] += 1
        self.most_open[ip] = max(self.most_open[ip], self.open[ip])
        try:
            await super()._serve(stream, peer)
        finally:
            self.open[ip] -= 1


def engine_config(tmp_path, **extra):
    return parse_config({
        "spool": {"path": str(tmp_path / "spool"), "fsync": "never"},
        "listen": {"smtp": ""},
        "delivery": {"retry_interval": 60, "max_retry_interval": 300, "max_age": 86400, "starttls": "never"},
        "route": [{"match": "gmail.test", "relay": f"{GOOGLE_MX}:25"}, {"match": "*", "relay": f"{OTHER_MX}:25"}],
        "bounces": {"notify": False},
        "source": SOURCES,
        "egress": {"default_pool": "shared"},
        **extra,
    })


async def submit(engine, n, domain, prefix="u", **kw):
    for i in range(n):
        await engine.submit("s@app.test", [f"{prefix}{i}@{domain}"], BODY, **kw)


async def test_a_connection_limit_action_caps_that_sources_sessions_to_the_site(tmp_path, autojump_clock):
    sink = OpenSink([SinkRule(match="busy*", action="defer",
                              reply="421 4.7.0 Too many concurrent SMTP connections from this IP address"),
                     SinkRule(match="*", action="delay", delay=2.0)])
    cfg = engine_config(tmp_path, pool={"shared": {"sources": ["ip2"]}, "own": {"sources": ["ip3"], "dedicated": True}},
                        customer=[{"id": "c3", "pool": "own"}])
    with trio.fail_after(6 * 3600):                    # virtual seconds: fail, never hang
        async with trio.open_nursery() as n:
            engine = await start(n, cfg, Sinks(**{OTHER_MX: sink}))
            automation = engine.dispatcher.egress.automation
            await submit(engine, 20, "other.test")
            await until(lambda: engine.counts["delivered"] == 20)
            before = sink.most_open["127.0.0.2"]
            await until(lambda: not sink.open["127.0.0.2"])
            await submit(engine, 3, "other.test", prefix="busy")      # the built-in rule wants 3
            await until(lambda: automation.active(), step=1)
            [action] = automation.active()
            await until(lambda: not sink.open["127.0.0.2"])
            sink.most_open.clear()
            await submit(engine, 20, "other.test", prefix="after")
            await submit(engine, 20, "other.test", prefix="own", customer="c3")
            await until(lambda: engine.counts["delivered"] == 60)
            n.cancel_scope.cancel()
    assert (action.rule, action.kind, action.connection_limit) == ("too-many-connections", "connection_limit", 2)
    assert (action.source, action.site) == ("127.0.0.2", f"{OTHER_MX}:25")
    assert before >= 10
    assert 1 <= sink.most_open["127.0.0.2"] <= 2
    assert sink.most_open["127.0.0.3"] >= 10                   # another source to the same site: not capped


async def test_rate_limited_replies_lower_the_pairs_adaptive_rate(tmp_path, autojump_clock):
    google = Sink(simulate=SimulateConfig(provider="google", rate_limit="1/s", limited_sources=["127.0.0.2"]))
    cfg = engine_config(tmp_path, pool={"shared": {"sources": ["ip2"]}}, automation={"default_rules": False},
                        shaping={"provider": {"google": {"adaptive_rate": ADAPTIVE}}})
    with trio.fail_after(6 * 3600):                    # virtual seconds: fail, never hang
        async with trio.open_nursery() as n:
            engine = await start(n, cfg, Sinks(**{GOOGLE_MX: google}))
            shaper = engine.dispatcher.shaper
            rates = []
    
            def rate():
                bid = shaper._buckets.get(("pair", "127.0.0.2>google"))
                if bid is not None and (not rates or rates[-1] != shaper.scheduler.bucket_rate(bid)):
                    rates.append(shaper.scheduler.bucket_rate(bid))
                return rates[-1] if rates else None
    
            start_rate = engine.dispatcher.egress.pair_rate("127.0.0.2", "google", engine.now())
            await submit(engine, 150, "gmail.test")
            await until(lambda: (rate() or 20) < 20, step=0.01)
            in_egress = engine.dispatcher.egress.pair_rate("127.0.0.2", "google", engine.now())
            await until(lambda: rate() is not None and engine.counts["delivered"] == 150, step=0.5)
            n.cancel_scope.cancel()
    assert start_rate == 20
    assert rates[0] == in_egress == 10                 # halved by the first rate-limited reply
    assert min(rates) < 10                             # and again on later steps that were limited
    # The bucket follows the AIMD: halvings and steps of +1/s, nothing else.
    assert all(b == max(1.0, a / 2) or b == min(20.0, a + 1) for a, b in zip(rates, rates[1:]))
    assert google.simulator.statistics()["127.0.0.2"].rate_limited > 0
    assert google.simulator.statistics()["127.0.0.2"].accepted == 150
