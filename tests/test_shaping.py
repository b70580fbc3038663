"""Traffic shaping end to end on virtual time: every level's limit holds at the sink.

Engine + in-memory sinks (see test_delivery.py), trio's autojump clock: hours of throttled
sending take a second. Times are read at the sink, when a message is accepted.
"""

from __future__ import annotations

import math

import pytest
import trio

from sender.config import ConfigError, parse_config, parse_rate
from sender.engine import Engine
from sender.model import Reply
from sender.shaping import Rules, is_rate_limited
from sender.sink import Sink, load_rules

from helpers import Sinks, start_engine as start, until

BODY = b"Subject: t\r\n\r\nhello\r\n"


class TimedSink(Sink):
    """Keeps (virtual time, first recipient) of every accepted message, and the most
    sessions it had open at once."""

    def __init__(self, rules=None) -> None:
        super().__init__(rules)
        self.seen: list[tuple[float, str]] = []
        self.open = self.most_open = 0

    def record(self, ev, peer, **kw) -> None:
        super().record(ev, peer, **kw)
        self.seen.append((trio.current_time(), ev.rcpts[0]))

    async def _serve(self, stream, peer) -> None:
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            await super()._serve(stream, peer)
        finally:
            self.open -= 1


def config(tmp_path, routes, shaping=None, **delivery):
    return parse_config({
        "spool": {"path": str(tmp_path / "spool"), "fsync": "never"},
        "listen": {"smtp": ""},
        "delivery": {"retry_interval": 60, "max_retry_interval": 600, "max_age": 86400, "starttls": "never",
                     **delivery},
        "route": [{"match": m, "relay": r} for m, r in routes],
        "shaping": shaping or {},
        "bounces": {"notify": False},
    })


def most_in_any_window(times: list[float], window: float) -> int:
    """The most events in any half-open window [t, t + window)."""
    times = sorted(times)
    best = j = 0
    for i, t in enumerate(times):
        while j < len(times) and times[j] < t + window - 1e-9:
            j += 1
        best = max(best, j - i)
    return best


async def test_domain_limit_holds_and_other_domains_are_not_delayed(tmp_path, autojump_clock):
    sink = TimedSink()
    cfg = config(tmp_path, [("*", "mx:25")], {"domain": {"limited.test": {"max_message_rate": "10/min"}}})
    async with trio.open_nursery() as n:
        engine = await start(n, cfg, Sinks(mx=sink))
        t0 = trio.current_time()
        for i in range(1000):
            await engine.submit("s@x.test", [f"u{i}@limited.test"], BODY)
            if i % 10 == 0:
                await engine.submit("s@x.test", [f"u{i}@free.test"], BODY)
        await until(lambda: engine.counts["delivered"] == 1100, step=30)
        n.cancel_scope.cancel()
    limited = [t - t0 for t, rcpt in sink.seen if rcpt.endswith("@limited.test")]
    free = [t - t0 for t, rcpt in sink.seen if rcpt.endswith("@free.test")]
    assert len(limited) == 1000
    assert most_in_any_window(limited, 60.0) == 10
    assert max(limited) == pytest.approx(999 * 6.0, abs=2)      # and the limit is used in full
    assert max(free) < 1.0


async def test_customer_limit_holds_across_domains_and_sites(tmp_path, autojump_clock):
    a, b = TimedSink(), TimedSink()
    cfg = config(tmp_path, [(".a.test", "mxa:25"), (".b.test", "mxb:25")],
                 {"customer": {"acme": {"max_message_rate": "60/min"}}})
    async with trio.open_nursery() as n:
        engine = await start(n, cfg, Sinks(mxa=a, mxb=b))
        t0 = trio.current_time()
        for i in range(300):
            site = "a" if i % 2 else "b"
            await engine.submit("s@x.test", [f"u{i}@d{i % 30}.{site}.test"], BODY, customer="acme")
        for i in range(50):
            await engine.submit("s@x.test", [f"other{i}@d{i}.a.test"], BODY, customer="other")
        await until(lambda: engine.counts["delivered"] == 350, step=5)
        n.cancel_scope.cancel()
    acme = [t - t0 for s in (a, b) for t, rcpt in s.seen if rcpt.startswith("u")]
    other = [t - t0 for t, rcpt in a.seen if rcpt.startswith("other")]
    assert len(acme) == 300
    assert most_in_any_window(acme, 10.0) == 10
    assert max(acme) == pytest.approx(299.0, abs=2)
    assert max(other) < 1.0


