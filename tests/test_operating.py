"""The on-call scenario: one provider starts deferring one customer's mail. The events show it,
explain tells one message's story (the provider's replies, and the provider's rate limit that
held it in the queue), a pause stops that customer at once, a resume lets it go, and all of it
holds across a restart."""

from __future__ import annotations

import orjson
import trio

from sender.cli import main
from sender.config import parse_config
from sender.explain import explain, render
from sender.sink import Sink, load_rules

from helpers import Sinks, start_engine as start, until

GOOGLE_MX = "gmail-smtp-in.l.google.com"
MICROSOFT_MX = "example-com.mail.protection.outlook.com"
BUSY = "451 4.7.500 Server busy. Please try again later."
BODY = b"Subject: t\r\n\r\nhello\r\n"


def config(tmp_path):
    return parse_config({
        "spool": {"path": str(tmp_path / "spool"), "fsync": "never"}, "listen": {"smtp": ""},
        "delivery": {"retry_interval": 60, "max_retry_interval": 300, "max_age": 86400, "starttls": "never"},
        "route": [{"match": "gmail.test", "relay": f"{GOOGLE_MX}:25"},
                  {"match": "outlook.test", "relay": f"{MICROSOFT_MX}:25"}],
        # Microsoft takes 6 a minute from us: the 12 messages for it wait their turn.
        "shaping": {"provider": {"microsoft": {"provider_max_message_rate": "6/min"}}},
        "bounces": {"notify": False}})


def explained(capsys, spool, msg_id) -> str:
    """What ``sender explain`` prints, from the files."""
    assert main(["explain", msg_id, "--spool", str(spool)]) == 0
    return capsys.readouterr().out


def sent(sink: Sink, customer: str) -> int:
    return sum(m["to"][0].startswith(customer) for m in sink.messages)


async def submit_all(engine, customer: str, n: int) -> list[str]:
    return [await engine.submit("app@x.test", [f"{customer}{i}@{domain}"], BODY, customer=customer)
            for i in range(n) for domain in ("gmail.test", "outlook.test")]


async def test_one_providers_deferrals_are_found_explained_paused_and_resumed_across_a_restart(
        tmp_path, autojump_clock, capsys):
    google, microsoft = Sink(load_rules("")), Sink(load_rules(
        f'[[rule]]\nmatch = "beta*@outlook.test"\naction = "defer"\nreply = "{BUSY}"\n'))
    google.messages, microsoft.messages = [], []
    spool = tmp_path / "spool"
    async with trio.open_nursery() as n:
        engine = await start(n, config(tmp_path), Sinks(**{GOOGLE_MX: google, MICROSOFT_MX: microsoft}))
        ids = {c: await submit_all(engine, c, 4) for c in ("acme", "beta", "gamma")}
        await until(lambda: sent(microsoft, "acme") == sent(microsoft, "gamma") == 4 and sent(google, "beta") == 4)
        await until(lambda: engine.counts["deferred"] >= 8, step=10)         # each of beta's, twice
        engine.events.flush()

        # Who is deferred by Microsoft, and why.
        assert main(["events", "--spool", str(spool), "--provider", "microsoft",
                     "--group-by", "customer,event,category", "--json"]) == 0
        rows = {(r["customer"], r["event"]): r for r in map(orjson.loads, capsys.readouterr().out.splitlines())}
        assert rows["beta", "deferred"]["count"] >= 8 and ("beta", "delivered") not in rows
        assert rows["acme", "delivered"]["count"] == rows["gamma", "delivered"]["count"] == 4
        assert ("acme", "deferred") not in rows and ("gamma", "deferred") not in rows

        # One of beta's messages: its attempts and Microsoft's replies.
        held = ids["beta"][1]                                                   # beta0@outlook.test
        text = explained(capsys, spool, held)
        assert text.count("deferred") >= 2 and "Server busy" in text and f"-> {MICROSOFT_MX}:25" in text
        assert "now: queued for beta0@outlook.test" in text and "next attempt at" in text
        # Before its first attempt it waited behind Microsoft's rate limit, with the others.
        assert "throttled   bucket provider:microsoft held " in text
        assert text.index("throttled") < text.index("deferred")

        # Pause beta: Microsoft has stopped deferring, but nothing of beta's goes any more.
        engine.control("pause", "customer", "beta", "oncall@x.test", "Microsoft deferring, ticket 42")
        microsoft.rules = []
        await submit_all(engine, "gamma", 1)
        await until(lambda: sent(microsoft, "gamma") == 5, step=10)
        await trio.sleep(3600)
        assert sent(microsoft, "beta") == 0
        assert engine.where(held)[0]["state"] == "paused"
        n.cancel_scope.cancel()

    async with trio.open_nursery() as n:                                   # a restart: still paused
        engine = await start(n, config(tmp_path), Sinks(**{GOOGLE_MX: google, MICROSOFT_MX: microsoft}))
        await trio.sleep(3600)
        assert sent(microsoft, "beta") == 0
        engine.control("resume", "customer", "beta", "oncall@x.test", "Microsoft accepts again")
        await until(lambda: sent(microsoft, "beta") == 4, step=10)
        n.cancel_scope.cancel()
    assert main(["events", "--spool", str(spool), "--event", "paused,resumed", "--json"]) == 0
    changes = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(c["event"], c["customer"], c["detail"]["who"]) for c in changes] == [
        ("paused", "beta", "oncall@x.test"), ("resumed", "beta", "oncall@x.test")]
    assert "delivered" in render(explain([spool], held)).splitlines()[-2]
    text = explained(capsys, spool, held)
    assert "Server busy" in text and "bucket provider:microsoft held " in text and text.endswith("done (delivered)\n")
    # The pause that held it, and its lifting, with who and why, in their place.
    assert text.index("paused      customer beta by oncall@x.test: Microsoft deferring, ticket 42") < text.index(
        "resumed     customer beta by oncall@x.test: Microsoft accepts again") < text.index("delivered")
