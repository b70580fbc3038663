"""Per-customer quotas (messages a UTC hour and a UTC day) and recipients a message, enforced
by the engine at acceptance, so every way in answers them: the Python API raises, the SMTP
listener answers 451 4.7.1 / 452 4.5.3, the HTTP API 429 / 422.

Engines run on a fixed wall-clock epoch, so that the hour and the day turn when a test says.
The HTTP app is driven in process (httpx's ASGI transport) on the autojump clock; the SMTP
listener over loopback on the real clock, as in test_smtpd.py.
"""

from __future__ import annotations

import calendar
import json
import time
from contextlib import asynccontextmanager

import httpx
import pytest
import trio

from sender.cli import main
from sender.config import ConfigError, parse_config
from sender.engine import Engine, QuotaExceeded, Submission, Suppressed, TooManyRecipients
from sender.inject.http import create_app
from sender.inject.smtpd import serve_smtp
from sender.sink import Sink, load_rules

from helpers import RawSMTP, Sinks, has_enhanced_code

BODY = b"From: app@x.test\r\nSubject: t\r\n\r\nhello\r\n"
KEY = "re_acme_key"
BOUND = 5.0                                     # seconds: every wait on a real socket


def utc(text: str) -> float:
    """Wall-clock seconds of "YYYY-MM-DDTHH:MM:SS" (UTC)."""
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%S")))


def config(tmp_path, acme: dict | None = None, *, listen: dict | None = None, relay: str = "mx:25", **extra):
    return parse_config({
        "spool": {"path": str(tmp_path / "spool"), "fsync": "never"},
        "listen": {"smtp": "", **(listen or {})},
        "delivery": {"starttls": "never", "retry_interval": 60, "max_age": 86400},
        "route": [{"match": "*", "relay": relay}],
        "bounces": {"notify": False},
        "customer": [{"id": "acme", "api_keys": [KEY], **(acme or {})}, {"id": "other", "api_keys": ["re_other"]}],
        **extra})


@asynccontextmanager
async def engine_at(cfg, epoch: float):
    """An Engine (wall clock ``epoch`` at trio time 0) delivering to an in-memory sink."""
    sinks = Sinks(mx=Sink(load_rules("")))
    async with trio.open_nursery() as nursery:
        await nursery.start(sinks.by_host["mx"].run_in_memory)
        engine = await nursery.start(Engine(cfg, open_stream=sinks.open_stream, epoch=epoch).run)
        yield engine
        nursery.cancel_scope.cancel()


async def send(engine, customer: str = "acme", n: int = 1, rcpts: list[str] | None = None) -> list[str]:
    return [await engine.submit("app@x.test", rcpts or [f"u{i}@y.test"], BODY, customer=customer) for i in range(n)]


def refusals(engine) -> list:
    return [ev for ev in engine.events.recent if ev.event == "quota_exceeded"]


async def test_the_hourly_quota_refuses_the_next_message_until_the_hour_turns(tmp_path, autojump_clock):
    async with engine_at(config(tmp_path, {"hourly_quota": 3}), utc("2030-01-01T10:59:00")) as engine:
        await send(engine, n=3)
        with pytest.raises(QuotaExceeded) as over:
            await send(engine, rcpts=["late@y.test", "later@z.test"])
        e = over.value
        assert (e.customer, e.quota, e.limit, e.retry_at) == ("acme", "hourly", 3, utc("2030-01-01T11:00:00"))
        assert "hourly quota" in str(e) and "3 messages" in str(e) and "2030-01-01T11:00:00Z" in str(e)
        # Refused: nothing queued, nothing counted, and an event that says why.
        assert engine.counts["accepted"] == 3 and len(engine._live) == 3
        [ev] = refusals(engine)
        assert (ev.customer, ev.rcpts, ev.category, ev.id) == ("acme", ["late@y.test", "later@z.test"], "quota", "")
        assert ev.detail == {"quota": "hourly", "limit": 3, "retry_at": utc("2030-01-01T11:00:00")}
        assert len(await send(engine, "other", 5)) == 5            # another customer: untouched
        await trio.sleep(59)                                       # 10:59:59: still this hour
        with pytest.raises(QuotaExceeded):
            await send(engine)
        await trio.sleep(1.5)                                      # 11:00:00.5
        assert len(await send(engine, n=3)) == 3
        with pytest.raises(QuotaExceeded):
            await send(engine)
        assert engine.counts["accepted"] == 3 + 5 + 3