async def test_provider_limit_holds_across_all_domains_sharing_its_mx(tmp_path, autojump_clock):
    big, small = TimedSink(), TimedSink()
    routes = [(f"d{i}.test", "mx1.bigmail.example:25") for i in range(5)] + [("small.test", "mx.small:25")]
    cfg = config(tmp_path, routes, {"provider": {"bigmail": {"match": [".bigmail.example"],
                                                             "provider_max_message_rate": "5/s,burst=1"}}})
    async with trio.open_nursery() as n:
        engine = await start(n, cfg, Sinks(**{"mx1.bigmail.example": big, "mx.small": small}))
        t0 = trio.current_time()
        for i in range(200):
            await engine.submit("s@x.test", [f"u{i}@d{i % 5}.test"], BODY)
            await engine.submit("s@x.test", [f"u{i}@small.test"], BODY)
        await until(lambda: engine.counts["delivered"] == 400, step=1)
        stats = {p.site: p for p in engine.dispatcher.statistics()}
        n.cancel_scope.cancel()
    times = [t - t0 for t, _ in big.seen]
    assert most_in_any_window(times, 1.0) == 5
    assert max(times) == pytest.approx(199 / 5, abs=1)
    assert max(t - t0 for t, _ in small.seen) < 1.0
    assert stats["mx1.bigmail.example:25"].provider == "bigmail"


async def test_source_ip_limit_holds_across_providers(tmp_path, autojump_clock):
    g, m = TimedSink(), TimedSink()
    cfg = config(tmp_path, [("gmail.test", "mx.google.com:25"), ("outlook.test", "x.protection.outlook.com:25")],
                 {"source": {"127.0.0.2": {"max_message_rate": "2/s,burst=1"}}}, source="127.0.0.2")
    async with trio.open_nursery() as n:
        engine = await start(n, cfg, Sinks(**{"mx.google.com": g, "x.protection.outlook.com": m}))
        t0 = trio.current_time()
        for i in range(60):
            await engine.submit("s@x.test", [f"u{i}@{'gmail' if i % 2 else 'outlook'}.test"], BODY)
        await until(lambda: engine.counts["delivered"] == 60, step=1)
        providers = {p.provider for p in engine.dispatcher.statistics()}
        n.cancel_scope.cancel()
    times = [t - t0 for s in (g, m) for t, _ in s.seen]
    assert most_in_any_window(times, 1.0) == 2
    assert max(times) == pytest.approx(59 / 2, abs=1)
    assert providers == {"google", "microsoft"}


async def test_higher_priority_goes_first_within_the_same_limits(tmp_path, autojump_clock):
    sink = TimedSink()
    cfg = config(tmp_path, [("*", "mx:25")], {"customer": {"acme": {"max_message_rate": "1/s"}}})
    async with trio.open_nursery() as n:
        engine = await start(n, cfg, Sinks(mx=sink))
        for i in range(20):
            await engine.submit("s@x.test", [f"bulk{i}@y.test"], BODY, customer="acme", message_type="marketing")
        for i in range(5):
            await engine.submit("s@x.test", [f"receipt{i}@z.test"], BODY, customer="acme",
                                message_type="transactional")
        await until(lambda: engine.counts["delivered"] == 25, step=1)
        n.cancel_scope.cancel()
    order = [rcpt for _, rcpt in sink.seen]
    # The first bulk message went before the receipts existed; every receipt comes next.
    assert [r[:7] for r in order[1:6]] == ["receipt"] * 5


