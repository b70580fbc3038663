"""A small authoritative DNS server for tests, written with dnspython.

It serves a zone held in memory on real UDP and TCP sockets bound to 127.0.0.1, from a
background thread, so it answers whatever clock the test runs on::

    with DNSServer() as srv:
        srv.soa("example.test", minimum=60)
        srv.add("example.test", "MX", "10 mx1.example.test.")
        srv.add("mx1.example.test", "A", "127.0.0.1")
        resolver = Resolver([srv.address])

A name that holds nothing gets NXDOMAIN, and a name without the asked type NODATA, both with
the SOA of the enclosing zone, if any, in the authority section (RFC 2308). ``servfail``,
``refuse`` and ``drop`` make a name misbehave; ``queries`` counts what was asked. A UDP answer
too big for the client's buffer is truncated (TC), and the client asks again over TCP.
"""

from __future__ import annotations

import collections
import selectors
import socket
import threading

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset

__all__ = ["DNSServer"]

_RCODES = {"servfail": dns.rcode.SERVFAIL, "refuse": dns.rcode.REFUSED}


class DNSServer:
    """Use as ``with DNSServer() as srv:``; ``srv.address`` is "127.0.0.1:PORT"."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rrsets: dict[tuple[dns.name.Name, int], dns.rrset.RRset] = {}
        self._behaviour: dict[tuple[dns.name.Name, int | None], str] = {}
        self.queries: collections.Counter[tuple[str, str]] = collections.Counter()
        self.total_queries = 0
        self.address = ""

    # ------------------------------------------------------------------ the zone

    def add(self, name: str, rdtype: str, text: str, *, ttl: int = 300) -> None:
        """Add one record, e.g. ``add("example.test", "MX", "10 mx1.example.test.")``;
        an RRset's TTL is the lowest given to it."""
        rrset = dns.rrset.from_text(dns.name.from_text(name), ttl, "IN", rdtype, text)
        with self._lock:
            have = self._rrsets.setdefault((rrset.name, rrset.rdtype), rrset)
            if have is not rrset:
                have.add(rrset[0], ttl)

    def soa(self, zone: str, *, minimum: int = 60, ttl: int = 3600) -> None:
        """Make ``zone`` a zone apex; its negative TTL is min(ttl, minimum) (RFC 2308)."""
        rrset = dns.rrset.from_text(dns.name.from_text(zone), ttl, "IN", "SOA",
                                    f"ns.{zone}. hostmaster.{zone}. 1 3600 600 86400 {minimum}")
        with self._lock:
            self._rrsets[(rrset.name, rrset.rdtype)] = rrset

    def servfail(self, name: str, rdtype: str | None = None) -> None:
        """Answer queries for ``name`` (of ``rdtype``, or every type) with SERVFAIL."""
        self._behave(name, rdtype, "servfail")

    def refuse(self, name: str, rdtype: str | None = None) -> None:
        """Answer queries for ``name`` (of ``rdtype``, or every type) with REFUSED."""
        self._behave(name, rdtype, "refuse")

    def drop(self, name: str, rdtype: str | None = None) -> None:
        """Never answer queries for ``name`` (of ``rdtype``, or every type): the client times out."""
        self._behave(name, rdtype, "drop")

    def heal(self, name: str, rdtype: str | None = None) -> None:
        """Undo ``servfail``, ``refuse`` or ``drop`` called with the same arguments."""
        self._behave(name, rdtype, None)

    def _behave(self, name: str, rdtype: str | None, behaviour: str | None) -> None:
        key = (dns.name.from_text(name), rdtype and dns.rdatatype.from_text(rdtype))
        with self._lock:
            if behaviour is None:
                self._behaviour.pop(key, None)
            else:
                self._behaviour[key] = behaviour

    # ------------------------------------------------------------------ running

    def __enter__(self) -> DNSServer:
        self._udp, self._tcp = _bind_udp_and_tcp()
        self._wake_r, self._wake_w = socket.socketpair()
        self.address = f"127.0.0.1:{self._udp.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, name=f"dns {self.address}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._wake_w.send(b"x")
        self._thread.join()
        for sock in (self._udp, self._tcp, self._wake_r, self._wake_w):
            sock.close()

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            for sock in (self._udp, self._tcp, self._wake_r):
                selector.register(sock, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fileobj is self._wake_r:
                        return
                    if key.fileobj is self._udp:
                        self._serve_udp()
                    else:
                        self._serve_tcp()

    def _serve_udp(self) -> None:
        try:
            wire, peer = self._udp.recvfrom(65535)
            reply = self._reply(wire, tcp=False)
            if reply is not None:
                self._udp.sendto(reply, peer)
        except OSError:
            pass

    def _serve_tcp(self) -> None:
        """One query per connection: enough for a client retrying a truncated answer."""
        conn, _ = self._tcp.accept()
        with conn:
            conn.settimeout(2.0)
            try:
                size = int.from_bytes(_recv_exactly(conn, 2), "big")
                reply = self._reply(_recv_exactly(conn, size), tcp=True)
                if reply is not None:
                    conn.sendall(len(reply).to_bytes(2, "big") + reply)
            except (OSError, EOFError):
                pass

    # ------------------------------------------------------------------ answering

    def _reply(self, wire: bytes, *, tcp: bool) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if len(query.question) != 1:
            return None
        qname, qtype = query.question[0].name, query.question[0].rdtype
        response = dns.message.make_response(query)
        with self._lock:
            self.total_queries += 1
            self.queries[(qname.to_text(omit_final_dot=True).lower(), dns.rdatatype.to_text(qtype))] += 1
            behaviour = self._behaviour.get((qname, qtype)) or self._behaviour.get((qname, None))
            if behaviour == "drop":
                return None
            if behaviour in _RCODES:
                response.set_rcode(_RCODES[behaviour])
            else:
                self._answer(response, qname, qtype)
            size = 65535 if tcp else query.payload if query.edns >= 0 else 512
            return response.to_wire(max_size=size, prefer_truncation=True)

    def _answer(self, response: dns.message.Message, qname: dns.name.Name, qtype: int) -> None:
        """Fill ``response`` from the zone; the caller holds the lock."""
        response.flags |= dns.flags.AA
        rrset = self._rrsets.get((qname, qtype))
        if rrset is not None:
            response.answer.append(rrset)
            return
        if not any(name.is_subdomain(qname) for name, _ in self._rrsets):
            response.set_rcode(dns.rcode.NXDOMAIN)
        zone = qname
        while (soa := self._rrsets.get((zone, dns.rdatatype.SOA))) is None and zone != dns.name.root:
            zone = zone.parent()
        if soa is not None:
            response.authority.append(soa)


def _bind_udp_and_tcp() -> tuple[socket.socket, socket.socket]:
    """A UDP and a listening TCP socket on the same ephemeral port of 127.0.0.1."""
    for _ in range(100):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            tcp.bind(("127.0.0.1", udp.getsockname()[1]))
        except OSError:
            udp.close()
            tcp.close()
            continue
        tcp.listen(16)
        return udp, tcp
    raise OSError("no port free for both UDP and TCP on 127.0.0.1")


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise EOFError("connection closed mid-message")
        data += chunk
    return data
