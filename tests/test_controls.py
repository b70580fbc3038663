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


def test_a_long_controls_log_is_rewritten_with_what_is_in_force(tmp_path):
    controls = Controls(tmp_path / "controls.log")
    for i in range(600):
        controls.change("pause", "customer", "acme", "ops", f"storm {i}", float(2 * i))
        controls.change("resume", "customer", "acme", "ops", "over", float(2 * i + 1))
    controls.change("limit", "domain", "y.test", "ops", "slow", 2000.0, {"rate": "10/min"})
    controls.change("pause", "source", "127.0.0.9", "ops", "listed", 2001.0)
    again = Controls(tmp_path / "controls.log")
    assert len((tmp_path / "controls.log").read_bytes().splitlines()) == 2
    assert list(again.pauses) == [("source", "127.0.0.9")] and again.limits["domain", "y.test"].detail == {
        "rate": "10/min"}
    assert list(Controls(tmp_path / "controls.log").pauses) == [("source", "127.0.0.9")]


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


# ----------------------------------------------------------------------- purge, quarantine, release


def accepted_ids(engine, customer: str) -> list[str]:
    return [e.id for e in engine.events.recent if e.event == "accepted" and e.customer == customer]


async def test_a_purge_quarantines_what_it_matches_survives_a_restart_and_is_released(tmp_path, autojump_clock):
    sink = recording_sink()
    cfg = config(tmp_path, shaping={"customer": {"spammy": {"max_message_rate": "1/h"}}})
    async with trio.open_nursery() as n:
        engine = await start(n, cfg, Sinks(mx=sink))
        await submit(engine, "spammy", 6)                  # one goes, five wait for tokens
        await engine.submit("s@x.test", ["spammy-a@y.test", "spammy-b@z.test"], BODY, customer="spammy")
        await until(lambda: len(sink.messages) == 1)
        with pytest.raises(ControlError, match="^reason: "):
            engine.purge({"customer": "spammy"}, who="ops", reason=" ")
        with pytest.raises(ControlError, match="^colour: not a purge filter"):
            engine.purge({"colour": "red"}, who="ops", reason="why")
        dry = engine.purge({"customer": "spammy"}, who="ops", reason="list bought", dry_run=True)
        assert (dry["messages"], dry["recipients"]) == (6, 7)
        assert engine.dispatcher.queued() == 7             # a dry run takes nothing (2 parts of one)
        only_z = engine.purge({"customer": "spammy", "domain": "Z.test"}, who="ops", reason="z first")
        assert (only_z["messages"], only_z["recipients"], only_z["in_flight"]) == (1, 1, 0)
        purge = engine.purge({"customer": "spammy"}, who="ops@x", reason="list bought")
        assert (purge["messages"], purge["recipients"]) == (6, 6) and purge["id"].startswith("Q")
        assert engine.dispatcher.queued() == 0 and engine.statistics().live_messages == 6
        await submit(engine, "calm", 3)                    # the others are not touched
        await until(lambda: len(sink.messages) == 4)
        n.cancel_scope.cancel()
    quarantined = [e for e in engine.events.recent if e.event == "quarantined"]
    assert len(quarantined) == 7 and quarantined[-1].detail["who"] == "ops@x"
    assert [e.detail["value"] for e in engine.events.recent if e.event == "purged"] == [only_z["id"], purge["id"]]
    async with trio.open_nursery() as n:                   # after a restart: still in quarantine
        engine = await start(n, cfg, Sinks(mx=sink))
        await trio.sleep(7200)
        assert len(sink.messages) == 4 and engine.dispatcher.queued() == 0
        assert sorted(engine.quarantine) == sorted([only_z["id"], purge["id"]])
        with pytest.raises(ControlError, match="^id: no purge 'Qnope'"):
            engine.release("Qnope", "ops", "why")
        engine.control("limit", "customer", "spammy", "ops", "cleaned up", {"rate": "100/s"})
        released = engine.release(purge["id"], "ops@x", "customer cleaned the list")
        assert (released["messages"], released["recipients"]) == (6, 6)
        await until(lambda: len(sink.messages) == 10)
        assert engine.dispatcher.queued() == 0 and list(engine.quarantine) == [only_z["id"]]
        n.cancel_scope.cancel()
    # The part to y.test of the two-domain message went with the release; z.test stays held.
    assert sorted(r for m in sink.messages for r in m["to"] if r.startswith("spammy-")) == ["spammy-a@y.test"]


@pytest.mark.parametrize("then, record", [("bounce", "bounced"), ("drop", "canceled")])
async def test_a_purge_not_released_in_time_is_bounced_or_dropped(tmp_path, autojump_clock, then, record):
    from sender.model import Bounced, Canceled

    from helpers import journal_records

    sink = recording_sink()
    cfg = config(tmp_path, shaping={"customer": {"acme": {"max_message_rate": "1/h"}}},
                 controls={"quarantine_retention": "2d"})
    async with trio.open_nursery() as n:
        engine = await start(n, cfg, Sinks(mx=sink))
        await submit(engine, "acme", 4)
        await until(lambda: len(sink.messages) == 1)
        purge = engine.purge({"customer": "acme"}, who="ops", reason="phishing", then=then)
        await trio.sleep(86400)
        assert engine.statistics().live_messages == 3      # a day on: still releasable
        await trio.sleep(86400 + 60)
        assert engine.statistics().live_messages == 0 and not engine.controls.purges
        n.cancel_scope.cancel()
    finals = [r for r in journal_records(tmp_path / "spool") if isinstance(r, (Bounced, Canceled))]
    assert len(finals) == 3 and all(isinstance(r, Bounced if then == "bounce" else Canceled) for r in finals)
    outcomes = [e for e in engine.events.recent if e.event == record and e.customer == "acme"]
    assert len(outcomes) == 3 and "phishing" in outcomes[0].reply
    assert [e.detail["value"] for e in engine.events.recent if e.event == "quarantine_expired"] == [purge["id"]]
    assert len(sink.messages) == 1


