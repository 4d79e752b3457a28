"""Prometheus queries and controller CPU per rollout-tick: per-rollout PrometheusMetrics vs the
shared PrometheusBatcher (issue 13, point 1), against a real Prometheus.

One exporter process publishes the series of --rollouts simulated rollouts as a Kubernetes
app would (the `app-histogram` preset: `http_request_duration_seconds_{bucket,count,sum,
created}` by namespace, service and code, 12 buckets, codes 200/404/503, both arms: 90 series
per rollout), its counters growing with time. Prometheus scrapes it every --scrape-s. For each
N in --sizes and each rollout age in --ages (seconds since the analysis began), this process
plays the controller's side only:

- batched: N rollouts (the operator's queries) register on one PrometheusBatcher (period
  --tick-s); then --ticks ticks, 1.1 x --tick-s apart, in each of which all N fetch at once (one
  batch). Their first reads (the registration's read back to `since`) are reported apart.
- old: PrometheusMetrics for --old-sample of the N rollouts (its cost per rollout-tick does
  not depend on N; at 1,000 it cannot keep up at all, see issue 13), --ticks ticks each.

Queries are counted by Prometheus itself (`prometheus_http_requests_total{handler=
"/api/v1/query"}` on its /metrics page); CPU is this process' (all threads: the executor pools
included), so neither Prometheus' nor the exporter's CPU is in it. Ages above 0 wait until
Prometheus has that much history (the run takes about max(--ages) + a few minutes).

    PYTHONPATH=. python -m benchmarks.metrics_batch [--sizes 100 500 1000] [--ages 0 600]
        [--ticks 3] [--tick-s 10] [--scrape-s 5] [--old-sample 20]

`--memory` measures the batcher alone instead (no old provider): for each N, N rollouts on
one batcher, --ticks batches after their first reads; the process' RSS before the
registrations and after each batch, CPU per rollout-read of the batches, then the same again
under tracemalloc for the batcher's retained heap per rollout (its registrations, counting
state and series cache, after a full collection).

    PYTHONPATH=. python -m benchmarks.metrics_batch --memory --sizes 1000 --ticks 8

`--first-reads` measures the rollouts' first reads alone: N rollouts registering at once
with `since` --ages back (a shard's rollouts resumed on another replica), with the range read
back to `since`, then with each series' summary (canary.metrics.batched, "Summary first
reads"): queries, this process' CPU, Prometheus' CPU and the wall time until all N have
their counts.

    PYTHONPATH=. python -m benchmarks.metrics_batch --first-reads --sizes 1000 --ages 600 3600
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import resource
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, math.inf)
SHARE = (0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 1.0)
CODES = {"200": 0.97, "404": 0.02, "503": 0.01}
RATES = {"primary": 20.0, "canary": 2.0}  # requests per second per arm


def names(i: int) -> tuple[str, str]:
    """The namespace and Deployment name of simulated rollout i."""
    return f"team{i % 25}", f"app{i}"


# --- the exporter (run as its own process) -------------------------------------------------------


def serve_exporter(port: int, rollouts: int) -> None:
    start = time.time()
    rows: list[tuple[str, float]] = []  # (labels without le, requests per second)
    for i in range(rollouts):
        namespace, app = names(i)
        for arm, rate in RATES.items():
            for code, share in CODES.items():
                labels = f'namespace="{namespace}",service="{app}-{arm}",code="{code}"'
                rows.append((labels, rate * share * (1 + (i % 7) / 10)))
    les = [("+Inf" if math.isinf(b) else repr(b)) for b in BUCKETS]

    # Each bucket's own (non-cumulative) count grows at its share of the rate, so every
    # cumulative bucket only grows and the buckets' increases stay cumulative, as in a real
    # histogram.
    parts = [b - a for a, b in zip((0.0, *SHARE[:-1]), SHARE, strict=True)]

    def page() -> bytes:
        elapsed = time.time() - start
        out = []
        metric = "http_request_duration_seconds"
        for labels, rate in rows:
            cumulative = 0
            for le, part in zip(les, parts, strict=True):
                cumulative += int(rate * part * elapsed)
                out.append(f'{metric}_bucket{{{labels},le="{le}"}} {cumulative}\n')
            out.append(f"{metric}_count{{{labels}}} {cumulative}\n")
            out.append(f"{metric}_sum{{{labels}}} {cumulative * 0.07:.3f}\n")
            out.append(f"{metric}_created{{{labels}}} {start:.3f}\n")
        return "".join(out).encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            body = page() if self.path.startswith("/metrics") else b"ok\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever(poll_interval=0.2)


# --- the controller's side -----------------------------------------------------------------------


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def prometheus_own(url: str, prefix: str, has: str = "") -> float:
    """The sum of Prometheus' own samples (its /metrics page) whose line starts with
    `prefix` and contains `has`."""
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix) and has in line
    )


async def prometheus_queries(url: str) -> float:
    """The queries Prometheus answered."""
    return await prometheus_own(url, "prometheus_http_requests_total{", 'handler="/api/v1/query"')


async def prometheus_cpu(url: str) -> float:
    """Prometheus' own CPU seconds."""
    return await prometheus_own(url, "process_cpu_seconds_total ")


