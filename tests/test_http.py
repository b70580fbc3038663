"""The Resend-compatible HTTP API over real loopback sockets, driven by Resend's own SDK.

An Engine delivers to an in-process Sink; ``serve_http`` listens on 127.0.0.1:0. The SDK and
httpx are synchronous, so they run in a worker thread. Real sockets do not mix with the
autojump clock, so these run on the real clock, each wait bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import base64
import json
import re
from contextlib import asynccontextmanager
from email import message_from_bytes

import dkim
import msgspec
import dns.resolver
import httpx
import pytest
import resend
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from sender.config import ConfigError, parse_config
from sender.engine import Engine
from sender.inject.http import serve_http
from sender.sink import Sink, load_rules

from dnsserver import DNSServer
from helpers import HookReceiver, free_port
from test_mime import BAD, base

BOUND = 5.0  # seconds; every wait on the network is bounded by this
KEY = "re_acme_test_key"
ADMIN = "adm_test_key"


class BodySink(Sink):
    """A sink that also keeps each accepted message's envelope and body."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.received: list[tuple[str, list[str], bytes]] = []

    def record(self, ev, peer: str, **kw) -> None:
        self.received.append((ev.sender, list(ev.rcpts), ev.body))
        super().record(ev, peer, **kw)


class Env:
    def __init__(self, engine: Engine, sink: BodySink, url: str) -> None:
        self.engine = engine
        self.sink = sink
        self.url = url

    async def wait_received(self, n: int) -> None:
        with trio.fail_after(BOUND):
            while len(self.sink.received) < n:
                await trio.sleep(0.01)

    async def get(self, path: str, *, key: str | None = KEY) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        return await trio.to_thread.run_sync(lambda: httpx.get(self.url + path, headers=headers, timeout=BOUND))

    async def post(self, path: str, body: object, *, key: str | None = KEY, headers: dict | None = None,
                   **kw) -> httpx.Response:
        headers = {**({"Authorization": f"Bearer {key}"} if key is not None else {}), **(headers or {})}
        return await trio.to_thread.run_sync(
            lambda: httpx.post(self.url + path, json=body, headers=headers, timeout=BOUND, **kw))


@asynccontextmanager
async def running(tmp_path, *, spool=None, acme=None, rules="", extra=None):
    """Sink + Engine + HTTP API on 127.0.0.1 free ports, the SDK pointed at it; all cancelled
    and the SDK's settings restored on exit."""
    sink = BodySink(load_rules(rules))
    saved = resend.api_url, resend.api_key
    async with trio.open_nursery() as nursery:
        sink_host, sink_port = await nursery.start(sink.run, "127.0.0.1:0")
        config = parse_config({
            "spool": {"path": str(tmp_path / "spool"), "fsync": "batch", **(spool or {})},
            "delivery": {"starttls": "never", "retry_interval": 60},
            "route": [{"match": "*", "relay": f"{sink_host}:{sink_port}"}],
            "customer": [{"id": "acme", "api_keys": [KEY], **(acme or {})}, {"id": "other", "api_keys": ["re_other"]}],
            "listen": {"smtp": "", "admin_keys": [ADMIN]},
            **(extra or {}),
        })
        engine = await nursery.start(Engine(config).run)
        with trio.fail_after(BOUND):
            host, port = await nursery.start(serve_http, engine, "127.0.0.1:0")
        url = f"http://{host}:{port}"
        resend.api_url, resend.api_key = url, KEY
        try:
            yield Env(engine, sink, url)
        finally:
            resend.api_url, resend.api_key = saved
            nursery.cancel_scope.cancel()


def email(to: str = "user@y.test", subject: str = "hello") -> dict:
    return {"from": "App <app@x.test>", "to": [to], "subject": subject, "text": "hi there"}


def body(answer: dict) -> dict:
    return {k: v for k, v in answer.items() if k != "http_headers"}


async def sdk(fn, *args):
    with trio.fail_after(BOUND):
        return await trio.to_thread.run_sync(fn, *args)


async def test_send_one_email_through_the_sdk(tmp_path):
    async with running(tmp_path) as env:
        answer = await sdk(resend.Emails.send, email(subject="Welcome"))
        await env.wait_received(1)
        sender, rcpts, body = env.sink.received[0]
        assert (sender, rcpts) == ("app@x.test", ["user@y.test"])
        assert message_from_bytes(body)["Subject"] == "Welcome"
        assert env.engine.counts["accepted"] == 1
        assert answer["id"]


