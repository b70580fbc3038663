"""sender.dns against a real authoritative server on loopback (tests/dnsserver.py).

Network waits run on the real clock; the resolver's cache runs on ``FakeClock``, moved by
hand, so TTL expiry is tested without waiting.
"""

from __future__ import annotations

import re
import time

import pytest
import trio

from sender.config import parse_config
from sender.dns import (
    DNSTemporaryError,
    MXHost,
    NoMailHost,
    NoSuchDomain,
    NullMX,
    Resolver,
    ResolverStatistics,
    _nameserver,
)
from sender.errors import DNSError

from dnsserver import DNSServer


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def srv():
    with DNSServer() as server:
        server.soa("example.test", minimum=60, ttl=3600)
        yield server


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def resolver(srv, clock):
    return Resolver([srv.address], timeout=2.0, clock=clock)


def assert_permanent(err: DNSError) -> None:
    assert err.permanent is True and err.category == "bad_domain"


def assert_transient(err: DNSError) -> None:
    assert isinstance(err, DNSTemporaryError)
    assert err.permanent is False and err.category == "dns_failure"


# ---------------------------------------------------------------------- MX and addresses


async def test_mx_in_preference_order_with_ipv4_then_ipv6_addresses(srv, resolver):
    srv.add("example.test", "MX", "20 mx2.example.test.")
    srv.add("example.test", "MX", "10 mx1.example.test.")
    srv.add("mx1.example.test", "AAAA", "::1")
    srv.add("mx1.example.test", "A", "127.0.0.1")
    srv.add("mx2.example.test", "A", "127.0.0.2")
    assert await resolver.mx("example.test") == [
        MXHost("mx1.example.test", 10, ("127.0.0.1", "::1")),
        MXHost("mx2.example.test", 20, ("127.0.0.2",)),
    ]


async def test_equal_preference_is_shuffled_on_every_call_including_cache_hits(srv, resolver):
    for host, preference in (("a", 10), ("b", 10), ("c", 20)):
        srv.add("example.test", "MX", f"{preference} {host}.example.test.")
        srv.add(f"{host}.example.test", "A", "127.0.0.1")
    orders = set()
    for _ in range(40):
        orders.add(tuple(mx.name[0] for mx in await resolver.mx("example.test")))
    assert orders == {("a", "b", "c"), ("b", "a", "c")}
    assert srv.queries[("example.test", "MX")] == 1


@pytest.mark.parametrize("records", [["A"], ["AAAA"], ["A", "AAAA"]])
async def test_implicit_mx_is_the_domain_itself(srv, resolver, records):
    srv.add("example.test", "TXT", '"v=spf1 -all"')
    address = {"A": "127.0.0.1", "AAAA": "::1"}
    for rdtype in records:
        srv.add("example.test", rdtype, address[rdtype])
    assert await resolver.mx("example.test") == [
        MXHost("example.test", 0, tuple(address[t] for t in records))]


async def test_no_mx_and_no_address_is_no_mail_host(srv, resolver):
    srv.add("example.test", "TXT", '"hello"')
    with pytest.raises(NoMailHost, match="example.test") as e:
        await resolver.mx("example.test")
    assert_permanent(e.value)


async def test_null_mx(srv, resolver):
    srv.add("example.test", "MX", "0 .")
    with pytest.raises(NullMX, match="example.test") as e:
        await resolver.mx("example.test")
    assert_permanent(e.value)


async def test_null_mx_among_other_records_is_ignored(srv, resolver):
    srv.add("example.test", "MX", "0 .")
    srv.add("example.test", "MX", "10 mx.example.test.")
    srv.add("mx.example.test", "A", "127.0.0.1")
    assert await resolver.mx("example.test") == [MXHost("mx.example.test", 10, ("127.0.0.1",))]


async def test_nxdomain_is_no_such_domain(srv, resolver):
    with pytest.raises(NoSuchDomain, match="nowhere.example.test") as e:
        await resolver.mx("nowhere.example.test")
    assert_permanent(e.value)


@pytest.mark.parametrize("misbehave, cause", [("servfail", "SERVFAIL"), ("refuse", "REFUSED")])
async def test_server_failure_is_transient(srv, resolver, misbehave, cause):
    getattr(srv, misbehave)("example.test")
    with pytest.raises(DNSError, match=f"example.test.*{cause}") as e:
        await resolver.mx("example.test")
    assert_transient(e.value)


async def test_dropped_query_is_transient_after_the_timeout(srv):
    srv.drop("example.test")
    resolver = Resolver([srv.address], timeout=0.3)
    start = time.monotonic()
    with pytest.raises(DNSError, match="example.test.*timed out") as e:
        await resolver.mx("example.test")
    assert 0.25 <= time.monotonic() - start < 2.0
    assert_transient(e.value)