def servers(rollouts: int, scrape_s: float, prefix: str) -> tuple[Any, Any]:
    """The exporter of `rollouts` simulated rollouts and a real Prometheus scraping it every
    `scrape_s` (both async context managers: start them with `async with`)."""
    from canary.demo.procs import ManagedProcess, PrometheusProcess, TcpReady, free_port

    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    port = free_port()
    exporter = ManagedProcess(
        [sys.executable, "-m", "benchmarks.metrics_batch", "exporter", str(port), str(rollouts)],
        log_path=workdir / "exporter.log",
        ready=TcpReady(port),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        name="exporter",
    )
    prometheus = PrometheusProcess(
        [f"127.0.0.1:{port}"], workdir=workdir, scrape_interval_s=scrape_s
    )
    return exporter, prometheus


async def until_scraped(url: str, series: int) -> None:
    """Wait until Prometheus holds every count series (its target discovery takes seconds)."""
    import aiohttp

    query = "count(http_request_duration_seconds_count)"
    async with aiohttp.ClientSession() as session:
        for _ in range(600):
            async with session.get(f"{url}/api/v1/query", params={"query": query}) as resp:
                result = (await resp.json())["data"]["result"]
            if result and int(result[0]["value"][1]) >= series:
                return
            await asyncio.sleep(0.5)
    raise RuntimeError(f"Prometheus did not scrape {series} series in 300 s")


def queries_for(i: int):  # type: ignore[no-untyped-def]
    from canary.kubernetes.spec import MetricsSpec

    namespace, app = names(i)
    return MetricsSpec().prom_queries(
        namespace=namespace, primary_service=f"{app}-primary", canary_service=f"{app}-canary"
    )


