"""Egress end to end on virtual time: pools, dedicated IPs, warmup caps, automation actions.

Engine + in-memory sinks on trio's autojump clock. Sources are 127.0.0.2 ... 127.0.0.9; each
sink sees the address a message left from (the in-memory peer is the bound source), as a
real MX host would.
"""

from __future__ import annotations

import datetime
import math
from collections import Counter

import orjson
import pytest
import trio

from sender.cli import main
from sender.config import ConfigError, parse_config
from sender.routing import DAY
from sender.simulator import SimulateConfig
from sender.sink import Sink

from helpers import Sinks, start_engine as start, until

BODY = b"Subject: t\r\n\r\nhello\r\n"
GOOGLE_MX = "gmail-smtp-in.l.google.com"
MICROSOFT_MX = "example-com.mail.protection.outlook.com"
OTHER_MX = "mx.other.test"
ROUTES = [("gmail.test", f"{GOOGLE_MX}:25"), ("outlook.test", f"{MICROSOFT_MX}:25"), ("*", f"{OTHER_MX}:25")]
SOURCES = {f"ip{i}": {"address": f"127.0.0.{i}", "ehlo": f"mta{i}.sender.test"} for i in range(2, 10)}


class SourceSink(Sink):
    """Keeps (virtual time, source IP, first recipient) of every accepted message."""

    def __init__(self, **simulate) -> None:
        super().__init__(simulate=SimulateConfig(**simulate) if simulate else None)
        self.seen: list[tuple[float, str, str]] = []
        self.helo: set[tuple[str, str]] = set()

    def record(self, ev, peer, *, helo="", **kw) -> None:
        super().record(ev, peer, helo=helo, **kw)
        self.seen.append((trio.current_time(), peer.rpartition(":")[0], ev.rcpts[0]))
        self.helo.add((peer.rpartition(":")[0], helo))

    def sources(self, since: float = -math.inf, until_: float = math.inf) -> Counter:
        return Counter(ip for t, ip, _ in self.seen if since <= t < until_)


def config(tmp_path, *, pools, customers=(), default_pool="shared", sources=None, **extra):
    return parse_config({
        "spool": {"path": str(tmp_path / "spool"), "fsync": "never"},
        "listen": {"smtp": ""},
        "delivery": {"retry_interval": 60, "max_retry_interval": 300, "max_age": 7 * 86400, "starttls": "never"},
        "route": [{"match": m, "relay": r} for m, r in ROUTES],
        "bounces": {"notify": False},
        "source": sources or SOURCES,
        "pool": pools,
        "customer": list(customers),
        "egress": {"default_pool": default_pool, **extra.pop("egress", {})},
        **extra,
    })


def today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).date().isoformat()


async def submit_many(engine, n, domain, **kw):
    for i in range(n):
        await engine.submit("s@app.test", [f"u{i}@{domain}"], BODY, **kw)


# ---------------------------------------------------------------------- automation


SUSPEND_ON_GMAIL_RATE_LIMIT = {"name": "gmail-rate-limit-suspend", "enhanced": "4.7.28", "provider": ["google"],
                               "count": 3, "window": "10m", "action": "suspend", "duration": "1h"}


