"""A real Prometheus (1 s scrapes) over real exporters the tests drive, for the metric sources.

The exporter (tests/support/servers.py) is a separate process whose counters a test advances
over HTTP; restarting it resets them, as a redeploy would. Each test uses its own arm label
values, so tests sharing a module's Prometheus never see each other's counts.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp

from canary.demo.procs import PrometheusProcess, free_port
from canary.metrics.prometheus import PromQueries
from support.pool import ProcessPool


@dataclass
class Env:
    prometheus: PrometheusProcess
    exporter_port: int
    spare_port: int  # a second scrape target, for tests that run their own exporter
    pool: ProcessPool

    def queries(self, name: str, **kwargs: object) -> PromQueries:
        return PromQueries(primary_arm=f"{name}-p", canary_arm=f"{name}-c", **kwargs)  # type: ignore[arg-type]


def start_env(pool: ProcessPool, workdir: object, prometheus_binary: str) -> Env:
    """An exporter and a Prometheus scraping it (and a spare port) every second."""
    from pathlib import Path

    exporter_port, spare_port = free_port(), free_port()
    pool.support_server("exporter", exporter_port)
    prometheus = PrometheusProcess(
        [f"127.0.0.1:{exporter_port}", f"127.0.0.1:{spare_port}"],
        workdir=Path(str(workdir)),
        scrape_interval_s=1.0,
        binary=prometheus_binary,
    )
    pool.start(prometheus)
    return Env(prometheus, exporter_port, spare_port, pool)


async def inc(port: int, version: str, *, n: int, code: int = 200, seconds: float = 0.01) -> None:
    """Count n requests of `version` with `code`, each observed as taking `seconds`."""
    url = f"http://127.0.0.1:{port}/inc"
    params = {"version": version, "code": str(code), "n": str(n), "seconds": str(seconds)}
    async with aiohttp.ClientSession() as session, session.get(url, params=params) as resp:
        assert resp.status == 200, await resp.text()


async def instant(env: Env, query: str) -> list[dict[str, object]]:
    """The result of an instant query, read with a plain client."""
    url = f"{env.prometheus.url}/api/v1/query"
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, params={"query": query}) as resp,
    ):
        result: list[dict[str, object]] = (await resp.json())["data"]["result"]
        return result


async def scraped(env: Env, version: str, total: float, *, within_s: float = 15.0) -> None:
    """Wait until Prometheus has scraped `total` requests for `version` (bounded wait)."""
    query = f'sum(http_requests_total{{version="{version}"}})'
    deadline = time.monotonic() + within_s
    last = None
    while time.monotonic() < deadline:
        result = await instant(env, query)
        last = float(result[0]["value"][1]) if result else None  # type: ignore[index]
        if last == total:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"Prometheus shows {last} for {query} after {within_s}s, want {total}")


async def scraped_raw(env: Env, selector: str, *, within_s: float = 15.0) -> None:
    """Wait until Prometheus holds at least one sample for `selector`."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if await instant(env, selector):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"no sample for {selector} after {within_s}s")