async def measure_batched(
    url: str, n: int, age: float, args: argparse.Namespace
) -> dict[str, float]:
    from canary.metrics.base import ArmsCounts
    from canary.metrics.batched import PrometheusBatcher

    # max_age_s = the period: every tick waits for its batch, so the CPU measured around a
    # tick is that batch's (the controller's default, two periods, lets ticks go on with the
    # last counts while the batch runs).
    batcher = PrometheusBatcher(url, period_s=args.tick_s, max_age_s=args.tick_s, timeout_s=60.0)
    try:
        since = time.time() - age
        providers = [batcher.provider(queries_for(i)) for i in range(n)]
        q0, c0, t0 = await prometheus_queries(url), cpu(), time.monotonic()
        first = await asyncio.gather(*(p.fetch(since=since, now=time.time()) for p in providers))
        c1, t1 = cpu(), time.monotonic()
        await asyncio.sleep(1.0)  # Prometheus counts a query after its answer has gone out
        q1 = await prometheus_queries(url)
        bad = [r for r in first if not isinstance(r, ArmsCounts)]
        assert not bad, bad[:2]
        tick_cpu, tick_wall, tick_queries, sent_in_ticks = 0.0, 0.0, 0.0, 0
        last = time.monotonic()
        # One tick untimed: the first batch reads back to the earliest registration (a
        # one-off, like a controller's start); the timed ones are the steady state.
        for tick in range(-1, args.ticks):
            # A little over the batcher's period, so that each tick starts one batch: ticking
            # in step, the rollouts could otherwise reuse the batch that began just after their
            # previous tick (allowed: counts at most one period old), and the figures would
            # mix ticks with and without a batch.
            await asyncio.sleep(max(0.0, last + args.tick_s * 1.1 - time.monotonic()))
            last = time.monotonic()
            qa, ca, sent = await prometheus_queries(url), cpu(), batcher.queries_sent
            results = await asyncio.gather(
                *(p.fetch(since=since, now=time.time()) for p in providers)
            )
            if tick >= 0:
                tick_wall += time.monotonic() - last
                tick_cpu += cpu() - ca
                await asyncio.sleep(1.0)
                tick_queries += await prometheus_queries(url) - qa
                sent_in_ticks += batcher.queries_sent - sent
            bad = [r for r in results if not isinstance(r, ArmsCounts)]
            assert not bad, bad[:2]
        return {
            "queries_per_rollout_tick": tick_queries / (n * args.ticks),
            "cpu_ms_per_rollout_tick": 1000 * tick_cpu / (n * args.ticks),
            "batch_wall_s": tick_wall / args.ticks,
            "register_queries_per_rollout": (q1 - q0) / n,
            "register_cpu_ms_per_rollout": 1000 * (c1 - c0) / n,
            "register_wall_s": t1 - t0,
            "batches": batcher.batches,
            "queries_sent_per_tick": sent_in_ticks / args.ticks,
        }
    finally:
        await batcher.aclose()


async def measure_first_reads(url: str, n: int, age: float) -> list[str]:
    """N rollouts' first reads back `age` seconds, all at once (a shard's rollouts resumed
    on another replica): the range read, then each series' summary (tests/metrics/
    test_batched.py checks that both leave every series in the same state)."""
    from canary.metrics.base import ArmsCounts
    from canary.metrics.batched import PrometheusBatcher

    rows, counts = [], []
    since = time.time() - age
    for label, summary_after_s in (("range", math.inf), ("summary", 0.0)):
        batcher = PrometheusBatcher(
            url, period_s=3600, timeout_s=60.0, summary_after_s=summary_after_s
        )
        try:
            providers = [batcher.provider(queries_for(i)) for i in range(n)]
            q0, p0, c0, t0 = (
                await prometheus_queries(url),
                await prometheus_cpu(url),
                cpu(),
                time.monotonic(),
            )
            now = time.time()
            first = await asyncio.gather(*(p.fetch(since=since, now=now) for p in providers))
            c1, t1 = cpu(), time.monotonic()
            await asyncio.sleep(1.0)  # Prometheus counts a query after its answer has gone out
            q1, p1 = await prometheus_queries(url), await prometheus_cpu(url)
            bad = [r for r in first if not isinstance(r, ArmsCounts)]
            assert not bad, bad[:2]
            counts.append(first)
            rows.append(
                f"| {n} | {age / 60:g} min | {label} | {(q1 - q0) / n:.1f} "
                f"| {1000 * (c1 - c0) / n:.2f} | {1000 * (p1 - p0) / n:.2f} | {t1 - t0:.1f} "
                f"| {batcher.summary_reads} / {batcher.summary_fallbacks} |"
            )
            print(rows[-1], flush=True)
        finally:
            await batcher.aclose()
    # The two reads are seconds apart, so their counts differ by what came in between; per
    # rollout, the summary's may only be as large or larger, and by no more than that.
    for ranged, summed in zip(*counts, strict=True):
        assert isinstance(ranged, ArmsCounts) and isinstance(summed, ArmsCounts)
        for arm in ("primary", "canary"):
            a, b = getattr(ranged, arm), getattr(summed, arm)
            assert b.requests >= a.requests and b.errors >= a.errors, (ranged, summed)
    return rows


