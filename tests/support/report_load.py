"""Load for the report routes: large records, and a rollout that ticks beside them.

Shared by tests/reports/test_report_serving.py (a behavioural bound: ticks keep their cadence)
and benchmarks/report_stall.py (the figure: the largest gap between ticks).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from analysis import AnalysisConfig, Analyzer, ArmCounts
from canary.core.rollout import RolloutSpec
from canary.metrics.base import ArmsCounts, MetricsResult
from canary.notify.webhooks import report_id
from canary.runner import RolloutRunner, TickReport
from support.report_records import Scenario, simulate


def write_large_records(record_dir: Path, *, count: int, ticks: int) -> list[str]:
    """`count` records of one simulated rollout of `ticks` ticks (about 4.9 KB a tick), each
    under its own target and rollout id; returns their report ids."""
    entries = simulate(
        Scenario(seed=5, canary_error_rate=0.01, ticks_per_step=10**9, max_ticks=ticks)
    )
    text = "".join(json.dumps(entry, separators=(",", ":")) + "\n" for entry in entries)
    rollout, target = entries[0]["rollout"], entries[0]["target"]
    record_dir.mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(count):
        new_target = f"load-{i}"
        new_rollout = rollout.replace(target, new_target)
        one = text.replace(f'"rollout":"{rollout}"', f'"rollout":"{new_rollout}"')
        one = one.replace(f'"target":"{target}"', f'"target":"{new_target}"')
        (record_dir / f"{new_target}.jsonl").write_text(one, encoding="utf-8")
        ids.append(report_id(new_rollout))
    return ids


class SteadyRouter:
    name = "steady"

    def __init__(self) -> None:
        self.weight = 0

    async def set_weight(self, canary_percent: int) -> None:
        self.weight = canary_percent

    async def get_weight(self) -> int:
        return self.weight


class SteadyMetrics:
    """Both arms alike, 1000 requests a tick: the analysis never fails."""

    def __init__(self) -> None:
        self.requests = 0.0

    async def fetch(self, *, since: float, now: float) -> MetricsResult:
        self.requests += 1000.0
        arm = ArmCounts(
            requests=self.requests,
            errors=self.requests / 100,
            latency_buckets={0.1: self.requests * 0.9, float("inf"): self.requests},
        )
        return ArmsCounts(primary=arm, canary=arm)


@dataclass
class TickTimes:
    """Monotonic times of a runner's ticks."""

    times: list[float] = field(default_factory=list)
    ticked: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self, report: TickReport) -> None:
        self.times.append(time.monotonic())
        self.ticked.set()

    def max_gap(self, since: float, until: float) -> float:
        """The largest time between ticks (or a window edge and a tick) within the window."""
        inside = [t for t in self.times if since <= t <= until]
        points = [since, *inside, until]
        return max(b - a for a, b in itertools.pairwise(points))


def ticking_runner(record_dir: Path, *, tick_s: float) -> tuple[RolloutRunner, TickTimes]:
    """A rollout that stays at its first step for an hour, ticking every `tick_s`, writing
    its record to a file (appends run in the default thread pool, as in production)."""
    ticks = TickTimes()
    runner = RolloutRunner(
        name="ticking",
        spec=RolloutSpec(steps=(5, 50), min_step_s=3600, max_step_s=7200, no_data_deadline_s=600),
        router=SteadyRouter(),
        metrics=SteadyMetrics(),
        record_path=record_dir / "ticking" / "ticking.jsonl",
        tick_s=tick_s,
        analyzer_factory=lambda: Analyzer(AnalysisConfig()),
        canary_version="v2",
        observers=[ticks],
    )
    return runner, ticks


async def wait_for_ticks(ticks: TickTimes, count: int, *, timeout_s: float = 30.0) -> None:
    start = len(ticks.times)
    async with asyncio.timeout(timeout_s):
        while len(ticks.times) < start + count:
            ticks.ticked.clear()
            await ticks.ticked.wait()