@pytest.mark.parametrize("target", ["nxdomain", "nodata", "servfail"])
async def test_mx_host_without_address_is_skipped(srv, resolver, target):
    srv.add("example.test", "MX", "10 bad.example.test.")
    srv.add("example.test", "MX", "20 good.example.test.")
    srv.add("good.example.test", "A", "127.0.0.1")
    if target == "nodata":
        srv.add("bad.example.test", "TXT", '"no address here"')
    elif target == "servfail":
        srv.servfail("bad.example.test")
    assert await resolver.mx("example.test") == [MXHost("good.example.test", 20, ("127.0.0.1",))]


@pytest.mark.parametrize("target, cause", [("nxdomain", "no A/AAAA"), ("servfail", "SERVFAIL")])
async def test_no_mx_host_with_an_address_is_transient(srv, resolver, target, cause):
    srv.add("example.test", "MX", "10 mx1.example.test.")
    srv.add("example.test", "MX", "20 mx2.example.test.")
    if target == "servfail":
        srv.servfail("mx1.example.test")
        srv.servfail("mx2.example.test")
    with pytest.raises(DNSError, match=f"example.test: no MX host has an address.*{cause}") as e:
        await resolver.mx("example.test")
    assert_transient(e.value)


async def test_addresses_asks_both_families_and_survives_one_failing(srv, resolver):
    srv.add("both.example.test", "A", "127.0.0.1")
    srv.add("both.example.test", "AAAA", "::1")
    srv.add("v4.example.test", "A", "127.0.0.2")
    srv.servfail("v4.example.test", "AAAA")
    srv.add("v6.example.test", "AAAA", "::2")
    srv.drop("v6.example.test", "A")
    assert await resolver.addresses("both.example.test") == ("127.0.0.1", "::1")
    assert await resolver.addresses("v4.example.test") == ("127.0.0.2",)
    resolver = Resolver([srv.address], timeout=0.3)
    assert await resolver.addresses("v6.example.test") == ("::2",)


async def test_addresses_errors(srv, resolver):
    srv.add("txt.example.test", "TXT", '"x"')
    srv.servfail("broken.example.test")
    assert await resolver.addresses("txt.example.test") == ()
    with pytest.raises(NoSuchDomain):
        await resolver.addresses("nowhere.example.test")
    with pytest.raises(DNSTemporaryError, match="broken.example.test"):
        await resolver.addresses("broken.example.test")


async def test_large_answer_is_truncated_over_udp_and_fetched_over_tcp(srv, resolver):
    many = [f"10.0.0.{i}" for i in range(100)]              # 1.6 kB: over the EDNS 1232
    for address in many:
        srv.add("big.example.test", "A", address)
    assert sorted(await resolver.addresses("big.example.test")) == sorted(many)
    assert srv.queries[("big.example.test", "A")] == 2     # UDP (TC set), then TCP


# ---------------------------------------------------------------------- names


async def test_names_are_lower_cased_without_the_final_dot(srv, resolver):
    srv.add("example.test", "MX", "10 MX.Example.Test.")
    srv.add("mx.example.test", "A", "127.0.0.1")
    assert await resolver.mx("ExAmPlE.TEST.") == [MXHost("mx.example.test", 10, ("127.0.0.1",))]
    assert await resolver.mx("example.test") == [MXHost("mx.example.test", 10, ("127.0.0.1",))]
    assert srv.queries[("example.test", "MX")] == 1      # one cache entry for both spellings


async def test_internationalized_domain_is_queried_as_idna(srv, resolver):
    srv.add("xn--bcher-kva.example.test", "MX", "10 mx.example.test.")
    srv.add("mx.example.test", "A", "127.0.0.1")
    assert await resolver.mx("Bücher.example.test") == [MXHost("mx.example.test", 10, ("127.0.0.1",))]


@pytest.mark.parametrize("domain", ["", ".", "a..example.test", "x" * 64 + ".test",
                                    ".".join(["a" * 60] * 5), "bad\u200d.test"])
async def test_invalid_name_is_permanent_and_sends_nothing(srv, resolver, domain):
    with pytest.raises(NoSuchDomain, match="invalid domain name") as e:
        await resolver.mx(domain)
    assert_permanent(e.value)
    with pytest.raises(NoSuchDomain, match="invalid domain name"):
        await resolver.addresses(domain)
    assert srv.total_queries == 0


# ---------------------------------------------------------------------- cache