def rss_kib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024


async def measure_memory(url: str, n: int, age: float, args: argparse.Namespace) -> str:
    import gc
    import tracemalloc

    from canary.metrics.base import ArmsCounts
    from canary.metrics.batched import PrometheusBatcher

    async def run(traced: bool) -> tuple[list[float], float, float]:
        batcher = PrometheusBatcher(
            url, period_s=args.tick_s, max_age_s=args.tick_s, timeout_s=60.0
        )
        try:
            gc.collect()
            if traced:
                tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0] if traced else rss_kib() * 1024
            since = time.time() - age
            providers = [batcher.provider(queries_for(i)) for i in range(n)]
            first = await asyncio.gather(
                *(p.fetch(since=since, now=time.time()) for p in providers)
            )
            assert all(isinstance(r, ArmsCounts) for r in first)
            rss, used, last = [], 0.0, time.monotonic()
            for tick in range(args.ticks):
                await asyncio.sleep(max(0.0, last + args.tick_s * 1.1 - time.monotonic()))
                last = time.monotonic()
                c0 = cpu()
                results = await asyncio.gather(
                    *(p.fetch(since=since, now=time.time()) for p in providers)
                )
                if tick > 0:  # the first batch reads back to the earliest registration
                    used += cpu() - c0
                assert all(isinstance(r, ArmsCounts) for r in results), results[:2]
                rss.append(rss_kib())
            gc.collect()
            held = (tracemalloc.get_traced_memory()[0] - base) / 1024 if traced else 0.0
            return [r - base / 1024 for r in rss], 1000 * used / (n * (args.ticks - 1)), held
        finally:
            if traced:
                tracemalloc.stop()
            await batcher.aclose()

    rss, ms, _ = await run(traced=False)
    _, _, held = await run(traced=True)
    growth = ", ".join(f"{r / 1024:.0f}" for r in rss)
    return f"| {n} | {rss[-1] / n:.1f} | {held / n:.1f} | {ms:.3f} | {growth} |"


