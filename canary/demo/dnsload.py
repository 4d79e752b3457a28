"""A load generator that finds its server through DNS, as real clients of two clusters do.

Traffic between two clusters is split by DNS weight, so what a user sees depends on what their
resolver answered and for how long it keeps the answer (the TTL). This generator plays
`clients` independent clients: each asks the authoritative server (our PowerDNS on loopback,
through canary/dnsquery.py) for the name, keeps the answer for its TTL, and sends its requests
to that address. With pickwrandom every fresh answer is a weighted draw, so across clients the
split follows the weights, and when a failover rewrites the record every client moves within
one TTL of the write.

Every request is kept as (send time, address, answered or not), so the time traffic took to
move is measured here, at the client, not taken from the controller's word.

Loopback only: answers outside 127.0.0.0/8 or ::1 are never sent to.
"""

from __future__ import annotations

import asyncio
import bisect
import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from canary.dnsquery import DnsError, query

__all__ = ["DnsLoadGenerator", "Sent"]


@dataclass(slots=True)
class Sent:
    at: float
    address: str  # "" when the name did not resolve
    ok: bool | None = None  # None while in flight; False: no answer or 5xx


@dataclass
class _Client:
    address: str = ""
    expires: float = 0.0


@dataclass
class DnsLoadGenerator:
    """Sends `rate` requests/s to http://<answer>:<port><path>, re-resolving per client TTL."""

    dns_server: str
    dns_port: int
    name: str
    port: int
    rate: float = 100.0
    clients: int = 20
    path: str = "/"
    timeout_s: float = 1.0
    min_ttl_s: float = 1.0
    clock: Callable[[], float] = time.monotonic
    sent: list[Sent] = field(default_factory=list)
    last_failure: str | None = None

    def __post_init__(self) -> None:
        if not 0 < self.rate <= 2000:
            raise ValueError(f"rate must be within (0, 2000] requests/s, got {self.rate}")
        if not 1 <= self.clients <= 1000:
            raise ValueError(f"clients must be within 1..1000, got {self.clients}")
        if not ipaddress.ip_address(self.dns_server).is_loopback:
            raise ValueError(f"dns_server must be a loopback address, got {self.dns_server!r}")
        self._clients = [_Client() for _ in range(self.clients)]
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def stop(self) -> None:
        self._stop.set()

    async def _resolve(self, client: _Client, now: float) -> None:
        try:
            answer = await query(self.dns_server, self.dns_port, self.name, timeout_s=0.5)
        except DnsError as exc:
            self.last_failure = str(exc)
            client.address, client.expires = "", now + self.min_ttl_s
            return
        address = answer.addresses[0] if answer.rcode == "NOERROR" and answer.addresses else ""
        if address and not ipaddress.ip_address(address).is_loopback:
            self.last_failure = f"{self.name} answered {address}, not loopback: not sent"
            address = ""
        ttl = max(self.min_ttl_s, float(answer.ttl or 0))
        client.address, client.expires = address, now + ttl

    async def run(self) -> None:
        """Send until stop() or cancellation; requests in flight are awaited, then cancelled."""
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        interval = 1.0 / self.rate
        index = 0
        async with aiohttp.ClientSession(timeout=timeout) as session:
            try:
                next_at = self.clock()
                while not self._stop.is_set():
                    now = self.clock()
                    if now < next_at:
                        await asyncio.sleep(next_at - now)
                        continue
                    next_at = max(next_at + interval, now - 1.0)
                    client = self._clients[index % self.clients]
                    index += 1
                    if now >= client.expires:
                        await self._resolve(client, now)
                    record = Sent(now, client.address)
                    self.sent.append(record)
                    if not client.address:
                        record.ok = False
                        continue
                    task = asyncio.create_task(self._one(session, record))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                if self._tasks:
                    await asyncio.wait(set(self._tasks), timeout=self.timeout_s)
            finally:
                for task in list(self._tasks):
                    task.cancel()
                if self._tasks:
                    await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _one(self, session: aiohttp.ClientSession, record: Sent) -> None:
        host = f"[{record.address}]" if ":" in record.address else record.address
        try:
            async with session.get(f"http://{host}:{self.port}{self.path}") as response:
                await response.read()
                record.ok = response.status < 500
        except (aiohttp.ClientError, TimeoutError) as exc:
            record.ok = False
            self.last_failure = f"{record.address}: {type(exc).__name__}: {exc}"

    # ---- what was seen ----------------------------------------------------------------

    def window(self, since: float, until: float | None = None) -> list[Sent]:
        times = [s.at for s in self.sent]
        lo = bisect.bisect_left(times, since)
        hi = len(times) if until is None else bisect.bisect_left(times, until)
        return self.sent[lo:hi]

    def share(self, address: str, since: float, until: float | None = None) -> float | None:
        """Share of requests sent to `address` in [since, until); None if none were sent."""
        sent = self.window(since, until)
        return sum(s.address == address for s in sent) / len(sent) if sent else None

    def moved_at(self, address: str, since: float) -> float | None:
        """The send time after which every request went to `address` (None: not yet).

        That is the first request to `address` after the last one that went elsewhere.
        """
        sent = self.window(since)
        last_elsewhere = max((s.at for s in sent if s.address != address), default=None)
        after = [
            s.at
            for s in sent
            if s.address == address and (last_elsewhere is None or s.at > last_elsewhere)
        ]
        return after[0] if after else None

    def failed(self, since: float, until: float | None = None) -> int:
        return sum(s.ok is False for s in self.window(since, until))