async def test_positive_answers_live_for_their_ttl(srv, resolver, clock):
    srv.add("example.test", "MX", "10 mx.example.test.", ttl=300)
    srv.add("mx.example.test", "A", "127.0.0.1", ttl=60)
    srv.add("mx.example.test", "A", "127.0.0.2", ttl=120)    # the RRset's TTL is its lowest
    await resolver.mx("example.test")
    assert srv.total_queries == 3
    clock.now += 59
    await resolver.mx("example.test")
    assert srv.total_queries == 3
    clock.now += 2                    # A expired, AAAA (negative: SOA minimum 60) too, MX not
    await resolver.mx("example.test")
    assert srv.queries[("example.test", "MX")] == 1
    assert srv.queries[("mx.example.test", "A")] == 2
    assert srv.queries[("mx.example.test", "AAAA")] == 2
    clock.now += 300
    await resolver.mx("example.test")
    assert srv.queries[("example.test", "MX")] == 2


async def test_positive_ttl_is_capped_by_max_ttl(srv, clock):
    srv.add("host.example.test", "A", "127.0.0.1", ttl=100_000)
    resolver = Resolver([srv.address], clock=clock, max_ttl=50)
    await resolver.addresses("host.example.test")
    clock.now += 49
    await resolver.addresses("host.example.test")
    assert srv.queries[("host.example.test", "A")] == 1
    clock.now += 2
    await resolver.addresses("host.example.test")
    assert srv.queries[("host.example.test", "A")] == 2


@pytest.mark.parametrize("name", ["nowhere.example.test", "txt.example.test"])
async def test_negative_answers_live_for_the_soa_minimum(srv, resolver, clock, name):
    srv.add("txt.example.test", "TXT", '"NODATA for MX, A and AAAA"')
    error = NoSuchDomain if name.startswith("nowhere") else NoMailHost
    for advance, queries in ((0, 1), (59, 1), (2, 2)):
        clock.now += advance
        with pytest.raises(error):
            await resolver.mx(name)
        assert srv.queries[(name, "MX")] == queries


async def test_negative_ttl_is_the_soa_ttl_when_lower_than_its_minimum(srv, clock):
    srv.soa("short.test", minimum=600, ttl=30)
    resolver = Resolver([srv.address], clock=clock)
    for advance, queries in ((0, 1), (29, 1), (2, 2)):
        clock.now += advance
        with pytest.raises(NoSuchDomain):
            await resolver.mx("nowhere.short.test")
        assert srv.queries[("nowhere.short.test", "MX")] == queries


async def test_negative_ttl_without_soa_is_negative_ttl(srv, clock):
    resolver = Resolver([srv.address], clock=clock, negative_ttl=10)
    for advance, queries in ((0, 1), (9, 1), (2, 2)):
        clock.now += advance
        with pytest.raises(NoSuchDomain):
            await resolver.mx("no-zone.invalid")
        assert srv.queries[("no-zone.invalid", "MX")] == queries


async def test_negative_ttl_is_capped_by_max_negative_ttl(srv, clock):
    srv.soa("long.test", minimum=86400, ttl=86400)
    resolver = Resolver([srv.address], clock=clock, max_negative_ttl=100)
    for advance, queries in ((0, 1), (99, 1), (2, 2)):
        clock.now += advance
        with pytest.raises(NoSuchDomain):
            await resolver.mx("nowhere.long.test")
        assert srv.queries[("nowhere.long.test", "MX")] == queries


async def test_transient_error_is_cached_for_error_ttl_then_retried(srv, clock):
    resolver = Resolver([srv.address], clock=clock, error_ttl=30)
    srv.add("example.test", "MX", "10 mx.example.test.")
    srv.add("mx.example.test", "A", "127.0.0.1")
    srv.servfail("example.test")
    for advance in (0, 29):
        clock.now += advance
        with pytest.raises(DNSTemporaryError, match="SERVFAIL") as e:
            await resolver.mx("example.test")
        assert_transient(e.value)
        assert srv.queries[("example.test", "MX")] == 1
    srv.heal("example.test")
    clock.now += 2
    assert await resolver.mx("example.test") == [MXHost("mx.example.test", 10, ("127.0.0.1",))]
    assert srv.queries[("example.test", "MX")] == 2


async def test_concurrent_lookups_share_one_query(srv, resolver):
    srv.add("example.test", "MX", "10 mx.example.test.")
    srv.add("mx.example.test", "A", "127.0.0.1")
    results = []

    async def look() -> None:
        results.append(await resolver.mx("example.test"))

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(look)
    assert results == [[MXHost("mx.example.test", 10, ("127.0.0.1",))]] * 10
    assert srv.total_queries == 3                 # MX, A, AAAA: once each
    assert resolver.statistics() == ResolverStatistics(queries=3, cache_hits=27, cache_entries=3)


async def test_concurrent_lookups_all_get_the_error_of_the_one_query(srv, clock):
    srv.drop("example.test")
    resolver = Resolver([srv.address], timeout=0.3, clock=clock)
    errors = []

    async def look() -> None:
        try:
            await resolver.mx("example.test")
        except DNSError as e:
            errors.append(e)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(look)
    assert len(errors) == 5 and all(isinstance(e, DNSTemporaryError) for e in errors)
    assert len({id(e) for e in errors}) == 5       # each waiter gets its own exception
    assert srv.queries[("example.test", "MX")] == 1


