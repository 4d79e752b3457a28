"""One load job: open-loop requests at a fixed rate to one URL until its deadline.

Open loop, because the point is a known rate of canary requests: each request starts on its
own schedule whether or not earlier ones have answered, so a slow canary cannot lower the
rate (a closed loop would, and would hide the slowness: coordinated omission). Latency is
measured from the scheduled start, for the same reason. In-flight requests are bounded per
job; a slot that would exceed the bound is counted as dropped, never queued.

Requests follow no redirects (a 3xx is counted, not followed), and every name is resolved by
`GuardedResolver`, so the address checked is the address connected to.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from canary.core.redact import redact_url
from canary.loadtest.policy import Limits, LoadRequest, TargetPolicy
from canary.notify.webhooks import RefusedAddress, refusal

__all__ = ["OUTCOMES", "GuardedResolver", "Job", "LoadMetrics"]

OUTCOMES = ("ok", "redirect", "http_4xx", "http_5xx", "timeout", "error")
_CATCH_UP_S = 1.0  # after a stall, at most this much of the schedule is made up at once
_READ_CHUNK = 64 * 1024


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, refusing a name that resolves to a loopback, link-local,
    unspecified or API-server address unless an allowed CIDR holds the address or the
    operator named the host exactly (`--allow-host`, no wildcard)."""

    def __init__(self, policy: TargetPolicy) -> None:
        self._policy = policy
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if self._policy.named_exactly(host):
            return results
        for result in results:
            address = result["host"]
            if self._policy.address_allowed(address):
                continue
            why = refusal(address)
            if why is not None:
                raise RefusedAddress(f"{host} resolves to {why}; no load sent (see --allow-cidr)")
        return results

    async def close(self) -> None:
        await self._inner.close()


class LoadMetrics:
    """The load tester's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["namespace", "name"]
        self.requests = Counter(
            "canary_loadtest_requests",
            "Requests sent by canary loadtest, by outcome (ok, redirect, http_4xx, http_5xx, "
            "timeout, error).",
            [*labels, "outcome"],
            registry=self.registry,
        )
        self.dropped = Counter(
            "canary_loadtest_dropped",
            "Scheduled requests not sent because the job's in-flight bound was reached.",
            labels,
            registry=self.registry,
        )
        self.latency = Histogram(
            "canary_loadtest_request_duration_seconds",
            "Time from a request's scheduled start to its answer.",
            labels,
            registry=self.registry,
        )
        self.jobs = Gauge("canary_loadtest_jobs", "Load jobs running.", registry=self.registry)
        self.webhooks = Counter(
            "canary_loadtest_webhooks",
            "Webhook calls, by result (started, extended, stopped, refused).",
            ["result"],
            registry=self.registry,
        )


class Job:
    """Sends `rps` requests per second to `url` until its deadline; `extend` moves it on."""

    def __init__(
        self,
        request: LoadRequest,
        *,
        session: aiohttp.ClientSession,
        limits: Limits,
        metrics: LoadMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.namespace, self.name, self.url = request.key
        self.method = request.method
        self.rps = request.rps
        self._clock = clock
        self.started = clock()
        self.started_at = time.time()  # wall time, for people reading /jobs
        self.deadline = self.started + request.duration_s
        self.phase = request.phase
        self.calls = 1
        self.sent = 0
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.dropped = 0
        self.last_error: str | None = None
        self._session = session
        self._limits = limits
        self._metrics = metrics
        self._in_flight: set[asyncio.Task[None]] = set()

    def extend(self, request: LoadRequest) -> None:
        """A repeated call: the latest rate and method, the later of the two deadlines."""
        self.rps = request.rps
        self.method = request.method
        self.phase = request.phase
        self.deadline = max(self.deadline, self._clock() + request.duration_s)
        self.calls += 1

    def remaining_s(self) -> float:
        return max(0.0, self.deadline - self._clock())

    def describe(self) -> dict[str, Any]:
        """The job as /jobs shows it."""
        return {
            "namespace": self.namespace,
            "name": self.name,
            "url": redact_url(self.url),  # a token in the query stays out of /jobs
            "method": self.method,
            "rps": self.rps,
            "remaining_s": round(self.remaining_s(), 3),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started_at)),
            "phase": self.phase,
            "calls": self.calls,
            "sent": self.sent,
            "in_flight": len(self._in_flight),
            "dropped": self.dropped,
            "outcomes": dict(self.outcomes),
            "last_error": self.last_error,
        }

    async def run(self) -> None:
        """Send on schedule until the deadline; cancelling it cancels and awaits every request."""
        labels = {"namespace": self.namespace, "name": self.name}
        dropped = self._metrics.dropped.labels(**labels)
        try:
            next_at = self._clock()
            while True:
                now = self._clock()
                if now >= self.deadline:
                    break
                if now < next_at:
                    await asyncio.sleep(min(next_at, self.deadline) - now)
                    continue
                scheduled = next_at
                next_at = max(next_at + 1.0 / self.rps, now - _CATCH_UP_S)
                if len(self._in_flight) >= self._limits.max_in_flight:
                    self.dropped += 1
                    dropped.inc()
                    continue
                self.sent += 1
                task = asyncio.create_task(self._one(scheduled))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
            if self._in_flight:
                await asyncio.wait(set(self._in_flight), timeout=self._limits.timeout_s)
        finally:
            for task in list(self._in_flight):
                task.cancel()
            if self._in_flight:
                await asyncio.gather(*self._in_flight, return_exceptions=True)

    async def _one(self, scheduled: float) -> None:
        outcome = "ok"
        try:
            async with self._session.request(
                self.method,
                self.url,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self._limits.timeout_s),
            ) as response:
                async for _ in response.content.iter_chunked(_READ_CHUNK):
                    pass  # read and drop: the connection is reused, memory stays flat
                if response.status >= 500:
                    outcome = "http_5xx"
                elif response.status >= 400:
                    outcome = "http_4xx"
                elif response.status >= 300:
                    outcome = "redirect"
                if outcome != "ok":
                    self.last_error = f"HTTP {response.status}"
        except TimeoutError:
            outcome, self.last_error = "timeout", f"no answer within {self._limits.timeout_s:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            outcome, self.last_error = "error", f"{type(exc).__name__}: {str(exc)[:200]}"
        self.outcomes[outcome] += 1
        labels = {"namespace": self.namespace, "name": self.name}
        self._metrics.requests.labels(**labels, outcome=outcome).inc()
        self._metrics.latency.labels(**labels).observe(max(0.0, self._clock() - scheduled))