async def test_a_rate_limited_source_is_suspended_for_that_provider_only(tmp_path, autojump_clock):
    google = SourceSink(provider="google", rate_limit="1/h", limited_sources=["127.0.0.3"])
    microsoft, other = SourceSink(), SourceSink()
    cfg = config(tmp_path, pools={"shared": {"sources": ["ip2", "ip3", "ip4"]}},
                 automation={"default_rules": False, "rule": [SUSPEND_ON_GMAIL_RATE_LIMIT]})
    async with trio.open_nursery() as n:
        engine = await start(n, cfg, Sinks(**{GOOGLE_MX: google, MICROSOFT_MX: microsoft, OTHER_MX: other}))
        automation = engine.dispatcher.egress.automation
        await submit_many(engine, 300, "gmail.test")
        await until(lambda: automation.active(), step=1)
        [action] = automation.active()
        assert (action.kind, action.source, action.provider, action.rule) == (
            "suspend", "127.0.0.3", "google", "gmail-rate-limit-suspend")
        assert len(action.replies) == 3 and all("4.7.28" in r and "unusual rate" in r for r in action.replies)
        assert action.until - action.started == 3600
        started = trio.current_time()
        # While .3 is suspended for Google, every source still sends elsewhere, .3 included.
        await trio.sleep(60)
        await submit_many(engine, 300, "gmail.test", customer="later")
        await submit_many(engine, 150, "outlook.test")
        await submit_many(engine, 150, "other.test")
        await until(lambda: engine.counts["delivered"] == 900, step=60)
        n.cancel_scope.cancel()
    assert google.sources(started + 1, started + 3600)["127.0.0.3"] == 0
    assert set(google.sources(started + 1, started + 3600)) == {"127.0.0.2", "127.0.0.4"}
    assert set(microsoft.sources()) == set(other.sources()) == {"127.0.0.2", "127.0.0.3", "127.0.0.4"}
    assert len(google.seen) == 600                     # every message delivered in the end
    assert google.simulator.statistics()["127.0.0.3"].rate_limited >= 3


async def test_the_builtin_gmail_rule_caps_the_rate_of_the_pair(tmp_path, autojump_clock):
    google = SourceSink(provider="google", rate_limit="1/h", limited_sources=["127.0.0.2"])
    cfg = config(tmp_path, pools={"shared": {"sources": ["ip2"]}})
    async with trio.open_nursery() as n:
        engine = await start(n, cfg, Sinks(**{GOOGLE_MX: google}))
        await submit_many(engine, 20, "gmail.test")
        egress = engine.dispatcher.egress
        await until(lambda: egress.automation.active(), step=1)
        action = egress.automation.active()[0]
        assert (action.rule, action.kind, action.max_message_rate) == (
            "google-unsolicited-rate-limited", "max_message_rate", "10/min")
        assert egress.pair_rate("127.0.0.2", "google", trio.current_time()) == pytest.approx(10 / 60)
        n.cancel_scope.cancel()


async def test_mail_held_by_a_suspension_comes_back_spread_out(tmp_path, autojump_clock):
    google = SourceSink(provider="google", rate_limit="1/h", limited_sources=["127.0.0.5"])
    cfg = config(tmp_path, pools={"shared": {"sources": ["ip2"]}, "acme": {"sources": ["ip5"], "dedicated": True}},
                 customers=[{"id": "acme", "pool": "acme"}],
                 automation={"default_rules": False, "rule": [{**SUSPEND_ON_GMAIL_RATE_LIMIT, "count": 1}]})
    async with trio.open_nursery() as n:
        engine = await start(n, cfg, Sinks(**{GOOGLE_MX: google}))
        await submit_many(engine, 2, "gmail.test", customer="acme")
        await until(lambda: engine.dispatcher.egress.automation.active(), step=1)
        [action] = engine.dispatcher.egress.automation.active()
        t_end = action.until - engine.now() + trio.current_time()
        google.simulator.config.limited_sources = ["192.0.2.1"]     # the provider lets up
        await submit_many(engine, 100, "gmail.test", customer="acme")
        await until(lambda: engine.counts["delivered"] == 102, step=30)
        n.cancel_scope.cancel()
    # The dedicated pool has no other source: its mail waited for the end, then came back
    # over the next minutes (a tenth of the wait: 6 minutes), not in one burst.
    times = sorted(t for t, ip, _ in google.seen if ip == "127.0.0.5")
    assert len(times) == 102 and times[1] >= t_end
    assert 200 < times[-1] - times[1] <= 360
    assert max(Counter(int(t) for t in times[1:]).values()) < 10


