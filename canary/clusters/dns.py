"""A minimal asyncio DNS client: one question over UDP, the answer's addresses and RCODE.

Why not a library: we need three things — ask a specific server on a specific port (our
PowerDNS on loopback), see the RCODE (a broken LUA record answers SERVFAIL, which resolvers
hide behind retries), and read A/AAAA/CNAME answers. That is ~100 lines of RFC 1035, cheaper
than a dependency, and it runs on the event loop without threads.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import struct
from dataclasses import dataclass

__all__ = ["RCODES", "DnsAnswer", "DnsError", "query"]

QTYPES = {"A": 1, "CNAME": 5, "AAAA": 28}
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


class DnsError(Exception):
    """No usable answer: timeout, malformed reply."""


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    rcode: str  # "NOERROR", "SERVFAIL", ...
    addresses: tuple[str, ...]  # A/AAAA addresses, or CNAME targets
    ttl: int | None  # of the first answer record


def _encode_name(name: str) -> bytes:
    out = b""
    for label in name.rstrip(".").split("."):
        raw = label.encode("idna")
        if not 0 < len(raw) < 64:
            raise ValueError(f"invalid DNS label {label!r} in {name!r}")
        out += bytes([len(raw)]) + raw
    return out + b"\x00"


def _skip_name(packet: bytes, offset: int) -> int:
    while True:
        length = packet[offset]
        if length & 0xC0 == 0xC0:  # compression pointer ends the name
            return offset + 2
        if length == 0:
            return offset + 1
        offset += 1 + length


def _read_name(packet: bytes, offset: int) -> str:
    labels: list[str] = []
    for _ in range(128):  # bounded: a pointer loop in a hostile reply must not hang us
        length = packet[offset]
        if length & 0xC0 == 0xC0:
            offset = struct.unpack_from("!H", packet, offset)[0] & 0x3FFF
            continue
        if length == 0:
            return ".".join(labels) + "."
        labels.append(packet[offset + 1 : offset + 1 + length].decode("ascii", "replace"))
        offset += 1 + length
    raise DnsError("DNS name compression loop")


def _parse(packet: bytes, query_id: int) -> DnsAnswer:
    if len(packet) < 12:
        raise DnsError("short DNS reply")
    reply_id, flags, qdcount, ancount = struct.unpack_from("!HHHH", packet, 0)
    if reply_id != query_id:
        raise DnsError("DNS reply id does not match the query")
    rcode = RCODES.get(flags & 0x000F, str(flags & 0x000F))
    offset = 12
    for _ in range(qdcount):
        offset = _skip_name(packet, offset) + 4
    addresses: list[str] = []
    ttl: int | None = None
    for _ in range(ancount):
        offset = _skip_name(packet, offset)
        rtype, _cls, rttl, rdlength = struct.unpack_from("!HHIH", packet, offset)
        offset += 10
        rdata = packet[offset : offset + rdlength]
        if rtype == QTYPES["A"] and rdlength == 4:
            addresses.append(str(ipaddress.IPv4Address(rdata)))
        elif rtype == QTYPES["AAAA"] and rdlength == 16:
            addresses.append(str(ipaddress.IPv6Address(rdata)))
        elif rtype == QTYPES["CNAME"]:
            addresses.append(_read_name(packet, offset))
        if ttl is None:
            ttl = rttl
        offset += rdlength
    return DnsAnswer(rcode=rcode, addresses=tuple(addresses), ttl=ttl)


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if not self.reply.done():
            self.reply.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc)


async def query(
    server: str, port: int, name: str, qtype: str = "A", *, timeout_s: float = 2.0
) -> DnsAnswer:
    """Ask `server:port` one question over UDP. Raises DnsError on timeout or a bad reply."""
    if qtype not in QTYPES:
        raise ValueError(f"qtype must be one of {sorted(QTYPES)}, got {qtype!r}")
    query_id = secrets.randbits(16)
    # RD=0: we ask the authoritative server itself, never a recursor.
    packet = struct.pack("!HHHHHH", query_id, 0, 1, 0, 0, 0)
    packet += _encode_name(name) + struct.pack("!HH", QTYPES[qtype], 1)
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(_Protocol, remote_addr=(server, port))
    try:
        transport.sendto(packet)
        try:
            data = await asyncio.wait_for(protocol.reply, timeout_s)
        except TimeoutError as exc:
            raise DnsError(f"no DNS answer from {server}:{port} within {timeout_s}s") from exc
        except OSError as exc:
            raise DnsError(f"DNS query to {server}:{port} failed: {exc}") from exc
        try:
            return _parse(data, query_id)
        except (IndexError, struct.error) as exc:
            raise DnsError(f"malformed DNS reply from {server}:{port}") from exc
    finally:
        transport.close()
