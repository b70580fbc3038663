"""Pauses: held at once, sent on when lifted, journaled across restarts, each with who and why."""

from __future__ import annotations

import pytest
import trio

from sender.config import ConfigError, parse_config
from sender.controls import ControlError, Controls
from sender.model import Delivery
from sender.sink import Sink, load_rules

from helpers import Sinks, start_engine as start, until

BODY = b"Subject: t\r\n\r\nhello\r\n"


class Path:
    def __init__(self, provider: str = "", source: str = "") -> None:
        self.provider, self.source = provider, source


def delivery(customer: str = "acme", domain: str = "y.test") -> Delivery:
    return Delivery("id", "s@x.test", domain, [f"u@{domain}"], 1, 0, 10, 0.0, customer=customer)


def test_a_pause_holds_what_it_names_and_survives_a_reread(tmp_path):
    controls = Controls(tmp_path / "controls.log", pools={"bulk": {"127.0.0.7"}})
    controls.change("pause", "customer", "acme", "ops@x", "bounce storm", 1.0)
    controls.change("pause", "provider", "Microsoft", "ops@x", "S3150 blocks", 2.0)
    controls.change("pause", "pool", "bulk", "ops@x", "warmup review", 3.0)
    assert controls.holds(delivery(), Path()).reason == "bounce storm"
    assert controls.holds(delivery("beta"), Path("microsoft")).scope == "provider"
    assert controls.holds(delivery("beta"), Path("google", "127.0.0.7")).scope == "pool"
    assert controls.holds(delivery("beta"), Path("google", "127.0.0.2")) is None
    controls.change("resume", "customer", "acme", "ops@x", "fixed", 4.0)
    with open(tmp_path / "controls.log", "ab") as f:
        f.write(b'{"action":"pause","sco')                     # a crash mid-write: never answered
    again = Controls(tmp_path / "controls.log", pools={"bulk": {"127.0.0.7"}})
    assert sorted(again.pauses) == [("pool", "bulk"), ("provider", "microsoft")]
    assert again.pauses["provider", "microsoft"].who == "ops@x"


@pytest.mark.parametrize("args, field", [
    (("stop", "customer", "a", "me", "why"), "action"),
    (("pause", "colour", "a", "me", "why"), "scope"),
    (("pause", "customer", " ", "me", "why"), "customer"),
    (("pause", "customer", "a", "me", " "), "reason"),
    (("pause", "pool", "nope", "me", "why"), "pool"),
    (("resume", "domain", "y.test", "me", "why"), "domain"),
])
def test_a_bad_change_names_its_field(tmp_path, args, field):
    with pytest.raises(ControlError, match=f"^{field}: "):
        Controls(tmp_path / "controls.log").change(*args, 0.0)
    assert not (tmp_path / "controls.log").exists() or not (tmp_path / "controls.log").read_bytes()


def config(tmp_path, delivery=None, **extra):
    return parse_config({"spool": {"path": str(tmp_path / "spool"), "fsync": "never"}, "listen": {"smtp": ""},
                         "delivery": {"retry_interval": 60, "max_age": 86400, **(delivery or {})},
                         "route": [{"match": "*", "relay": "mx:25"}], "bounces": {"notify": False}, **extra})


def recording_sink(rules: str = "") -> Sink:
    sink = Sink(load_rules(rules))
    sink.messages = []
    return sink


async def submit(engine, customer: str, n: int) -> None:
    for i in range(n):
        await engine.submit("s@x.test", [f"{customer}{i}@y.test"], BODY, customer=customer)


async def test_a_paused_customer_stops_at_once_resumes_and_the_pause_survives_a_restart(tmp_path, autojump_clock):
    sink = recording_sink()

    def sent(customer: str) -> int:
        return sum(m["to"][0].startswith(customer) for m in sink.messages)

    async with trio.open_nursery() as n:
        engine = await start(n, config(tmp_path), Sinks(mx=sink))
        engine.control("pause", "customer", "acme", "ops@x", "bounce storm")
        await submit(engine, "acme", 5)
        await submit(engine, "beta", 5)
        await until(lambda: sent("beta") == 5)
        await trio.sleep(600)
        assert sent("acme") == 0 and engine.dispatcher.paused() == 5
        held = next(e.id for e in engine.events.recent if e.event == "accepted" and e.customer == "acme")
        [where] = engine.where(held)
        assert (where["state"], where["scope"], where["reason"]) == ("paused", "customer", "bounce storm")
        engine.control("resume", "customer", "acme", "ops@x", "storm over")
        await until(lambda: sent("acme") == 5)
        engine.control("pause", "customer", "beta", "ops@x", "complaints")
        n.cancel_scope.cancel()
    kinds = [(e.event, e.customer, e.detail.get("who")) for e in engine.events.recent if e.event in ("paused", "resumed")]
    assert kinds == [("paused", "acme", "ops@x"), ("resumed", "acme", "ops@x"), ("paused", "beta", "ops@x")]
    async with trio.open_nursery() as n:                   # the pause of beta is still there
        engine = await start(n, config(tmp_path), Sinks(mx=sink))
        await submit(engine, "beta", 2)
        await submit(engine, "gamma", 2)
        await until(lambda: sent("gamma") == 2)
        await trio.sleep(600)
        assert sent("beta") == 5
        engine.control("resume", "customer", "beta", "ops@x", "handled")
        await until(lambda: sent("beta") == 7)
        n.cancel_scope.cancel()