async def test_suspension_and_warmup_counts_survive_a_restart(tmp_path, autojump_clock, capsys):
    google = SourceSink(provider="google", rate_limit="1/h", limited_sources=["127.0.0.2"])
    sources = {**SOURCES, "ip3": {**SOURCES["ip3"], "warmup": "w", "warmup_start": today()}}
    cfg = config(tmp_path, pools={"shared": {"sources": ["ip2", "ip3"]}}, sources=sources,
                 warmup={"w": {"days": [5]}},
                 automation={"default_rules": False, "rule": [{**SUSPEND_ON_GMAIL_RATE_LIMIT, "count": 1}]})
    async with trio.open_nursery() as n:
        engine = await start(n, cfg, Sinks(**{GOOGLE_MX: google}))
        await submit_many(engine, 3, "other.test")
        for _ in range(30):
            await submit_many(engine, 1, "gmail.test")
            if engine.dispatcher.egress.automation.active():
                break
            await trio.sleep(1)
        sent_before = engine.dispatcher.egress.state.sent.get("127.0.0.3", 0)
        n.cancel_scope.cancel()
    assert (tmp_path / "spool" / "egress.state").exists()
    assert main(["egress", "--spool", str(tmp_path / "spool")]) == 0
    shown = orjson.loads(capsys.readouterr().out)
    assert [(a["rule"], a["action"], a["source"], a["toward"]) for a in shown["actions"]] == [
        ("gmail-rate-limit-suspend", "suspend", "127.0.0.2", "google")]
    assert "4.7.28" in shown["actions"][0]["replies"][0] and shown["sent_today"]["127.0.0.3"] == sent_before
    async with trio.open_nursery() as n:
        engine = await start(n, cfg, Sinks(**{GOOGLE_MX: google}))
        egress = engine.dispatcher.egress
        [action] = egress.automation.active()
        assert (action.source, action.provider) == ("127.0.0.2", "google")
        # Taken up, not started again (replayed mail routed since may have added to it).
        assert egress.state.sent.get("127.0.0.3", 0) >= sent_before > 0
        n.cancel_scope.cancel()


# ---------------------------------------------------------------------- pools


async def test_dedicated_and_shared_pools_never_mix(tmp_path, autojump_clock):
    other = SourceSink()
    cfg = config(tmp_path,
                 pools={"shared": {"sources": ["ip2", "ip3", "ip4"]}, "bulk": {"sources": ["ip7", "ip8"]},
                        "acme": {"sources": ["ip5", "ip6"], "dedicated": True}},
                 customers=[{"id": "acme", "pool": "acme"}, {"id": "beta"}],
                 egress={"message_type": {"marketing": "bulk"}})
    async with trio.open_nursery() as n:
        engine = await start(n, cfg, Sinks(**{OTHER_MX: other}))
        for customer in ("acme", "beta", ""):
            for message_type in ("transactional", "marketing"):
                await submit_many(engine, 60, f"{customer or 'none'}-{message_type}.test", customer=customer,
                                  message_type=message_type)
        await until(lambda: engine.counts["delivered"] == 360)
        n.cancel_scope.cancel()
    by_domain: dict[str, set[str]] = {}
    for _, ip, rcpt in other.seen:
        by_domain.setdefault(rcpt.partition("@")[2], set()).add(ip)
    assert by_domain["acme-transactional.test"] == by_domain["acme-marketing.test"] == {"127.0.0.5", "127.0.0.6"}
    assert by_domain["beta-transactional.test"] == by_domain["none-transactional.test"] == {
        "127.0.0.2", "127.0.0.3", "127.0.0.4"}
    assert by_domain["beta-marketing.test"] == by_domain["none-marketing.test"] == {"127.0.0.7", "127.0.0.8"}


async def test_weights_split_the_traffic(tmp_path, autojump_clock):
    other = SourceSink()
    cfg = config(tmp_path, pools={"shared": {"sources": {"ip2": 3, "ip3": 1}}})
    async with trio.open_nursery() as n:
        engine = await start(n, cfg, Sinks(**{OTHER_MX: other}))
        await submit_many(engine, 800, "other.test")
        await until(lambda: engine.counts["delivered"] == 800)
        n.cancel_scope.cancel()
    share = other.sources()["127.0.0.2"] / 800
    assert 0.68 < share < 0.82