async def test_a_throttled_site_and_a_failing_site_never_delay_another(tmp_path, autojump_clock):
    slow = TimedSink(load_rules('[[rule]]\nmatch = "*"\naction = "defer"\ndelay = 30\nreply = "451 4.3.0 slow"'))
    fast = TimedSink()
    cfg = config(tmp_path, [("slow.test", "slow:25"), ("down.test", "down:25"), ("limited.test", "fast:25"),
                            ("fast.test", "fast:25")],
                 {"domain": {"limited.test": {"max_message_rate": "1/h"}}}, connection_limit=2)

    async def open_stream(host, port, source=""):
        if host == "down":
            raise OSError(111, "Connection refused")
        return await {"fast": fast, "slow": slow}[host].open_stream(host, port, source)

    async with trio.open_nursery() as n:
        for s in (slow, fast):
            await n.start(s.run_in_memory)
        engine = await n.start(Engine(cfg, open_stream=open_stream).run)
        t0 = trio.current_time()
        for i in range(100):
            for domain in ("slow.test", "down.test", "limited.test", "fast.test"):
                await engine.submit("s@x.test", [f"u{i}@{domain}"], BODY)
        await until(lambda: len([r for _, r in fast.seen if r.endswith("@fast.test")]) == 100, step=0.01)
        done = trio.current_time() - t0
        n.cancel_scope.cancel()
    assert done < 1.0


async def test_rate_limiting_replies_put_the_path_in_backoff_which_recovers_step_by_step(tmp_path, autojump_clock):
    rules = ('[[rule]]\nmatch = "*"\naction = "defer"\n'
             'reply = "421 4.7.28 Our system has detected an unusual rate of unsolicited mail"')
    sink = TimedSink(load_rules(rules))
    cfg = config(tmp_path, [("*", "mx:25")], {"default": {"backoff_max_message_rate": "1/s", "backoff_step": "1m"}},
                 retry_interval=3600, max_retry_interval=3600)
    async with trio.open_nursery() as n:
        engine = await start(n, cfg, Sinks(mx=sink))
        for i in range(5):
            await engine.submit("s@x.test", [f"u{i}@y.test"], BODY)
        await until(lambda: engine.counts["deferred"] >= 1, step=0.1)
        (pool,) = engine.dispatcher.pools.values()
        assert engine.dispatcher.shaper.in_backoff(pool) == 1.0
        sink.rules = []                                  # the provider is happy again
        t0 = trio.current_time()
        for i in range(30):
            await engine.submit("s@x.test", [f"v{i}@y.test"], BODY)
        await until(lambda: len(sink.seen) == 30, step=0.1)
        slowed = [t - t0 for t, _ in sink.seen]
        rates = []
        for _ in range(8):
            await trio.sleep(60)
            rates.append(engine.dispatcher.shaper.in_backoff(pool))
        n.cancel_scope.cancel()
    assert most_in_any_window(slowed, 1.0) == 1 and max(slowed) >= 28
    # Doubles once a minute from 1/s; an unlimited path is back to normal after six steps.
    assert rates[:5] == [2.0, 4.0, 8.0, 16.0, 32.0]
    assert rates[-1] is None


async def test_new_rules_apply_at_run_time_and_queued_mail_keeps_its_place(tmp_path, autojump_clock):
    sink = TimedSink()
    shaping = {"domain": {"y.test": {"max_message_rate": "1/h"}}}
    async with trio.open_nursery() as n:
        engine = await start(n, config(tmp_path, [("*", "mx:25")], shaping), Sinks(mx=sink))
        for i in range(50):
            await engine.submit("s@x.test", [f"u{i}@y.test"], BODY)
        await trio.sleep(60)
        assert len(sink.seen) == 1
        t0 = trio.current_time()
        engine.dispatcher.replace_rules(config(tmp_path, [("*", "mx:25")],
                                               {"domain": {"y.test": {"max_message_rate": "10/s,burst=1"}}}))
        await until(lambda: len(sink.seen) == 50, step=0.1)
        n.cancel_scope.cancel()
    assert [r for _, r in sink.seen] == [f"u{i}@y.test" for i in range(50)]
    assert max(t for t, _ in sink.seen) - t0 == pytest.approx(4.9, abs=0.3)