async def test_the_id_is_the_queue_id(tmp_path):
    async with running(tmp_path) as env:
        queued: list[str] = []
        submit = env.engine.submit

        async def spy(*args, **kw):
            queued.append(await submit(*args, **kw))
            assert kw["customer"] == "acme"
            return queued[-1]

        env.engine.submit = spy
        answer = await sdk(resend.Emails.send, email())
        assert [answer["id"]] == queued


async def test_batch_of_three_through_the_sdk(tmp_path):
    async with running(tmp_path) as env:
        answer = await sdk(resend.Batch.send, [email(f"u{i}@y.test", f"n{i}") for i in range(3)])
        ids = [d["id"] for d in answer["data"]]
        assert len(set(ids)) == 3
        await env.wait_received(3)
        got = sorted((r[1][0], message_from_bytes(r[2])["Subject"]) for r in env.sink.received)
        assert got == [(f"u{i}@y.test", f"n{i}") for i in range(3)]


async def test_wrong_key_is_401_and_nothing_is_queued(tmp_path):
    async with running(tmp_path) as env:
        resend.api_key = "re_wrong"
        with pytest.raises(resend.exceptions.ResendError) as e:
            await sdk(resend.Emails.send, email())
        assert str(e.value.code) == "401" and e.value.error_type == "invalid_api_key"
        r = await env.post("/emails", email(), key="re_acme_test_kez")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert env.engine.counts["accepted"] == 0


async def test_missing_key_is_401(tmp_path):
    async with running(tmp_path) as env:
        r = await env.post("/emails", email(), key=None)
        assert r.status_code == 401
        assert r.json() == {"statusCode": 401, "name": "missing_api_key", "message": r.json()["message"]}
        assert env.engine.counts["accepted"] == 0


async def test_bad_address_is_422_naming_the_field(tmp_path):
    async with running(tmp_path) as env:
        r = await env.post("/emails", email(to="not an address"))
        assert r.status_code == 422
        body = r.json()
        assert body["name"] == "validation_error" and body["message"].startswith("to[0]"), body
        with pytest.raises(resend.exceptions.ResendError) as e:
            await sdk(resend.Emails.send, email(to="not an address"))
        assert str(e.value.code) == "422" and "to[0]" in str(e.value)
        assert env.engine.counts["accepted"] == 0


async def test_invalid_json_is_422(tmp_path):
    async with running(tmp_path) as env:
        r = await env.post("/emails", None, content=b"{nope", key=KEY)
        assert r.status_code == 422 and r.json()["name"] == "validation_error"


async def test_batch_with_one_bad_item_names_its_index_and_queues_nothing(tmp_path):
    async with running(tmp_path) as env:
        batch = [email(), email(), email(), email(to="bad")]
        r = await env.post("/emails/batch", batch)
        assert r.status_code == 422
        assert r.json()["message"].startswith("[3].to[0]: "), r.json()
        assert env.engine.counts["accepted"] == 0


async def test_permissive_batch_queues_the_valid_ones_and_names_the_others(tmp_path):
    async with running(tmp_path) as env:
        env.engine.suppression.add("acme", "gone@y.test", "invalid_recipient", env.engine.now())
        batch = [email("a@y.test"), email(to="bad"), email("b@y.test"), email("gone@y.test"), {"from": "x"}]
        answer = await sdk(resend.Batch.send, batch, {"batch_validation": "permissive"})
        assert len(answer["data"]) == 2
        assert [(e["index"], e["message"].split(":")[0]) for e in answer["errors"]] == [
            (1, "to[0]"), (3, "to"), (4, "from")]
        assert "gone@y.test (invalid_recipient" in answer["errors"][1]["message"]
        await env.wait_received(2)
        assert sorted(r[1][0] for r in env.sink.received) == ["a@y.test", "b@y.test"]
        r = await env.post("/emails/batch", [email()], headers={"x-batch-validation": "lenient"})
        assert r.status_code == 422 and r.json()["message"].startswith("x-batch-validation: "), r.json()


async def test_full_spool_is_429_with_retry_after(tmp_path):
    async with running(tmp_path, spool={"max_bytes": "1KiB"}) as env:
        big = email() | {"text": "x" * 2000}
        assert (await env.post("/emails", big)).status_code == 200
        assert env.engine.spool_full
        r = await env.post("/emails", email())
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["name"] == "rate_limit_exceeded"
        assert env.engine.counts["accepted"] == 1


async def test_unknown_path_is_404_and_wrong_method_405(tmp_path):
    async with running(tmp_path) as env:
        r = await env.post("/nowhere", {})
        assert r.status_code == 404 and r.json()["name"] == "not_found"
        r = await trio.to_thread.run_sync(lambda: httpx.get(env.url + "/emails", timeout=BOUND))
        assert r.status_code == 405 and r.json()["name"] == "method_not_allowed"