async def test_each_source_binds_its_address_and_says_its_own_ehlo_name(tmp_path, autojump_clock):
    other = SourceSink()
    cfg = config(tmp_path, pools={"shared": {"sources": ["ip2", "ip3"]}})
    async with trio.open_nursery() as n:
        engine = await start(n, cfg, Sinks(**{OTHER_MX: other}))
        await submit_many(engine, 40, "other.test")
        await until(lambda: engine.counts["delivered"] == 40)
        n.cancel_scope.cancel()
    assert other.helo == {("127.0.0.2", "mta2.sender.test"), ("127.0.0.3", "mta3.sender.test")}


@pytest.mark.parametrize("change, message", [
    ({"pool": {"shared": {"sources": ["nope"]}}}, "pool.shared.sources: no [source.nope]"),
    ({"pool": {"shared": {"sources": {"ip2": 0}}}}, "pool.shared.sources: weight of 'ip2' must be above 0"),
    ({"pool": {"shared": {"sources": ["ip2"]}, "d": {"sources": ["ip2"], "dedicated": True}}},
     "pool.d.sources: 'ip2' is dedicated there and also in shared pool 'shared'"),
    ({"customer": [{"id": "a", "pool": "nope"}]}, "customer[0].pool: no [pool.nope]"),
    ({"egress": {"default_pool": "d"}, "pool": {"d": {"sources": ["ip2"], "dedicated": True}}},
     "egress.default_pool: 'd' is a dedicated pool"),
    ({"source": {"x": {"address": "mta.example"}}}, "source.x.address: expected an IP address"),
    ({"source": {"x": {"address": "127.0.0.2", "warmup": "fast", "warmup_start": "2026-01-01"}}},
     "source.x.warmup: no plan [warmup.fast]"),
    ({"source": {"x": {"address": "127.0.0.2", "warmup": "default"}}}, "source.x.warmup_start: needed"),
    ({"source": {"x": {"address": "127.0.0.2", "warmup": "default", "warmup_start": "1 Nov"}}},
     "source.x.warmup_start: expected a date"),
    ({"warmup": {"w": {"days": [10, 0]}}}, "warmup.w.days: daily caps must be at least 1"),
    ({"automation": {"rule": [{"name": "r", "category": "rate_limit"}]}},
     "automation.rule[0].category: 'rate_limit' is not a category"),
    ({"automation": {"rule": [{"name": "r", "enhanced": "4.7."}]}}, "automation.rule[0].enhanced: expected"),
    ({"automation": {"rule": [{"name": "r", "code": 421, "action": "reroute"}]}},
     "automation.rule[0].pool: needed with action \"reroute\""),
    ({"automation": {"rule": [{"name": "r", "code": 421, "action": "reroute", "pool": "d"}]},
      "pool": {"shared": {"sources": ["ip2"]}, "d": {"sources": ["ip3"], "dedicated": True}}},
     "automation.rule[0].pool: 'd' is a dedicated pool"),
    ({"shaping": {"provider": {"google": {"adaptive_rate": {"min": "10/s", "max": "1/s"}}}}},
     "shaping.provider.google.adaptive_rate.min: above max"),
])
def test_config_errors_name_the_key(tmp_path, change, message):
    data = {"source": SOURCES, "pool": {"shared": {"sources": ["ip2"]}}, "egress": {"default_pool": "shared"}}
    for key, value in change.items():
        data[key] = {**data[key], **value} if key == "egress" else value
    if "pool" in change and "egress" not in change and "shared" not in change["pool"]:
        data["egress"] = {"default_pool": next(iter(change["pool"]))}
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    assert str(e.value).startswith(message), str(e.value)


# ---------------------------------------------------------------------- warmup


