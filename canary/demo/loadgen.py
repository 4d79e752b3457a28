"""The demo's load generator: open-loop HTTP traffic that measures the split it receives.

Open loop, because real users do not wait for each other: requests are started on a fixed
schedule (`rate` per second) whether or not earlier ones have answered, so a slow canary
cannot quietly lower the load. Concurrency is still bounded; a request that would exceed the
bound is counted as `dropped` instead of being queued (a queue would turn into a closed loop).

Every response names the version that served it (service.VERSION_HEADER), so the split is
measured here, at the client, independently of what the router says its weights are. Each
request is attributed to the time it was *sent*, so "the split since the weight changed"
counts exactly the requests HAProxy routed under the new weight.

Only loopback URLs are accepted: the demo never sends traffic anywhere else.
"""

from __future__ import annotations

import asyncio
import bisect
import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from canary.demo.service import VERSION_HEADER

__all__ = ["LoadGenerator", "SplitStats"]

_NONE = "none"  # no version: the request failed before any server answered


@dataclass(frozen=True, slots=True)
class SplitStats:
    """What the load generator saw over a window of send times."""

    since: float
    until: float
    completed: int  # answered by a server with a version header
    primary: int
    canary: int
    primary_errors: int  # 5xx answers
    canary_errors: int
    failed: int  # no answer with a version: connection errors, timeouts, proxy errors
    dropped: int  # not sent: the concurrency bound was reached

    @property
    def canary_share(self) -> float | None:
        """Canary answers / (primary + canary answers); None before any answer."""
        total = self.primary + self.canary
        return self.canary / total if total else None

    def error_rate(self, version: str) -> float | None:
        """5xx share of that version's answers; None before any answer."""
        served, errors = (
            (self.canary, self.canary_errors)
            if version == "canary"
            else (self.primary, self.primary_errors)
        )
        return errors / served if served else None


def _require_loopback(url: str) -> None:
    host = urlsplit(url).hostname
    if host is None:
        raise ValueError(f"load generator url has no host: {url!r}")
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"load generator url must point at loopback, got host {host!r}")


class LoadGenerator:
    """Sends `rate` requests per second to `url` until `run()` is cancelled or `stop()`ped."""

    def __init__(
        self,
        url: str,
        *,
        rate: float = 200.0,
        concurrency: int = 64,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _require_loopback(url)
        if not 0 < rate <= 5000:
            raise ValueError(f"rate must be within (0, 5000] requests/s, got {rate}")
        if not 1 <= concurrency <= 1024:
            raise ValueError(f"concurrency must be within 1..1024, got {concurrency}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.url = url
        self.rate = rate
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.clock = clock
        # Parallel lists kept sorted by send time (appended in order of sending).
        self._sent_at: list[float] = []
        self._outcome: list[str] = []  # "primary", "canary", "none" until answered: "pending"
        self._error: list[bool] = []
        self._dropped_at: list[float] = []
        self._in_flight: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self.last_failure: str | None = None

    def now(self) -> float:
        """The load generator's clock, the one `stats()` windows are expressed in."""
        return self.clock()

    def stop(self) -> None:
        """Ask `run()` to stop sending; it then waits for requests in flight and returns."""
        self._stopping.set()

    async def run(self) -> None:
        """Send on schedule until stopped or cancelled; in-flight requests are awaited or cancelled."""
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        interval = 1.0 / self.rate
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            try:
                next_at = self.clock()
                while not self._stopping.is_set():
                    now = self.clock()
                    if now < next_at:
                        await asyncio.sleep(next_at - now)
                        continue
                    # Catch up after a stall without a burst larger than one second's worth.
                    next_at = max(next_at + interval, now - 1.0)
                    if len(self._in_flight) >= self.concurrency:
                        self._dropped_at.append(now)
                        continue
                    index = len(self._sent_at)
                    self._sent_at.append(now)
                    self._outcome.append("pending")
                    self._error.append(False)
                    task = asyncio.create_task(self._one(session, index))
                    self._in_flight.add(task)
                    task.add_done_callback(self._in_flight.discard)
                if self._in_flight:
                    await asyncio.wait(set(self._in_flight), timeout=self.timeout_s)
            finally:
                for task in list(self._in_flight):
                    task.cancel()
                if self._in_flight:
                    await asyncio.gather(*self._in_flight, return_exceptions=True)

    async def _one(self, session: aiohttp.ClientSession, index: int) -> None:
        try:
            async with session.get(self.url) as response:
                await response.read()
                version = response.headers.get(VERSION_HEADER)
                if version in ("primary", "canary"):
                    self._outcome[index] = version
                    self._error[index] = response.status >= 500
                else:
                    self._outcome[index] = _NONE
                    self.last_failure = f"HTTP {response.status} without a version header"
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._outcome[index] = _NONE
            self.last_failure = f"{type(exc).__name__}: {exc}"

    def stats(self, *, since: float | None = None, until: float | None = None) -> SplitStats:
        """Counts over requests *sent* in [since, until); pending requests are left out."""
        start = self._sent_at[0] if since is None and self._sent_at else (since or 0.0)
        end = self.clock() if until is None else until
        lo = bisect.bisect_left(self._sent_at, start)
        hi = bisect.bisect_left(self._sent_at, end)
        primary = canary = primary_errors = canary_errors = failed = 0
        for i in range(lo, hi):
            outcome = self._outcome[i]
            if outcome == "primary":
                primary += 1
                primary_errors += self._error[i]
            elif outcome == "canary":
                canary += 1
                canary_errors += self._error[i]
            elif outcome == _NONE:
                failed += 1
        dropped = bisect.bisect_left(self._dropped_at, end) - bisect.bisect_left(
            self._dropped_at, start
        )
        return SplitStats(
            since=start,
            until=end,
            completed=primary + canary,
            primary=primary,
            canary=canary,
            primary_errors=primary_errors,
            canary_errors=canary_errors,
            failed=failed,
            dropped=dropped,
        )