# ----------------------------------------------------------------------- reroute and run-time limits


def egress_config(tmp_path, **extra):
    return config(tmp_path, source={"a": {"address": "127.0.0.2"}, "b": {"address": "127.0.0.3"}},
                  pool={"main": {"sources": ["a"]}, "recovery": {"sources": ["b"]}},
                  egress={"default_pool": "main"}, **extra)


async def test_a_reroute_sends_a_domains_queued_and_new_mail_from_another_pool(tmp_path, autojump_clock):
    sink = recording_sink()
    sources: list[str] = []
    sinks = Sinks(mx=sink)
    plain = sinks.open_stream

    async def open_stream(host, port, source=""):
        sources.append(source)
        return await plain(host, port, source)

    sinks.open_stream = open_stream
    cfg = egress_config(tmp_path, shaping={"domain": {"y.test": {"max_message_rate": "6/min"}}})
    async with trio.open_nursery() as n:
        engine = await start(n, cfg, sinks)
        await submit(engine, "acme", 4)
        await until(lambda: len(sink.messages) == 1)
        assert set(sources) == {"127.0.0.2"}
        with pytest.raises(ControlError, match="^pool: "):
            engine.control("reroute", "domain", "y.test", "ops", "why", {"pool": "nope"})
        engine.control("reroute", "domain", "Y.test", "ops", "main is listed at Spamhaus", {"pool": "recovery"})
        await until(lambda: len(sink.messages) == 4)
        assert sources[-1] == "127.0.0.3" and "127.0.0.2" not in sources[1:]
        engine.control("unroute", "domain", "y.test", "ops", "delisted")
        await submit(engine, "acme", 1)
        await until(lambda: len(sink.messages) == 5)
        n.cancel_scope.cancel()
    assert sources[-1] == "127.0.0.2"
    moves = [(e.event, e.detail.get("pool")) for e in engine.events.recent if e.event in ("rerouted", "unrouted")]
    assert moves == [("rerouted", "recovery"), ("unrouted", None)]


async def test_a_limit_set_at_run_time_holds_mail_survives_a_restart_and_is_lifted(tmp_path, autojump_clock):
    sink = recording_sink()
    async with trio.open_nursery() as n:
        engine = await start(n, config(tmp_path), Sinks(mx=sink))
        for bad, field in [({"rate": "fast"}, "rate"), ({}, "rate"), ({"rate": "1/s", "connections": 2}, "connections")]:
            with pytest.raises(ControlError, match=f"^{field}: "):
                engine.control("limit", "customer", "acme", "ops", "why", bad)
        with pytest.raises(ControlError, match="^provider: no provider 'nowhere'"):
            engine.control("limit", "provider", "nowhere", "ops", "why", {"rate": "1/s"})
        engine.control("limit", "customer", "acme", "ops", "complaints up", {"rate": "1/h"})
        await submit(engine, "acme", 3)
        await submit(engine, "beta", 3)
        await until(lambda: len(sink.messages) == 4)
        await trio.sleep(600)
        assert len(sink.messages) == 4                     # acme: one, then one an hour
        n.cancel_scope.cancel()
    async with trio.open_nursery() as n:
        engine = await start(n, config(tmp_path), Sinks(mx=sink))
        await trio.sleep(600)
        assert len(sink.messages) == 5                     # the limit came back with the restart (full bucket)
        await trio.sleep(600)
        assert len(sink.messages) == 5
        engine.control("unlimit", "customer", "acme", "ops", "handled")
        await until(lambda: len(sink.messages) == 6)
        n.cancel_scope.cancel()
    assert [e.event for e in engine.events.recent if e.event in ("limited", "unlimited")] == ["unlimited"]


async def test_a_providers_connections_can_be_limited_at_run_time(tmp_path, autojump_clock):
    sink = recording_sink('[[rule]]\nmatch = "*"\naction = "delay"\ndelay = 5\n')
    peak = 0

    async with trio.open_nursery() as n:
        cfg = config(tmp_path, {"connection_limit": 8}, shaping={"provider": {"box": {"match": ["mx"]}}})
        engine = await start(n, cfg, Sinks(mx=sink))
        engine.control("limit", "provider", "box", "ops", "they asked for 2", {"connections": 2})
        for i in range(20):
            await engine.submit("s@x.test", [f"u{i}@y.test"], BODY, customer="acme")
        while len(sink.messages) < 20:
            peak = max(peak, engine.dispatcher.in_flight())
            await trio.sleep(0.5)
        n.cancel_scope.cancel()
    assert peak == 2