async def test_the_daily_quota_outlasts_the_hour_and_resets_with_the_utc_day(tmp_path, autojump_clock):
    async with engine_at(config(tmp_path, {"daily_quota": 2, "hourly_quota": 5}), utc("2030-01-01T22:30:00")) as engine:
        await send(engine, n=2)
        with pytest.raises(QuotaExceeded) as over:
            await send(engine)
        assert (over.value.quota, over.value.limit, over.value.retry_at) == ("daily", 2, utc("2030-01-02T00:00:00"))
        await trio.sleep(3600)                                     # 23:30: a new hour, the same day
        with pytest.raises(QuotaExceeded):
            await send(engine)
        await trio.sleep(1800)                                     # midnight UTC
        assert len(await send(engine, n=2)) == 2
        assert engine.counts["accepted"] == 4
        assert len(refusals(engine)) == 2


async def test_the_counts_survive_a_restart_on_the_same_spool(tmp_path, autojump_clock):
    cfg = config(tmp_path, {"hourly_quota": 3, "daily_quota": 4})
    epoch = utc("2030-01-01T10:59:00")
    folder = tmp_path / "spool" / "events"
    folder.mkdir(parents=True)
    # Yesterday's file is not read (nor would it count).
    (folder / "2029-12-31T23.jsonl").write_text(
        "".join(json.dumps({"time": utc("2029-12-31T23:10:00"), "event": "accepted", "id": f"Y{i}",
                            "customer": "acme"}) + "\n" for i in range(9)))
    async with engine_at(cfg, epoch) as engine:
        await send(engine, n=2)                                    # 10:59: 2 this hour, 2 today
    async with engine_at(cfg, epoch) as engine:
        await send(engine)                                         # the hour's third
        with pytest.raises(QuotaExceeded) as over:
            await send(engine)
        assert over.value.quota == "hourly"
    await trio.sleep(60)                                           # 11:00: a fresh hour, 3 today
    async with engine_at(cfg, epoch) as engine:
        await send(engine)
        with pytest.raises(QuotaExceeded) as over:
            await send(engine)
        assert over.value.quota == "daily"
        assert len(await send(engine, "other", 3)) == 3


async def test_recipients_over_the_customers_limit_are_refused_and_count_nothing(tmp_path, autojump_clock):
    cfg = config(tmp_path, {"max_recipients": 2, "hourly_quota": 1})
    async with engine_at(cfg, utc("2030-01-01T10:00:00")) as engine:
        with pytest.raises(TooManyRecipients) as e:
            await send(engine, rcpts=["a@y.test", "b@y.test", "c@y.test"])
        assert e.value.limit == 2 and "at most 2" in str(e.value)
        assert engine.counts["accepted"] == 0 and not engine._live and not refusals(engine)
        engine.suppression.add("acme", "gone@y.test", "invalid_recipient", engine.now())
        with pytest.raises(Suppressed):                            # refused otherwise: not counted either
            await send(engine, rcpts=["gone@y.test"])
        await send(engine, rcpts=["a@y.test", "b@y.test"])         # the quota was untouched
        assert len(await send(engine, "other", rcpts=["a@y.test", "b@y.test", "c@y.test"])) == 1


async def test_submit_many_takes_what_fits_and_refuses_the_rest(tmp_path, autojump_clock):
    async with engine_at(config(tmp_path, {"hourly_quota": 2, "max_recipients": 1}), utc("2030-01-01T10:00:00")) as engine:
        got = await engine.submit_many([
            Submission("app@x.test", ["a@y.test", "b@y.test"], BODY, "acme"),      # too many: not counted
            Submission("app@x.test", ["c@y.test"], BODY, "acme"),
            Submission("app@x.test", ["d@y.test"], BODY, "other"),
            Submission("app@x.test", ["e@y.test"], BODY, "acme"),
            Submission("app@x.test", ["f@y.test"], BODY, "acme"),                  # over the quota
        ])
        assert [type(g).__name__ if isinstance(g, Exception) else "id" for g in got] == \
            ["TooManyRecipients", "id", "id", "id", "QuotaExceeded"]
        assert engine.counts["accepted"] == 3 and len(engine._live) == 3
        assert [ev.rcpts for ev in refusals(engine)] == [["f@y.test"]]


async def test_a_shard_enforces_its_share_of_the_quota(tmp_path, autojump_clock):
    cfg = config(tmp_path, {"daily_quota": 10, "hourly_quota": 3}, daemon={"processes": 4})
    async with engine_at(cfg, utc("2030-01-01T10:00:00")) as engine:
        await send(engine)                                         # 3 // 4 is 0: at least 1
        with pytest.raises(QuotaExceeded) as over:
            await send(engine)
        assert over.value.limit == 1 and "share of 3" in str(over.value)
        await trio.sleep(3600)
        await send(engine)                                         # 10 // 4 = 2 a day
        await trio.sleep(3600)
        with pytest.raises(QuotaExceeded) as over:
            await send(engine)
        assert (over.value.quota, over.value.limit) == ("daily", 2)


