"""What one rollout costs the controller per tick and holds in memory, by rollout age: the
runner's own share of issue 13's targets, without the API server or Prometheus.

N real RolloutRunners (the real Analyzer, planner, record writer packing ConfigMap chunks,
telemetry), each at its first step for hours (min_step_s 3 h), with a router that reads back
what it was told and a metric source that makes up A/A counts (benchmarks/metrics_batch's
rates: 20 req/s on the primary, 2 on the canary, 3% errors, its 12 latency buckets). Time is
dilated: the runners' clock runs `--dilation` times faster than the loop's, so a 10 s tick
comes every 10/dilation s and an hour of rollout age takes seconds to minutes. The runners
tick as fast as one core lets them; what is measured is per tick done, not per period.

Printed per simulated age: CPU per rollout-tick (process time over ticks done since the last
age), the Python heap the runners hold per rollout (tracemalloc), and RSS per rollout.

    PYTHONPATH=. python -m benchmarks.tick_cost [--rollouts 200] [--hours 1] [--dilation 200]
        [--gc-tuned]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import resource
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.report_load import SteadyRouter  # noqa: E402

from analysis import AnalysisConfig, Analyzer, ArmCounts  # noqa: E402
from benchmarks.metrics_batch import BUCKETS, CODES, RATES, SHARE  # noqa: E402
from benchmarks.record_memory import MemoryConfigMaps  # noqa: E402
from canary.core.rollout import RolloutSpec  # noqa: E402
from canary.kubernetes.record_store import ConfigMapRecord  # noqa: E402
from canary.metrics.base import ArmsCounts, MetricsResult  # noqa: E402
from canary.runner import RolloutRunner, TickReport  # noqa: E402
from canary.runner.telemetry import Telemetry  # noqa: E402

TICK_S = 10.0


class DilatedClock:
    """The runners' clock: `dilation` seconds for each second of the loop's."""

    def __init__(self, dilation: float) -> None:
        self.dilation = dilation
        self.origin = time.monotonic()

    def __call__(self) -> float:
        return 1e6 + (time.monotonic() - self.origin) * self.dilation


class Metrics:
    """Cumulative A/A counts at metrics_batch's rates, by the runners' clock."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def _arm(self, rate: float, seconds: float) -> ArmCounts:
        n = math.floor(rate * self.scale * seconds)
        errors = math.floor(n * CODES["503"])
        buckets = {b: float(math.floor(n * s)) for b, s in zip(BUCKETS, SHARE, strict=True)}
        buckets[math.inf] = float(n)
        return ArmCounts(requests=float(n), errors=float(errors), latency_buckets=buckets)

    async def fetch(self, *, since: float, now: float) -> MetricsResult:
        seconds = max(0.0, now - since)
        return ArmsCounts(
            primary=self._arm(RATES["primary"], seconds), canary=self._arm(RATES["canary"], seconds)
        )


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


