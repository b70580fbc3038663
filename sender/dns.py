"""MX resolution on trio with dnspython: the next hops for a recipient domain.

Errors are translated here, once, so nothing above sees dnspython. Permanent, the message
bounces (``category = "bad_domain"``): ``NoSuchDomain`` (NXDOMAIN, or a name that cannot
exist), ``NullMX`` (RFC 7505: the domain takes no mail) and ``NoMailHost`` (no MX and no
address, RFC 5321 section 5.1). Transient, the message waits (``category = "dns_failure"``):
``DNSTemporaryError`` for SERVFAIL, REFUSED, timeouts, and MX hosts none of which has an
address, as Postfix defers there too.

The cache is ours, not dnspython's, because an MTA needs a policy for what is not an answer:
negative answers live for the zone's SOA negative TTL (RFC 2308), failures for a short
``error_ttl`` so that a broken domain is not asked again for every queued message, and
concurrent lookups of one name share one query.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Awaitable, Callable
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.inet
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import idna
import msgspec
import trio

from .errors import DNSError

__all__ = [
    "MXHost",
    "ResolverStatistics",
    "Resolver",
    "DNSTemporaryError",
    "NoSuchDomain",
    "NullMX",
    "NoMailHost",
]

# EDNS buffer size of DNS Flag Day 2020: big MX sets fit in UDP, without IP fragmentation.
_EDNS_PAYLOAD = 1232


class DNSTemporaryError(DNSError):
    """SERVFAIL, REFUSED, a timeout, or no usable MX host: retry later."""

    permanent = False
    category = "dns_failure"


class NoSuchDomain(DNSError):
    """NXDOMAIN, or a name that is not a valid domain name: permanent."""

    permanent = True
    category = "bad_domain"


class NullMX(DNSError):
    """The domain publishes "MX 0 ." (RFC 7505): it accepts no mail. Permanent."""

    permanent = True
    category = "bad_domain"


class NoMailHost(DNSError):
    """No MX records and no address for an implicit MX (RFC 5321 section 5.1): permanent."""

    permanent = True
    category = "bad_domain"


class MXHost(msgspec.Struct, frozen=True, gc=False):
    """One next hop: ``preference`` is 0 for an implicit MX; IPv4 addresses come first."""

    name: str
    preference: int
    addresses: tuple[str, ...]


class ResolverStatistics(msgspec.Struct, frozen=True, gc=False):
    """``queries``: lookups sent to the nameservers. ``cache_hits``: lookups answered
    without one (from the cache, or by sharing a query in flight). ``cache_entries``: the
    entries held, expired ones included until replaced or evicted."""

    queries: int
    cache_hits: int
    cache_entries: int


# A cached result: MX records as (preference, host), addresses as strings, () for NODATA,
# or the error to raise (an instance never raised itself: each caller gets a fresh copy).
_Result = tuple | DNSError


class _Flight:
    """A query in progress; the tasks asking for the same name wait on ``done``."""

    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: _Result | None = None


class Resolver:
    """MX and address lookups with a cache, for one process.

    Args:
      nameservers: "ip", "ip:port", "v6" or "[v6]:port" entries, each with its own port;
        empty or ``None`` reads the system configuration (/etc/resolv.conf).
      timeout: seconds for one lookup, across every nameserver and retry.
      clock: the cache's time source; ``trio.current_time`` by default.
      max_entries: cache size. When full, expired entries go first, then the oldest.
      max_ttl: cap on the TTL of positive answers.
      negative_ttl: how long NXDOMAIN and NODATA are kept when no SOA came with them.
      max_negative_ttl: cap on the SOA negative TTL.
      error_ttl: how long a transient failure is kept before the name is asked again.

    Raises:
      ValueError: a bad ``nameservers`` entry (the message names it), or no nameservers
        given and none configured in the system.
    """

    def __init__(
        self,
        nameservers: list[str] | None = None,
        *,
        timeout: float = 5.0,
        clock: Callable[[], float] | None = None,
        max_entries: int = 100_000,
        max_ttl: float = 86400.0,
        negative_ttl: float = 300.0,
        max_negative_ttl: float = 3600.0,
        error_ttl: float = 30.0,
    ) -> None:
        self._resolver = _make_resolver(nameservers, timeout)
        self._clock = clock or trio.current_time
        self.max_entries = max_entries
        self.max_ttl = max_ttl
        self.negative_ttl = negative_ttl
        self.max_negative_ttl = max_negative_ttl
        self.error_ttl = error_ttl
        # Insertion-ordered: the first key is the oldest entry.
        self._cache: dict[tuple[str, str], tuple[float, _Result]] = {}
        self._flights: dict[tuple[str, str], _Flight] = {}
        self._queries = 0
        self._cache_hits = 0

    async def mx(self, domain: str) -> list[MXHost]:
        """The MX hosts of ``domain`` with their addresses, in preference order, shuffled
        among equal preference on every call so that load spreads.

        Hosts without an address are left out. Without MX records the domain itself is the
        host (implicit MX, preference 0). "MX 0 ." alone is a null MX; among other records
        it is ignored.

        Raises:
          NoSuchDomain, NullMX, NoMailHost: permanent.
          DNSTemporaryError: transient, including when no MX host has an address.
        """
        name = _domain(domain)
        records = await self._lookup(name, "MX")
        if not records:
            addresses = await self.addresses(name)
            if not addresses:
                raise NoMailHost(f"{name}: no MX and no A/AAAA records: the domain takes no mail")
            return [MXHost(name, 0, addresses)]
        best: dict[str, int] = {}
        for preference, host in records:
            if host != ".":
                best[host] = min(preference, best.get(host, preference))
        if not best:
            raise NullMX(f"{name}: null MX (RFC 7505): the domain accepts no mail")
        hosts = sorted(best, key=lambda host: (best[host], random.random()))
        found = await _gather(self.addresses, hosts)
        mxs = [MXHost(h, best[h], a) for h, a in zip(hosts, found) if a and not isinstance(a, DNSError)]
        if not mxs:
            failed = [a for a in found if isinstance(a, DNSError) and not a.permanent]
            reason = failed[0] if failed else "no A/AAAA records"
            raise DNSTemporaryError(f"{name}: no MX host has an address ({', '.join(hosts)}): {reason}")
        return mxs

    async def addresses(self, host: str) -> tuple[str, ...]:
        """IPv4 then IPv6 addresses of ``host``, both asked at once; () when it has none.

        A failure of one family is ignored when the other has addresses.

        Raises:
          NoSuchDomain: NXDOMAIN, or an invalid name.
          DNSTemporaryError: no address, and a lookup failed.
        """
        name = _domain(host)
        found = await _gather(functools.partial(self._lookup, name), ["A", "AAAA"])
        if all(isinstance(r, NoSuchDomain) for r in found):
            raise found[0]
        addresses = tuple(a for r in found if isinstance(r, tuple) for a in r)
        if not addresses:
            for r in found:
                if isinstance(r, DNSError) and not r.permanent:
                    raise r
        return addresses

    def statistics(self) -> ResolverStatistics:
        return ResolverStatistics(self._queries, self._cache_hits, len(self._cache))

    def clear(self) -> None:
        """Drop the cache; queries in flight still finish and are cached."""
        self._cache.clear()

    async def _lookup(self, name: str, rdtype: str) -> tuple:
        """The records of one (name, type), from the cache, a query in flight, or a new one."""
        key = (name, rdtype)
        while True:
            entry = self._cache.get(key)
            if entry is not None and entry[0] > self._clock():
                self._cache_hits += 1
                return _unwrap(entry[1])
            flight = self._flights.get(key)
            if flight is None:
                break
            await flight.done.wait()
            if flight.result is not None:
                self._cache_hits += 1
                return _unwrap(flight.result)
            # The task asking was cancelled before an answer: ask again.
        flight = self._flights[key] = _Flight()
        try:
            result, ttl = await self._query(name, rdtype)
            self._store(key, result, ttl)
            flight.result = result
        finally:
            del self._flights[key]
            flight.done.set()
        return _unwrap(result)

    async def _query(self, name: str, rdtype: str) -> tuple[_Result, float]:
        """Ask the nameservers; returns what to cache and for how many seconds."""
        self._queries += 1
        qname = dns.name.from_text(name)
        try:
            answer = await self._resolver.resolve(qname, rdtype, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as e:
            return NoSuchDomain(f"{name}: no such domain (NXDOMAIN)"), self._negative_ttl(e.response(qname))
        except dns.exception.DNSException as e:
            return DNSTemporaryError(f"{name}: {rdtype} lookup failed: {e}"), self.error_ttl
        if answer.rrset is None:
            return (), self._negative_ttl(answer.response)
        ttl = min(answer.chaining_result.minimum_ttl, self.max_ttl)
        if rdtype == "MX":
            return tuple((rr.preference, _host(rr.exchange)) for rr in answer.rrset), ttl
        return tuple(rr.address for rr in answer.rrset), ttl

    def _negative_ttl(self, response: dns.message.Message) -> float:
        """RFC 2308 section 5: the lower of the SOA's own TTL and its minimum field."""
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA:
                return min(rrset.ttl, rrset[0].minimum, self.max_negative_ttl)
        return min(self.negative_ttl, self.max_negative_ttl)

    def _store(self, key: tuple[str, str], result: _Result, ttl: float) -> None:
        if ttl <= 0:
            return
        now = self._clock()
        self._cache.pop(key, None)     # re-inserted at the end: the newest
        if len(self._cache) >= self.max_entries:
            self._make_room(now)
        self._cache[key] = (now + ttl, result)

    def _make_room(self, now: float) -> None:
        """Drop expired entries, then the oldest, down to 90% of ``max_entries``, so that a
        full cache is scanned once per many insertions rather than on each."""
        cache = self._cache
        for key in [k for k, (expires, _) in cache.items() if expires <= now]:
            del cache[key]
        keep = self.max_entries * 9 // 10
        for key in list(itertools.islice(cache, max(0, len(cache) - keep))):
            del cache[key]