async def test_a_new_provider_block_applies_to_paths_already_open(tmp_path, autojump_clock):
    sink = TimedSink(load_rules('[[rule]]\nmatch = "*"\naction = "delay"\ndelay = 1'))
    routes = [("y.test", "mx1.bigmail.example:25")]
    async with trio.open_nursery() as n:
        engine = await start(n, config(tmp_path, routes, connection_limit=5), Sinks(**{"mx1.bigmail.example": sink}))
        for i in range(10):
            await engine.submit("s@x.test", [f"u{i}@y.test"], BODY)
        await trio.sleep(0.5)                          # five connections busy, five messages queued
        engine.dispatcher.replace_rules(config(tmp_path, routes, {"provider": {"bigmail": {
            "match": [".bigmail.example"], "provider_max_message_rate": "1/h", "provider_connection_limit": 1}}},
            connection_limit=5))
        for i in range(10, 20):
            await engine.submit("s@x.test", [f"u{i}@y.test"], BODY)
        await trio.sleep(600)
        (stats,) = engine.dispatcher.statistics()
        gate = engine.dispatcher.connections.open
        n.cancel_scope.cancel()
    assert stats.provider == "bigmail"
    assert len(sink.seen) == 11                        # the first ten, then one token of the new limit
    assert gate == {"": 0, "bigmail": 0}


async def test_provider_connection_limit_spans_its_sites(tmp_path, autojump_clock):
    slow = TimedSink(load_rules('[[rule]]\nmatch = "*"\naction = "delay"\ndelay = 5'))
    routes = [(f"d{i}.test", f"mx{i}.bigmail.example:25") for i in range(3)]
    cfg = config(tmp_path, routes, {"provider": {"bigmail": {"match": [".bigmail.example"],
                                                             "provider_connection_limit": 2}}},
                 connection_limit=5)
    sinks = Sinks(**{f"mx{i}.bigmail.example": slow for i in range(3)})
    async with trio.open_nursery() as n:
        engine = await start(n, cfg, sinks)
        for i in range(30):
            await engine.submit("s@x.test", [f"u{i}@d{i % 3}.test"], BODY)
        await until(lambda: engine.counts["delivered"] == 30, step=1)
        n.cancel_scope.cancel()
    assert slow.most_open == 2


async def test_max_connection_rate_spaces_new_connections(tmp_path, autojump_clock):
    sink = TimedSink()
    cfg = config(tmp_path, [("*", "mx:25")], {"default": {"max_connection_rate": "1/s,burst=1"}},
                 max_deliveries_per_connection=1, connection_limit=10)
    sinks = Sinks(mx=sink)
    async with trio.open_nursery() as n:
        engine = await start(n, cfg, sinks)
        for i in range(10):
            await engine.submit("s@x.test", [f"u{i}@y.test"], BODY)
        await until(lambda: engine.counts["delivered"] == 10, step=1)
        n.cancel_scope.cancel()
    assert most_in_any_window([t for t, _ in sinks.connects], 1.0) == 1


async def test_a_message_held_past_max_age_expires_in_the_queue(tmp_path, autojump_clock):
    sink = TimedSink()
    cfg = config(tmp_path, [("*", "mx:25")], {"domain": {"y.test": {"max_message_rate": "1/h", "max_age": "90m"}}})
    async with trio.open_nursery() as n:
        engine = await start(n, cfg, Sinks(mx=sink))
        for i in range(3):
            await engine.submit("s@x.test", [f"u{i}@y.test"], BODY)
        await until(lambda: engine.counts["delivered"] + engine.counts["expired"] == 3, step=60)
        n.cancel_scope.cancel()
    # One goes at once, one after an hour; the third would go at two hours, past 90 minutes.
    assert engine.counts["delivered"] == 2 and engine.counts["expired"] == 1