async def test_sender_events_finds_the_refusals(tmp_path, autojump_clock, capsys):
    async with engine_at(config(tmp_path, {"hourly_quota": 1}), utc("2030-01-01T10:00:00")) as engine:
        await send(engine)
        for _ in range(2):
            with pytest.raises(QuotaExceeded):
                await send(engine, rcpts=["late@y.test"])
    capsys.readouterr()
    assert main(["events", "--spool", str(tmp_path / "spool"), "--event", "quota_exceeded", "--json"]) == 0
    found = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["customer"], e["rcpts"], e["category"], e["domain"]) for e in found] == \
        [("acme", ["late@y.test"], "quota", "y.test")] * 2


async def test_our_own_non_delivery_report_is_never_refused_but_counts(tmp_path, autojump_clock):
    rules = '[[rule]]\nmatch = "bad@*"\naction = "reject"\nreply = "550 5.1.1 no such user"\n'
    sink = Sink(load_rules(rules))
    cfg = config(tmp_path, {"hourly_quota": 1}, bounces={"notify": True})
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run_in_memory)
        engine = await nursery.start(Engine(cfg, open_stream=sink.open_stream, epoch=utc("2030-01-01T10:00:00")).run)
        await send(engine, rcpts=["bad@y.test"])                   # the hour's one message: it bounces
        with trio.fail_after(60):
            while engine.counts["accepted"] < 2:                   # the report to app@x.test
                await trio.sleep(0.01)
        assert engine.quotas.taken("acme", engine.now()) == (2, 2) and not refusals(engine)
        nursery.cancel_scope.cancel()


def test_bad_quotas_name_the_key():
    for key in ("hourly_quota", "daily_quota", "max_recipients"):
        with pytest.raises(ConfigError) as e:
            parse_config({"customer": [{"id": "a", key: -1}]})
        assert str(e.value).startswith(f"customer[0].{key}: "), str(e.value)


# ----------------------------------------------------------------------- HTTP API


def email(to: list[str] | None = None) -> dict:
    return {"from": "App <app@x.test>", "to": to or ["user@y.test"], "subject": "hello", "text": "hi there"}


@asynccontextmanager
async def http_client(engine):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(engine)), base_url="http://sender",
                                 headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


async def test_http_answers_429_with_retry_after_over_a_quota_counted_with_every_way_in(tmp_path, autojump_clock):
    async with engine_at(config(tmp_path, {"hourly_quota": 3}), utc("2030-01-01T10:59:00")) as engine, \
            http_client(engine) as http:
        await send(engine)                                         # the Python API counts too
        assert [(await http.post("/emails", json=email())).status_code for _ in range(2)] == [200, 200]
        over = await http.post("/emails", json=email())
        assert over.status_code == 429, over.json()
        assert over.json()["name"] == "hourly_quota_exceeded" and "0 left this hour" in over.json()["message"]
        assert 59 <= int(over.headers["retry-after"]) <= 60
        other = await http.post("/emails", json=email(), headers={"Authorization": "Bearer re_other"})
        assert other.status_code == 200
        await trio.sleep(61)
        assert (await http.post("/emails", json=email())).status_code == 200
        assert engine.counts["accepted"] == 5


async def test_http_batches_over_the_quota(tmp_path, autojump_clock):
    async with engine_at(config(tmp_path, {"daily_quota": 3}), utc("2030-01-01T10:00:00")) as engine, \
            http_client(engine) as http:
        assert (await http.post("/emails/batch", json=[email(), email()])).status_code == 200
        # Strict (the default): all or nothing.
        over = await http.post("/emails/batch", json=[email(), email()])
        assert over.status_code == 429 and over.json()["name"] == "daily_quota_exceeded", over.json()
        assert "1 left today" in over.json()["message"]
        assert int(over.headers["retry-after"]) == 14 * 3600
        assert engine.counts["accepted"] == 2 and len(engine._live) == 2
        assert len(refusals(engine)) == 2
        # Permissive: what fits goes, the rest is named by its index.
        r = await http.post("/emails/batch", json=[email(), email()], headers={"x-batch-validation": "permissive"})
        assert r.status_code == 200
        assert len(r.json()["data"]) == 1 and [e["index"] for e in r.json()["errors"]] == [1], r.json()
        assert "daily email sending quota (3)" in r.json()["errors"][0]["message"]
        assert engine.counts["accepted"] == 3


