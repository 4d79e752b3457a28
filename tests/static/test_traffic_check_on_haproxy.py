"""The traffic check with real parts: the demo stack's HAProxy splitting 200 req/s of real
requests between two demo-service processes, a real Prometheus scraping them, and the runner
with `traffic_check: hold`. Behind the real router the split follows every weight and the
rollout is promoted; behind the same router wrapped so that it acknowledges and reads back
every weight after the first without sending it (a lie no read-back can catch, which HAProxy
itself cannot be made to tell), the analysis' own request counts show it and the rollout is
never promoted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from analysis import AnalysisConfig, Analyzer
from canary.core.records import EndEntry, NoteEntry, read_record
from canary.core.rollout import RolloutSpec
from canary.demo.stack import BACKEND, ServiceSpec, Stack, StackSettings
from canary.metrics.prometheus import PrometheusMetrics, PromQueries
from canary.routers.haproxy import HAProxyRouter
from canary.runner import RolloutRunner

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SPEC = RolloutSpec(
    steps=(10, 40), min_step_s=6, max_step_s=40, no_data_deadline_s=8, traffic_check="hold"
)
# Errors only: the two identical services' latency differs on a loaded 2-core machine, and
# what is tested here is the split.
ANALYSIS = AnalysisConfig.model_validate(
    {"min_samples": 100, "quantiles": [], "errors": {"tolerance": 5.0, "abs_tolerance": 0.05}}
)


class DropsWrites:
    """The real router, acknowledging every weight after the first without sending it, and
    reading back the last one asked for."""

    def __init__(self, router: HAProxyRouter) -> None:
        self.router = router
        self.name = f"dropping:{router.name}"
        self.asked: int | None = None
        self.sent: list[int] = []

    async def set_weight(self, canary_percent: int) -> None:
        first = self.asked is None
        self.asked = canary_percent
        if first or canary_percent == 0:
            self.sent.append(canary_percent)
            await self.router.set_weight(canary_percent)

    async def get_weight(self) -> int:
        real = await self.router.get_weight()
        return self.asked if self.asked is not None and real != 0 else real


async def _rollout(stack: Stack, directory: Path, router: Any, revision: str) -> RolloutRunner:
    assert stack.prometheus is not None
    metrics = PrometheusMetrics(
        stack.prometheus.url, queries=PromQueries(selector='job="canary"'), timeout_s=2
    )
    runner = RolloutRunner(
        name="tc",
        spec=SPEC,
        router=router,
        metrics=metrics,
        record_path=directory / f"{revision}.jsonl",
        status_path=directory / f"{revision}.status.json",
        tick_s=0.5,
        analyzer_factory=lambda: Analyzer(ANALYSIS),
        revision=revision,
        canary_version=revision,
        router_timeout_s=3,
    )
    try:
        await runner.run()
    finally:
        metrics.close()
    return runner


async def test_hold_promotes_behind_haproxy_and_never_behind_a_router_that_drops_writes(
    sockdir: Path, tmp_path: Path
) -> None:
    spec = ServiceSpec(error_rate=0.005, latency_ms=5.0, latency_jitter=0.3, seed=5)
    settings = StackSettings(primary=spec, canary=spec, rate=200.0, scrape_interval_s=0.5)
    async with Stack(settings, workdir=sockdir / "stack") as stack:
        await stack.wait_for_metrics()
        real = HAProxyRouter(stack.socket_path, BACKEND, "primary", "canary", timeout_s=2)
        await real.set_weight(0)
        honest = await _rollout(stack, tmp_path, real, "v1")
        assert honest.status.outcome == "promoted", honest.status.reason
        await real.set_weight(0)  # the promoted canary keeps all traffic in static mode

        lying = DropsWrites(real)
        held = await _rollout(stack, tmp_path, lying, "v2")
        really = await real.get_weight()

    honest_notes = [e.message for e in read_record(honest.record_path) if isinstance(e, NoteEntry)]
    assert not [n for n in honest_notes if "traffic split" in n], honest_notes

    entries = read_record(held.record_path)
    notes = [e.message for e in entries if isinstance(e, NoteEntry)]
    told = [n for n in notes if n.startswith("the traffic split did not follow the weight")]
    end = entries[-1]
    assert isinstance(end, EndEntry) and end.outcome == "rolled_back", end
    assert 100 not in lying.sent and lying.sent[0] == 10
    # HAProxy really served 10% of the weight all along, and the rollback's 0% is real
    assert really == 0
    assert told and "at 40%" in told[0] and "at 10%" in told[0], notes
    assert end.reason.startswith("the traffic split did not follow the weight for "), end.reason
