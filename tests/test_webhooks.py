"""Webhooks: Svix signatures, retries on schedule, the durable outbox, dead letters.

Deliveries to a real endpoint run on the real clock against ``HookReceiver`` on 127.0.0.1
(sockets do not mix with the autojump clock), each wait bounded by ``trio.fail_after``, and
are checked with Resend's own SDK. Schedules, subscriptions and limits use a fake ``post``
on the autojump clock.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import ssl
import struct
import time
import urllib.parse

import msgspec
import resend
import trio
import trio.testing
import trustme

from sender import webhooks
from sender.config import CustomerConfig, WebhookConfig, WebhooksConfig
from sender.webhooks import Webhooks, new_hook_id, post_http, sign

from helpers import HookReceiver, free_port

BOUND = 5.0  # seconds; every wait on the network is bounded by this
SECRET = "whsec_" + base64.b64encode(b"webhook signing key for tests").decode()
SVIX_DEFAULT = [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0]


def customer(cid: str = "acme", *hooks: tuple[str, list[str]]) -> CustomerConfig:
    return CustomerConfig(id=cid, webhook=[WebhookConfig(url=u, secret=SECRET, events=e) for u, e in hooks])


def settings(schedule: list[float], *, timeout: float = 2.0, max_in_flight: int = 10) -> WebhooksConfig:
    return WebhooksConfig(retry_schedule=schedule, timeout=timeout, max_in_flight=max_in_flight)


def verified(headers: dict[str, str], body: bytes) -> dict:
    """The event, once Resend's SDK has checked its signature (and that its timestamp is now)."""
    return resend.Webhooks.verify({"payload": body.decode(), "webhook_secret": SECRET, "headers": {
        "id": headers["svix-id"], "timestamp": headers["svix-timestamp"], "signature": headers["svix-signature"]}})


def records(path) -> list:
    """Every record of an outbox, read straight from its frames."""
    data, out, off = path.read_bytes(), [], 0
    while off + 8 <= len(data):
        length, _crc = struct.unpack_from("<II", data, off)
        out.append(msgspec.msgpack.decode(data[off + 8: off + 8 + length], type=webhooks.OutboxRecord))
        off += 8 + length
    return out


async def until(cond, bound: float = BOUND, step: float = 0.005) -> None:
    with trio.fail_after(bound):
        while not cond():
            await trio.sleep(step)


DATA = {"email_id": "e1", "from": "App <app@x.test>", "to": ["user@y.test"], "subject": "hi"}


# ---------------------------------------------------------------- signatures and ids


def test_sign_matches_svix_and_an_independent_hmac():
    # The example from Svix's "verifying payloads manually" page.
    assert sign("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330,
                b'{"test": 2432232314}') == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    body = b'{"type":"email.delivered","data":{}}'
    key = base64.b64decode(SECRET[len("whsec_"):])
    mac = hmac.new(key, b"msg_abc.1700000000." + body, hashlib.sha256).digest()
    assert sign(SECRET, "msg_abc", 1700000000, body) == "v1," + base64.b64encode(mac).decode()


def test_hook_ids_look_like_svix_message_ids():
    ids = {new_hook_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"msg_[A-Za-z0-9]{27}", i) for i in ids)


# ---------------------------------------------------------------- real endpoint, real clock


async def test_two_failures_then_delivered_same_id_same_bytes(tmp_path):
    receiver = HookReceiver([500, 500])
    async with trio.open_nursery() as nursery:
        url = await nursery.start(receiver.run)
        hooks = Webhooks([customer("acme", (url, []))], settings([0.05, 0.05, 0.05]), tmp_path / "webhooks.log",
                         time.time)
        await nursery.start(hooks.run)
        hooks.emit("acme", "email.delivered", DATA, 1700000000.5)
        await until(lambda: hooks.statistics()["delivered"] == 1)
        assert hooks.statistics() == {"pending": 0, "dead": 0, "delivered": 1, "failed_attempts": 2}
        nursery.cancel_scope.cancel()
    assert receiver.answered == [500, 500, 200]
    heads = [h for h, _ in receiver.received]
    assert len({h["svix-id"] for h in heads}) == 1 and re.fullmatch(r"msg_\w{27}", heads[0]["svix-id"])
    stamps = [int(h["svix-timestamp"]) for h in heads]
    assert stamps == sorted(stamps)
    assert len({b for _, b in receiver.received}) == 1                 # the same bytes every time
    for h, b in receiver.received:
        event = verified(h, b)
        assert h["content-type"] == "application/json" and h["user-agent"] == "sender-webhooks"
    assert event == {"type": "email.delivered", "created_at": "2023-11-14T22:13:20.500Z", "data": DATA}
    assert [type(r).__name__ for r in records(tmp_path / "webhooks.log")] == [
        "Queued", "Attempted", "Attempted", "Done"]


