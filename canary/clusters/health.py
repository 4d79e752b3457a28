"""Health of a cluster's entry point, as the failover machine needs it: one `Probe` per round.

Three signals, as platform teams watch a cluster (and as k8gb does for its GSLB):
- an HTTP probe of the entry point (the ingress address): any answer < 500 within the timeout;
- the Prometheus error ratio of the cluster's traffic, when a query is configured: above the
  threshold is unhealthy, "no data" says nothing either way;
- whether the cluster's Kubernetes API answers, when a checker is given.

Each check's failure is data with a reason, never an exception: the pure machine in
canary/failover.py counts failures and applies hysteresis.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from canary.core.failover import Probe
from canary.httpio import read_prefix

# What a health check reads of the body at most (the kubelet's probes read 10 KiB): an entry
# point that answers with an endless body is judged by its status, not read to the end.
PROBE_BODY_BYTES = 10 * 1024

__all__ = ["CheckResult", "EntryPointHealth", "HealthMonitor", "http_check"]


@dataclass(frozen=True, slots=True)
class CheckResult:
    healthy: bool | None  # None: this check could not say (no data)
    detail: str


Check = Callable[[], Awaitable[CheckResult]]


async def http_check(session: aiohttp.ClientSession, url: str, *, timeout_s: float) -> CheckResult:
    """GET the entry point. A 5xx, a refused connection or a timeout is unhealthy."""
    try:
        async with asyncio.timeout(timeout_s), session.get(url, allow_redirects=False) as response:
            await read_prefix(response, PROBE_BODY_BYTES)  # the status decides, as the kubelet's
            if response.status >= 500:
                return CheckResult(False, f"GET {url}: HTTP {response.status}")
            return CheckResult(True, f"GET {url}: HTTP {response.status}")
    except TimeoutError:
        return CheckResult(False, f"GET {url}: no answer within {timeout_s}s")
    except aiohttp.ClientError as exc:
        return CheckResult(False, f"GET {url}: {exc.__class__.__name__}: {exc}")


def error_ratio_check(ratio: float | None, *, threshold: float) -> CheckResult:
    """Judge an error ratio read from Prometheus; None or NaN means no data."""
    if ratio is None or math.isnan(ratio):
        return CheckResult(None, "error ratio: no data")
    if ratio > threshold:
        return CheckResult(False, f"error ratio {ratio:.2%} > {threshold:.2%}")
    return CheckResult(True, f"error ratio {ratio:.2%}")


@dataclass
class EntryPointHealth:
    """The checks for one cluster. Unhealthy if any check says so; healthy needs the HTTP probe."""

    name: str
    checks: list[Check]

    async def probe(self) -> CheckResult:
        results = await asyncio.gather(*(check() for check in self.checks))
        bad = [r.detail for r in results if r.healthy is False]
        if bad:
            return CheckResult(False, f"{self.name}: " + "; ".join(bad))
        if any(r.healthy for r in results):
            return CheckResult(True, f"{self.name}: " + "; ".join(r.detail for r in results))
        return CheckResult(None, f"{self.name}: no check could say")


@dataclass
class HealthMonitor:
    """Probes primary and standby together, so both are judged on the same round."""

    primary: EntryPointHealth
    standby: EntryPointHealth

    async def probe(self) -> Probe:
        primary, standby = await asyncio.gather(self.primary.probe(), self.standby.probe())
        return Probe(
            primary_healthy=primary.healthy,
            standby_healthy=standby.healthy,
            detail=primary.detail if primary.healthy is not True else "",
        )
