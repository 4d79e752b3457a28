"""The demo's sample service: one version of a tiny HTTP app, run as its own process.

The demo needs two versions whose behaviour it can dial (error rate, latency) and whose
metrics look like a real service's: a request counter by status code and a latency histogram
with Prometheus' default buckets, both exported by prometheus-client and scraped by a real
Prometheus. Every response names its version in a header, so the load generator can measure
the split HAProxy really produced, independently of what HAProxy says its weights are.

Run it as `python -m canary.demo.service --port P --version canary --error-rate 0.05`.
It listens on 127.0.0.1 only and exits cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import math
import random
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

__all__ = [
    "ERROR_STATUS",
    "LATENCY_METRIC",
    "REQUESTS_METRIC",
    "VERSION_HEADER",
    "ServiceSettings",
    "build_app",
    "main",
    "parse_args",
]

VERSION_HEADER = "X-Canary-Version"
# Names as the Prometheus client exports them (the counter gains its `_total` suffix).
REQUESTS_METRIC = "http_requests_total"
LATENCY_METRIC = "http_request_duration_seconds"
ERROR_STATUS = 500
VERSIONS = ("primary", "canary")


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    """How one version behaves."""

    version: str
    error_rate: float = 0.0  # probability that a request answers 500
    latency_ms: float = 20.0  # median of the log-normal latency
    latency_jitter: float = 0.3  # sigma of the log-normal (0: every request takes latency_ms)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.version not in VERSIONS:
            raise ValueError(f"version must be one of {', '.join(VERSIONS)}, got {self.version!r}")
        if not (0.0 <= self.error_rate <= 1.0) or math.isnan(self.error_rate):
            raise ValueError(f"error_rate must be within 0..1, got {self.error_rate}")
        if not (0.0 <= self.latency_ms <= 60_000.0):
            raise ValueError(f"latency_ms must be within 0..60000, got {self.latency_ms}")
        if not (0.0 <= self.latency_jitter <= 3.0):
            raise ValueError(f"latency_jitter must be within 0..3, got {self.latency_jitter}")

    def draw_latency_s(self, rng: random.Random) -> float:
        """One request's latency in seconds: log-normal around the median latency_ms."""
        if self.latency_ms == 0:
            return 0.0
        return self.latency_ms / 1000.0 * math.exp(rng.gauss(0.0, self.latency_jitter))


def build_app(settings: ServiceSettings) -> web.Application:
    """The aiohttp app: `/` (any path) serves traffic, `/metrics` and `/healthz` do not count."""
    rng = random.Random(settings.seed)
    registry = CollectorRegistry()
    requests = Counter(
        REQUESTS_METRIC.removesuffix("_total"),
        "HTTP requests served, by version and status code.",
        ["version", "code"],
        registry=registry,
    )
    # Default buckets on purpose: the analysis reads whatever `le` bounds Prometheus has.
    latency = Histogram(
        LATENCY_METRIC,
        "Time to answer an HTTP request, by version.",
        ["version"],
        registry=registry,
    )
    version = settings.version

    async def serve(request: web.Request) -> web.Response:
        started = time.perf_counter()
        delay = settings.draw_latency_s(rng)
        if delay > 0:
            await asyncio.sleep(delay)
        failed = rng.random() < settings.error_rate
        status = ERROR_STATUS if failed else 200
        body = f"{version}: {'injected error' if failed else 'ok'}\n"
        requests.labels(version=version, code=str(status)).inc()
        latency.labels(version=version).observe(time.perf_counter() - started)
        return web.Response(status=status, text=body, headers={VERSION_HEADER: version})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n", headers={VERSION_HEADER: version})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/{tail:.*}", serve)
    return app


def parse_args(argv: Sequence[str] | None) -> tuple[ServiceSettings, int, str]:
    """Settings and port from the command line; bad values exit with a message naming the flag."""
    parser = argparse.ArgumentParser(
        prog="python -m canary.demo.service", description="One version of the demo service."
    )
    parser.add_argument("--port", type=int, required=True, help="TCP port")
    # Two "clusters" on one machine listen on distinct loopback addresses (127.0.0.10, ...).
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address to listen on")
    parser.add_argument("--version", required=True, choices=VERSIONS)
    parser.add_argument("--error-rate", type=float, default=0.0, help="share of 500s, 0..1")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="median latency")
    parser.add_argument(
        "--latency-jitter", type=float, default=0.3, help="sigma of the log-normal latency"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for errors and latency")
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be within 1..65535, got {args.port}")
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        parser.error(f"--host must be a loopback address, got {args.host!r}")
    try:
        settings = ServiceSettings(
            version=args.version,
            error_rate=args.error_rate,
            latency_ms=args.latency_ms,
            latency_jitter=args.latency_jitter,
            seed=args.seed,
        )
    except ValueError as exc:
        parser.error(f"--{str(exc).replace('_', '-')}")
    return settings, args.port, args.host


async def serve_until_signalled(
    settings: ServiceSettings, port: int, host: str = "127.0.0.1"
) -> None:
    """Serve on host:port until SIGTERM or SIGINT, then close connections and return."""
    runner = web.AppRunner(build_app(settings), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        print(f"service {settings.version} listening on {host}:{port}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    settings, port, host = parse_args(argv)
    try:
        asyncio.run(serve_until_signalled(settings, port, host))
    except OSError as exc:
        print(f"service {settings.version}: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
