"""The operators' dashboard: the figures of /admin/dashboard.json match what was sent, both
routes need an admin key (Bearer, or Basic for a browser), and the page in headless Chromium
shows the same numbers as the JSON and /admin/stats.

The JSON tests run an Engine on in-memory sinks on virtual time and call the ASGI app in
process. The browser test runs ``sender run`` and ``sender sink`` on loopback and drives
Debian's chromium with Playwright; tests/install-chromium.sh installs it when it is missing.
"""

from __future__ import annotations

import base64
import importlib
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import trio

from sender.config import parse_config
from sender.dashboard import BUCKETS, INTERVAL, PAGE
from sender.inject.http import create_app
from sender.sink import Sink, load_rules

from helpers import ROOT, Sinks, free_port, spawn, start_engine, stop, until, wait_for_line

ADMIN = "adm_dash_key"
BODY = b"Subject: t\r\n\r\nhello\r\n"
MX = "mx.gmail.test"
REJECT_BAD = '[[rule]]\nmatch = "bad*"\naction = "reject"\nreply = "550 5.1.1 Sink: user unknown"\n'
CHROMIUM = "/usr/bin/chromium"
INSTALL = Path(__file__).with_name("install-chromium.sh")
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"]


def config(tmp_path, **extra):
    return parse_config({
        "spool": {"path": str(tmp_path / "spool"), "fsync": "never"},
        "listen": {"smtp": "", "admin_keys": [ADMIN]},
        "delivery": {"retry_interval": 60, "max_age": 86400, "starttls": "never"},
        "route": [{"match": "*", "relay": f"{MX}:25"}],
        "shaping": {"provider": {"gmail": {"match": [MX]}}},
        "source": {"ip5": {"address": "127.0.0.5"}},
        "pool": {"shared": {"sources": ["ip5"]}},
        "egress": {"default_pool": "shared"},
        "customer": [{"id": c, "api_keys": [f"re_{c}"]} for c in ("acme", "beta", "gamma")],
        "bounces": {"notify": False},
        **extra,
    })


async def submit(engine, customer: str, n: int, local: str = "u") -> None:
    for i in range(n):
        await engine.submit("app@x.test", [f"{local}{i}@y.test"], BODY, customer=customer)


def client(engine) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(engine)), base_url="http://sender.test")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def basic(password: str, user: str = "ops") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def rate(data: dict, dim: str, value: str, kind: str) -> int:
    return data["rates"][dim][value][kind]["total"]


# ----------------------------------------------------------------------------- the JSON