def test_config_checks_customers():
    with pytest.raises(ConfigError, match=r"customer\[1\]\.api_keys"):
        parse_config({"customer": [{"id": "a", "api_keys": ["k"]}, {"id": "b", "api_keys": ["k"]}]})
    with pytest.raises(ConfigError, match=r"customer\[1\]\.id"):
        parse_config({"customer": [{"id": "a"}, {"id": "a"}]})
    with pytest.raises(ConfigError, match="listen.http"):
        parse_config({"listen": {"http": "nope:port"}})


# ---------------------------------------------------------------------- idempotency keys


async def test_the_same_idempotency_key_and_payload_send_once_even_after_a_restart(tmp_path):
    async with running(tmp_path) as env:
        first = await sdk(resend.Emails.send, email(), {"idempotency_key": "order-17"})
        again = await sdk(resend.Emails.send, email(), {"idempotency_key": "order-17"})
        other = await sdk(resend.Emails.send, email(), {"idempotency_key": "order-18"})
        assert again["id"] == first["id"] != other["id"]
        await env.wait_received(2)
    async with running(tmp_path) as env:
        after = await sdk(resend.Emails.send, email(), {"idempotency_key": "order-17"})
        assert after["id"] == first["id"]
        assert env.engine.counts["accepted"] == 0
        # Another customer's key of the same name is its own.
        r = await env.post("/emails", email(), key="re_other", headers={"Idempotency-Key": "order-17"})
        assert r.status_code == 200 and r.json()["id"] != first["id"]


async def test_a_reused_key_with_another_payload_is_409_and_a_bad_key_400(tmp_path):
    async with running(tmp_path) as env:
        await sdk(resend.Emails.send, email(), {"idempotency_key": "k1"})
        with pytest.raises(resend.exceptions.ResendError) as e:
            await sdk(resend.Emails.send, email(subject="changed"), {"idempotency_key": "k1"})
        assert str(e.value.code) == "409" and e.value.error_type == "invalid_idempotent_request"
        for bad in ("", "k" * 257):
            r = await env.post("/emails", email(), headers={"Idempotency-Key": bad})
            assert r.status_code == 400 and r.json()["name"] == "invalid_idempotency_key", r.json()
        assert (await env.post("/emails", email(), headers={"Idempotency-Key": "k" * 256})).status_code == 200
        assert env.engine.counts["accepted"] == 2


async def test_a_refused_request_leaves_its_key_free_and_a_batch_is_kept_whole(tmp_path):
    async with running(tmp_path) as env:
        r = await env.post("/emails", email(to="bad"), headers={"Idempotency-Key": "k2"})
        assert r.status_code == 422
        ok = await sdk(resend.Emails.send, email(), {"idempotency_key": "k2"})
        batch = [email("a@y.test"), email(to="bad"), email("b@y.test")]
        options = {"idempotency_key": "k3", "batch_validation": "permissive"}
        first = await sdk(resend.Batch.send, batch, options)
        again = await sdk(resend.Batch.send, batch, options)
        # (The SDK adds the answer's HTTP headers, Date among them: compare what the API said.)
        assert body(again) == body(first) and len(first["data"]) == 2 and first["errors"][0]["index"] == 1
        with pytest.raises(resend.exceptions.ResendError) as e:       # strict is another request
            await sdk(resend.Batch.send, batch, {"idempotency_key": "k3"})
        assert e.value.error_type == "invalid_idempotent_request"
        assert env.engine.counts["accepted"] == 3 and ok["id"]


async def test_a_retry_while_the_first_is_answered_is_409_concurrent(tmp_path):
    async with running(tmp_path) as env:
        release = trio.Event()
        real_submit = env.engine.submit

        async def slow_submit(*args, **kw):
            await release.wait()
            return await real_submit(*args, **kw)

        env.engine.submit = slow_submit
        async with trio.open_nursery() as n:
            first: list = []
            n.start_soon(lambda: _post_into(env, first, "k4"))
            while not env.engine.idempotency._in_flight:
                await trio.sleep(0.01)
            r = await env.post("/emails", email(), headers={"Idempotency-Key": "k4"})
            assert r.status_code == 409 and r.json()["name"] == "concurrent_idempotent_requests"
            release.set()
        assert first[0].status_code == 200


async def _post_into(env, out: list, key: str) -> None:
    out.append(await env.post("/emails", email(), headers={"Idempotency-Key": key}))