async def _gather(fn: Callable[[Any], Awaitable[Any]], args: list) -> list:
    """``fn(arg)`` for every arg at once; each result is a value or the DNSError raised."""
    results: list = [None] * len(args)

    async def run(i: int, arg: Any) -> None:
        try:
            results[i] = await fn(arg)
        except DNSError as e:
            results[i] = e

    async with trio.open_nursery() as nursery:
        for i, arg in enumerate(args):
            nursery.start_soon(run, i, arg)
    return results


def _unwrap(result: _Result) -> tuple:
    if isinstance(result, DNSError):
        raise type(result)(*result.args)
    return result


def _host(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


def _domain(domain: str) -> str:
    """``domain`` as a lower-case ASCII name without the final dot (IDNA for non-ASCII).

    Non-ASCII names go through IDNA 2008 with UTS 46 mapping (the ``idna`` package) here
    rather than through dnspython, whose default codec depends on which ``idna`` version
    happens to be installed.

    Raises:
      NoSuchDomain: an empty name, an empty label, a label or name too long, bad IDNA.
    """
    try:
        if not domain.isascii():
            final_dot = domain.endswith(".")
            domain = idna.encode(domain.removesuffix("."), uts46=True).decode("ascii")
            domain += "." if final_dot else ""
        name = dns.name.from_text(domain)
    except (dns.exception.DNSException, UnicodeError, idna.IDNAError) as e:
        raise NoSuchDomain(f"{domain!r}: invalid domain name: {e}") from None
    if name == dns.name.root:
        raise NoSuchDomain(f"{domain!r}: invalid domain name: empty")
    return _host(name)


def _nameserver(entry: str) -> dns.nameserver.Do53Nameserver:
    """"ip", "ip:port", "v6" or "[v6]:port" as a nameserver with its own port."""
    address, port = entry, "53"
    if entry.startswith("["):
        address, bracket, rest = entry[1:].partition("]")
        if not bracket or rest[:1] not in ("", ":"):
            address = ""
        port = rest[1:] if rest else port
    elif entry.count(":") == 1:
        address, _, port = entry.partition(":")
    if not (dns.inet.is_address(address) and port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"nameserver {entry!r}: expected \"ip\", \"ip:port\", \"v6\" or \"[v6]:port\"")
    return dns.nameserver.Do53Nameserver(address, int(port))


def _make_resolver(nameservers: list[str] | None, timeout: float) -> dns.asyncresolver.Resolver:
    if nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [_nameserver(entry) for entry in nameservers]
    else:
        try:
            resolver = dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration as e:
            raise ValueError(f"no nameservers given and none in the system configuration: {e}") from e
    resolver.cache = None              # Resolver caches, with its own negative and error policy
    resolver.lifetime = timeout
    resolver.use_edns(0, 0, _EDNS_PAYLOAD)
    return resolver