def engine_day(engine, t: float) -> int:
    """The UTC day number of virtual time ``t`` as the engine sees it."""
    return int((engine.now() - trio.current_time() + t) // DAY)


async def test_warmup_caps_hold_per_day_and_the_rest_waits(tmp_path, autojump_clock):
    other = SourceSink()
    sources = {"ip2": {**SOURCES["ip2"], "warmup": "w", "warmup_start": today()}}
    cfg = config(tmp_path, pools={"shared": {"sources": ["ip2"], "overflow": "wait"}}, sources=sources,
                 warmup={"w": {"days": [10, 20, 40]}})
    async with trio.open_nursery() as n:
        engine = await start(n, cfg, Sinks(**{OTHER_MX: other}))
        await submit_many(engine, 100, "other.test")
        await until(lambda: engine.counts["delivered"] == 100, step=600)
        per_day = Counter(engine_day(engine, t) for t, _, _ in other.seen)
        first = engine_day(engine, 0.0)
        n.cancel_scope.cancel()
    assert [per_day[first + i] for i in range(4)] == [10, 20, 40, 30]


async def test_warmup_overflows_to_the_rest_of_the_pool(tmp_path, autojump_clock):
    other = SourceSink()
    sources = {**SOURCES, "ip2": {**SOURCES["ip2"], "warmup": "w", "warmup_start": today()}}
    cfg = config(tmp_path, pools={"shared": {"sources": ["ip2", "ip3"]}}, sources=sources,
                 warmup={"w": {"days": [10], "provider": {"google": [3]}}})
    google = SourceSink()
    async with trio.open_nursery() as n:
        engine = await start(n, cfg, Sinks(**{OTHER_MX: other, GOOGLE_MX: google}))
        await submit_many(engine, 20, "gmail.test")
        await submit_many(engine, 100, "other.test")
        await until(lambda: engine.counts["delivered"] == 120)
        n.cancel_scope.cancel()
    assert google.sources()["127.0.0.2"] == 3                  # its cap for Google
    assert google.sources()["127.0.0.2"] + other.sources()["127.0.0.2"] == 10      # its cap in all
    assert google.sources()["127.0.0.3"] + other.sources()["127.0.0.3"] == 110


async def test_warmup_counts_survive_a_restart(tmp_path, autojump_clock):
    other = SourceSink()
    sources = {"ip2": {**SOURCES["ip2"], "warmup": "w", "warmup_start": today()}}
    cfg = config(tmp_path, pools={"shared": {"sources": ["ip2"], "overflow": "wait"}}, sources=sources,
                 warmup={"w": {"days": [10, 20]}})
    async with trio.open_nursery() as n:
        engine = await start(n, cfg, Sinks(**{OTHER_MX: other}))
        await submit_many(engine, 6, "other.test")
        await until(lambda: engine.counts["delivered"] == 6)
        n.cancel_scope.cancel()
    async with trio.open_nursery() as n:
        engine = await start(n, cfg, Sinks(**{OTHER_MX: other}))
        await submit_many(engine, 10, "other.test")
        day = engine_day(engine, trio.current_time())
        await until(lambda: engine.counts["delivered"] == 10, step=600)
        per_day = Counter(engine_day(engine, t) for t, _, _ in other.seen)
        n.cancel_scope.cancel()
    assert (per_day[day], per_day[day + 1]) == (10, 6)          # 6 + 4 on the first day


# ---------------------------------------------------------------------- reports after delivery


def complaint_for(verp: str, rcpt: str) -> bytes:
    """An ARF complaint (RFC 5965) about a message, sent to its return path."""
    return (f"From: fbl@isp.test\r\nTo: <{verp}>\r\nSubject: complaint\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/report; report-type=feedback-report; boundary="b"\r\n\r\n'
            "--b\r\nContent-Type: text/plain\r\n\r\nThis is an abuse report.\r\n"
            "--b\r\nContent-Type: message/feedback-report\r\n\r\n"
            f"Feedback-Type: abuse\r\nUser-Agent: isp/1\r\nVersion: 1\r\nOriginal-Rcpt-To: {rcpt}\r\n"
            "--b\r\nContent-Type: text/rfc822-headers\r\n\r\nSubject: s\r\n--b--\r\n").encode()


async def test_a_complaint_after_delivery_counts_against_the_source_that_sent_it(tmp_path, autojump_clock):
    google = SourceSink()
    google.messages = []
    cfg = config(tmp_path, pools={"shared": {"sources": ["ip3"]}}, bounces={"domain": "bounces.sender.test",
                                                                         "notify": False})
    async with trio.open_nursery() as n:
        engine = await start(n, cfg, Sinks(**{GOOGLE_MX: google}))
        await engine.submit("s@app.test", ["reader@gmail.test"], BODY, customer="acme")
        await until(lambda: engine.counts["delivered"] == 1)
        verp = google.messages[0]["from"]
        assert verp.startswith("bounces+") and "x7f000003" in verp        # the source, in hex
        engine.take_report([verp], complaint_for(verp, "reader@gmail.test"))
        counts = engine.dispatcher.egress.reputation.counts("127.0.0.3", "google", engine.now())
        n.cancel_scope.cancel()
    assert counts.complaints == 1
    assert engine.suppression.check("acme", "reader@gmail.test", engine.now()).reason == "complaint"


async def test_a_reload_moves_new_mail_to_the_new_pools(tmp_path, autojump_clock):
    other = SourceSink()
    before = config(tmp_path, pools={"shared": {"sources": ["ip2"]}})
    after = config(tmp_path, pools={"shared": {"sources": ["ip2"]}, "acme": {"sources": ["ip5"], "dedicated": True}},
                   customers=[{"id": "acme", "pool": "acme"}])
    async with trio.open_nursery() as n:
        engine = await start(n, before, Sinks(**{OTHER_MX: other}))
        await submit_many(engine, 5, "other.test", customer="acme")
        await until(lambda: engine.counts["delivered"] == 5)
        engine.dispatcher.replace_rules(after)            # what SIGHUP does
        await submit_many(engine, 5, "late.test", customer="acme")
        await until(lambda: engine.counts["delivered"] == 10)
        n.cancel_scope.cancel()
    by_domain = Counter((rcpt.partition("@")[2], ip) for _, ip, rcpt in other.seen)
    assert by_domain == {("other.test", "127.0.0.2"): 5, ("late.test", "127.0.0.5"): 5}


async def test_explain_tells_the_deferrals_the_automation_and_the_delivery(tmp_path, autojump_clock, capsys):
    from sender.explain import explain, render

    google = SourceSink(provider="google", rate_limit="1/h", limited_sources=["127.0.0.3"])
    cfg = config(tmp_path, pools={"shared": {"sources": ["ip2", "ip3"]}},
                 automation={"default_rules": False, "rule": [SUSPEND_ON_GMAIL_RATE_LIMIT]})
    async with trio.open_nursery() as n:
        engine = await start(n, cfg, Sinks(**{GOOGLE_MX: google}))
        await submit_many(engine, 40, "gmail.test")
        await until(lambda: engine.counts["delivered"] == 40, step=10)
        n.cancel_scope.cancel()
    spool = tmp_path / "spool"
    lines = [orjson.loads(line) for f in sorted((spool / "events").iterdir()) for line in f.read_bytes().splitlines()]
    deferred = {e["id"] for e in lines if e["event"] == "deferred" and e.get("source") == "127.0.0.3"}
    msg_id = sorted(deferred)[0]
    story = explain([spool], msg_id)
    text = render(story)
    assert [e.event for e in story.events][0] == "accepted" and story.events[-1].event == "delivered"
    assert story.events[-1].source == "127.0.0.2" and not story.queued
    assert "via 127.0.0.3 -> " in text and "4.7.28" in text and "[rate_limited]" in text and "attempt 1" in text
    # The rule fired while this message waited for its retry.
    assert [a.detail["rule"] for a in story.actions] == ["gmail-rate-limit-suspend"]
    assert "rule gmail-rate-limit-suspend: suspend 127.0.0.3 toward google until " in text
    assert [e["detail"]["rule"] for e in lines if e["event"] == "automation"] == ["gmail-rate-limit-suspend"]
    assert text.splitlines()[-1] == "now: done (delivered)"
    assert main(["explain", msg_id, "--spool", str(spool), "--json"]) == 0
    assert orjson.loads(capsys.readouterr().out)["id"] == msg_id
    assert main(["explain", "0000000000000000F", "--spool", str(spool)]) == 1
