"""One DNS question to one server: the answer's RCODE, addresses and TTL.

Why: two parts of canary ask our authoritative server (PowerDNS) directly, not a resolver:
the PowerDNS router resolves the name it just wrote (a broken LUA record answers SERVFAIL,
which resolvers hide behind retries), and the failover demo's clients resolve the service as
real clients would. Both need a specific server and port, the RCODE, and A/AAAA/CNAME
answers. dnspython does the protocol: a real message parser, a TCP retry when the UDP answer
is truncated (TC bit), and datagrams that are not the answer (another id, garbage) are
skipped instead of failing the query. This module only shapes its answer for our callers and
bounds the whole exchange, TCP fallback included, by one timeout.

The UDP socket is connected to the server: the kernel drops datagrams from anyone else, and
a closed port fails at once (ICMP port unreachable) rather than after the timeout.

A top-level utility: it may import nothing else from ``canary``.

Exception tree::

    DnsError    no usable answer: timeout, refused, malformed reply
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

import dns.asyncbackend
import dns.asyncquery
import dns.exception
import dns.flags
import dns.inet
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype

__all__ = ["QTYPES", "DnsAnswer", "DnsError", "query"]

QTYPES = ("A", "AAAA", "CNAME")


class DnsError(Exception):
    """No usable answer: timeout, refused, malformed reply."""


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    rcode: str  # "NOERROR", "SERVFAIL", ...
    addresses: tuple[str, ...]  # A/AAAA addresses, or CNAME targets
    ttl: int | None  # of the first answer record
    tcp: bool = False  # the UDP answer was truncated; this one came over TCP


async def query(
    server: str, port: int, name: str, qtype: str = "A", *, timeout_s: float = 2.0
) -> DnsAnswer:
    """Ask `server:port` one question (UDP, TCP if truncated), all within `timeout_s`.

    Raises DnsError when no usable answer came; ValueError for a bad name or qtype.
    """
    if qtype not in QTYPES:
        raise ValueError(f"qtype must be one of {sorted(QTYPES)}, got {qtype!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    try:
        qname = dns.name.from_text(name)
    except dns.exception.DNSException as exc:
        raise ValueError(f"invalid DNS name {name!r}: {exc}") from None
    message = dns.message.make_query(qname, dns.rdatatype.from_text(qtype))
    # RD=0: we ask the authoritative server itself, never a recursor.
    message.flags &= ~dns.flags.RD
    try:
        async with asyncio.timeout(timeout_s):
            address = await _address(server, port)
            backend = dns.asyncbackend.get_default_backend()
            udp = await backend.make_socket(  # type: ignore[no-untyped-call]
                dns.inet.af_for_address(address), socket.SOCK_DGRAM, 0, None, (address, port)
            )
            async with udp:
                reply, tcp = await dns.asyncquery.udp_with_fallback(
                    message,
                    address,
                    timeout=timeout_s,
                    port=port,
                    udp_sock=udp,
                    ignore_unexpected=True,
                    ignore_errors=True,
                )
    except (TimeoutError, dns.exception.Timeout) as exc:
        raise DnsError(f"no DNS answer from {server}:{port} within {timeout_s}s") from exc
    except (dns.exception.DNSException, OSError, EOFError) as exc:
        detail = str(exc) or type(exc).__name__
        raise DnsError(f"DNS query to {server}:{port} failed: {detail}") from exc
    return _answer(reply, tcp=tcp)


async def _address(server: str, port: int) -> str:
    """`server` as an IP address: as given, or its first address when it is a host name."""
    try:
        return str(ipaddress.ip_address(server))
    except ValueError:
        pass
    infos = await asyncio.get_running_loop().getaddrinfo(server, port, type=socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"{server} has no address")
    return str(infos[0][4][0])


def _answer(reply: dns.message.Message, *, tcp: bool) -> DnsAnswer:
    addresses: list[str] = []
    ttl: int | None = None
    for rrset in reply.answer:
        if ttl is None:
            ttl = rrset.ttl
        for rdata in rrset:
            if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                addresses.append(str(rdata.address))
            elif rrset.rdtype == dns.rdatatype.CNAME:
                addresses.append(str(rdata.target))
    return DnsAnswer(
        rcode=dns.rcode.to_text(reply.rcode()), addresses=tuple(addresses), ttl=ttl, tcp=tcp
    )