async def test_http_too_many_recipients_is_422_naming_to(tmp_path, autojump_clock):
    async with engine_at(config(tmp_path, {"max_recipients": 2, "hourly_quota": 1}),
                         utc("2030-01-01T10:00:00")) as engine, http_client(engine) as http:
        three = ["a@y.test", "b@y.test", "c@y.test"]
        r = await http.post("/emails", json=email(three))
        assert r.status_code == 422 and r.json()["message"].startswith("to: "), r.json()
        r = await http.post("/emails/batch", json=[email(), email(three)])
        assert r.status_code == 422 and r.json()["message"].startswith("[1].to: "), r.json()
        r = await http.post("/emails/batch", json=[email(three), email()], headers={"x-batch-validation": "permissive"})
        assert r.json()["errors"] == [{"index": 0, "message": r.json()["errors"][0]["message"]}]
        assert r.json()["errors"][0]["message"].startswith("to: ") and len(r.json()["data"]) == 1
        assert engine.counts["accepted"] == 1


# ----------------------------------------------------------------------- SMTP listener


@asynccontextmanager
async def listening(tmp_path, acme: dict, listen: dict | None = None):
    """Sink + Engine + listener on loopback (real clock; the wall clock starts at 10:00 UTC)."""
    sink = Sink(load_rules(""))
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(sink.run, "127.0.0.1:0")
        cfg = config(tmp_path, acme, listen=listen, relay=f"{host}:{port}")
        engine = await nursery.start(Engine(cfg, epoch=utc("2030-01-01T10:00:00") - trio.current_time()).run)
        addr = await nursery.start(serve_smtp, engine, "127.0.0.1:0")
        with trio.fail_after(BOUND):
            client = await RawSMTP.connect(*addr)
            await client.hello()
            try:
                yield engine, client
            finally:
                await client.aclose()
        nursery.cancel_scope.cancel()


async def test_smtp_with_the_customer_known_at_mail_answers_there_and_at_rcpt(tmp_path):
    async with listening(tmp_path, {"hourly_quota": 1, "max_recipients": 2}, {"customer": "acme"}) as (engine, c):
        assert (await c.cmd("MAIL FROM:<app@x.test>")).startswith("250 ")
        replies = [await c.cmd(f"RCPT TO:<u{i}@y.test>") for i in range(4)]
        assert [r[:9] for r in replies] == ["250 2.1.5", "250 2.1.5", "452 4.5.3", "452 4.5.3"], replies
        assert "Too many recipients" in replies[2] and has_enhanced_code(replies[2])
        assert (await c.cmd("DATA")).startswith("354 ")
        await c.send(BODY + b".\r\n")
        assert (await c.reply()).startswith("250 2.0.0 Ok: queued as ")
        over = await c.cmd("MAIL FROM:<app@x.test>")                # the hour's quota is used
        assert over.startswith("451 4.7.1 ") and has_enhanced_code(over), over
        assert "hourly quota" in over and "(1 messages)" in over and "2030-01-01T11:00:00Z" in over
        assert (await c.cmd("RCPT TO:<u@y.test>")).startswith("503 ")   # no transaction was opened
        assert engine.counts["accepted"] == 1
        assert [ev.customer for ev in refusals(engine)] == ["acme"]


async def test_smtp_with_the_customer_in_the_header_answers_at_the_end_of_data(tmp_path):
    async with listening(tmp_path, {"hourly_quota": 1, "max_recipients": 2}) as (engine, c):
        head = b"X-Sender-Customer: acme\r\n"

        async def transaction(rcpts: list[str]) -> str:
            assert (await c.cmd("MAIL FROM:<app@x.test>")).startswith("250 ")
            for r in rcpts:
                assert (await c.cmd(f"RCPT TO:<{r}>")).startswith("250 ")
            assert (await c.cmd("DATA")).startswith("354 ")
            await c.send(head + BODY + b".\r\n")
            return await c.reply()

        many = await transaction(["a@y.test", "b@y.test", "c@y.test"])
        assert many.startswith("554 5.5.3 ") and "at most 2" in many, many
        assert (await transaction(["a@y.test"])).startswith("250 2.0.0 ")
        over = await transaction(["b@y.test"])
        assert over.startswith("451 4.7.1 ") and "hourly quota" in over and "11:00:00Z" in over, over
        assert engine.counts["accepted"] == 1 and len(engine._live) <= 1