async def test_the_figures_match_what_was_sent(tmp_path, autojump_clock):
    sink = Sink(load_rules(REJECT_BAD))
    async with trio.open_nursery() as n:
        engine = await start_engine(n, config(tmp_path), Sinks(**{MX: sink}))
        engine.control("pause", "customer", "gamma", "ops@x.test", "complaint spike")
        await submit(engine, "acme", 5)
        await submit(engine, "beta", 3, local="bad")
        await submit(engine, "gamma", 2)
        await until(lambda: engine.counts["delivered"] == 5 and engine.counts["bounced"] == 3)
        await trio.sleep(5)
        async with client(engine) as http:
            r = await http.get("/admin/dashboard.json", headers=bearer(ADMIN))
            assert r.status_code == 200 and r.headers["content-type"] == "application/json"
            data = r.json()
            stats = (await http.get("/admin/stats", headers=bearer(ADMIN))).json()
        n.cancel_scope.cancel()
    totals = data["totals"]
    assert (totals["accepted"], totals["delivered"], totals["bounced"], totals["deferred"]) == (10, 5, 3, 0)
    assert {k: totals[k] for k in ("accepted", "delivered", "bounced")} == {
        k: stats[k] for k in ("accepted", "delivered", "bounced")}
    assert totals["queued"] == totals["messages"] == stats["live_messages"] == 2
    assert data["depth"]["paused"] == 2
    assert data["queued"]["provider"] == {"gmail": 2}
    assert data["queued"]["customer"] == {"gamma": 2}
    assert data["queued"]["source"] == {"127.0.0.5": 2}
    assert rate(data, "provider", "gmail", "delivered") == 5 and rate(data, "provider", "gmail", "bounced") == 3
    assert rate(data, "customer", "acme", "delivered") == 5 and rate(data, "customer", "acme", "bounced") == 0
    assert rate(data, "customer", "beta", "bounced") == 3 and "gamma" not in data["rates"]["customer"]
    assert rate(data, "source", "127.0.0.5", "delivered") == 5
    assert list(data["rates"]["customer"]) == ["acme", "beta"]         # the busiest first
    series = data["rates"]["provider"]["gmail"]["delivered"]["series"]
    assert len(series) == BUCKETS and sum(series) == 5
    assert data["rates"]["start"] == (int(data["now"] // INTERVAL) - BUCKETS + 1) * INTERVAL
    assert data["bounce_categories"] == [{"category": "invalid_recipient", "count": 3}]
    [pause] = data["pauses"]
    assert (pause["scope"], pause["value"], pause["who"], pause["reason"]) == (
        "customer", "gamma", "ops@x.test", "complaint spike")
    assert data["automation"] == [] and data["processes"] == 1


async def test_rates_leave_the_window_and_the_queue_count_is_cached_for_a_second(tmp_path, autojump_clock):
    sink = Sink(load_rules(REJECT_BAD))
    async with trio.open_nursery() as n:
        engine = await start_engine(n, config(tmp_path), Sinks(**{MX: sink}))
        await submit(engine, "acme", 2)
        await submit(engine, "beta", 1, local="bad")
        await until(lambda: engine.counts["delivered"] == 2 and engine.counts["bounced"] == 1)
        engine.control("pause", "customer", "gamma", "ops@x.test", "hold")
        async with client(engine) as http:
            async def get() -> dict:
                return (await http.get("/admin/dashboard.json", headers=bearer(ADMIN))).json()

            assert (await get())["queued"]["total"] == 0
            await submit(engine, "gamma", 3)
            assert (await get())["queued"]["total"] == 0                # the count of a moment ago
            await trio.sleep(1.0)
            queued = (await get())["queued"]
            assert queued.pop("at") > engine.now() - 1
            assert queued == {"total": 3, "provider": {"gmail": 3}, "customer": {"gamma": 3}, "source": {"127.0.0.5": 3}}
            await trio.sleep(15 * 60)                                   # past the rates' window
            data = await get()
            assert data["rates"]["provider"] == {} and data["rates"]["customer"] == {}
            assert data["bounce_categories"] == [{"category": "invalid_recipient", "count": 1}]
            await trio.sleep(45 * 60)                                   # and past the hour
            assert (await get())["bounce_categories"] == []
            assert (await get())["totals"]["delivered"] == 2            # totals are since the start
        n.cancel_scope.cancel()


async def test_one_events_subscriber_per_engine_counting_what_came_before_it(tmp_path, autojump_clock):
    async with trio.open_nursery() as n:
        engine = await start_engine(n, config(tmp_path), Sinks(**{MX: Sink(load_rules(""))}))
        await submit(engine, "acme", 2)
        await until(lambda: engine.counts["delivered"] == 2)
        before = len(engine.events.subscribers)
        first, second = client(engine), client(engine)                 # two apps on one engine
        assert len(engine.events.subscribers) == before + 1
        await submit(engine, "acme", 1)
        await until(lambda: engine.counts["delivered"] == 3)
        async with first, second:
            for http in (first, second):
                data = (await http.get("/admin/dashboard.json", headers=bearer(ADMIN))).json()
                assert rate(data, "customer", "acme", "delivered") == 3
        n.cancel_scope.cancel()


async def test_automation_actions_in_force_are_listed(tmp_path, autojump_clock):
    from test_egress import GOOGLE_MX, SourceSink, SUSPEND_ON_GMAIL_RATE_LIMIT

    google = SourceSink(provider="google", rate_limit="1/h", limited_sources=["127.0.0.3"])
    cfg = config(tmp_path, route=[{"match": "*", "relay": f"{GOOGLE_MX}:25"}], shaping={},
                 source={"ip2": {"address": "127.0.0.2"}, "ip3": {"address": "127.0.0.3"}},
                 pool={"shared": {"sources": ["ip2", "ip3"]}},
                 automation={"default_rules": False, "rule": [SUSPEND_ON_GMAIL_RATE_LIMIT]})
    async with trio.open_nursery() as n:
        engine = await start_engine(n, cfg, Sinks(**{GOOGLE_MX: google}))
        await submit(engine, "acme", 40)
        await until(lambda: engine.dispatcher.egress.automation.active(), step=1)
        async with client(engine) as http:
            data = (await http.get("/admin/dashboard.json", headers=bearer(ADMIN))).json()
        n.cancel_scope.cancel()
    [action] = data["automation"]
    assert (action["rule"], action["action"], action["source"], action["provider"]) == (
        "gmail-rate-limit-suspend", "suspend", "127.0.0.3", "google")
    assert action["until"] - action["started"] == 3600 and "4.7.28" in action["replies"][-1]
    assert rate(data, "source", "127.0.0.3", "deferred") >= 3


async def test_only_an_admin_key_opens_the_dashboard_and_a_browser_is_asked_for_basic_auth(tmp_path, autojump_clock):
    async with trio.open_nursery() as n:
        engine = await start_engine(n, config(tmp_path), Sinks())
        async with client(engine) as http:
            for path in ("/dashboard", "/admin/dashboard.json"):
                for headers in ({}, bearer("re_acme"), basic("re_acme"), basic("wrong"), bearer("wrong"),
                                basic(""), {"Authorization": "Basic !!!"}, {"Authorization": "Basic"}):
                    r = await http.get(path, headers=headers)
                    assert r.status_code == 401, (path, headers)
                    assert r.json()["name"] in ("missing_api_key", "invalid_api_key")
                    challenges = r.headers.get_list("www-authenticate")
                    if path == "/dashboard":
                        assert challenges == ['Basic realm="sender admin", charset="UTF-8"']
                    else:                       # an API client's Bearer first, then the browser's
                        assert challenges[0].startswith("Bearer") and challenges[1].startswith("Basic realm=")
                for headers in (bearer(ADMIN), basic(ADMIN), basic(ADMIN, user="")):
                    assert (await http.get(path, headers=headers)).status_code == 200, (path, headers)
            # Basic is for reading: a browser would send it along with another site's form post.
            r = await http.post("/admin/pause", json={"customer": "acme", "reason": "x"}, headers=basic(ADMIN))
            assert r.status_code == 401 and not engine.controls.pauses
            r = await http.post("/admin/pause", json={"customer": "acme", "reason": "x"}, headers=bearer(ADMIN))
            assert r.status_code == 200
            # Other admin reads take Basic too; customers' endpoints never do.
            assert (await http.get("/admin/stats", headers=basic(ADMIN))).status_code == 200
            assert (await http.get("/admin/stats", headers=basic("re_acme"))).status_code == 401
            assert (await http.get("/emails/nope", headers=basic("re_acme"))).status_code == 401
            assert (await http.get("/emails/nope", headers=bearer("re_acme"))).status_code == 404
        n.cancel_scope.cancel()


async def test_the_page_is_self_contained_and_runs_only_its_own_script(tmp_path, autojump_clock):
    async with trio.open_nursery() as n:
        engine = await start_engine(n, config(tmp_path), Sinks())
        async with client(engine) as http:
            r = await http.get("/dashboard", headers=basic(ADMIN))
        n.cancel_scope.cancel()
    assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
    assert r.content == PAGE and b"/admin/dashboard.json" in PAGE
    html = PAGE.decode()
    assert "<script src" not in html and "stylesheet" not in html and "https://" not in html
    assert html.replace("http://www.w3.org/2000/svg", "").count("http://") == 0
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp and "connect-src 'self'" in csp
    assert r.headers["cache-control"] == "no-store"


# ----------------------------------------------------------------------------- the browser


def _unavailable(reason: str):
    """Fail in CI (the test must run there), skip elsewhere."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; the dashboard's browser test must run in CI", pytrace=False)
    pytest.skip(reason)


def ensure_chromium(path: str = CHROMIUM, install: Path = INSTALL) -> str:
    """``path``, after running ``install`` if it is missing; fails in CI or skips if it is
    still missing, or if Playwright cannot be imported."""
    if not os.path.exists(path):
        try:
            done = subprocess.run(["bash", str(install)], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=900)
            said = f"exit status {done.returncode}: {(done.stderr or done.stdout).strip()[-500:]}"
        except (OSError, subprocess.TimeoutExpired) as e:
            said = str(e)
        if not os.path.exists(path):
            _unavailable(f"{path} is missing and {install.name} did not install it ({said})")
    try:
        importlib.import_module("playwright.sync_api")
    except ImportError as e:
        _unavailable(f"playwright cannot be imported ({e}); pip install -e '.[test]'")
    return path


@pytest.fixture(scope="session")
def chromium() -> str:
    return ensure_chromium()


def test_the_chromium_fixture_installs_then_fails_in_ci_or_skips(tmp_path, monkeypatch):
    browser = tmp_path / "chromium"
    installs = tmp_path / "install.sh"
    installs.write_text(f"set -euo pipefail\ntouch {browser}\n")
    assert ensure_chromium(str(browser), installs) == str(browser) and browser.exists()
    failing = tmp_path / "failing.sh"
    failing.write_text("echo 'E: Unable to locate package chromium' >&2\nexit 100\n")
    missing = str(tmp_path / "still-missing")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="Unable to locate package chromium.*must run in CI"):
        ensure_chromium(missing, failing)
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="still-missing is missing and failing.sh did not install it"):
        ensure_chromium(missing, failing)


def artifacts() -> Path:
    folder = Path(os.environ.get("SENDER_TEST_ARTIFACTS") or ROOT / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_the_dashboard_in_chromium_shows_the_daemons_figures(tmp_path, chromium):
    from playwright.sync_api import sync_playwright

    rules = tmp_path / "rules.toml"
    rules.write_text(REJECT_BAD)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs = []
    try:
        sink = spawn(["sink", "--listen", "127.0.0.1:0", "--rules", str(rules)], tmp_path / "sink.out")
        procs.append(sink)
        sink_port = wait_for_line(sink, tmp_path / "sink.out", r"^sink: listening on 127\.0\.0\.1:(\d+)$").group(1)
        cfg = tmp_path / "sender.toml"
        cfg.write_text(
            f'[spool]\npath = "{tmp_path / "spool"}"\nfsync = "batch"\n'
            f'[listen]\nsmtp = ""\nhttp = "127.0.0.1:{port}"\nadmin_keys = ["{ADMIN}"]\n'
            f'[delivery]\nretry_interval = "1h"\nstarttls = "never"\n'
            f'[bounces]\nnotify = false\n'
            f'[[route]]\nmatch = "*"\nrelay = "127.0.0.1:{sink_port}"\n'
            f'[shaping.provider.gmail]\nmatch = ["127.0.0.1"]\n'
            f'[source.lo]\naddress = "127.0.0.1"\n[pool.shared]\nsources = ["lo"]\n[egress]\ndefault_pool = "shared"\n'
            + "".join(f'[[customer]]\nid = "{c}"\napi_keys = ["re_{c}"]\n' for c in ("acme", "beta", "gamma")))
        daemon = spawn(["run", "--config", str(cfg)], tmp_path / "run.out")
        procs.append(daemon)
        wait_for_line(daemon, tmp_path / "run.out", r"listening on .*\(HTTP\)")

        with httpx.Client(base_url=url, timeout=10) as http:
            def send(customer: str, to: str) -> None:
                r = http.post("/emails", headers=bearer(f"re_{customer}"),
                              json={"from": "App <app@x.test>", "to": [to], "subject": "hi", "text": "hello"})
                assert r.status_code == 200, r.text

            reason = "Complaint spike from gamma, ticket 4711"
            r = http.post("/admin/pause", headers=bearer(ADMIN), json={"customer": "gamma", "reason": reason,
                                                                        "who": "oncall@x.test"})
            assert r.status_code == 200, r.text
            r = http.post("/admin/limit", headers=bearer(ADMIN), json={"customer": "beta", "rate": "100/min",
                                                                        "reason": "new sender", "who": "oncall@x.test"})
            assert r.status_code == 200, r.text
            for i in range(6):
                send("acme", f"user{i}@y.test")
            for i in range(3):
                send("beta", f"bad{i}@y.test")
            for i in range(2):
                send("gamma", f"held{i}@y.test")

            def json(path: str) -> dict:
                r = http.get(path, headers=bearer(ADMIN))
                assert r.status_code == 200, r.text
                return r.json()

            deadline = time.monotonic() + 30
            while True:                 # settled: every outcome in, the held mail counted, connections closed
                stats, data = json("/admin/stats"), json("/admin/dashboard.json")
                if (stats["delivered"], stats["bounced"], data["depth"]["paused"], data["totals"]["queued"],
                        data["depth"]["in_flight"]) == (6, 3, 2, 2, 0):
                    break
                assert time.monotonic() < deadline, (stats, data)
                time.sleep(0.2)

            started = time.monotonic()
            seen_requests: list[str] = []
            errors: list[str] = []
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium, args=BROWSER_ARGS)
                try:
                    context = browser.new_context(http_credentials={"username": "admin", "password": ADMIN},
                                                  viewport={"width": 1400, "height": 900})
                    page = context.new_page()
                    page.on("request", lambda req: seen_requests.append(req.url))
                    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                    page.on("pageerror", lambda e: errors.append(str(e)))
                    assert page.goto(url + "/dashboard").status == 200
                    page.wait_for_selector('body[data-loaded="1"]', timeout=15_000)
                    stats, data = json("/admin/stats"), json("/admin/dashboard.json")

                    def shown(testid: str) -> int:
                        return int(page.get_by_test_id(testid).inner_text().replace(",", ""))

                    for key in ("accepted", "delivered", "deferred", "bounced", "expired"):
                        assert shown(f"total-{key}") == stats[key] == data["totals"][key], key
                    assert (shown("total-delivered"), shown("total-bounced"), shown("total-accepted")) == (6, 3, 11)
                    assert shown("total-queued") == data["totals"]["queued"] == 2
                    assert shown("total-messages") == stats["live_messages"] == 2
                    for state, n in data["depth"].items():
                        assert shown(f"depth-{state}") == n, state
                    assert shown("depth-paused") == 2 and shown("total-in_flight") == 0
                    assert shown("queue-provider-gmail") == data["queued"]["provider"]["gmail"] == 2
                    assert shown("queue-customer-gamma") == data["queued"]["customer"]["gamma"] == 2
                    assert shown("queue-source-127.0.0.1") == data["queued"]["source"]["127.0.0.1"] == 2
                    assert shown("queue-customer-acme") == 0
                    assert shown("rate-provider-gmail-delivered") == rate(data, "provider", "gmail", "delivered") == 6
                    assert shown("rate-provider-gmail-bounced") == rate(data, "provider", "gmail", "bounced") == 3
                    assert shown("rate-customer-acme-delivered") == rate(data, "customer", "acme", "delivered") == 6
                    assert shown("rate-customer-beta-bounced") == rate(data, "customer", "beta", "bounced") == 3
                    assert shown("rate-source-127.0.0.1-delivered") == 6
                    assert shown("rate-total-delivered") == 6 and shown("rate-total-bounced") == 3
                    assert shown("bounce-category-invalid_recipient") == 3
                    assert data["bounce_categories"] == [{"category": "invalid_recipient", "count": 3}]
                    assert shown("pauses-count") == len(data["pauses"]) == 1
                    assert page.get_by_test_id("pause-reason-customer-gamma").inner_text() == reason
                    assert "oncall@x.test" in page.get_by_test_id("pause-customer-gamma").inner_text()
                    assert shown("controls-count") == len(data["controls"]) == 1
                    assert "rate 100/min" in page.get_by_test_id("control-limit-beta").inner_text()
                    assert shown("automation-count") == 0
                    assert float(page.evaluate("document.body.dataset.updated")) > 0

                    shot = artifacts() / "dashboard.png"
                    shot.unlink(missing_ok=True)
                    page.screenshot(path=str(shot), full_page=True)
                    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
                finally:
                    browser.close()
            assert errors == []                 # no script error, nothing the page's CSP refused
            assert seen_requests and all(u.startswith(url + "/") for u in seen_requests), seen_requests
            assert time.monotonic() - started < 60
    finally:
        for proc in reversed(procs):
            stop(proc)


def test_the_shards_data_merge_into_one_view():
    from sender.dashboard import BUCKETS, INTERVAL, merge

    def part(now, start, delivered, bounced, category_count):
        series = [0] * BUCKETS
        series[-1] = delivered
        return {"now": now, "totals": {"delivered": delivered, "bounced": bounced}, "depth": {"ready": 1},
                "queued": {"total": 2, "provider": {"gmail": 2}, "customer": {"acme": 2}, "source": {"127.0.0.2": 2}},
                "rates": {"interval": INTERVAL, "buckets": BUCKETS, "start": start, "kinds": ["delivered"],
                          "provider": {"gmail": {"delivered": {"total": delivered, "series": series},
                                                 "deferred": {"total": 0, "series": [0] * BUCKETS},
                                                 "bounced": {"total": 0, "series": [0] * BUCKETS}}},
                          "customer": {}, "source": {}},
                "bounce_categories": [{"category": "invalid_recipient", "count": category_count}],
                "pauses": [{"scope": "customer", "value": "x"}], "controls": [], "automation": []}

    # The second answered an interval later: its last interval is the first's next one.
    both = merge([part(1000.0, 0.0, 5, 1, 1), part(1010.0, INTERVAL, 3, 2, 4)])
    assert both["now"] == 1010.0 and both["totals"] == {"delivered": 8, "bounced": 3}
    assert both["queued"]["total"] == 4 and both["queued"]["provider"] == {"gmail": 4}
    gmail = both["rates"]["provider"]["gmail"]["delivered"]
    assert gmail["total"] == 8 and gmail["series"][-2:] == [5, 3]     # on the newest window
    assert both["bounce_categories"] == [{"category": "invalid_recipient", "count": 5}]
    assert both["pauses"] == [{"scope": "customer", "value": "x"}]
