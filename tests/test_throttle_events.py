"""Why mail waited and where it went: the buckets holding mail (``Shaper.holding``, the
``throttled`` events the dispatcher reports, the saturation metrics), the reason of each
source choice (``chosen`` on the outcome events), and ``sender explain`` telling both after
the fact.

Engine tests run on trio's autojump clock against in-memory sinks."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import orjson
import pytest
import trio

import sender.shaping
from sender.cli import main
from sender.config import parse_config
from sender.delivery import THROTTLE_REPORT
from sender.events import Event, EventLog
from sender.explain import explain, explain_live, render
from sender.model import Delivery
from sender.routing import Egress
from sender.shaping import Rules, Shaper

from helpers import Sinks, start_engine as start, until
from test_egress import SUSPEND_ON_GMAIL_RATE_LIMIT, SourceSink

BODY = b"Subject: t\r\n\r\nhello\r\n"
MX = "mx.test"
GOOGLE_MX = "gmail-smtp-in.l.google.com"
T0 = 1_795_500_000.0            # 2026-11-24T06:00:00Z


def config(tmp_path, **extra):
    return parse_config({
        "spool": {"path": str(tmp_path / "spool"), "fsync": "never"}, "listen": {"smtp": ""},
        "delivery": {"retry_interval": 60, "max_retry_interval": 300, "starttls": "never"},
        "route": [{"match": "gmail.test", "relay": f"{GOOGLE_MX}:25"}, {"match": "*", "relay": f"{MX}:25"}],
        "bounces": {"notify": False}, **extra})


def limited(tmp_path, rate="6/min", **extra):
    """acme's mail at ``rate`` (one at a time: the burst is one), everyone else's unlimited."""
    return config(tmp_path, shaping={"customer": {"acme": {"max_message_rate": rate}}}, **extra)


async def submit(engine, n, customer, domain="d.test") -> list[str]:
    return [await engine.submit("app@x.test", [f"{customer}{i}@{domain}"], BODY, customer=customer)
            for i in range(n)]


def events(engine, kind: str) -> list[Event]:
    return [ev for ev in engine.events.recent if ev.event == kind]


# ---------------------------------------------------------------------- the shaper's holds


@dataclass(eq=False)
class FakePath:
    key: str
    source: str
    provider: str
    site_bucket: int = -1


@pytest.mark.parametrize("level", ["customer", "domain", "provider", "source", "path", "pair"])
def test_holding_names_the_bucket_of_each_level_its_count_and_next_token(sched, monkeypatch, level):
    monkeypatch.setattr(sender.shaping, "Scheduler", sched.Scheduler)
    rate = {"max_message_rate": "1/min"}
    cfg = parse_config({
        "shaping": {"customer": {"acme": rate} if level == "customer" else {},
                    "domain": {"d.test": rate} if level == "domain" else {},
                    "source": {"127.0.0.2": rate} if level == "source" else {},
                    "provider": {"google": {"provider_max_message_rate": "1/min"}} if level == "provider" else {},
                    "default": rate if level == "path" else {}}})
    shaper = Shaper(Rules(cfg), T0)
    path = FakePath("127.0.0.2>mx.google.test:25", "127.0.0.2", "google")
    path.site_bucket = shaper.path_bucket(path, T0)
    if level == "pair":
        shaper.set_pair_rate("127.0.0.2", "google", 1 / 60, T0)
    assert shaper.holding(T0) == []
    for i in range(4):
        shaper.push(Delivery(f"m{i}", "s@x.test", "d.test", [f"u{i}@d.test"], 0, 0, 0, T0, customer="acme"), path, T0)
    assert shaper.pop(T0) is not None and shaper.pop(T0) is None       # one goes, three wait
    [hold] = shaper.holding(T0 + 1)
    key = {"customer": "acme", "domain": "d.test", "provider": "google", "source": "127.0.0.2",
           "path": path.key, "pair": "127.0.0.2>google"}[level]
    assert (hold.bucket, hold.level, hold.held) == (f"{level}:{key}", level, 3)
    assert hold.until == pytest.approx(T0 + 60)
    concerns = {"customer": {"customer": "acme"}, "domain": {"domain": "d.test"}, "provider": {"provider": "google"},
                "source": {"source": "127.0.0.2"},
                "path": {"source": "127.0.0.2", "site": "mx.google.test:25", "provider": "google"},
                "pair": {"source": "127.0.0.2", "provider": "google"}}[level]
    assert {f: getattr(hold, f) for f in ("customer", "domain", "provider", "source", "site") if getattr(hold, f)} \
        == concerns
    assert shaper.held(Delivery("m1", "", "d.test", [], 0, 0, 0, T0, customer="acme"), path, T0 + 1)[0] == hold.bucket


# ---------------------------------------------------------------------- throttled events


async def test_a_throttled_customers_mail_makes_throttled_events_naming_its_bucket(tmp_path, autojump_clock):
    sink = SourceSink()
    async with trio.open_nursery() as n:
        engine = await start(n, limited(tmp_path), Sinks(**{MX: sink}))
        await submit(engine, 10, "acme")
        await submit(engine, 10, "beta")
        await until(lambda: engine.counts["delivered"] == 20, step=1)
        await trio.sleep(3600)
        n.cancel_scope.cancel()
    throttled = events(engine, "throttled")
    assert throttled and {ev.detail["bucket"] for ev in throttled} == {"customer:acme"}
    assert {ev.customer for ev in throttled} == {"acme"}
    held = [ev.detail["held"] for ev in throttled]
    assert max(held) == 9 and held[-1] >= 1 and held == sorted(held, reverse=True)     # draining, one a token
    assert all(ev.detail["until"] > ev.time for ev in throttled)
    assert all(b.time - a.time >= THROTTLE_REPORT for a, b in zip(throttled, throttled[1:]))
    # Reported while it held mail, not after: the last report came before the last delivery.
    last = max(ev.time for ev in events(engine, "delivered"))
    assert throttled[-1].time < last


async def test_no_throttled_events_and_no_wake_ups_when_nothing_is_held(tmp_path, autojump_clock, monkeypatch):
    async with trio.open_nursery() as n:
        engine = await start(n, limited(tmp_path), Sinks(**{MX: SourceSink()}))
        await submit(engine, 20, "beta")                                   # beta is not limited
        await until(lambda: engine.counts["delivered"] == 20)
        loops = []
        monkeypatch.setattr(engine.dispatcher.shaper, "tick", loops.append)    # once per pass of the clock loop
        await trio.sleep(86400)
        n.cancel_scope.cancel()
    assert events(engine, "throttled") == []
    assert len(loops) <= 2                  # a quiet day: the clock loop slept through it


async def test_a_slow_bucket_is_reported_at_its_tokens_not_polled(tmp_path, autojump_clock):
    async with trio.open_nursery() as n:
        engine = await start(n, limited(tmp_path, rate="1/h"), Sinks(**{MX: SourceSink()}))
        await submit(engine, 2, "acme")                 # one goes, one waits
        await trio.sleep(THROTTLE_REPORT / 2)
        await submit(engine, 2, "acme")                 # behind it
        await until(lambda: engine.counts["delivered"] == 4, step=60)
        n.cancel_scope.cancel()
    t0 = engine.events.recent[0].time
    # Told at once, then at each token (once an hour), never every THROTTLE_REPORT.
    assert [(round(ev.time - t0), ev.detail["held"]) for ev in events(engine, "throttled")] == [
        (0, 1), (3600, 2), (7200, 1)]


async def test_a_bucket_that_starts_holding_is_told_within_the_report_interval(tmp_path, autojump_clock):
    cfg = config(tmp_path, shaping={"customer": {"acme": {"max_message_rate": "1/h"},
                                                 "beta": {"max_message_rate": "1/10min"}}})
    async with trio.open_nursery() as n:
        engine = await start(n, cfg, Sinks(**{MX: SourceSink()}))
        await submit(engine, 2, "acme")
        await trio.sleep(THROTTLE_REPORT / 2)           # reported at 0: the next report not before 10
        await submit(engine, 2, "beta")                 # beta's second waits until 605
        await until(lambda: engine.counts["delivered"] == 4, step=60)
        n.cancel_scope.cancel()
    t0 = engine.events.recent[0].time
    assert [(round(ev.time - t0), ev.customer, ev.detail["held"]) for ev in events(engine, "throttled")] == [
        (0, "acme", 1), (THROTTLE_REPORT, "acme", 1), (THROTTLE_REPORT, "beta", 1), (605, "acme", 1)]


# ---------------------------------------------------------------------- explain


async def test_explain_after_delivery_names_the_bucket_that_held_the_message(tmp_path, autojump_clock, capsys):
    async with trio.open_nursery() as n:
        engine = await start(n, limited(tmp_path), Sinks(**{MX: SourceSink()}))
        acme = await submit(engine, 6, "acme")
        beta = await submit(engine, 2, "beta")
        await until(lambda: engine.counts["delivered"] == 8, step=1)
        n.cancel_scope.cancel()
    spool = tmp_path / "spool"
    assert main(["explain", acme[-1], "--spool", str(spool)]) == 0
    text = capsys.readouterr().out
    assert "throttled   bucket customer:acme held 5 deliveries, its next token at " in text
    assert "more report(s) until" in text and text.splitlines()[-1] == "now: done (delivered)"
    lines = text.splitlines()
    assert lines.index(next(line for line in lines if "throttled" in line)) < \
        lines.index(next(line for line in lines if " delivered " in line))
    assert main(["explain", acme[-1], "--spool", str(spool), "--json"]) == 0
    story = orjson.loads(capsys.readouterr().out)
    assert story["throttles"] and {t["detail"]["bucket"] for t in story["throttles"]} == {"customer:acme"}
    assert all(t["time"] <= story["events"][-1]["time"] for t in story["throttles"])
    # The first of acme's left at once, and beta was never held: nothing to tell.
    assert explain([spool], acme[0]).throttles == [] and explain([spool], beta[0]).throttles == []
    assert "throttled" not in render(explain([spool], beta[0]))


def test_explain_takes_the_throttles_of_its_customer_domain_and_paths_while_it_waited(tmp_path):
    clock = type("Clock", (), {"t": T0, "__call__": lambda self: self.t})()
    log = EventLog(tmp_path, now=clock)
    site, other = "mx.outlook.test:25", "mx.other.test:25"

    def held(t, bucket, **fields):
        return Event(time=T0 + t, event="throttled", detail={"bucket": bucket, "held": 3, "until": T0 + t + 5},
                     **fields)

    for ev in [
        Event(time=T0, event="accepted", id="M", customer="acme", rcpts=["a@d.test", "b@d.test"]),
        held(1, "customer:acme", customer="acme"),                              # yes
        held(2, "customer:beta", customer="beta"),                              # another customer
        held(3, "domain:d.test", domain="d.test"),                              # yes
        held(4, "domain:e.test", domain="e.test"),                              # another domain
        held(5, "provider:microsoft", provider="microsoft"),                    # yes: the path it took
        held(6, "provider:google", provider="google"),                          # another provider
        held(7, f"path:127.0.0.2>{site}", source="127.0.0.2", site=site, provider="microsoft"),     # yes
        held(8, f"path:127.0.0.2>{other}", source="127.0.0.2", site=other),     # another site
        Event(time=T0 + 10, event="deferred", id="M", customer="acme", rcpts=["a@d.test", "b@d.test"],
              domain="d.test", source="127.0.0.2", site=site, provider="microsoft", next_at=T0 + 100),
        held(50, "customer:acme", customer="acme"),                             # waiting for its retry
        held(120, "source:127.0.0.2", source="127.0.0.2"),                      # yes
        Event(time=T0 + 130, event="delivered", id="M", customer="acme", rcpts=["a@d.test", "b@d.test"],
              domain="d.test", source="127.0.0.2", site=site, provider="microsoft",
              chosen="from pool shared (the default pool): 2 sources"),
        held(130, "customer:acme", customer="acme"),                            # done by then
        held(200, "customer:acme", customer="acme"),
    ]:
        clock.t = ev.time
        log.emit(ev)
    log.close()
    story = explain_live("M", tmp_path, [])
    assert [t.time - T0 for t in story.throttles] == [1, 3, 5, 7, 120]
    text = render(story)
    assert "source: from pool shared (the default pool): 2 sources" in text
    assert [line.split(" bucket ")[1].split()[0] for line in text.splitlines() if " throttled " in line] == [
        "customer:acme", "domain:d.test", "provider:microsoft", "path:127.0.0.2>mx.outlook.test:25",
        "source:127.0.0.2"]


# ---------------------------------------------------------------------- the source choice


async def test_the_chosen_reason_names_a_source_an_automation_rule_suspended(tmp_path, autojump_clock):
    google = SourceSink(provider="google", rate_limit="1/h", limited_sources=["127.0.0.3"])
    sources = {f"ip{i}": {"address": f"127.0.0.{i}"} for i in (2, 3)}
    cfg = config(tmp_path, source=sources, pool={"shared": {"sources": ["ip2", "ip3"]}},
                 egress={"default_pool": "shared"},
                 automation={"default_rules": False, "rule": [SUSPEND_ON_GMAIL_RATE_LIMIT]})
    async with trio.open_nursery() as n:
        engine = await start(n, cfg, Sinks(**{GOOGLE_MX: google}))
        await submit(engine, 40, "acme", "gmail.test")
        await until(lambda: engine.counts["delivered"] == 40, step=10)
        n.cancel_scope.cancel()
    recent = list(engine.events.recent)
    [action] = [i for i, ev in enumerate(recent) if ev.event == "automation"]
    outcomes = [ev for ev in recent if ev.event in ("delivered", "deferred")]
    assert all(ev.chosen.startswith("from pool shared (the default pool): ") for ev in outcomes)
    before = [ev.chosen for ev in recent[:action] if ev in outcomes]
    after = [ev.chosen for ev in recent[action:] if ev.time > recent[action].time and ev in outcomes]
    assert set(before) == {"from pool shared (the default pool): 2 sources"}
    assert after and set(after) == {"from pool shared (the default pool): 1 of 2 sources; 127.0.0.3 suspended "
                                    "for google by rule 'gmail-rate-limit-suspend'"}
    # Explain tells it for the attempt that went elsewhere after the suspension.
    moved = next(ev.id for ev in outcomes if ev.event == "deferred" and ev.source == "127.0.0.3")
    text = render(explain([tmp_path / "spool"], moved))
    assert "source: from pool shared (the default pool): 1 of 2 sources; 127.0.0.3 suspended" in text


def egress(**extra) -> Egress:
    today = datetime.datetime.fromtimestamp(T0, datetime.timezone.utc).date().isoformat()
    e = Egress(parse_config({
        "source": {f"ip{i}": {"address": f"127.0.0.{i}", **({"warmup": "w", "warmup_start": today} if i == 4 else {})}
                   for i in range(2, 8)},
        "warmup": {"w": {"days": [1]}},
        "pool": {"shared": {"sources": ["ip2", "ip3", "ip4"]}, "bulk": {"sources": ["ip5"]},
                 "own": {"sources": ["ip6", "ip7"], "dedicated": True}},
        "customer": [{"id": "big", "pool": "own"}],
        "egress": {"default_pool": "shared", "message_type": {"marketing": "bulk"}},
        "automation": {"default_rules": False}, **extra}))
    e.start(T0)
    return e


def reason(e: Egress, customer="", message_type="", provider="google") -> str:
    d = Delivery("m", "s@x.test", "gmail.test", ["u@gmail.test"], 0, 0, 0, T0, customer=customer,
                 message_type=message_type)
    choice = e.choose(d, provider, "gmail-smtp-in.l.google.com:25", T0)
    assert choice.source is not None
    return choice.reason


def test_the_chosen_reason_says_which_pool_why_and_what_was_left_out():
    e = egress()
    assert reason(e, "big") == "from pool own (the customer's dedicated pool): 2 sources"
    assert reason(e, "", "marketing") == "from pool bulk (the pool of marketing mail): its only source"
    assert reason(e) == "from pool shared (the default pool): 3 sources"
    assert reason(e, "big") is reason(e, "big")        # made once per situation
    while e.state.sent.get("127.0.0.4", 0) < 1:         # ip4's warmup cap (1 today) is used up
        reason(e)
    assert reason(e) == "from pool shared (the default pool): 2 of 3 sources; 127.0.0.4 sent its warmup cap for today"
    for _ in range(150):
        e.reputation.record("127.0.0.3", "google", "delivered", "", T0)
    e.reputation.record("127.0.0.3", "google", "complaint", "", T0)
    assert reason(e) == ("from pool shared (the default pool): 2 of 3 sources; 127.0.0.4 sent its warmup cap for "
                         "today; 127.0.0.3 weighted down (health 0.33)")
    assert reason(e, provider="microsoft").endswith("2 of 3 sources; 127.0.0.4 sent its warmup cap for today")


# ---------------------------------------------------------------------- metrics


def gauges(engine, name: str) -> dict[str, float]:
    out = {}
    for line in engine.metrics.page().decode().splitlines():
        if line.startswith(name + "{"):
            labels, value = line.rsplit(" ", 1)
            out[labels[labels.index('"') + 1:labels.rindex('"')]] = float(value)
    return out


async def test_metrics_show_the_deliveries_held_and_the_saturated_buckets_per_level(tmp_path, autojump_clock):
    async with trio.open_nursery() as n:
        engine = await start(n, config(tmp_path, shaping={"customer": {"acme": {"max_message_rate": "1/min"}},
                                                          "domain": {"slow.test": {"max_message_rate": "1/min"}}}),
                             Sinks(**{MX: SourceSink()}))
        assert gauges(engine, "sender_throttled_deliveries") == dict.fromkeys(
            ("customer", "domain", "provider", "source", "path", "pair"), 0.0)
        await submit(engine, 5, "acme")
        await submit(engine, 3, "beta", "slow.test")
        await trio.sleep(1)
        assert gauges(engine, "sender_throttled_deliveries") == {
            "customer": 4.0, "domain": 2.0, "provider": 0.0, "source": 0.0, "path": 0.0, "pair": 0.0}
        assert gauges(engine, "sender_saturated_buckets") == {
            "customer": 1.0, "domain": 1.0, "provider": 0.0, "source": 0.0, "path": 0.0, "pair": 0.0}
        await until(lambda: engine.counts["delivered"] == 8, step=10)
        assert set(gauges(engine, "sender_throttled_deliveries").values()) == {0.0}
        assert set(gauges(engine, "sender_saturated_buckets").values()) == {0.0}
        n.cancel_scope.cancel()