async def measure_old(url: str, n: int, age: float, args: argparse.Namespace) -> dict[str, float]:
    from canary.metrics.base import ArmsCounts
    from canary.metrics.prometheus import PrometheusMetrics

    sample = min(n, args.old_sample)
    step = max(1, n // sample)
    providers = [
        PrometheusMetrics(url, queries=queries_for(i), timeout_s=60.0)
        for i in range(0, step * sample, step)
    ]
    try:
        since = time.time() - age
        await asyncio.gather(*(p.fetch(since=since, now=time.time()) for p in providers))  # warm
        qa, ca, ta = await prometheus_queries(url), cpu(), time.monotonic()
        for _ in range(args.ticks):
            results = await asyncio.gather(
                *(p.fetch(since=since, now=time.time()) for p in providers)
            )
            bad = [r for r in results if not isinstance(r, ArmsCounts)]
            assert not bad, bad[:2]
        rollout_ticks = len(providers) * args.ticks
        used, wall = cpu() - ca, time.monotonic() - ta
        await asyncio.sleep(1.0)  # Prometheus counts a query after its answer has gone out
        return {
            "queries_per_rollout_tick": (await prometheus_queries(url) - qa) / rollout_ticks,
            "cpu_ms_per_rollout_tick": 1000 * used / rollout_ticks,
            "wall_s_per_tick_of_sample": wall / args.ticks,
            "sample": len(providers),
        }
    finally:
        for p in providers:
            p.close()


async def main(args: argparse.Namespace) -> int:
    import signal

    task = asyncio.current_task()
    assert task is not None
    for signum in (signal.SIGINT, signal.SIGTERM):  # stop the servers on the way out
        asyncio.get_running_loop().add_signal_handler(signum, task.cancel)
    exporter, prometheus = servers(max(args.sizes), args.scrape_s, "metrics-batch-")
    rows: list[str] = []
    async with exporter, prometheus:
        url = prometheus.url
        await until_scraped(url, 6 * max(args.sizes))
        started = time.time()  # history starts here
        await asyncio.sleep(2 * args.scrape_s)
        print(
            f"# exporter {max(args.sizes)} rollouts x 90 series, scrape {args.scrape_s:g}s, "
            f"tick {args.tick_s:g}s, {args.ticks} ticks",
            flush=True,
        )
        for age in sorted(args.ages):
            wait = started + age + 2 * args.scrape_s - time.time()
            if wait > 0:
                print(f"# waiting {wait:.0f}s for {age:g}s of history", flush=True)
                await asyncio.sleep(wait)
            for n in args.sizes:
                if args.first_reads:
                    rows.extend(await measure_first_reads(url, n, age))
                    continue
                if args.memory:
                    row = await measure_memory(url, n, age, args)
                    print(row, flush=True)
                    rows.append(row)
                    continue
                old = await measure_old(url, n, age, args)
                new = await measure_batched(url, n, age, args)
                row = (
                    f"| {n} | {age / 60:g} min | {old['queries_per_rollout_tick']:.2f} "
                    f"| {new['queries_per_rollout_tick']:.4f} "
                    f"| {old['cpu_ms_per_rollout_tick']:.2f} | {new['cpu_ms_per_rollout_tick']:.3f} "
                    f"| {new['batch_wall_s']:.2f} "
                    f"| {new['register_queries_per_rollout']:.1f} "
                    f"| {new['register_cpu_ms_per_rollout']:.2f} |"
                )
                print(
                    row,
                    f"old sample {old['sample']:.0f}, old wall per tick of the sample "
                    f"{old['wall_s_per_tick_of_sample']:.2f}s, registration wall "
                    f"{new['register_wall_s']:.1f}s, batcher's own count of queries per tick "
                    f"{new['queries_sent_per_tick']:g}",
                    flush=True,
                )
                rows.append(row)
    print()
    if args.first_reads:
        print(
            "| rollouts | age | first read | queries per rollout | CPU ms per rollout "
            "| Prometheus CPU ms per rollout | wall s, all at once | summaries / range reads after one |"
        )
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(rows))
        return 0
    if args.memory:
        print(
            "| rollouts | RSS KiB per rollout after the last batch | traced heap KiB per rollout "
            "| CPU ms per rollout-read | RSS growth after each batch, MiB |"
        )
        print("|---|---|---|---|---|")
        print("\n".join(rows))
        return 0
    print(
        "| rollouts | age | queries per rollout-tick, old | batched "
        "| CPU ms per rollout-tick, old | batched | batch wall s | registration queries per rollout "
        "| registration CPU ms per rollout |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


def cli(argv: list[str]) -> int:
    if argv[:1] == ["exporter"]:
        serve_exporter(int(argv[1]), int(argv[2]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.metrics_batch")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 500, 1000])
    parser.add_argument("--ages", type=float, nargs="+", default=[0.0, 600.0])
    parser.add_argument("--ticks", type=int, default=3)
    parser.add_argument("--tick-s", type=float, default=10.0)
    parser.add_argument("--scrape-s", type=float, default=5.0)
    parser.add_argument("--old-sample", type=int, default=20)
    parser.add_argument("--memory", action="store_true", help="the batcher's memory alone")
    parser.add_argument(
        "--first-reads",
        action="store_true",
        help="first reads alone, all N at once: the range read vs each series' summary",
    )
    return asyncio.run(main(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
