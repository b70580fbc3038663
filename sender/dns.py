"""MX resolution on trio with dnspython: the next hops for a recipient domain.

Errors are translated here, once: ``NoSuchDomain`` and ``NullMX`` are permanent (the domain
does not take mail), ``DNSError`` itself is transient (SERVFAIL, timeout) and means retry.
"""

from __future__ import annotations

import random

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver

from .errors import DNSError

__all__ = ["NoSuchDomain", "NullMX", "make_resolver", "resolve_mx"]


class NoSuchDomain(DNSError):
    """NXDOMAIN: permanent."""

    permanent = True


class NullMX(DNSError):
    """The domain publishes "MX 0 ." (RFC 7505): it accepts no mail. Permanent."""

    permanent = True


def make_resolver(nameservers: list[str] | None = None, timeout: float = 5.0) -> dns.asyncresolver.Resolver:
    """A resolver using the system config, or only ``nameservers`` ("ip" or "ip:port")."""
    if not nameservers:
        r = dns.asyncresolver.Resolver()
    else:
        r = dns.asyncresolver.Resolver(configure=False)
        r.nameservers = []
        for ns in nameservers:
            host, _, port = ns.rpartition(":") if ns.count(":") == 1 else (ns, "", "")
            r.nameservers.append(host or ns)
            if port:
                r.port = int(port)
    r.lifetime = timeout
    return r


async def resolve_mx(domain: str, resolver: dns.asyncresolver.Resolver) -> list[str]:
    """MX hosts of ``domain`` in preference order, shuffled among equal preference; the
    domain itself when it has no MX (implicit MX, RFC 5321 5.1).

    Raises:
      NoSuchDomain, NullMX: permanent. DNSError: transient.
    """
    try:
        answer = await resolver.resolve(domain, "MX")
    except dns.resolver.NXDOMAIN as e:
        raise NoSuchDomain(f"{domain}: no such domain (NXDOMAIN)") from e
    except dns.resolver.NoAnswer:
        return [domain]
    except (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.LifetimeTimeout) as e:
        raise DNSError(f"{domain}: MX lookup failed: {e}") from e
    except dns.exception.DNSException as e:
        raise DNSError(f"{domain}: MX lookup failed: {e}") from e
    records = [(rr.preference, random.random(), rr.exchange) for rr in answer]
    if len(records) == 1 and records[0][2] == dns.name.root:
        raise NullMX(f"{domain}: null MX (RFC 7505): the domain accepts no mail")
    records.sort()
    return [ex.to_text(omit_final_dot=True) for _, _, ex in records if ex != dns.name.root]
