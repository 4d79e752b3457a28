"""One DNS question, against a tiny scripted DNS server on 127.0.0.1 (UDP and TCP, one port)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest

from canary.dnsquery import DnsAnswer, DnsError, query

NAME = "app.example.test."
Address = tuple[str, int]


def reply(
    wire: bytes,
    *addresses: str,
    rtype: str = "A",
    ttl: int = 5,
    rcode: int = dns.rcode.NOERROR,
    truncated: bool = False,
) -> dns.message.Message:
    """The answer to the query in `wire`: `addresses` as `rtype` records, or the TC bit."""
    request = dns.message.from_wire(wire)
    response = dns.message.make_response(request)
    response.flags |= dns.flags.AA
    response.set_rcode(rcode)
    if truncated:
        response.flags |= dns.flags.TC
    elif addresses:
        question = request.question[0]
        response.answer.append(dns.rrset.from_text(question.name, ttl, "IN", rtype, *addresses))
    return response


@dataclass
class FakeDns:
    """Answers UDP with `on_udp` (which may send anything, or nothing) and TCP with `on_tcp`."""

    port: int = 0
    on_udp: Callable[[FakeDns, bytes, Address], None] | None = None
    on_tcp: Callable[[bytes], dns.message.Message] | None = None
    udp_queries: list[dns.message.Message] = field(default_factory=list)
    tcp_queries: int = 0
    transport: asyncio.DatagramTransport | None = None
    elsewhere: asyncio.DatagramTransport | None = None  # another socket on 127.0.0.1

    def send(self, data: bytes, to: Address) -> None:
        assert self.transport is not None
        self.transport.sendto(data, to)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: FakeDns) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: Address) -> None:  # type: ignore[override]
        self.server.udp_queries.append(dns.message.from_wire(data))
        if self.server.on_udp is not None:
            self.server.on_udp(self.server, data, addr)


async def _start(server: FakeDns) -> asyncio.Server:
    """UDP and TCP on the same free loopback port (a few tries: the port may be taken)."""
    loop = asyncio.get_running_loop()

    async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            length = int.from_bytes(await reader.readexactly(2), "big")
            wire = await reader.readexactly(length)
            server.tcp_queries += 1
            if server.on_tcp is not None:
                answer = server.on_tcp(wire).to_wire()
                writer.write(len(answer).to_bytes(2, "big") + answer)
                await writer.drain()
        writer.close()

    for _ in range(20):
        tcp_server = await asyncio.start_server(tcp, "127.0.0.1", 0)
        port = tcp_server.sockets[0].getsockname()[1]
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Udp(server), local_addr=("127.0.0.1", port)
            )
        except OSError:
            tcp_server.close()
            await tcp_server.wait_closed()
            continue
        server.port, server.transport = port, transport
        server.elsewhere, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0)
        )
        return tcp_server
    raise RuntimeError("no free loopback port for UDP and TCP")


@pytest.fixture
async def fake_dns() -> AsyncIterator[FakeDns]:
    server = FakeDns()
    tcp_server = await _start(server)
    try:
        yield server
    finally:
        tcp_server.close()
        await tcp_server.wait_closed()
        for transport in (server.transport, server.elsewhere):
            if transport is not None:
                transport.close()


def answers(*addresses: str, **options: object) -> Callable[[FakeDns, bytes, Address], None]:
    def on_udp(server: FakeDns, wire: bytes, addr: Address) -> None:
        server.send(reply(wire, *addresses, **options).to_wire(), addr)  # type: ignore[arg-type]

    return on_udp


async def test_an_answer_over_udp(fake_dns: FakeDns) -> None:
    """A plain answer: its RCODE, addresses and TTL; the question asks for no recursion."""
    fake_dns.on_udp = answers("127.0.0.10", ttl=3)
    answer = await query("127.0.0.1", fake_dns.port, NAME)
    assert answer == DnsAnswer(rcode="NOERROR", addresses=("127.0.0.10",), ttl=3, tcp=False)
    [asked] = fake_dns.udp_queries
    assert not asked.flags & dns.flags.RD
    assert fake_dns.tcp_queries == 0


async def test_a_truncated_answer_is_asked_again_over_tcp(fake_dns: FakeDns) -> None:
    """The TC bit on the UDP answer means "incomplete": the question goes again over TCP,
    and the TCP answer is the one returned (not the empty UDP one)."""
    fake_dns.on_udp = answers(truncated=True)
    fake_dns.on_tcp = lambda wire: reply(wire, "127.0.0.10", "127.0.0.20")
    answer = await query("127.0.0.1", fake_dns.port, NAME)
    assert answer.tcp and fake_dns.tcp_queries == 1
    assert (answer.rcode, sorted(answer.addresses)) == ("NOERROR", ["127.0.0.10", "127.0.0.20"])


async def test_stray_datagrams_do_not_break_the_query(fake_dns: FakeDns) -> None:
    """Garbage, a reply to another query, and a reply from another socket arrive before the
    answer: all are skipped, and the real answer is returned."""

    def on_udp(server: FakeDns, wire: bytes, addr: Address) -> None:
        server.send(b"\x12\x34 not a DNS message", addr)
        other = reply(wire, "127.0.0.66")
        other.id = (other.id + 1) % 65536
        server.send(other.to_wire(), addr)
        assert server.elsewhere is not None
        server.elsewhere.sendto(reply(wire, "127.0.0.77").to_wire(), addr)
        server.send(reply(wire, "127.0.0.10").to_wire(), addr)

    fake_dns.on_udp = on_udp
    answer = await query("127.0.0.1", fake_dns.port, NAME)
    assert answer.addresses == ("127.0.0.10",)


async def test_an_rcode_and_cname_targets_are_reported(fake_dns: FakeDns) -> None:
    """SERVFAIL comes back as data with no addresses; CNAME targets are absolute names."""
    fake_dns.on_udp = answers(rcode=dns.rcode.SERVFAIL)
    assert await query("127.0.0.1", fake_dns.port, NAME) == DnsAnswer("SERVFAIL", (), None)
    fake_dns.on_udp = answers("edge.example.net.", rtype="CNAME", ttl=7)
    answer = await query("127.0.0.1", fake_dns.port, NAME, "CNAME")
    assert (answer.addresses, answer.ttl) == (("edge.example.net.",), 7)


async def test_no_answer_is_a_dns_error_after_the_timeout(fake_dns: FakeDns) -> None:
    """A server that keeps silent: DnsError naming the server and the timeout."""
    with pytest.raises(DnsError, match=rf"no DNS answer from 127.0.0.1:{fake_dns.port} within"):
        await query("127.0.0.1", fake_dns.port, NAME, timeout_s=0.2)


async def test_a_closed_port_is_a_dns_error_without_waiting_for_the_timeout() -> None:
    """Nothing listens: the refusal is reported as such, not as a timeout."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DnsError, match=r"failed: .*Connection refused"):
        await query("127.0.0.1", port, NAME, timeout_s=30)


async def test_a_failed_tcp_fallback_is_a_dns_error(fake_dns: FakeDns) -> None:
    """Truncated over UDP and no answer over TCP: DnsError, not an empty answer."""
    fake_dns.on_udp = answers(truncated=True)
    with pytest.raises(DnsError):
        await query("127.0.0.1", fake_dns.port, NAME, timeout_s=2)
    assert fake_dns.tcp_queries == 1


async def test_bad_arguments_are_value_errors() -> None:
    """A qtype we do not read, a name that is not one, a timeout that is not positive."""
    with pytest.raises(ValueError, match="qtype"):
        await query("127.0.0.1", 53, NAME, "MX")
    with pytest.raises(ValueError, match="invalid DNS name"):
        await query("127.0.0.1", 53, "a" * 64 + ".example.test")
    with pytest.raises(ValueError, match="timeout_s"):
        await query("127.0.0.1", 53, NAME, timeout_s=0)