async def test_a_scheduled_email_waits_and_bad_times_are_422(tmp_path):
    async with running(tmp_path) as env:
        answer = await sdk(resend.Emails.send, email() | {"scheduled_at": "in 1 hour"})
        iso = await env.post("/emails", email() | {"scheduled_at": "2099-01-01T09:00:00Z"})
        assert iso.status_code == 422 and iso.json()["message"] == "scheduled_at: at most 30 days ahead"
        for bad in ("tomorrow-ish", 17, "in 3 fortnights"):
            r = await env.post("/emails", email() | {"scheduled_at": bad})
            assert r.status_code == 422 and r.json()["message"].startswith("scheduled_at: "), r.json()
        r = await env.post("/emails/batch", [email(), email() | {"scheduled_at": "soon"}])
        assert r.status_code == 422 and r.json()["message"].startswith("[1].scheduled_at: ")
        past = await env.post("/emails", email("now@y.test") | {"scheduled_at": "2020-01-01T00:00:00+00:00"})
        assert past.status_code == 200
        await env.wait_received(1)                       # the one in the past went at once
        await trio.sleep(0.3)
        assert [r[1] for r in env.sink.received] == [["now@y.test"]]
        waiting = env.engine._live[answer["id"]]
        assert 3590 < waiting.next_at - env.engine.now() <= 3600


async def test_a_customers_request_rate_gets_resends_headers_and_429(tmp_path):
    async with running(tmp_path, acme={"api_rate_limit": "2/min,burst=2"}) as env:
        answers = [await env.post("/emails", email()) for _ in range(3)]
        assert [r.status_code for r in answers] == [200, 200, 429]
        assert answers[0].headers["ratelimit-limit"] == "2" and answers[0].headers["ratelimit-remaining"] == "1"
        refused = answers[2]
        assert refused.json()["name"] == "rate_limit_exceeded"
        assert 20 <= int(refused.headers["retry-after"]) <= 30              # a token every 30 s
        assert refused.headers["ratelimit-remaining"] == "0"
        other = await env.post("/emails", email(), key="re_other")       # another customer: no limit
        assert other.status_code == 200 and "ratelimit-limit" not in other.headers
        assert env.engine.counts["accepted"] == 3


async def test_the_daily_quota_refuses_what_does_not_fit(tmp_path):
    async with running(tmp_path, acme={"daily_quota": 5}) as env:
        assert (await env.post("/emails/batch", [email() for _ in range(3)])).status_code == 200
        over = await env.post("/emails/batch", [email() for _ in range(3)])
        assert over.status_code == 429 and over.json()["name"] == "daily_quota_exceeded", over.json()
        assert "2 left today" in over.json()["message"]
        assert (await env.post("/emails", email(to="bad"))).status_code == 422    # not counted
        assert [(await env.post("/emails", email())).status_code for _ in range(3)] == [200, 200, 429]
        assert env.engine.counts["accepted"] == 5


def test_bad_limits_name_the_key():
    for bad, key in (({"api_rate_limit": "fast"}, "customer[0].api_rate_limit"),
                     ({"daily_quota": -1}, "customer[0].daily_quota")):
        with pytest.raises(ConfigError) as e:
            parse_config({"customer": [{"id": "a", **bad}]})
        assert str(e.value).startswith(key), str(e.value)


async def test_a_scheduled_email_can_be_moved_or_canceled_by_its_customer_only(tmp_path):
    async with running(tmp_path) as env:
        later = await sdk(resend.Emails.send, email("later@y.test") | {"scheduled_at": "in 2 hours"})
        moved = await sdk(resend.Emails.send, email("moved@y.test") | {"scheduled_at": "in 2 hours"})
        # Another customer neither sees nor touches it.
        r = await env.post(f"/emails/{later['id']}/cancel", None, key="re_other")
        assert r.status_code == 404 and r.json()["name"] == "not_found"
        assert (await sdk(resend.Emails.cancel, later["id"]))["id"] == later["id"]
        with pytest.raises(resend.exceptions.ResendError) as e:
            await sdk(resend.Emails.cancel, later["id"])             # gone now
        assert str(e.value.code) == "404"
        # Moved to a time already past: it goes at once.
        await sdk(resend.Emails.update, {"id": moved["id"], "scheduled_at": "2020-01-01T00:00:00Z"})
        await env.wait_received(1)
        assert [r[1] for r in env.sink.received] == [["moved@y.test"]]
        with pytest.raises(resend.exceptions.ResendError) as e:       # sending has begun
            await sdk(resend.Emails.update, {"id": moved["id"], "scheduled_at": "in 1 hour"})
        assert str(e.value.code) in ("404", "422")
        assert env.engine.counts["canceled"] == 1
    async with running(tmp_path) as env:                                  # and after a restart
        assert env.engine._live == {}