async def test_a_pending_hook_waits_out_a_restart(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/hooks"
    path = tmp_path / "webhooks.log"
    config = settings([0.02] * 100)
    async with trio.open_nursery() as nursery:                      # nobody listens: refused
        hooks = Webhooks([customer("acme", (url, []))], config, path, time.time)
        await nursery.start(hooks.run)
        hooks.emit("acme", "email.bounced", DATA, time.time())
        await until(lambda: hooks.statistics()["failed_attempts"] >= 2)
        nursery.cancel_scope.cancel()
    assert hooks.statistics()["pending"] == 1 and not hooks.dead_letters()
    (queued,) = [r for r in records(path) if isinstance(r, webhooks.Queued)]
    receiver = HookReceiver()
    again = Webhooks([customer("acme", (url, []))], config, path, time.time)
    assert again.statistics()["pending"] == 1
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
        nursery.start_soon(trio.serve_listeners, receiver._serve, listeners)
        await nursery.start(again.run)
        await until(lambda: again.statistics()["delivered"] == 1)
        nursery.cancel_scope.cancel()
    ((headers, body),) = receiver.received
    assert headers["svix-id"] == queued.id and body == queued.body
    assert verified(headers, body)["type"] == "email.bounced"
    assert Webhooks([], config, path, time.time).statistics()["pending"] == 0


async def test_emit_before_run_is_sent_once_run_starts(tmp_path):
    receiver = HookReceiver()
    async with trio.open_nursery() as nursery:
        url = await nursery.start(receiver.run)
        hooks = Webhooks([customer("acme", (url, []))], settings([0.05]), tmp_path / "webhooks.log", time.time)
        hooks.emit("acme", "email.sent", DATA, time.time())
        assert hooks.statistics()["pending"] == 1 and not receiver.received
        await nursery.start(hooks.run)
        await until(lambda: hooks.statistics()["delivered"] == 1)
        nursery.cancel_scope.cancel()
    assert verified(*receiver.received[0])["type"] == "email.sent"


async def test_dead_letter_survives_a_restart_and_is_retried(tmp_path, caplog):
    caplog.set_level(logging.INFO, "sender.webhooks")
    receiver = HookReceiver([500, 500, 500])
    path = tmp_path / "webhooks.log"
    config = settings([0.01, 0.01])
    async with trio.open_nursery() as nursery:
        url = await nursery.start(receiver.run)
        hooks = Webhooks([customer("acme", (url, []))], config, path, time.time)
        await nursery.start(hooks.run)
        hooks.emit("acme", "email.complained", DATA, 1700000000.0)
        await until(lambda: hooks.dead_letters())
        (letter,) = hooks.dead_letters()
        assert (letter.attempts, letter.last_error, letter.url, letter.customer, letter.type) == (
            3, "HTTP 500", url, "acme", "email.complained")
        assert hooks.statistics() == {"pending": 0, "dead": 1, "delivered": 0, "failed_attempts": 3}
        nursery.cancel_scope.cancel()
    again = Webhooks([customer("acme", (url, []))], config, path, time.time)
    assert again.dead_letters() == [letter]
    assert webhooks.read_outbox(path) == (0, [letter])
    assert again.retry_dead("msg_nosuchthing") is False
    async with trio.open_nursery() as nursery:             # the receiver again, on the same port
        listeners = await trio.open_tcp_listeners(urllib.parse.urlsplit(url).port, host="127.0.0.1")
        nursery.start_soon(trio.serve_listeners, receiver._serve, listeners)
        await nursery.start(again.run)
        assert again.retry_dead(letter.id) is True and again.retry_dead(letter.id) is False
        await until(lambda: again.statistics()["delivered"] == 1)
        assert again.statistics() == {"pending": 0, "dead": 0, "delivered": 1, "failed_attempts": 0}
        nursery.cancel_scope.cancel()
    assert receiver.answered == [500, 500, 500, 200]
    assert {h["svix-id"] for h, _ in receiver.received} == {letter.id}
    for h, b in receiver.received:
        verified(h, b)
    assert letter.body.encode() == receiver.received[-1][1]
    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 3 and all(letter.id in m and url in m and "HTTP 500" in m for m in failures)
    assert "attempt 3" in failures[-1]
    assert SECRET not in caplog.text and SECRET[6:] not in caplog.text
    assert webhooks.read_outbox(path) == (0, [])


async def test_no_answer_within_the_timeout_fails_the_attempt(tmp_path):
    async def silent(stream):
        async with stream:
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, silent, listeners)
        hooks = Webhooks([customer("acme", (f"http://127.0.0.1:{port}/", []))], settings([0.01], timeout=0.2),
                         tmp_path / "webhooks.log", time.time)
        await nursery.start(hooks.run)
        hooks.emit("acme", "email.sent", DATA, time.time())
        await until(lambda: hooks.dead_letters())
        nursery.cancel_scope.cancel()
    (letter,) = hooks.dead_letters()
    assert letter.attempts == 2 and letter.last_error == "no answer within 0.2s"


