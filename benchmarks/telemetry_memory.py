"""What the controller's own /metrics hold per rollout (issue 13: 1,000 rollouts at <= 300 MiB).

N synthetic rollouts (`shop{i % 25}/app{i}`), each shown as the runner shows it at a tick
(`show`, `weight_read`, a decision, an error) with a realistic verdict of 4 metrics (errors,
latency_p50, latency_p90, latency_p99) from the real Analyzer; the Python heap the telemetry
holds for them (tracemalloc), the time of one tick's telemetry calls per rollout, the time of
one scrape (generate_latest, and Telemetry.exposition which /metrics serves) and its size. With `--cycles K`: K rounds of creating and then
forgetting the N rollouts (as Deployments come and go): the heap and the number of per-rollout
series after each round must stay flat.

    PYTHONPATH=. python -m benchmarks.telemetry_memory [--rollouts 1000] [--cycles 0]
        [--exposition FILE]   # write one rollout's exposition (to compare two versions)
"""

from __future__ import annotations

import argparse
import gc
import math
import time
import tracemalloc

from prometheus_client import generate_latest

from analysis import AnalysisConfig, Analyzer, ArmCounts, Snapshot, Verdict
from canary.core.rollout import RolloutStatus
from canary.runner.telemetry import Telemetry

LE = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, math.inf)


def _arm(requests: float, errors: float, shares: tuple[float, ...]) -> ArmCounts:
    return ArmCounts(
        requests=requests,
        errors=errors,
        latency_buckets={le: requests * s for le, s in zip(LE, shares, strict=True)},
    )


def verdict() -> Verdict:
    """A verdict of 4 metrics after 5 minutes at 10%: every number set (estimate, bounds)."""
    analyzer = Analyzer(AnalysisConfig(quantiles=(0.5, 0.9, 0.99)))
    shares = (0.2, 0.5, 0.8, 0.9, 0.96, 0.99, 1.0)
    result = None
    for minute in range(1, 6):
        result = analyzer.observe(
            Snapshot(
                elapsed_s=60.0 * minute,
                primary=_arm(1080.0 * minute, 10.0 * minute, shares),
                canary=_arm(120.0 * minute, 1.0 * minute, shares),
            )
        )
    assert result is not None and len(result.metrics) == 4
    return result


def touch(telemetry: Telemetry, name: str, status: RolloutStatus, last: Verdict) -> None:
    """One tick's telemetry calls, as canary/runner/runner.py makes them."""
    telemetry.weight_read.labels(name).set(status.weight)
    telemetry.decisions.labels(name, "continue").inc()
    telemetry.analysis(name, last)
    telemetry.show(name, status)


def per_rollout_series(telemetry: Telemetry) -> int:
    return sum(
        1
        for family in telemetry.registry.collect()
        for sample in family.samples
        if "rollout" in sample.labels
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=1000)
    parser.add_argument("--cycles", type=int, default=0)
    parser.add_argument("--exposition")
    args = parser.parse_args()
    last = verdict()
    status = RolloutStatus(stage="Progressing", weight=10, step=0)
    names = [f"shop{i % 25}/app{i}" for i in range(args.rollouts)]

    # What is imported or cached once (first labels(), first scrape) is not per rollout.
    warm = Telemetry("kubernetes")
    touch(warm, "warm/up", status, last)
    warm.errors.labels("warm/up", "router").inc()
    generate_latest(warm.registry)
    del warm
    gc.collect()

    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    telemetry = Telemetry("kubernetes")
    empty = tracemalloc.get_traced_memory()[0]
    for name in names:
        touch(telemetry, name, status, last)
        telemetry.errors.labels(name, "router").inc()
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - empty
    tracemalloc.stop()
    print(
        f"telemetry itself: {(empty - base) / 1024:.0f} KiB; {args.rollouts} rollouts: "
        f"{held / 2**20:.2f} MiB, {held / args.rollouts:.0f} bytes per rollout, "
        f"{per_rollout_series(telemetry)} per-rollout series"
    )

    began = time.perf_counter()
    for name in names:
        touch(telemetry, name, status, last)
    tick = (time.perf_counter() - began) / args.rollouts
    began = time.perf_counter()
    body = generate_latest(telemetry.registry)
    scrape = time.perf_counter() - began
    exposition = getattr(telemetry, "exposition", None)  # what /metrics serves, since 2026-12
    served = ""
    if exposition is not None:
        began = time.perf_counter()
        fast = exposition()
        served = (
            f"; what /metrics serves (Telemetry.exposition): "
            f"{(time.perf_counter() - began) * 1e3:.0f} ms, the same text: {fast == body}"
        )
    print(
        f"one tick's telemetry calls: {tick * 1e6:.1f} us per rollout; one scrape "
        f"(generate_latest): {scrape * 1e3:.0f} ms, {len(body) / 2**20:.1f} MiB{served}"
    )

    if args.exposition:
        one = Telemetry("kubernetes")
        touch(one, "shop/app", status, last)
        one.errors.labels("shop/app", "router").inc()
        with open(args.exposition, "wb") as f:
            f.write(generate_latest(one.registry))

    if args.cycles:
        forget = getattr(telemetry, "forget", None)
        if forget is None:
            print("this Telemetry has no forget(): series of deleted rollouts stay")
            return
        tracemalloc.start()
        for name in names:
            forget(name)
        gc.collect()
        start = tracemalloc.get_traced_memory()[0]
        for cycle in range(1, args.cycles + 1):
            fresh = [f"{name}-{cycle}" for name in names]  # new Deployments each round
            for name in fresh:
                touch(telemetry, name, status, last)
                telemetry.errors.labels(name, "router").inc()
            series = per_rollout_series(telemetry)
            for name in fresh:
                forget(name)
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - start
            print(
                f"cycle {cycle}: {series} per-rollout series while alive, "
                f"{per_rollout_series(telemetry)} after forget, heap {grown / 1024:+.0f} KiB"
            )
        tracemalloc.stop()


if __name__ == "__main__":
    main()