async def test_cancelled_lookup_lets_a_waiter_ask_again(srv, clock):
    srv.drop("example.test")
    resolver = Resolver([srv.address], timeout=1.0, clock=clock)

    async def first() -> None:
        with trio.move_on_after(0.1):
            await resolver.mx("example.test")

    async def second() -> None:
        await trio.sleep(0.05)
        srv.heal("example.test")
        srv.add("example.test", "MX", "10 mx.example.test.")
        srv.add("mx.example.test", "A", "127.0.0.1")
        assert await resolver.mx("example.test") == [MXHost("mx.example.test", 10, ("127.0.0.1",))]

    with trio.fail_after(3):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            nursery.start_soon(second)
    assert srv.queries[("example.test", "MX")] >= 2


async def test_full_cache_evicts_expired_entries_first_then_the_oldest(srv, clock):
    srv.soa("short.test", minimum=10)
    srv.soa("long.test", minimum=1000)
    resolver = Resolver([srv.address], clock=clock, max_entries=4)

    async def nx(name: str) -> None:              # one cache entry (name, MX) each
        with pytest.raises(NoSuchDomain):
            await resolver.mx(name)

    for name in ("a.long.test", "s.short.test", "b.long.test", "c.long.test"):
        await nx(name)
    assert resolver.statistics().cache_entries == 4
    clock.now += 20                               # s.short.test has expired
    await nx("d.long.test")                       # room made by dropping the expired one
    assert resolver.statistics().cache_entries == 4
    await nx("a.long.test")
    assert srv.queries[("a.long.test", "MX")] == 1     # kept
    await nx("e.long.test")                       # full, nothing expired: the oldest goes
    await nx("a.long.test")
    assert srv.queries[("a.long.test", "MX")] == 2
    await nx("d.long.test")
    assert srv.queries[("d.long.test", "MX")] == 1
    assert resolver.statistics().cache_entries == 4


async def test_clear_drops_the_cache(srv, resolver):
    srv.add("host.example.test", "A", "127.0.0.1")
    await resolver.addresses("host.example.test")
    assert resolver.statistics().cache_entries == 2
    resolver.clear()
    assert resolver.statistics().cache_entries == 0
    await resolver.addresses("host.example.test")
    assert srv.queries[("host.example.test", "A")] == 2


# ---------------------------------------------------------------------- nameservers and config


@pytest.mark.parametrize("entry, address, port", [
    ("127.0.0.1", "127.0.0.1", 53),
    ("127.0.0.1:5353", "127.0.0.1", 5353),
    ("::1", "::1", 53),
    ("[::1]", "::1", 53),
    ("[2001:db8::1]:5353", "2001:db8::1", 5353),
])
def test_nameserver_entries(entry, address, port):
    ns = _nameserver(entry)
    assert (ns.address, ns.port) == (address, port)


@pytest.mark.parametrize("entry", ["", "localhost", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536",
                                   "127.0.0.1:x", "[::1", "[::1]53", "[::1]:", "1.2.3", "::1::2"])
def test_bad_nameserver_entry_raises_value_error_naming_it(entry):
    with pytest.raises(ValueError, match=re.escape(f"nameserver {entry!r}")):
        Resolver(["127.0.0.1", entry])


async def test_each_nameserver_has_its_own_port(srv):
    srv.add("example.test", "MX", "10 mx.example.test.")
    srv.add("mx.example.test", "A", "127.0.0.1")
    with DNSServer() as refusing:
        for name in ("example.test", "mx.example.test"):
            refusing.refuse(name)
        resolver = Resolver([refusing.address, srv.address], timeout=2.0)
        assert await resolver.mx("example.test") == [MXHost("mx.example.test", 10, ("127.0.0.1",))]
        assert refusing.queries[("example.test", "MX")] == 1
        assert srv.queries[("example.test", "MX")] == 1


async def test_config_feeds_the_resolver(srv):
    Resolver(parse_config({"dns": {"nameservers": ["127.0.0.1:5353"]}}).dns.nameservers)
    srv.add("example.test", "MX", "10 mx.example.test.")
    srv.add("mx.example.test", "A", "127.0.0.1")
    srv.drop("slow.example.test")
    cfg = parse_config({"dns": {"nameservers": [srv.address], "timeout": 0.3}})
    resolver = Resolver(cfg.dns.nameservers, timeout=cfg.dns.timeout)
    assert await resolver.mx("example.test") == [MXHost("mx.example.test", 10, ("127.0.0.1",))]
    start = time.monotonic()
    with pytest.raises(DNSTemporaryError):
        await resolver.mx("slow.example.test")
    assert time.monotonic() - start < 2.0          # the config's timeout, not the default 5 s