async def test_https_endpoint(tmp_path):
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    receiver = HookReceiver()

    async def post(url, headers, body, timeout):
        return await post_http(url, headers, body, timeout, ssl_context=client_ctx)

    async with trio.open_nursery() as nursery:
        tcp = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = tcp[0].socket.getsockname()[1]
        listeners = [trio.SSLListener(tcp[0], server_ctx, https_compatible=True)]
        nursery.start_soon(trio.serve_listeners, receiver._serve, listeners)
        hooks = Webhooks([customer("acme", (f"https://127.0.0.1:{port}/in?x=1", []))], settings([0.05]),
                         tmp_path / "webhooks.log", time.time, post=post)
        await nursery.start(hooks.run)
        hooks.emit("acme", "email.sent", DATA, time.time())
        await until(lambda: hooks.statistics()["delivered"] == 1)
        nursery.cancel_scope.cancel()
    assert verified(*receiver.received[0])["data"] == DATA


# ---------------------------------------------------------------- virtual clock, fake post


class FakePost:
    """Records (virtual time, url, headers) of every attempt and answers ``status``."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.calls: list[tuple[float, str, dict[str, str], bytes]] = []

    async def __call__(self, url, headers, body, timeout) -> int:
        self.calls.append((trio.current_time(), url, headers, body))
        await trio.sleep(0)
        return self.status


async def test_the_svix_schedule_then_dead(tmp_path, autojump_clock):
    post = FakePost(503)
    hooks = Webhooks([customer("acme", ("http://h.test/", []))], settings(SVIX_DEFAULT), tmp_path / "w.log",
                     trio.current_time, post=post)
    async with trio.open_nursery() as nursery:
        await nursery.start(hooks.run)
        start = trio.current_time()
        hooks.emit("acme", "email.delivery_delayed", DATA, start)
        await until(lambda: hooks.dead_letters(), bound=200_000, step=60.0)
        nursery.cancel_scope.cancel()
    times = [c[0] for c in post.calls]
    assert times[0] == start and len(times) == len(SVIX_DEFAULT) + 1
    for before, after, wait in zip(times, times[1:], SVIX_DEFAULT):
        assert 0.9 * wait - 1e-6 <= after - before <= 1.1 * wait + 1e-6, (before, after, wait)
    (letter,) = hooks.dead_letters()
    assert (letter.attempts, letter.last_error) == (8, "HTTP 503")
    assert {int(c[2]["svix-timestamp"]) for c in post.calls} == {int(t) for t in times}


async def test_subscriptions_and_wants(tmp_path, autojump_clock):
    post = FakePost()
    path = tmp_path / "w.log"
    written = []
    hooks = Webhooks([customer("acme", ("http://bounces.test/", ["email.bounced"])),
                      customer("beta", ("http://all.test/", [])), customer("quiet")],
                     settings([1.0]), path, trio.current_time, post=post, on_write=lambda: written.append(1))
    assert hooks.wants("acme", "email.bounced") and not hooks.wants("acme", "email.delivered")
    assert hooks.wants("beta", "email.delivered") and hooks.wants("beta", "email.scheduled")
    assert not hooks.wants("quiet", "email.bounced") and not hooks.wants("nobody", "email.bounced")
    empty = path.stat().st_size
    hooks.emit("acme", "email.delivered", DATA, 1.0)
    hooks.emit("quiet", "email.bounced", DATA, 1.0)
    hooks.emit("nobody", "email.bounced", DATA, 1.0)
    assert path.stat().st_size == empty and not written
    hooks.emit("acme", "email.bounced", DATA, 1.0)
    hooks.emit("beta", "email.delivered", DATA, 1.0)
    assert path.stat().st_size > empty and len(written) == 2
    async with trio.open_nursery() as nursery:
        await nursery.start(hooks.run)
        await until(lambda: hooks.statistics()["delivered"] == 2)
        nursery.cancel_scope.cancel()
    got = sorted((url, msgspec.json.decode(body)["type"]) for _, url, _, body in post.calls)
    assert got == [("http://all.test/", "email.delivered"), ("http://bounces.test/", "email.bounced")]
    assert len(written) == 4                        # and a Done record each


async def test_at_most_max_in_flight_attempts_per_url(tmp_path, autojump_clock):
    release = trio.Event()
    running: dict[str, int] = {}
    most: dict[str, int] = {}

    async def post(url, headers, body, timeout):
        running[url] = running.get(url, 0) + 1
        most[url] = max(most.get(url, 0), running[url])
        try:
            await release.wait()
        finally:
            running[url] -= 1
        return 204

    hooks = Webhooks([customer("acme", ("http://a.test/", []), ("http://b.test/", []))],
                     settings([1.0], timeout=3600, max_in_flight=2), tmp_path / "w.log", trio.current_time, post=post)
    async with trio.open_nursery() as nursery:
        await nursery.start(hooks.run)
        for _ in range(5):
            hooks.emit("acme", "email.sent", DATA, 0.0)
        await trio.testing.wait_all_tasks_blocked()
        assert running == {"http://a.test/": 2, "http://b.test/": 2}
        release.set()
        await until(lambda: hooks.statistics()["delivered"] == 10, bound=60)
        nursery.cancel_scope.cancel()
    assert most == {"http://a.test/": 2, "http://b.test/": 2}


async def test_cancelled_mid_attempt_the_hook_stays_pending(tmp_path, autojump_clock):
    async def hang(url, headers, body, timeout):
        await trio.sleep_forever()

    path = tmp_path / "w.log"
    hooks = Webhooks([customer("acme", ("http://a.test/", []))], settings([1.0], timeout=3600), path,
                     trio.current_time, post=hang)
    async with trio.open_nursery() as nursery:
        await nursery.start(hooks.run)
        hooks.emit("acme", "email.sent", DATA, 0.0)
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    post = FakePost()
    again = Webhooks([customer("acme", ("http://a.test/", []))], settings([1.0]), path, trio.current_time, post=post)
    assert again.statistics()["pending"] == 1
    async with trio.open_nursery() as nursery:
        await nursery.start(again.run)
        await until(lambda: again.statistics()["delivered"] == 1)
        nursery.cancel_scope.cancel()
    assert len(post.calls) == 1


async def test_an_endpoint_no_longer_configured_goes_to_dead_letters(tmp_path, autojump_clock):
    path = tmp_path / "w.log"
    hooks = Webhooks([customer("acme", ("http://old.test/", []))], settings([1.0]), path, trio.current_time)
    hooks.emit("acme", "email.sent", DATA, 0.0)
    hooks.close()
    post = FakePost()
    again = Webhooks([customer("acme", ("http://new.test/", []))], settings([1.0]), path, trio.current_time,
                     post=post)
    async with trio.open_nursery() as nursery:
        await nursery.start(again.run)
        await until(lambda: again.dead_letters())
        nursery.cancel_scope.cancel()
    (letter,) = again.dead_letters()
    assert (letter.url, letter.attempts, letter.last_error) == ("http://old.test/", 0, "endpoint no longer configured")
    assert not post.calls


async def test_without_on_write_the_outbox_is_fsynced_within_a_second(tmp_path, autojump_clock, monkeypatch):
    synced: list[float] = []

    async def inline(fn, *args):                # in this task, so the virtual clock can tell when
        synced.append(trio.current_time())
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", inline)
    hooks = Webhooks([customer("acme", ("http://a.test/", []))], settings([1.0]), tmp_path / "w.log",
                     trio.current_time, post=FakePost())
    async with trio.open_nursery() as nursery:
        await nursery.start(hooks.run)
        start = trio.current_time()
        hooks.emit("acme", "email.sent", DATA, 0.0)
        await trio.sleep(5)
        assert hooks.statistics()["delivered"] == 1
        nursery.cancel_scope.cancel()
    assert len(synced) == 1 and 0 < synced[0] - start <= 1.0        # Queued and Done, one fsync


# ---------------------------------------------------------------- the outbox file


def test_a_torn_tail_is_cut_and_earlier_hooks_kept(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "sender.webhooks")
    path = tmp_path / "w.log"
    hooks = Webhooks([customer("acme", ("http://a.test/", []))], settings([1.0]), path, lambda: 100.0)
    hooks.emit("acme", "email.sent", DATA, 1.0)
    hooks.emit("acme", "email.delivered", DATA, 2.0)
    hooks.close()
    good = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"\x40\x00\x00\x00\x01\x02\x03\x04\x93garbage")
    again = Webhooks([customer("acme", ("http://a.test/", []))], settings([1.0]), path, lambda: 100.0)
    assert again.statistics()["pending"] == 2
    assert path.stat().st_size == good and "torn tail" in caplog.text
    again.emit("acme", "email.bounced", DATA, 3.0)              # appends after the good part
    again.close()
    assert [r.type for r in records(path)] == ["email.sent", "email.delivered", "email.bounced"]


def test_a_corrupt_frame_in_the_middle_is_skipped(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "sender.webhooks")
    path = tmp_path / "w.log"
    hooks = Webhooks([customer("acme", ("http://a.test/", []))], settings([1.0]), path, lambda: 100.0)
    for kind in ("email.sent", "email.delivered", "email.bounced"):
        hooks.emit("acme", kind, DATA, 1.0)
    hooks.close()
    data = bytearray(path.read_bytes())
    first = struct.unpack_from("<I", data, 0)[0] + 8
    data[first + 20] ^= 0xFF                                    # inside the second frame
    path.write_bytes(data)
    again = Webhooks([customer("acme", ("http://a.test/", []))], settings([1.0]), path, lambda: 100.0)
    assert again.statistics()["pending"] == 2 and "corrupt record" in caplog.text
    assert path.stat().st_size == len(data)                     # nothing cut off
    assert webhooks.read_outbox(path)[0] == 2


async def test_compaction_keeps_pending_and_dead_and_drops_delivered(tmp_path, autojump_clock, monkeypatch):
    monkeypatch.setattr(webhooks, "COMPACT_BYTES", 1000)
    stuck = trio.Event()

    async def post(url, headers, body, timeout):
        if "slow" in url:
            await stuck.wait()                      # in flight all along: pending
        return 500 if "dead" in url else 200

    path = tmp_path / "w.log"
    cust = [customer("slow", ("http://slow.test/", [])), customer("dead", ("http://dead.test/", [])),
            customer("ok", ("http://ok.test/", []))]
    hooks = Webhooks(cust, settings([1.0], timeout=1e6), path, trio.current_time, post=post)
    async with trio.open_nursery() as nursery:
        await nursery.start(hooks.run)
        hooks.emit("slow", "email.sent", DATA, 0.0)
        hooks.emit("dead", "email.sent", DATA, 0.0)
        await until(lambda: hooks.dead_letters())
        (slow,) = [r for r in records(path) if isinstance(r, webhooks.Queued) and r.customer == "slow"]
        (dead,) = hooks.dead_letters()
        for n in range(1, 50):                      # one at a time, until the file is rewritten
            before = path.stat().st_size
            hooks.emit("ok", "email.delivered", DATA, 0.0)
            await until(lambda: hooks.statistics()["delivered"] == n)
            if path.stat().st_size < before:
                break
        assert n > 1 and before > webhooks.COMPACT_BYTES > path.stat().st_size
        kept = records(path)
        assert [(type(r).__name__, r.id) for r in kept] == [
            ("Queued", slow.id), ("Queued", dead.id), ("Attempted", dead.id), ("Dead", dead.id)]
        hooks.emit("ok", "email.sent", DATA, 0.0)   # appended to the new file
        await until(lambda: hooks.statistics()["delivered"] == n + 1)
        assert [type(r).__name__ for r in records(path)[4:]] == ["Queued", "Done"]
        nursery.cancel_scope.cancel()
    again = Webhooks(cust, settings([1.0]), path, trio.current_time)
    assert again.statistics()["pending"] == 1 and again.dead_letters() == [dead]
    assert dead.attempts == 2