async def test_get_tells_the_last_event_to_its_customer_only_and_after_a_restart(tmp_path):
    async with running(tmp_path) as env:
        sent = await sdk(resend.Emails.send, email(subject="Status") | {"tags": [{"name": "kind", "value": "welcome"}]})
        later = await sdk(resend.Emails.send, email("later@y.test") | {"scheduled_at": "in 1 hour"})
        await env.wait_received(1)
        with trio.fail_after(BOUND):
            while (got := await sdk(resend.Emails.get, sent["id"]))["last_event"] != "delivered":
                await trio.sleep(0.02)
        assert got["object"] == "email" and got["id"] == sent["id"]
        assert (got["from"], got["to"], got["subject"]) == ("App <app@x.test>", ["user@y.test"], "Status")
        assert got["tags"] == [{"name": "kind", "value": "welcome"}] and got["scheduled_at"] is None
        assert got["created_at"].endswith("+00:00")
        scheduled = await sdk(resend.Emails.get, later["id"])
        assert scheduled["last_event"] == "scheduled" and scheduled["scheduled_at"]
        await sdk(resend.Emails.cancel, later["id"])
        assert (await sdk(resend.Emails.get, later["id"]))["last_event"] == "canceled"
        # Another customer's key: not found, like an id that does not exist.
        r = await env.get(f"/emails/{sent['id']}", key="re_other")
        assert r.status_code == 404 and r.json()["name"] == "not_found"
        assert (await env.get("/emails/0000000000000000F")).status_code == 404
    async with running(tmp_path) as env:
        assert (await sdk(resend.Emails.get, sent["id"]))["last_event"] == "delivered"
        assert (await sdk(resend.Emails.get, later["id"]))["last_event"] == "canceled"


async def test_a_deferred_email_is_delivery_delayed(tmp_path):
    async with running(tmp_path, rules='[[rule]]\nmatch = "*"\naction = "defer"\n'):
        sent = await sdk(resend.Emails.send, email())
        with trio.fail_after(BOUND):
            while (await sdk(resend.Emails.get, sent["id"]))["last_event"] != "delivery_delayed":
                await trio.sleep(0.02)


async def test_admin_keys_alone_reach_the_admin_endpoints(tmp_path):
    async with running(tmp_path) as env:
        sent = await sdk(resend.Emails.send, email())
        for key in (KEY, "re_other", "nope", None):
            r = await env.get("/admin/stats", key=key)
            assert r.status_code == 401, key
            assert r.json()["name"] == ("missing_api_key" if key is None else "invalid_api_key")
        stats = (await env.get("/admin/stats", key=ADMIN)).json()
        assert stats["accepted"] == 1
        r = await env.get(f"/admin/emails/{sent['id']}", key=ADMIN)
        assert r.status_code == 200 and r.json()["customer"] == "acme"
        events = (await env.get("/admin/events?limit=10", key=ADMIN)).json()
        assert [e["event"] for e in events][:1] == ["accepted"] and events[0]["id"] == sent["id"]
        assert (await env.get("/admin/events?limit=-3", key=ADMIN)).json() == []
        assert (await env.get("/admin/events?limit=x", key=ADMIN)).status_code == 422
        assert (await env.get("/admin/webhooks/dead", key=ADMIN)).json() == {"data": []}
        # An admin key sends no mail.
        r = await env.post("/emails", email(), key=ADMIN)
        assert r.status_code == 401 and env.engine.counts["accepted"] == 1


SECRET = "whsec_" + base64.b64encode(b"webhook signing key 0123").decode()


def verified(headers: dict[str, str], body: bytes) -> dict:
    """The event, once Resend's SDK has checked its Svix signature."""
    return resend.Webhooks.verify({"payload": body.decode(), "webhook_secret": SECRET, "headers": {
        "id": headers["svix-id"], "timestamp": headers["svix-timestamp"], "signature": headers["svix-signature"]}})