async def run(
    rollouts: int, hours: float, dilation: float, ages: list[float], *, heap: bool
) -> list[dict[str, float]]:
    clock = DilatedClock(dilation)
    sink = MemoryConfigMaps(keep_chunks=False)
    telemetry = Telemetry("kubernetes")
    config = AnalysisConfig()
    ticks = 0

    def count(report: TickReport) -> None:
        nonlocal ticks
        ticks += 1

    def runner(i: int) -> RolloutRunner:
        namespace, name = f"team{i % 25}", f"app{i}"
        return RolloutRunner(
            name=f"{namespace}/{name}",
            spec=RolloutSpec(
                steps=(10, 50),
                min_step_s=3 * 3600 + hours * 3600,
                max_step_s=6 * 3600 + hours * 3600,
                no_data_deadline_s=600,
            ),
            router=SteadyRouter(),
            metrics=Metrics(1.0 + (i % 7) / 10),
            tick_s=TICK_S / dilation,
            analyzer_factory=lambda: Analyzer(config),
            analysis=config,
            expected_rps=22.0,
            revision=f"rev{i}",
            canary_version=f"rev{i}",
            records=lambda rollout_id, *, ref=None, ns=namespace: ConfigMapRecord(
                sink,
                namespace="canary-system",
                rollout=rollout_id,
                ref=ref,
                flush_s=60.0 / dilation,
            ),
            labels={"namespace": namespace, "deployment": name},
            telemetry=telemetry,
            clock=clock,
            observers=[count],
        )

    # One rollout first, for a minute of its age: what it imports lazily is not per rollout.
    warm = runner(rollouts)
    warm_task = asyncio.create_task(warm.run())
    await asyncio.sleep(60 / dilation)
    warm_task.cancel()
    await asyncio.gather(warm_task, return_exceptions=True)
    del warm, warm_task
    ticks = 0
    gc.collect()
    if heap:
        tracemalloc.start()  # slows everything down: CPU figures are without it
    heap0 = tracemalloc.get_traced_memory()[0]
    rss0 = _rss_mib()
    runners = [runner(i) for i in range(rollouts)]
    tasks = [asyncio.create_task(r.run()) for r in runners]
    rows: list[dict[str, float]] = []
    started = clock()
    cpu, done = time.process_time(), 0
    try:
        for age_h in ages:
            # the clock is the loop's, dilated: sleep until it reads that age
            await asyncio.sleep(max(0.0, (started + age_h * 3600 - clock()) / dilation))
            now_cpu, now_ticks = time.process_time(), ticks
            gc.collect()
            # The sink keeps the heads' data, which in a cluster is etcd's: out of the heap,
            # and shown apart (RSS has it in).
            held = tracemalloc.get_traced_memory()[0] - (sink.stored if heap else 0)
            rows.append(
                {
                    "age_min": (clock() - started) / 60,
                    "ticks_per_rollout": now_ticks / rollouts,
                    "cpu_ms_per_rollout_tick": 1000 * (now_cpu - cpu) / max(1, now_ticks - done),
                    "heap_kib_per_rollout": (held - heap0) / 1024 / rollouts,
                    "rss_kib_per_rollout": (_rss_mib() - rss0) * 1024 / rollouts,
                    "record_bytes_per_write": sink.bytes / max(1, sink.writes),
                    "sink_kib_per_rollout": sink.stored / 1024 / rollouts,
                }
            )
            print("  ".join(f"{k} {v:,.2f}" for k, v in rows[-1].items()), flush=True)
            cpu, done = time.process_time(), now_ticks
        if heap:  # where the held heap is, per rollout, by the line that allocated it
            for stat in tracemalloc.take_snapshot().statistics("lineno")[:25]:
                print(f"  {stat.size / 1024 / rollouts:7.1f} KiB/rollout  {stat.traceback}")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        tracemalloc.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rollouts", type=int, default=200)
    parser.add_argument("--hours", type=float, default=1.0)
    parser.add_argument("--dilation", type=float, default=200.0)
    parser.add_argument("--heap", action="store_true", help="trace the Python heap (slower)")
    parser.add_argument(
        "--gc-tuned",
        action="store_true",
        help="the controller's garbage collector settings (canary.runtime.tune_gc)",
    )
    args = parser.parse_args()
    from canary.runtime import gc_seconds, tune_gc, watch_gc

    watch_gc()
    if args.gc_tuned:
        tune_gc()
    cpu, collected = time.process_time(), sum(gc_seconds())
    ages = [a for a in (1 / 6, 0.25, 0.5, 1.0, 2.0, 4.0, 6.0) if a <= args.hours]
    print(
        f"{args.rollouts} rollouts, {args.hours:g} h of age, dilation {args.dilation:g}",
        file=sys.stderr,
    )
    asyncio.run(run(args.rollouts, args.hours, args.dilation, ages, heap=args.heap))
    cpu, collected = time.process_time() - cpu, sum(gc_seconds()) - collected
    print(f"garbage collections: {collected:.2f} s, {100 * collected / cpu:.1f}% of the CPU")


if __name__ == "__main__":
    main()