# --- rules ---------------------------------------------------------------------


def test_providers_match_by_mx_suffix_or_exact_host(tmp_path):
    rules = Rules(config(tmp_path, [], {"provider": {"corp": {"match": [".corp.example", "10.0.0.5"]}}}))
    assert rules.provider_of(("alt1.gmail-smtp-in.l.google.com",)) == "google"
    assert rules.provider_of(("foo-com.mail.protection.outlook.com",)) == "microsoft"
    assert rules.provider_of(("mta5.am0.yahoodns.net",)) == "yahoo"
    assert rules.provider_of(("mx.corp.example",)) == "corp"
    assert rules.provider_of(("10.0.0.5",)) == "corp"
    assert rules.provider_of(("corp.example",)) == ""          # a suffix matches hosts under it only
    assert rules.provider_of(("notgoogle.com",)) == ""


def test_limits_fall_back_provider_then_default_then_delivery(tmp_path):
    cfg = config(tmp_path, [], {"default": {"connection_limit": 7, "retry_interval": "2m"},
                                "provider": {"google": {"connection_limit": 3, "max_message_rate": "50/s"}},
                                "domain": {"slow.test": {"retry_interval": "10m", "max_age": "1d"}}},
                 connection_limit=20, max_deliveries_per_connection=99)
    rules = Rules(cfg)
    g, other = rules.site("google"), rules.site("")
    assert (g.connection_limit, other.connection_limit) == (3, 7)
    assert g.max_message_rate.per_second == 50 and other.max_message_rate is None
    assert g.max_deliveries_per_connection == other.max_deliveries_per_connection == 99
    assert rules.retry_policy("slow.test", "google").retry_interval == 600
    assert rules.retry_policy("slow.test", "google").max_age == 86400
    assert rules.retry_policy("x.test", "google").retry_interval == 120
    assert rules.retry_policy("x.test", "").max_retry_interval == 600


def test_each_shard_holds_its_share_of_every_limit(tmp_path):
    cfg = config(tmp_path, [], {"customer": {"a": {"max_message_rate": "100/s"}},
                                "provider": {"google": {"provider_connection_limit": 5}}}, connection_limit=3)
    cfg.daemon.processes = 4
    rules = Rules(cfg)
    assert rules.customer_rates["a"].per_second == 25
    assert rules.provider_connection_limits["google"] == 2
    assert rules.site("").connection_limit == 1


def test_rates_parse_with_units_and_burst():
    assert parse_rate("10/min", "k").per_second == pytest.approx(1 / 6)
    assert parse_rate("10/min", "k").burst == 1
    assert parse_rate("100/s", "k").burst == 10
    assert parse_rate("2000/day", "k").per_second == pytest.approx(2000 / 86400)
    assert parse_rate("1/5min", "k").per_second == pytest.approx(1 / 300)
    assert parse_rate("100/s,burst=20", "k").burst == 20
    for bad in ("100", "0/s", "10/fortnight", "x/s", "10/s,burst=0"):
        with pytest.raises(ConfigError, match="^shaping.customer.a.max_message_rate: "):
            parse_config({"shaping": {"customer": {"a": {"max_message_rate": bad}}}})


def test_bad_shaping_values_name_their_key():
    with pytest.raises(ConfigError, match=r"^shaping.provider.g: Object contains unknown field `bogus`"):
        parse_config({"shaping": {"provider": {"g": {"bogus": 0}}}})
    with pytest.raises(ConfigError, match=r"^shaping.customer.a.max_message_rate: Expected `str"):
        parse_config({"shaping": {"customer": {"a": {"max_message_rate": 5}}}})
    with pytest.raises(ConfigError, match="shaping.provider.g.connection_limit: must be at least 1"):
        parse_config({"shaping": {"provider": {"g": {"connection_limit": 0}}}})
    with pytest.raises(ConfigError, match="shaping.default.backoff_step"):
        parse_config({"shaping": {"default": {"backoff_step": "soon"}}})
    with pytest.raises(ConfigError, match="shaping.provider.g.match"):
        parse_config({"shaping": {"provider": {"g": {"match": [""]}}}})