async def test_webhooks_arrive_signed_and_are_retried_after_two_failures(tmp_path):
    receiver = HookReceiver([500, 503])
    async with trio.open_nursery() as nursery:
        url = await nursery.start(receiver.run)
        hook = {"webhook": [{"url": url, "secret": SECRET, "events": ["email.delivered"]}]}
        async with running(tmp_path, acme=hook, extra={"webhooks": {"retry_schedule": [0.05, 0.05, 0.05]}}) as env:
            sent = await sdk(resend.Emails.send, email(subject="Hooked"))
            with trio.fail_after(BOUND):          # answered, and the answer read
                while 200 not in receiver.answered or env.engine.webhooks.statistics()["pending"]:
                    await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert receiver.answered == [500, 503, 200]
    # Every attempt is the same webhook message (svix-id, bytes), each signed afresh.
    assert len({h["svix-id"] for h, _ in receiver.received}) == 1
    assert len({b for _, b in receiver.received}) == 1
    event = verified(*receiver.received[-1])
    assert event["type"] == "email.delivered" and event["created_at"].endswith("Z")
    data = event["data"]
    assert (data["email_id"], data["subject"], data["from"], data["to"]) == (
        sent["id"], "Hooked", "App <app@x.test>", ["user@y.test"])


async def test_webhooks_wait_out_a_restart(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/hooks"
    hook = {"webhook": [{"url": url, "secret": SECRET}]}          # every event type
    extra = {"webhooks": {"retry_schedule": [0.05] * 50}}
    rules = '[[rule]]\nmatch = "gone@y.test"\naction = "reject"\nreply = "550 5.1.1 no such user"\n'
    async with running(tmp_path, acme=hook, extra=extra, rules=rules) as env:
        ok = await sdk(resend.Emails.send, email("user@y.test"))
        gone = await sdk(resend.Emails.send, email("gone@y.test"))
        with trio.fail_after(BOUND):            # nobody listens yet: attempts fail
            while env.engine.webhooks.statistics()["failed_attempts"] < 4:
                await trio.sleep(0.01)
    receiver = HookReceiver()
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
        nursery.start_soon(trio.serve_listeners, receiver._serve, listeners)
        async with running(tmp_path, acme=hook, extra=extra, rules=rules) as env:
            with trio.fail_after(BOUND):
                while len(receiver.received) < 4:
                    await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    events = {(e["data"]["email_id"], e["type"]): e for e in (verified(h, b) for h, b in receiver.received)}
    assert sorted(events) == sorted([(ok["id"], "email.sent"), (ok["id"], "email.delivered"),
                                     (gone["id"], "email.sent"), (gone["id"], "email.bounced")])
    bounce = events[gone["id"], "email.bounced"]
    assert bounce["type"] == "email.bounced" and bounce["data"]["bounce"]["type"] == "Permanent"
    assert bounce["data"]["bounce"]["subType"] == "invalid_recipient"
    assert "5.1.1" in bounce["data"]["bounce"]["message"]


def _txt(value: str) -> str:
    """A TXT record's text: character strings of at most 255 octets."""
    return " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))


async def test_mail_leaves_dkim_signed_with_both_key_types_verified_through_dns(tmp_path):
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    for name, key in (("rsa.pem", rsa_key), ("ed.pem", ed_key)):
        (tmp_path / name).write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    rsa_public = rsa_key.public_key().public_bytes(serialization.Encoding.DER,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    ed_public = ed_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    keys = {"dkim": [{"domain": "x.test", "selector": "r2026", "key_file": str(tmp_path / "rsa.pem")},
                     {"domain": "x.test", "selector": "e2026", "key_file": str(tmp_path / "ed.pem")}]}
    with DNSServer() as dns_server:
        dns_server.add("r2026._domainkey.x.test", "TXT",
                       _txt(f"v=DKIM1; k=rsa; p={base64.b64encode(rsa_public).decode()}"))
        dns_server.add("e2026._domainkey.x.test", "TXT",
                       _txt(f"v=DKIM1; k=ed25519; p={base64.b64encode(ed_public).decode()}"))
        host, port = dns_server.address.rsplit(":", 1)
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers, resolver.port = [host], int(port)

        def dnsfunc(name: bytes, timeout: float = 5) -> bytes:
            answer = resolver.resolve(name.decode().rstrip("."), "TXT", lifetime=timeout)
            return b"".join(answer[0].strings)

        async with running(tmp_path, extra=keys) as env:
            await sdk(resend.Emails.send, email(subject="Signed") | {"html": "<p>signed</p>"})
            await sdk(resend.Emails.send, {**email(), "from": "other@elsewhere.test"})
            await env.wait_received(2)
        signed, unsigned = sorted((r[2] for r in env.sink.received), key=lambda b: b"other@" in b)
        checker = dkim.DKIM(signed)
        assert checker.verify(idx=0, dnsfunc=dnsfunc) and checker.verify(idx=1, dnsfunc=dnsfunc)
        algorithms = re.findall(rb"a=([a-z0-9-]+);", signed.split(b"\r\n\r\n")[0])
        assert sorted(algorithms) == [b"ed25519-sha256", b"rsa-sha256"]
        assert dns_server.total_queries >= 2
        assert b"DKIM-Signature" not in unsigned           # no key for elsewhere.test


async def test_every_malformed_field_is_422_naming_it_and_nothing_is_queued(tmp_path):
    table = [*BAD,
             ({"text": "x" * 30_000}, "text"),                                  # over max_message_size
             ({"attachments": [{"filename": "a.bin", "content": base64.b64encode(b"x" * 30_000).decode()}]},
              "message"),
             ({"scheduled_at": "next tuesday-ish"}, "scheduled_at"),
             ({"scheduled_at": 1700000000}, "scheduled_at"),
             ({"tags": [{"name": "a b", "value": "x"}]}, "tags[0].name"),
             ({"tags": [{"name": "kind"}]}, "tags[0].value")]
    async with running(tmp_path, extra={"listen": {"smtp": "", "admin_keys": [ADMIN],
                                                   "max_message_size": 20_000}}) as env:
        wrong = []
        for changes, field in table:
            if any("\ud800" in str(v) for v in changes.values()):
                continue                # a lone surrogate: the whole body is refused (below)
            # json.dumps escapes what httpx's encoder refuses (a lone surrogate).
            r = await env.post("/emails", None, content=json.dumps(base(**changes)),
                               headers={"content-type": "application/json"})
            body = r.json()
            if r.status_code != 422 or body["name"] not in ("validation_error", "missing_required_field") \
                    or not body["message"].startswith((f"{field}:", f"{field!r}:")):
                wrong.append((field, r.status_code, body))
        assert wrong == []
        r = await env.post("/emails", None, content=b'{"subject": "\\ud800"}', headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["message"].startswith("invalid JSON")
        # The same in a batch names the email's index too.
        r = await env.post("/emails/batch", [base(), base(to="a@@b.test")])
        assert r.status_code == 422 and r.json()["message"].startswith("[1].to")
        assert env.engine.counts["accepted"] == 0


async def test_metrics_for_prometheus_behind_an_admin_key(tmp_path):
    rules = '[[rule]]\nmatch = "gone@y.test"\naction = "reject"\nreply = "550 5.1.1 no such user"\n'
    async with running(tmp_path, rules=rules) as env:
        await sdk(resend.Emails.send, email())
        await sdk(resend.Emails.send, email("gone@y.test"))
        with trio.fail_after(BOUND):
            while (env.engine.counts["delivered"], env.engine.counts["bounced"]) != (2, 1):   # and the report
                await trio.sleep(0.01)
        assert (await env.get("/metrics")).status_code == 401
        r = await env.get("/metrics", key=ADMIN)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    assert samples["sender_accepted_total"] == 3                  # two, and the non-delivery report
    assert samples['sender_outcomes_total{category="",event="delivered",provider=""}'] == 2
    assert samples['sender_outcomes_total{category="invalid_recipient",event="bounced",provider=""}'] == 1
    assert samples['sender_delivery_latency_seconds_count{provider=""}'] == 2
    assert samples["sender_journal_fsync_seconds_count"] >= 1
    assert samples["sender_queue_messages"] == 0
    assert {'sender_queue_deliveries{state="timer"}', 'sender_queue_deliveries{state="in_flight"}'} <= set(samples)


async def test_explain_tells_which_bucket_holds_a_queued_email_and_until_when(tmp_path):
    from sender.explain import Story, render

    shaping = {"shaping": {"customer": {"acme": {"max_message_rate": "1/h"}}}}
    async with running(tmp_path, extra=shaping) as env:
        first = await sdk(resend.Emails.send, email("one@y.test"))
        second = await sdk(resend.Emails.send, email("two@y.test"))
        await env.wait_received(1)                              # the hour's one token went to the first
        r = await env.get(f"/admin/explain/{second['id']}", key=ADMIN)
        assert r.status_code == 200
        story = msgspec.json.decode(r.content, type=Story)
        [part] = story.queued
        assert (part["state"], part["bucket"], part["rcpts"]) == ("throttled", "customer:acme", ["two@y.test"])
        assert 3000 < part["until"] - env.engine.now() <= 3600
        assert "held by the customer:acme bucket until" in render(story)
        done = msgspec.json.decode((await env.get(f"/admin/explain/{first['id']}", key=ADMIN)).content, type=Story)
        assert [e.event for e in done.events] == ["accepted", "delivered"] and done.queued == []
        assert (await env.get(f"/admin/explain/{second['id']}")).status_code == 401      # a customer's key


async def test_an_admin_pauses_a_customer_with_a_reason_and_resumes_it(tmp_path):
    async with running(tmp_path) as env:
        r = await env.post("/admin/pause", {"customer": "acme", "who": "ops@x"}, key=ADMIN)
        assert r.status_code == 422 and r.json()["message"].startswith("reason:")
        assert (await env.post("/admin/pause", {"customer": "acme", "reason": "storm"})).status_code == 401
        r = await env.post("/admin/pause", {"customer": "acme", "reason": "bounce storm", "who": "ops@x"}, key=ADMIN)
        assert r.status_code == 200 and r.json()["scope"] == "customer"
        assert [p["value"] for p in (await env.get("/admin/pauses", key=ADMIN)).json()["data"]] == ["acme"]
        held = await sdk(resend.Emails.send, email("held@y.test"))          # accepted, not sent
        other = env.engine.config.customer[1].api_keys[0]
        r = await env.post("/emails", email("free@y.test"), key=other)
        await env.wait_received(1)
        assert [m[1] for m in env.sink.received] == [["free@y.test"]]
        story = (await env.get(f"/admin/explain/{held['id']}", key=ADMIN)).json()
        assert story["queued"][0]["state"] == "paused" and story["queued"][0]["reason"] == "bounce storm"
        r = await env.post("/admin/resume", {"customer": "acme", "reason": "storm over"}, key=ADMIN)
        assert r.status_code == 200
        await env.wait_received(2)
        r = await env.post("/admin/resume", {"customer": "acme", "reason": "again"}, key=ADMIN)
        assert r.status_code == 422 and "not paused" in r.json()["message"]


async def test_a_blocked_domain_is_422_naming_to(tmp_path):
    async with running(tmp_path, extra={"abuse": {"blocked_domains": ["trap.example"]}}) as env:
        r = await env.post("/emails", email("x@trap.example"))
        assert r.status_code == 422 and r.json()["message"].startswith("to: every recipient is at a blocked domain")
        r = await env.post("/emails/batch", [email(), email("y@trap.example")])
        assert r.status_code == 422 and r.json()["message"].startswith("[1].to: every recipient is at a blocked")
        assert env.engine.counts["accepted"] == 0


@pytest.mark.parametrize("path, body, field", [
    ("/admin/purge", {"colour": "red", "reason": "x"}, "colour"),
    ("/admin/purge", {"customer": "acme"}, "reason"),
    ("/admin/purge", {"customer": "acme", "reason": "x", "then": "burn"}, "then"),
    ("/admin/purge", {"customer": "acme", "reason": "x", "dry_run": "yes"}, "dry_run"),
    ("/admin/purge", {"customer": "acme", "reason": "x", "keep": "forever"}, "keep"),
    ("/admin/purge", {"customer": "acme", "reason": "x", "purge_id": "Q1"}, "purge_id"),
    ("/admin/release", {"reason": "x"}, "id"),
    ("/admin/reroute", {"domain": "y.test", "pool": "p", "reason": "x"}, "pool"),
    ("/admin/reroute", {"customer": "acme", "pool": "p", "reason": "x"}, "customer: not a field"),
    ("/admin/limit", {"source": "127.0.0.2", "connections": 3, "reason": "x"}, "connections"),
    ("/admin/unlimit", {"customer": "acme", "reason": "x"}, "customer"),
    ("/admin/drain", {"reason": "x", "timeout": "soonish"}, "timeout"),
    ("/admin/undrain", {"reason": "x"}, "drain"),
])
async def test_a_bad_control_is_422_naming_its_field_and_changes_nothing(tmp_path, path, body, field):
    async with running(tmp_path) as env:
        r = await env.post(path, body, key=ADMIN)
        assert r.status_code == 422 and r.json()["message"].startswith(f"{field}"), r.text
        controls = (await env.get("/admin/controls", key=ADMIN)).json()
        assert controls == {"pauses": [], "reroutes": [], "limits": [], "quarantine": [], "draining": None}


async def test_a_draining_daemon_answers_503_to_new_mail_until_the_drain_is_called_off(tmp_path):
    async with running(tmp_path) as env:
        r = await env.post("/admin/drain", {"reason": "deploy", "timeout": "1h"}, key=ADMIN)
        assert r.status_code == 200 and r.json()["who"] == "unknown"
        r = await env.post("/emails", email("late@y.test"))
        assert r.status_code == 503 and r.headers["retry-after"] == "60"
        assert (await env.post("/emails/batch", [email("late@y.test")])).status_code == 503
        assert (await env.post("/admin/undrain", {"reason": "deploy called off"}, key=ADMIN)).status_code == 200
        assert (await env.post("/emails", email("late@y.test"))).status_code == 200
        assert not env.engine.drained.is_set() and env.engine.counts["accepted"] == 1
