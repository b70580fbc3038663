"""Delivery routed by MX records from a real DNS server on loopback, to sinks on 127.0.0.x.

Real sockets and the real clock (the autojump clock would jump through network waits); every
wait is bounded. 127.0.0.21-.23 stand for separate MX hosts.
"""

from __future__ import annotations

import trio

from sender.config import parse_config
from sender.engine import Engine
from sender.model import Bounced, Deferred
from sender.sink import Sink

from dnsserver import DNSServer
from helpers import journal_records

BOUND = 10
BODY = b"Subject: t\r\n\r\nhello\r\n"


def engine_config(tmp_path, dns: DNSServer, port: int, shaping=None):
    return parse_config({
        "spool": {"path": str(tmp_path / "spool"), "fsync": "never"},
        "listen": {"smtp": ""},
        "delivery": {"port": port, "starttls": "never", "retry_interval": 60},
        "dns": {"nameservers": [dns.address], "timeout": 2.0},
        "shaping": shaping or {},
        "bounces": {"notify": False},
    })


async def refuse_with_421(listener: trio.SocketListener) -> None:
    """An MX host that is busy: greets with 421 and hangs up."""
    async def busy(stream):
        async with stream:
            await stream.send_all(b"421 4.7.0 mx1 busy, try later\r\n")
    await trio.serve_listeners(busy, [listener])


async def until(cond) -> None:
    with trio.fail_after(BOUND):
        while not cond():
            await trio.sleep(0.01)


async def test_domains_sharing_mx_hosts_share_one_site_and_a_refusal_or_4xx_greeting_moves_on(tmp_path):
    good = Sink()
    good.messages = []
    with DNSServer() as dns:
        async with trio.open_nursery() as n:
            _, port = await n.start(good.run, "127.0.0.22:0")
            busy = (await trio.open_tcp_listeners(port, host="127.0.0.21"))[0]
            n.start_soon(refuse_with_421, busy)
            dns.soa("test", minimum=60)
            for domain in ("a.test", "b.test"):
                dns.add(domain, "MX", "5 mx0.bigmail.test.")
                dns.add(domain, "MX", "10 mx1.bigmail.test.")
                dns.add(domain, "MX", "20 mx2.bigmail.test.")
            dns.add("mx0.bigmail.test", "A", "127.0.0.23")      # nothing listens: refused
            dns.add("mx1.bigmail.test", "A", "127.0.0.21")
            dns.add("mx2.bigmail.test", "A", "127.0.0.22")
            cfg = engine_config(tmp_path, dns, port, {"provider": {"bigmail": {"match": [".bigmail.test"]}}})
            engine = await n.start(Engine(cfg).run)
            for i in range(10):
                await engine.submit("s@x.test", [f"u{i}@a.test", f"v{i}@b.test"], BODY)
            await until(lambda: engine.counts["delivered"] == 20)
            stats = engine.dispatcher.statistics()
            n.cancel_scope.cancel()
    # One site for both domains: the set of MX hosts, matched to its provider by suffix.
    site = f"mx0.bigmail.test,mx1.bigmail.test,mx2.bigmail.test:{port}"
    assert [(s.site, s.provider) for s in stats] == [(site, "bigmail")]
    assert len(good.messages) == 20 and engine.counts["deferred"] == 0
    assert dns.queries[("a.test", "MX")] == 1 and dns.queries[("b.test", "MX")] == 1


async def test_null_mx_and_nxdomain_bounce_at_once_and_servfail_defers(tmp_path):
    with DNSServer() as dns:
        dns.soa("test", minimum=60)
        dns.add("nullmx.test", "MX", "0 .")
        dns.servfail("broken.test")
        async with trio.open_nursery() as n:
            engine = await n.start(Engine(engine_config(tmp_path, dns, 25)).run)
            await engine.submit("s@x.test", ["u@nullmx.test"], BODY)
            await engine.submit("s@x.test", ["u@nosuch.test"], BODY)
            await engine.submit("s@x.test", ["u@broken.test"], BODY)
            await until(lambda: engine.counts["bounced"] == 2 and engine.counts["deferred"] == 1)
            n.cancel_scope.cancel()
    assert engine.counts["delivered"] == 0
    replies = {r.rcpts[0]: r.reply for r in journal_records(tmp_path / "spool") if isinstance(r, (Bounced, Deferred))}
    assert (replies["u@nullmx.test"].code, replies["u@nullmx.test"].enhanced) == (556, "5.1.10")
    assert (replies["u@nosuch.test"].code, replies["u@nosuch.test"].enhanced) == (550, "5.1.2")
    assert (replies["u@broken.test"].code, replies["u@broken.test"].enhanced) == (451, "4.4.3")