@pytest.mark.parametrize(("reply", "limited"), [
    (Reply(421, "Service not available, closing transmission channel"), True),
    (Reply(450, "Our system has detected an unusual rate of unsolicited mail", "4.7.28"), True),
    (Reply(451, "Temporary local problem - please try later"), False),
    (Reply(452, "Too many recipients received this hour"), True),
    (Reply(451, "[TSS04] Messages from 1.2.3.4 temporarily deferred"), True),
    (Reply(550, "rate limit exceeded"), True),         # a 5xx rate limit is transient (classify.py)
    # Microsoft's throttling of an IP it does not know yet (Exchange Online NDR docs, 4.7.500-699).
    (Reply(451, "4.7.500 Server busy. Please try again later from [1.2.3.4]. (S77719)"), True),
    (Reply(550, "5.1.1 user unknown"), False),
])
def test_rate_limiting_replies_are_recognized(reply, limited):
    assert is_rate_limited(reply) is limited


def test_unlimited_levels_cost_no_bucket(tmp_path):
    from sender.shaping import Shaper

    class P:
        key, source, provider = "mx:25", "", ""

    rules = Rules(config(tmp_path, []))
    shaper = Shaper(rules, 0.0)
    p = P()
    p.site_bucket = shaper.path_bucket(p, 0.0)
    qid = shaper.queue("acme", "y.test", p, 0.0)
    assert shaper.scheduler.bucket_rate(p.site_bucket) == math.inf
    assert shaper.queue("acme", "y.test", p, 0.0) == qid


async def test_fast_limits_hold_on_the_real_clock(tmp_path):
    # Real time moves while the dispatcher releases, so the next token can be due before it
    # sleeps; a limit of a token every 0.25 ms makes that happen all the time.
    sink = TimedSink()
    cfg = config(tmp_path, [("*", "mx:25")], {"domain": {"y.test": {"max_message_rate": "4000/s,burst=1"}}})
    async with trio.open_nursery() as n:
        engine = await start(n, cfg, Sinks(mx=sink))
        with trio.fail_after(30):
            for i in range(2000):
                await engine.submit("s@x.test", [f"u{i}@y.test"], BODY)
            await until(lambda: engine.counts["delivered"] == 2000, step=0.01)
        n.cancel_scope.cancel()
    # Timed at release, the limit shows at the sink as a whole: 2,000 messages take 0.5 s.
    times = [t for t, _ in sink.seen]
    assert max(times) - min(times) >= 0.49


def test_the_shaper_says_which_limit_holds_a_delivery_and_until_when(tmp_path):
    from sender.model import Delivery
    from sender.shaping import Shaper

    class P:
        key, source, provider = "mx:25", "", ""

    rules = Rules(config(tmp_path, [], {"domain": {"y.test": {"max_message_rate": "1/min"}},
                                        "customer": {"acme": {"max_message_rate": "10/s"}}}))
    shaper = Shaper(rules, 0.0)
    p = P()
    p.site_bucket = shaper.path_bucket(p, 0.0)
    first, second = (Delivery(f"M{i}", "s@x.test", "y.test", ["u@y.test"], 0, 0, 0, 0.0, customer="acme")
                     for i in range(2))
    shaper.push(first, p, 100.0)
    shaper.push(second, p, 100.0)
    assert shaper.pop(100.0) == (p, first)
    assert shaper.pop(100.0) is None
    assert shaper.held(second, p, 100.0) == ("domain:y.test", pytest.approx(160.0))
    assert shaper.next_wakeup() == pytest.approx(160.0)
    assert shaper.pop(160.0) == (p, second)