async def test_held_mail_leaves_the_shaper_and_takes_no_tokens_from_the_others(tmp_path, autojump_clock):
    sink = recording_sink()
    cfg = config(tmp_path, shaping={"domain": {"y.test": {"max_message_rate": "6/min"}}})
    async with trio.open_nursery() as n:
        engine = await start(n, cfg, Sinks(mx=sink))
        await submit(engine, "acme", 10)                   # waiting for the domain's tokens
        await trio.sleep(1)
        engine.control("pause", "customer", "acme", "ops@x", "hold")
        t0 = trio.current_time()
        await submit(engine, "beta", 3)
        await until(lambda: sum(m["to"][0].startswith("beta") for m in sink.messages) == 3)
        # Three tokens at one per 10 s: the held mail of acme took none of them.
        assert trio.current_time() - t0 <= 31
        assert sum(m["to"][0].startswith("acme") for m in sink.messages) <= 1   # (one before the pause)
        n.cancel_scope.cancel()


async def test_a_bounce_storm_pauses_that_customer_only(tmp_path, autojump_clock):
    sink = recording_sink('[[rule]]\nmatch = "storm*"\naction = "reject"\nreply = "550 5.1.1 no such user"\n')
    cfg = config(tmp_path, {"connection_limit": 2}, suppression={"enabled": False},
                 shaping={"customer": {"storm": {"max_message_rate": "10/s"}}}, abuse={"min_messages": 50})
    async with trio.open_nursery() as n:
        engine = await start(n, cfg, Sinks(mx=sink))
        for i in range(300):
            await engine.submit("s@x.test", [f"storm{i}@y.test"], BODY, customer="storm")
            await engine.submit("s@x.test", [f"calm{i}@y.test"], BODY, customer="calm")
        await until(lambda: ("customer", "storm") in engine.controls.pauses, step=1)
        await until(lambda: sum(m["to"][0].startswith("calm") for m in sink.messages) == 300, step=1)
        await trio.sleep(600)
        n.cancel_scope.cancel()
    pause = engine.controls.pauses["customer", "storm"]
    assert pause.who == "sender abuse watch" and pause.reason.startswith("bounce rate 100.0% (")
    assert list(engine.controls.pauses) == [("customer", "storm")]              # calm untouched
    # It stopped soon after the 50 it needed to judge: most of the storm was never sent.
    assert 50 <= engine.counts["bounced"] < 100 and engine.dispatcher.paused() > 150


async def test_a_new_customer_starts_slow_until_it_has_limits_of_its_own(tmp_path, autojump_clock):
    sink = recording_sink()
    cfg = config(tmp_path, abuse={"new_customer_rate": "6/min"},
                 shaping={"customer": {"known": {}}})                   # a table of its own: raised
    async with trio.open_nursery() as n:
        engine = await start(n, cfg, Sinks(mx=sink))
        t0 = trio.current_time()
        await submit(engine, "known", 5)
        await submit(engine, "", 5)                                    # mail of no customer
        await until(lambda: len(sink.messages) == 10)
        assert trio.current_time() - t0 < 2
        await submit(engine, "fresh", 4)
        await until(lambda: sum(m["to"][0].startswith("fresh") for m in sink.messages) == 4)
        assert 29 <= trio.current_time() - t0 <= 40                     # one each 10 s after the first
        n.cancel_scope.cancel()


@pytest.mark.parametrize("abuse, key", [({"new_customer_rate": "lots"}, "abuse.new_customer_rate"),
                                        ({"max_bounce_rate": 5}, "abuse.max_bounce_rate"),
                                        ({"window": "soon"}, "abuse.window"),
                                        ({"min_messages": 0}, "abuse.window and abuse.min_messages")])
def test_bad_abuse_settings_name_their_key(abuse, key):
    with pytest.raises(ConfigError, match=f"^{key}"):
        parse_config({"abuse": abuse})


async def test_mail_to_a_blocked_domain_is_refused_and_the_rest_goes(tmp_path, autojump_clock):
    from sender.engine import Blocked

    sink = recording_sink()
    cfg = config(tmp_path, abuse={"blocked_domains": ["Trap.Example."]})
    assert cfg.abuse.blocked_domains == ["trap.example"]
    async with trio.open_nursery() as n:
        engine = await start(n, cfg, Sinks(mx=sink))
        with pytest.raises(Blocked, match="blocked domain .*: a@trap.example, b@x.TRAP.example"):
            await engine.submit("s@x.test", ["a@trap.example", "b@x.TRAP.example"], BODY, customer="acme")
        await engine.submit("s@x.test", ["c@trap.example", "d@untrapped.example"], BODY, customer="acme")
        await until(lambda: len(sink.messages) == 1)
        n.cancel_scope.cancel()
    assert sink.messages[0]["to"] == ["d@untrapped.example"] and engine.counts["accepted"] == 1
    assert [e.rcpts[0] for e in engine.events.recent if e.event == "blocked"] == [
        "a@trap.example", "b@x.TRAP.example", "c@trap.example"]
    with pytest.raises(ConfigError, match="^abuse.blocked_domains: 'not a domain'"):
        parse_config({"abuse": {"blocked_domains": ["not a domain"]}})
