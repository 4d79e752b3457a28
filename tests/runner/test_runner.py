"""The controller loop: orchestration around the pure machine, with in-memory router and metrics.

The router and metrics here are fakes implementing the protocols (the real HAProxy and
Prometheus paths are tested in test_haproxy.py, test_prometheus.py and end to end by the
demo). The analysis is the real Analyzer, fed seeded binomial counts. Time is virtual: each
fetch moves the clock 10 s on, so step timing is exact whatever the machine's speed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from analysis import AnalysisConfig, Analyzer, ArmCounts, Snapshot
from canary.core.records import (
    EndEntry,
    Entry,
    ManualEntry,
    NoteEntry,
    StartEntry,
    TickEntry,
    TransitionEntry,
    read_record,
)
from canary.core.rollout import Command, Phase, RolloutSpec
from canary.metrics.prometheus import ArmsCounts, MetricsResult, NoData
from canary.routers.base import RouterUnreachable
from canary.runner import (
    Controller,
    ResumeError,
    RolloutRunner,
    TickReport,
    run_until_signalled,
)
from canary.runner.files import FileRecord
from canary.runner.seams import SavedHead

pytestmark = pytest.mark.timeout(60)

SPEC = RolloutSpec(steps=(5, 10, 25, 50), min_step_s=20, max_step_s=600, no_data_deadline_s=40)
TICK_S = 0.005  # real seconds between ticks; the virtual clock moves 10 s per fetch


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class FakeRouter:
    """An in-memory TrafficRouter; `down` makes every call fail, `stuck` ignores set_weight."""

    name = "fake"

    def __init__(self, weight: int = 0) -> None:
        self.weight = weight
        self.down = False
        self.stuck = False
        self.sets: list[int] = []

    async def set_weight(self, canary_percent: int) -> None:
        if self.down:
            raise RouterUnreachable("connection refused")
        self.sets.append(canary_percent)
        if not self.stuck:
            self.weight = canary_percent

    async def get_weight(self) -> int:
        if self.down:
            raise RouterUnreachable("connection refused")
        return self.weight


class FakeMetrics:
    """Cumulative counts: 4000 requests per 10 s, split by the router's weight, seeded errors."""

    def __init__(
        self,
        router: FakeRouter,
        clock: Clock,
        *,
        canary_error_rate: float = 0.01,
        seed: int = 7,
        requests_per_fetch: int = 4000,
    ) -> None:
        self.router = router
        self.requests_per_fetch = requests_per_fetch
        self.clock = clock
        self.canary_error_rate = canary_error_rate
        self.rng = np.random.default_rng(seed)
        self.no_data = False
        self.totals = {"primary": [0.0, 0.0], "canary": [0.0, 0.0]}
        self.sinces: list[float] = []

    def _arm(self, name: str) -> ArmCounts:
        requests, errors = self.totals[name]
        # same latency distribution on both arms
        buckets = {
            0.05: requests * 0.5,
            0.1: requests * 0.9,
            0.5: requests * 0.995,
            float("inf"): requests,
        }
        return ArmCounts(requests=requests, errors=errors, latency_buckets=buckets)

    async def fetch(self, *, since: float, now: float) -> MetricsResult:
        self.sinces.append(since)
        self.clock.now += 10.0
        if self.no_data:
            return NoData("empty result: no series")
        share = self.router.weight / 100
        for arm, n, rate in (
            ("primary", round(self.requests_per_fetch * (1 - share)), 0.01),
            ("canary", round(self.requests_per_fetch * share), self.canary_error_rate),
        ):
            self.totals[arm][0] += n
            self.totals[arm][1] += float(self.rng.binomial(n, rate))
        return ArmsCounts(primary=self._arm("primary"), canary=self._arm("canary"))


def make_runner(
    tmp_path: Path,
    *,
    canary_error_rate: float = 0.01,
    spec: RolloutSpec = SPEC,
    router: FakeRouter | None = None,
) -> tuple[RolloutRunner, FakeRouter, FakeMetrics]:
    clock = Clock()
    router = router or FakeRouter()
    metrics = FakeMetrics(router, clock, canary_error_rate=canary_error_rate)
    runner = RolloutRunner(
        name="app",
        spec=spec,
        router=router,
        metrics=metrics,
        record_path=tmp_path / "app.jsonl",
        tick_s=TICK_S,
        analyzer_factory=lambda: Analyzer(AnalysisConfig()),
        canary_version="v2",
        clock=clock,
    )
    return runner, router, metrics


async def stopped_at_step(
    tmp_path: Path, step: int, *, spec: RolloutSpec = SPEC
) -> tuple[RolloutRunner, FakeRouter, FakeMetrics]:
    """A runner saving its status to a file, stopped (as by a controller shutting down) once
    its rollout reached `step`: what a restart finds."""
    first, router, metrics = make_runner(tmp_path, spec=spec)
    first.status_path = tmp_path / "app.status.json"
    controller = Controller([first])
    reached = asyncio.Event()
    first.observers.append(lambda report: reached.set() if report.status.step == step else None)
    task = asyncio.create_task(controller.run())
    await reached.wait()
    controller.stop()
    await task
    return first, router, metrics


def kinds(path: Path) -> list[str]:
    return [entry.kind for entry in read_record(path)]


async def test_healthy_canary_is_promoted_step_by_step(tmp_path: Path) -> None:
    """A canary as good as the primary walks 5, 10, 25, 50 and is promoted at 100%."""
    runner, router, metrics = make_runner(tmp_path)
    statuses = await Controller([runner]).run()
    assert statuses["app"].phase is Phase.SUCCEEDED
    assert router.sets == [5, 10, 25, 50, 100]
    assert router.weight == 100
    # one analysis for the whole rollout: every fetch counts from the rollout's start
    assert len(set(metrics.sinces)) == 1
    entries = read_record(runner.record_path)
    assert isinstance(entries[0], StartEntry) and entries[0].canary_version == "v2"
    assert isinstance(entries[-1], EndEntry) and entries[-1].outcome == "promoted"
    ticks = [e for e in entries if isinstance(e, TickEntry)]
    assert ticks and all(t.verdict is not None and t.primary is not None for t in ticks)
    assert all(t.weight_read == t.weight_set or t.phase != "Progressing" for t in ticks[1:])
    moves = [e.to_phase for e in entries if isinstance(e, TransitionEntry)]
    assert moves == ["Progressing"] * 4 + ["Promoting", "Succeeded"]


async def test_bad_canary_is_rolled_back(tmp_path: Path) -> None:
    """A canary with 10x the primary's error rate is rolled back to 0% and the record says why."""
    runner, router, _ = make_runner(tmp_path, canary_error_rate=0.1)
    statuses = await Controller([runner]).run()
    assert statuses["app"].phase is Phase.FAILED
    assert router.weight == 0 and router.sets[-1] == 0
    entries = read_record(runner.record_path)
    end = entries[-1]
    assert isinstance(end, EndEntry) and end.outcome == "rolled_back"
    assert "analysis failed" in end.reason and "errors" in end.reason
    failing = [
        e
        for e in entries
        if isinstance(e, TickEntry) and e.verdict and e.verdict.decision == "fail"
    ]
    assert failing and failing[0].canary is not None and failing[0].canary.errors > 0


async def test_no_data_holds_then_rolls_back_at_the_deadline(tmp_path: Path) -> None:
    """With no metrics the weight holds at 5% and the rollout rolls back once the deadline passes."""
    runner, router, metrics = make_runner(tmp_path)
    metrics.no_data = True
    statuses = await Controller([runner]).run()
    assert statuses["app"].phase is Phase.FAILED
    assert router.sets == [5, 0]
    entries = read_record(runner.record_path)
    ticks = [e for e in entries if isinstance(e, TickEntry)]
    assert all(t.no_data_reason == "empty result: no series" and t.canary is None for t in ticks)
    assert [t.weight_set for t in ticks[:-1]] == [5] * (len(ticks) - 1)
    end = entries[-1]
    assert isinstance(end, EndEntry) and end.reason.startswith("no data for 40s")


async def test_router_outage_is_ridden_out(tmp_path: Path) -> None:
    """A router down for two ticks holds the rollout; once back, the rollout carries on and is promoted."""
    runner, router, metrics = make_runner(tmp_path)
    calls = 0
    original = metrics.fetch

    async def flaky(*, since: float, now: float) -> MetricsResult:
        nonlocal calls
        calls += 1
        router.down = calls in (3, 4)
        return await original(since=since, now=now)

    metrics.fetch = flaky  # type: ignore[method-assign]
    statuses = await Controller([runner]).run()
    assert statuses["app"].phase is Phase.SUCCEEDED
    ticks = [e for e in read_record(runner.record_path) if isinstance(e, TickEntry)]
    assert any(t.weight_read is None for t in ticks)  # the outage is in the record


async def test_router_dead_at_the_last_step_never_promotes(tmp_path: Path) -> None:
    """The router dies at 50% with the analysis passing: nothing advances or promotes while
    the weight cannot be read, and at the router deadline the rollout rolls back (and ends
    once the router is back to confirm 0%)."""
    runner, router, metrics = make_runner(tmp_path)
    original = metrics.fetch

    async def dies_at_last_step(*, since: float, now: float) -> MetricsResult:
        if runner.status.phase is Phase.ROLLING_BACK:
            router.down = False  # restarted: the rollback can confirm 0%
        elif runner.status.weight == 50 and runner.status.weight_verified:
            router.down = True  # HAProxy killed: reads and writes fail
        return await original(since=since, now=now)

    metrics.fetch = dies_at_last_step  # type: ignore[method-assign]
    statuses = await Controller([runner]).run()
    status = statuses["app"]
    assert status.phase is Phase.FAILED and status.outcome == "rolled_back"
    assert "router failing" in status.reason
    assert 100 not in router.sets and router.sets == [5, 10, 25, 50, 0]
    entries = read_record(runner.record_path)
    ticks = [e for e in entries if isinstance(e, TickEntry)]
    blind = [t for t in ticks if t.weight_read is None and t.phase == "Progressing"]
    assert len(blind) >= 2 and all(t.weight_set == 50 and t.verdict for t in blind)
    assert not any(isinstance(e, TransitionEntry) and e.to_phase == "Promoting" for e in entries)


async def test_weight_that_does_not_read_back_never_counts(tmp_path: Path) -> None:
    """A router that accepts but ignores weights never starts a step; the rollout rolls back."""
    router = FakeRouter()
    router.stuck = True
    runner, _, _ = make_runner(tmp_path, router=router)
    statuses = await Controller([runner]).run()
    status = statuses["app"]
    # stuck at 0%, which is where a rollback wants to be: it ends, without ever advancing
    assert status.phase is Phase.FAILED and status.step == 0
    notes = [e.message for e in read_record(runner.record_path) if isinstance(e, NoteEntry)]
    assert any("weight read back is 0%, expected 5%" in n for n in notes)
    assert set(router.sets) <= {0, 5}


async def test_manual_commands_reach_the_runner_and_are_recorded(tmp_path: Path) -> None:
    """pause holds the step, a repeated pause is refused, and abort rolls back as 'aborted'."""
    runner, router, _ = make_runner(
        tmp_path, spec=SPEC.model_copy(update={"min_step_s": 10_000, "max_step_s": None})
    )
    controller = Controller([runner])
    task = asyncio.create_task(controller.run())
    await controller.started.wait()
    paused = await controller.command("app", Command("pause", "alice", "looking at dashboards"))
    assert paused.accepted and paused.phase == "Paused"
    again = await controller.command("app", Command("pause", "bob"))
    assert not again.accepted and "already paused by alice" in again.message
    aborted = await controller.command("app", Command("abort", "alice", "bad dashboards"))
    assert aborted.accepted
    statuses = await task
    assert statuses["app"].phase is Phase.FAILED and statuses["app"].outcome == "aborted"
    assert router.weight == 0
    entries = read_record(runner.record_path)
    manual = [(e.command, e.who) for e in entries if isinstance(e, ManualEntry)]
    assert manual == [("pause", "alice"), ("pause", "bob"), ("abort", "alice")]
    end = entries[-1]
    assert isinstance(end, EndEntry) and end.outcome == "aborted"
    late = await controller.command("app", Command("resume", "alice"))
    assert not late.accepted


async def test_tick_hook_fields_and_observers(tmp_path: Path) -> None:
    """The tick hook's measured split lands in each TickEntry, and observers see every tick."""
    runner, _, _ = make_runner(tmp_path)
    seen: list[TickReport] = []
    runner.tick_hook = lambda name, status: {"observed_canary_share": status.weight / 100}
    runner.observers.append(seen.append)
    await Controller([runner]).run()
    ticks = [e for e in read_record(runner.record_path) if isinstance(e, TickEntry)]
    assert [t.observed_canary_share for t in ticks] == [r.entry.observed_canary_share for r in seen]
    assert all(t.observed_canary_share == t.weight_set / 100 for t in ticks)


async def test_unknown_tick_hook_field_is_an_error(tmp_path: Path) -> None:
    """A hook that returns a field TickEntry does not have is reported by name."""
    runner, _, _ = make_runner(tmp_path)
    runner.tick_hook = lambda name, status: {"observed_split": 0.05}
    with pytest.raises(ValueError, match=r"unknown TickEntry fields \['observed_split'\]"):
        await runner.run()
    last = read_record(runner.record_path)[-1]
    assert isinstance(last, NoteEntry) and "controller error" in last.message


async def test_sigterm_stops_cleanly_leaving_weights_and_a_whole_record(tmp_path: Path) -> None:
    """SIGTERM stops ticking, cancels and awaits every task, keeps the weight and the record whole."""
    slow = SPEC.model_copy(update={"min_step_s": 10_000, "max_step_s": None})
    runners = [make_runner(tmp_path / str(n), spec=slow)[0] for n in range(3)]
    for n, runner in enumerate(runners):
        runner.name = f"app{n}"
    controller = Controller(runners)
    seen = asyncio.Event()
    runners[0].observers.append(lambda report: seen.set())
    task = asyncio.create_task(run_until_signalled(controller))
    await seen.wait()
    # never send SIGTERM to the test process without a handler: that would end the whole run
    assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
    os.kill(os.getpid(), signal.SIGTERM)
    statuses = await task
    assert all(s.phase is Phase.PROGRESSING and s.weight == 5 for s in statuses.values())
    assert all(r.router.weight == 5 for r in runners)  # type: ignore[attr-defined]
    assert all(r.stopped for r in runners)
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
    for runner in runners:
        entries = read_record(runner.record_path)  # parses every line: nothing torn
        assert not any(isinstance(e, EndEntry) for e in entries)
        last = entries[-1]
        assert (
            isinstance(last, NoteEntry) and "controller stopped during Progressing" in last.message
        )
    # the handler is gone again: a later SIGTERM is not swallowed by a finished loop
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


async def test_stop_before_run_still_stops(tmp_path: Path) -> None:
    """A stop() that arrives before the tasks exist (a signal at startup) is not lost."""
    runner, router, _ = make_runner(tmp_path)
    controller = Controller([runner])
    controller.stop()
    statuses = await controller.run()
    assert runner.stopped and statuses["app"].phase is Phase.INITIALIZING
    assert router.sets == [] and not runner.record_path.exists()  # nothing was touched


async def test_controller_rejects_duplicate_names(tmp_path: Path) -> None:
    """Two rollouts with one name are refused up front."""
    one, _, _ = make_runner(tmp_path / "a")
    two, _, _ = make_runner(tmp_path / "b")
    with pytest.raises(ValueError, match="two rollouts are named 'app'"):
        Controller([one, two])


APP = {"rollout": "app", "namespace": "", "name": "app"}  # a static target's metric labels


async def test_states_and_telemetry_follow_the_rollout(tmp_path: Path) -> None:
    """/rollouts data and the Prometheus metrics show the final phase and weight."""
    runner, _, _ = make_runner(tmp_path, canary_error_rate=0.1)
    controller = Controller([runner])
    await controller.run()
    state = controller.states()[0]
    assert state["phase"] == "Failed" and state["weight"] == 0 and state["name"] == "app"
    registry = controller.telemetry.registry
    assert registry.get_sample_value("canary_rollout_phase", {**APP, "phase": "Failed"}) == 1.0
    assert registry.get_sample_value("canary_rollout_weight_percent", APP) == 0.0
    fails = registry.get_sample_value(
        "canary_analysis_decisions_total", {**APP, "decision": "fail"}
    )
    assert fails is not None and fails >= 1
    # the numbers behind the failing metric: e-value at or over its threshold, lower bound > 1
    errors = {**APP, "metric": "errors"}
    e_fail = registry.get_sample_value("canary_analysis_metric_e_value_fail", errors)
    threshold = registry.get_sample_value("canary_analysis_metric_e_value_fail_threshold", errors)
    assert e_fail is not None and threshold is not None and e_fail >= threshold > 1
    lower = registry.get_sample_value("canary_analysis_metric_lower_bound", errors)
    assert lower is not None and lower > 1.0
    decided = registry.get_sample_value(
        "canary_analysis_metric_decision", {**errors, "decision": "fail"}
    )
    assert decided == 1.0
    version = metadata.version("canary")
    assert registry.get_sample_value("canary_info", {"version": version, "mode": "static"}) == 1.0
    # every tick is timed: how late it began against its schedule, and how long it took
    ticks = registry.get_sample_value("canary_tick_seconds_count")
    assert ticks is not None and ticks >= fails
    assert registry.get_sample_value("canary_tick_lateness_seconds_count") == ticks
    late = registry.get_sample_value("canary_tick_lateness_seconds_sum")
    assert late is not None and 0 <= late < ticks * 0.5


# ---- the HTTP server around a controller ----------------------------------------------------


async def test_server_routes_probes_state_and_commands(tmp_path: Path) -> None:
    """The server answers probes, lists rollouts, maps command outcomes to 200/409/404/400,
    serves extension routes and exposes the controller's metrics."""
    import aiohttp
    from aiohttp import web

    from canary.server.app import Server, make_app
    from canary.server.auth import TokenAccess

    token = "t" * 32
    runner, _, _ = make_runner(
        tmp_path, spec=SPEC.model_copy(update={"min_step_s": 10_000, "max_step_s": None})
    )
    other, _, _ = make_runner(tmp_path / "shop", spec=runner.spec)
    other.name = "shop/web"  # Kubernetes-style names hold a slash
    controller = Controller([runner, other])

    def extension(app: web.Application) -> None:
        async def hello(request: web.Request) -> web.Response:
            return web.Response(text="reports here")

        app.router.add_get("/reports/", hello)

    async with (
        Server(make_app(controller, access=TokenAccess(token), extensions=[extension])) as server,
        aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        ) as http,
    ):
        base = server.url

        async def call(method: str, path: str, **kwargs: object) -> tuple[int, str]:
            async with http.request(method, base + path, **kwargs) as response:  # type: ignore[arg-type]
                return response.status, await response.text()

        assert (await call("GET", "/healthz"))[0] == 200
        assert (await call("GET", "/readyz"))[0] == 503  # the controller has not started
        task = asyncio.create_task(controller.run())
        await controller.started.wait()
        assert (await call("GET", "/readyz"))[0] == 200
        assert await call("GET", "/reports/") == (200, "reports here")

        status, body = await call("GET", "/rollouts")
        names = [r["name"] for r in json.loads(body)["rollouts"]]
        assert status == 200 and names == ["app", "shop/web"]
        assert (await call("GET", "/rollouts/nope"))[0] == 404
        status, body = await call("GET", "/rollouts/shop/web")
        assert status == 200 and json.loads(body)["name"] == "shop/web"
        status, body = await call("POST", "/rollouts/shop/web/abort")
        assert status == 200 and json.loads(body)["name"] == "shop/web"

        status, body = await call(
            "POST", "/rollouts/app/pause", json={"who": "alice", "reason": "why not"}
        )
        assert status == 200 and json.loads(body)["phase"] == "Paused"
        status, body = await call("POST", "/rollouts/app/pause")
        assert status == 409 and "already paused by alice" in json.loads(body)["message"]
        status, body = await call("POST", "/rollouts/app/explode")
        assert status == 400 and "unknown command 'explode'" in body
        status, body = await call("POST", "/rollouts/nope/abort")
        assert status == 404 and "no rollout named 'nope'" in body
        status, body = await call("POST", "/rollouts/app/abort", data=b"not json")
        assert status == 400 and "body is not JSON" in body
        status, body = await call("POST", "/rollouts/app/abort", json={"who": 3})
        assert status == 400 and "who must be a string" in body
        status, body = await call("POST", "/rollouts/app/abort", json={"user": "x"})
        assert status == 400 and "unknown body keys ['user']" in body

        status, body = await call("GET", "/metrics")
        assert status == 200
        assert (
            'canary_rollout_phase{name="app",namespace="",phase="Paused",rollout="app"} 1.0' in body
        )

        status, body = await call("POST", "/rollouts/app/abort", json={"who": "alice"})
        assert status == 200
        final = await task
        assert final["app"].outcome == "aborted" and final["shop/web"].outcome == "aborted"


# ---- saving the status and resuming -------------------------------------------------------------


def _again(first: RolloutRunner, *, record_path: Path, resume_saved: bool = True) -> RolloutRunner:
    """A new runner for the same target, as a restarted process would build it."""
    return RolloutRunner(
        name=first.name,
        spec=first.spec,
        router=first.router,
        metrics=first.metrics,
        record_path=record_path,
        tick_s=TICK_S,
        analyzer_factory=first.analyzer_factory,
        canary_version="v2",
        clock=first.clock,
        status_path=first.status_path,
        resume_saved=resume_saved,
    )


async def test_restarted_runner_resumes_the_same_step_and_record(tmp_path: Path) -> None:
    """Stopped at step 3 (25%) and started again, a runner carries on in the same record from
    25%: no step taken twice, no weight set again, the earlier ticks replayed as evidence."""
    first, router, _ = await stopped_at_step(tmp_path, 2)
    assert first.stopped and first.status.step == 2 and router.weight == 25
    assert router.sets == [5, 10, 25]
    ticks_before = [
        e
        for e in read_record(first.record_path)
        if isinstance(e, TickEntry) and e.canary is not None
    ]

    second = _again(first, record_path=tmp_path / "elsewhere.jsonl")
    statuses = await Controller([second]).run()
    assert statuses["app"].phase is Phase.SUCCEEDED
    assert router.sets == [5, 10, 25, 50, 100]  # 25 was not set again: it read back fine
    assert second.record_path == first.record_path and not (tmp_path / "elsewhere.jsonl").exists()
    entries = read_record(first.record_path)
    assert sum(isinstance(e, StartEntry) for e in entries) == 1
    assert sum(isinstance(e, EndEntry) for e in entries) == 1
    notes = [e.message for e in entries if isinstance(e, NoteEntry)]
    assert any(n.startswith("controller stopped during Progressing at step 2") for n in notes)
    assert (
        f"resumed during Progressing at step 2 (25% wanted); {len(ticks_before)} ticks"
        in " ".join(notes)
    )
    moves = [e.weight for e in entries if isinstance(e, TransitionEntry)]
    assert moves == [5, 10, 25, 50, 100, 100]  # every step once, across both runs


async def _stop_at_the_fourth_look_of_step_1(first: RolloutRunner) -> None:
    """Run `first` until its fourth look at its second step, then stop it there."""
    controller = Controller([first])
    at_step: list[int] = []
    enough = asyncio.Event()

    def count(report: TickReport) -> None:
        at_step.append(report.status.step)
        if at_step.count(1) >= 4:
            enough.set()

    first.observers.append(count)
    task = asyncio.create_task(controller.run())
    await enough.wait()
    controller.stop()
    await task


async def test_a_resumed_analysis_judges_as_the_one_that_observed_every_tick(
    tmp_path: Path,
) -> None:
    """Stopped mid-step, a restarted runner rebuilds its analysis from the record (replayed,
    without verdicts): given the next counts, it decides exactly as the stopped runner's own
    analysis, which observed every tick, would have (the same verdict, to the last digit)."""
    # steps of 20 looks at least: it is stopped at the fourth of its second step
    first, _, metrics = make_runner(tmp_path, spec=SPEC.model_copy(update={"min_step_s": 200}))
    first.status_path = tmp_path / "app.status.json"
    await _stop_at_the_fourth_look_of_step_1(first)
    live = first._analyzer
    assert live is not None and first.status.step == 1

    second = _again(first, record_path=tmp_path / "elsewhere.jsonl")
    await second.prepare()
    assert await second._resume()
    resumed = second._analyzer
    assert resumed is not None and resumed is not live
    for _ in range(3):
        counts = await metrics.fetch(since=0.0, now=0.0)
        assert isinstance(counts, ArmsCounts)
        snapshot = Snapshot(elapsed_s=1e3, primary=counts.primary, canary=counts.canary)
        assert (
            resumed.observe(snapshot).model_dump_json() == live.observe(snapshot).model_dump_json()
        )
    await second.store.release()  # type: ignore[union-attr]


async def test_a_resume_looks_within_half_a_period_once_traffic_has_flowed(
    tmp_path: Path,
) -> None:
    """A rollout resumed long after its last recorded look (a shard taken over a Lease
    duration later) looks within the first half period, not after a fresh rollout's half
    to one period; resumed soon after its last look, no sooner than half a period after it."""
    first, _, _ = await stopped_at_step(tmp_path, 1)
    at_once = _again(first, record_path=tmp_path / "a.jsonl")
    at_once.tick_s = 40.0  # the last look was 10 s ago (the fake fetch moves the clock on)
    await at_once.prepare()
    assert await at_once._resume()
    assert at_once._first_look == (0.25, 0.75)  # from half a period after that look
    await at_once.store.release()  # type: ignore[union-attr]

    assert isinstance(first.clock, Clock)
    first.clock.now += 15.0  # a Lease duration later
    later = _again(first, record_path=tmp_path / "b.jsonl")
    await later.prepare()
    assert await later._resume()
    assert later._first_look == (0.0, 0.5)
    await later.store.release()  # type: ignore[union-attr]

    first.clock.now -= 3600.0  # a clock behind the record's: no later than a fresh rollout
    behind = _again(first, record_path=tmp_path / "c.jsonl")
    await behind.prepare()
    assert await behind._resume()
    assert behind._first_look == (0.5, 1.0)
    await behind.store.release()  # type: ignore[union-attr]


class _CarryingRecord(FileRecord):
    """A file record that also keeps the metric source's state, as the ConfigMap record does
    in its head (canary.runner.seams.CarryingRecord); `saved` stands for the head."""

    def __init__(self, path: Path, saved: dict[str, str]) -> None:
        super().__init__(path)
        self.saved = saved
        self.source: Callable[[], str | None] | None = None
        self._carried: str | None = None

    def carry_from(self, source: Callable[[], str | None]) -> None:
        self.source = source

    def take_carried(self) -> str | None:
        carried, self._carried = self._carried, None
        return carried

    async def flush(self, *, force: bool = False) -> bool:
        state = self.source() if self.source is not None else None
        if state is not None:
            self.saved["state"] = state
        return await super().flush(force=force)

    async def read(self) -> list[Entry]:
        self._carried = self.saved.get("state")
        return await super().read()


class _CarriedMetrics(FakeMetrics):
    """FakeMetrics that can carry a state (canary.metrics.base.CarriedCounts)."""

    refuse: str | None = None
    taken: list[tuple[str, float, float]]

    def carry(self) -> str | None:
        return f"counted through fetch {len(self.sinces)}"

    def carry_on(self, state: str, *, since: float, now: float) -> str | None:
        self.taken.append((state, since, now))
        return self.refuse


@pytest.mark.parametrize("refuse", [None, "counted for other selectors or settings"])
async def test_a_resume_counts_on_from_the_state_its_record_carries(
    tmp_path: Path, refuse: str | None
) -> None:
    """The record saves the metric source's state with its writes; a resumed runner hands the
    one its record carries to its metric source, with the analysis' since, and its resumed
    note says whether the counts carried on or read back (and why)."""
    saved: dict[str, str] = {}

    def opener(path: Path) -> Callable[..., FileRecord]:
        return lambda rollout_id, *, ref=None: _CarryingRecord(Path(ref) if ref else path, saved)

    first, router, _ = make_runner(tmp_path)
    metrics = _CarriedMetrics(router, first.clock)  # type: ignore[arg-type]
    metrics.taken, metrics.refuse = [], refuse
    first.metrics, first.records = metrics, opener(tmp_path / "app.jsonl")
    first.status_path = tmp_path / "app.status.json"
    controller = Controller([first])
    reached = asyncio.Event()
    first.observers.append(lambda report: reached.set() if report.status.step == 1 else None)
    task = asyncio.create_task(controller.run())
    await reached.wait()
    controller.stop()
    await task
    assert saved["state"].startswith("counted through fetch "), saved
    assert metrics.taken == []

    second = _again(first, record_path=tmp_path / "elsewhere.jsonl")
    second.records = opener(tmp_path / "elsewhere.jsonl")
    await second.prepare()
    assert await second._resume()
    since = second.status.analysis_started_at
    assert since is not None
    assert metrics.taken == [(saved["state"], since, second.clock())]
    await second._flush_record(force=True)
    notes = [e.message for e in read_record(first.record_path) if isinstance(e, NoteEntry)]
    resumed = [n for n in notes if n.startswith("resumed during")]
    assert len(resumed) == 1, notes
    if refuse is None:
        assert resumed[0].endswith("; counts carried on from the state saved with the record")
    else:
        assert resumed[0].endswith(
            f"; counts read back to the analysis' start (the saved state: {refuse})"
        )
    await second.store.release()  # type: ignore[union-attr]


class _AnalysisRecord(FileRecord):
    """A file record that also saves the runner's analysis state with each write, as the
    ConfigMap record does in its head (canary.runner.seams.AnalysisRecord); `saved` stands
    for the head, and `reads` counts the whole-record reads."""

    def __init__(self, path: Path, saved: dict[str, str]) -> None:
        super().__init__(path)
        self.saved = saved
        self.source: Callable[[], str | None] | None = None
        self.reads = 0
        self.tail: int | None = 10**6  # entries in the head's tail (recent)
        self.recent_reads = 0

    def keep_analysis_with(self, source: Callable[[], str | None]) -> None:
        self.source = source

    async def flush(self, *, force: bool = False) -> bool:
        wrote = await super().flush(force=force)
        if self.source is not None:
            self.saved["analysis"] = self.source() or ""
        return wrote

    async def read_head(self) -> SavedHead | None:
        if not self.saved.get("analysis"):
            return None
        ticks = [e for e in read_record(self.path) if isinstance(e, TickEntry)]
        data = [t.at for t in ticks if t.verdict is not None]
        return SavedHead(
            analysis=self.saved["analysis"],
            tick_at=ticks[-1].at if ticks else None,
            data_at=data[-1] if data else None,
            recent=self.recent,
        )

    def recent(self) -> tuple[Entry, ...]:
        """The head's tail: the latest entries (here all of them; `tail` cuts them, and
        `tail` None is a bug in reading them)."""
        self.recent_reads += 1
        if self.tail is None:
            raise RuntimeError("a bug in reading the tail")
        entries = tuple(read_record(self.path))
        return entries[-self.tail :] if self.tail else ()

    async def read(self) -> list[Entry]:
        self.reads += 1
        return await super().read()


def _analysis_records(saved: dict[str, str], path: Path) -> Callable[..., FileRecord]:
    """Opens _AnalysisRecords at `path` (or the saved status' ref) whose head is `saved`."""
    return lambda rollout_id, *, ref=None: _AnalysisRecord(Path(ref) if ref else path, saved)


async def _stopped_saving_its_analysis(
    tmp_path: Path, saved: dict[str, str]
) -> tuple[RolloutRunner, FakeMetrics]:
    """A runner whose record saves its analysis state in `saved`, stopped at the fourth look
    of its second step; and its metrics."""
    first, _, metrics = make_runner(tmp_path, spec=SPEC.model_copy(update={"min_step_s": 200}))
    first.records = _analysis_records(saved, tmp_path / "app.jsonl")
    first.status_path = tmp_path / "app.status.json"
    await _stop_at_the_fourth_look_of_step_1(first)
    return first, metrics


def _restarted(first: RolloutRunner, tmp_path: Path, saved: dict[str, str]) -> RolloutRunner:
    """`first` built again, as a restarted process would, over the same saved head."""
    second = _again(first, record_path=tmp_path / "elsewhere.jsonl")
    second.records = _analysis_records(saved, tmp_path / "elsewhere.jsonl")
    return second


@pytest.mark.parametrize("damage", [None, "text", "since"])
async def test_a_resume_takes_up_the_analysis_its_record_saved_without_reading_it(
    tmp_path: Path, damage: str | None
) -> None:
    """The record saves the analysis' state with its writes; a resumed runner takes it up
    from the head alone (the record is not read, nothing is replayed) and then judges
    exactly as the stopped runner's analysis would have. A state it cannot use (damaged,
    or of another analysis than the saved status') is refused with the reason in the
    resumed note, and the record is read and replayed as before."""
    saved: dict[str, str] = {}
    first, metrics = await _stopped_saving_its_analysis(tmp_path, saved)
    live = first._analyzer
    assert live is not None and first.status.step == 1 and saved["analysis"]
    looks = sum(
        isinstance(e, TickEntry)
        and e.verdict is not None
        and e.at >= (first.status.analysis_started_at or 0.0)
        for e in read_record(first.record_path)
    )
    assert looks == first._looks >= 4  # every tick since the analysis began, observed once
    if damage == "text":
        saved["analysis"] = "H4sIAAAA" + saved["analysis"][8:40]
    elif damage == "since":  # the status was saved after the record, at another step
        status = json.loads((tmp_path / "app.status.json").read_text())
        status["status"]["analysis_started_at"] += 10.0
        (tmp_path / "app.status.json").write_text(json.dumps(status))

    second = _restarted(first, tmp_path, saved)
    await second.prepare()
    assert await second._resume()
    record = second.record
    assert isinstance(record, _AnalysisRecord)
    assert record.reads == (0 if damage is None else 1)
    resumed = second._analyzer
    assert resumed is not None and resumed is not live
    await second._flush_record(force=True)
    notes = [e.message for e in read_record(first.record_path) if isinstance(e, NoteEntry)]
    said = [n for n in notes if n.startswith("resumed during")]
    assert len(said) == 1, notes
    if damage is None:
        assert (
            f"; the analysis carried on from the state saved with the record ({looks} looks)"
            in (said[0])
        )
    elif damage == "text":
        assert (
            "ticks of evidence replayed into a fresh analysis (the analysis state saved "
            in (said[0])
        )
        assert "not gzip data" in said[0] or "cut short" in said[0], said[0]
    else:
        assert "(the analysis state saved with the record: it is of another analysis" in said[0]
    if damage != "since":  # (else the replay starts elsewhere: another analysis on purpose)
        for _ in range(3):
            counts = await metrics.fetch(since=0.0, now=0.0)
            assert isinstance(counts, ArmsCounts)
            snapshot = Snapshot(elapsed_s=1e3, primary=counts.primary, canary=counts.canary)
            got, want = resumed.observe(snapshot), live.observe(snapshot)
            assert got.model_dump_json() == want.model_dump_json()
    await second.store.release()  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "source",
    ["head", "head's tail", "unreadable tail", "failing tail", "superseded", "record"],
)
async def test_a_resumed_rollouts_charts_carry_on_from_its_recorded_ticks(
    tmp_path: Path, source: str
) -> None:
    """The live page's history of a resumed rollout starts with the ticks its record holds,
    as the stopped runner showed them: from the head's tail (read before the first look, not
    in the resume) or from the record read whole. A tail that cannot be read, or whose
    reading fails, leaves the charts to start at the resume, and the rollout goes on; a
    rollout superseded before its first look does not get the old one's ticks."""
    saved: dict[str, str] = {}
    first, _ = await _stopped_saving_its_analysis(tmp_path, saved)
    shown = first.history.points()
    assert len(shown) >= 6 and len({p["rollout"] for p in shown}) == 1
    if source == "record":
        saved["analysis"] = ""  # no state with the head: the record is read and replayed

    second = _restarted(first, tmp_path, saved)
    await second.prepare()
    assert await second._resume()
    record = second.record
    assert isinstance(record, _AnalysisRecord)
    if source == "head's tail":
        record.tail = 5  # the latest entries only: the tail ends with ticks
    elif source == "unreadable tail":
        record.tail = 0
    elif source == "failing tail":
        record.tail = None
    if source == "record":
        assert second.history.points() == shown  # replayed: the charts at once
    else:
        assert not len(second.history) and record.recent_reads == 0  # not in the resume
    ticks = sum(isinstance(e, TickEntry) for e in read_record(first.record_path)[-5:])
    if source == "superseded":
        second._pending_revision = "v3"
        await second._supersede()
    await second._tick()
    points = second.history.points()
    assert points[-1]["at"] > shown[-1]["at"]  # the new look, last
    if source == "superseded":
        assert [p["rollout"] for p in points] == ["app@v3"] and record.recent_reads == 0
        await second.store.release()  # type: ignore[union-attr]
        return
    if source in ("head", "record"):
        assert points[:-1] == shown
    elif source == "head's tail":
        assert ticks and points[:-1] == shown[-ticks:]
    else:
        assert len(points) == 1
    if source != "record":
        assert record.recent_reads == 1
    await second.store.release()  # type: ignore[union-attr]


async def test_a_finished_rollout_is_not_run_again_but_a_new_revision_is(tmp_path: Path) -> None:
    """A saved rollout that ended is not rolled out again for the same revision (a restart
    after the end, or the same `canary run` again: before, the promoted canary went back to
    the first step); another revision, or resume_saved=False, gives a new rollout with its
    own record."""
    first, router, _ = make_runner(tmp_path)
    first.status_path = tmp_path / "app.status.json"
    await Controller([first]).run()
    assert first.status.phase is Phase.SUCCEEDED
    router.sets.clear()

    again = _again(first, record_path=tmp_path / "again.jsonl")
    statuses = await Controller([again]).run()
    assert statuses["app"].phase is Phase.SUCCEEDED and router.sets == []
    assert not (tmp_path / "again.jsonl").exists()

    router.weight = 0
    newer = _again(first, record_path=tmp_path / "next.jsonl")
    newer.canary_version = "v3"
    newer.spec = SPEC.model_copy(update={"steps": (5,)})
    await Controller([newer]).run()
    assert newer.record_path == tmp_path / "next.jsonl" and router.sets[0] == 5
    assert isinstance(read_record(newer.record_path)[0], StartEntry)

    router.sets.clear()
    fresh = _again(first, record_path=tmp_path / "fresh.jsonl", resume_saved=False)
    fresh.canary_version = "v3"
    fresh.spec = SPEC.model_copy(update={"steps": (5,)})
    await Controller([fresh]).run()
    assert router.sets[0] == 5 and (tmp_path / "fresh.jsonl").exists()


async def test_fresh_start_ignores_an_unfinished_saved_rollout(tmp_path: Path) -> None:
    """resume_saved=False starts over from the first step in a new record."""
    first, router, _ = await stopped_at_step(tmp_path, 1)
    second = _again(first, record_path=tmp_path / "fresh.jsonl", resume_saved=False)
    second.spec = SPEC.model_copy(update={"steps": (5,)})
    await Controller([second]).run()
    assert second.record_path == tmp_path / "fresh.jsonl"
    assert router.sets[-2:] == [5, 100]


async def test_unreadable_saved_status_refuses_to_start(tmp_path: Path) -> None:
    """A corrupt status file is a loud error naming the file, and nothing moves: never a
    silent new rollout (issue 11). `resume_saved=False` (`--fresh`) starts one on purpose."""
    runner, router, _ = make_runner(tmp_path, spec=SPEC.model_copy(update={"steps": (5,)}))
    runner.status_path = tmp_path / "app.status.json"
    runner.status_path.write_text("{not json")
    with pytest.raises(ResumeError, match=r"app\.status\.json.*--fresh"):
        await runner.run()
    assert router.sets == [] and not runner.record_path.exists()
    assert runner.status_path.read_text() == "{not json"

    fresh, _, _ = make_runner(tmp_path, spec=SPEC.model_copy(update={"steps": (5,)}))
    fresh.status_path = runner.status_path
    fresh.resume_saved = False
    await Controller([fresh]).run()
    assert fresh.status.phase is Phase.SUCCEEDED


class Announcements:
    """An Announcer that keeps what it is told (Kubernetes Events, in the operator)."""

    def __init__(self) -> None:
        self.said: list[tuple[str, str, str]] = []

    async def announce(self, type: str, reason: str, message: str) -> None:
        self.said.append((type, reason, message))


@pytest.mark.parametrize(
    ("requests_per_fetch", "fits"),
    [(4000, True), (40, False)],
    ids=["400rps-fits", "4rps-too-slow"],
)
async def test_the_planner_tells_users_how_long_a_good_canary_needs(
    tmp_path: Path, requests_per_fetch: int, fits: bool
) -> None:
    """At the start (from the expected traffic) and once counts are in (from the observed
    rates), the runner says how long a good canary needs to pass the 5% step: a note with the
    numbers in the record, the same words in the status (/rollouts), and an Event, a Warning
    when the 600 s step is too short. 20 canary req/s: minutes, fits; 0.2 canary req/s: hours,
    and how much generated load would help."""
    runner, _, metrics = make_runner(tmp_path)
    metrics.requests_per_fetch = requests_per_fetch  # per 10 s: 400 or 4 req/s
    runner.expected_rps = requests_per_fetch / 10
    runner.announcer = events = Announcements()
    shown: list[str] = []
    runner.observers.append(lambda report: shown.append(runner.state()["advice"]))
    await Controller([runner]).run()
    counted = {  # canary requests counted by each analysis second
        e.elapsed_s: e.canary.requests
        for e in read_record(runner.record_path)
        if isinstance(e, TickEntry) and e.canary is not None
    }

    entries = read_record(runner.record_path)
    start = entries[0]
    assert isinstance(start, StartEntry)
    advice = [e for e in entries if isinstance(e, NoteEntry) and e.plan]
    assert len(advice) >= 2, [e for e in entries if isinstance(e, NoteEntry)]
    assumed, observed = advice[0], advice[1]
    assert start.plan["likely_pass_s"] == assumed.plan["likely_pass_s"]
    assert assumed.plan["elapsed_s"] == 0.0 and "assumed" in assumed.message
    elapsed = observed.plan["elapsed_s"]
    assert elapsed is not None and elapsed >= 10 and "observed over" in observed.message
    # from the counts of that tick, not from the expected traffic (the fake's counts run one
    # 10 s fetch ahead of the analysis clock, hence up to 2x the true rate after 10 s)
    assert observed.plan["canary_rps"] == pytest.approx(counted[elapsed] / elapsed)
    canary_rps = requests_per_fetch / 10 * 0.05
    assert assumed.plan["canary_rps"] == pytest.approx(canary_rps)
    assert canary_rps <= observed.plan["canary_rps"] <= 2.2 * canary_rps
    for note in (assumed, observed):
        assert note.level == ("info" if fits else "warning"), note.message
        assert note.plan["fits"] == (1.0 if fits else 0.0)
        likely = note.plan["likely_pass_s"]
        assert likely is not None
        if fits:
            assert 60 < likely <= 600 and "fits the 10.0 min step" in note.message
        else:
            assert likely > 3600 and " h to pass in 95% of rollouts" in note.message
            assert "longer than the 10.0 min step" in note.message
            assert "req/s more at the entry point" in note.message
            assert note.plan["extra_entry_rps"] and note.plan["extra_entry_rps"] > 4

    # the status field carries the latest advice while the step runs
    assert assumed.message in shown and observed.message in shown
    assert runner.status.advice == advice[-1].message
    kind = "Normal" if fits else "Warning"
    assert (kind, "PassEstimate", observed.message) in events.said
    if not fits:  # and the step did end at its deadline, as the advice said
        assert runner.status.phase is Phase.FAILED
        assert "no pass within max_step_s" in runner.status.reason


async def test_a_planner_failure_never_stops_a_rollout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The advice is advice: a planner that raises (a bug) is logged, and the rollout runs
    to its end as it would without it."""
    import canary.runner.runner as runner_module

    def broken(*args: object, **kwargs: object) -> None:
        raise TypeError("planner bug")

    monkeypatch.setattr(runner_module, "assumed_advice", broken)
    monkeypatch.setattr(runner_module, "observed_advice", broken)
    runner, router, _ = make_runner(tmp_path)
    runner.expected_rps = 400.0
    statuses = await Controller([runner]).run()
    assert statuses["app"].phase is Phase.SUCCEEDED and router.sets == [5, 10, 25, 50, 100]
    assert "the planner failed" in caplog.text and runner.status.advice == ""
    assert not [e for e in read_record(runner.record_path) if isinstance(e, NoteEntry) and e.plan]


async def test_an_estimate_that_holds_is_looked_at_again_half_as_often(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The planner runs after a minute, then again after 1, 2, 4, 8 and at most 10 minutes
    while its estimate holds (a fresh one each minute was 40% of the controller's CPU at
    scale); a material change brings it back to every minute."""
    import canary.runner.runner as runner_module
    from analysis import Snapshot
    from canary.core.advice import Advice
    from canary.runner.runner import MAX_RECHECK_S

    runner, _, _ = make_runner(tmp_path)
    runner.status = runner.status.model_copy(update={"stage": "Progressing"})
    assert runner.status.stage == "Progressing"
    calls: list[float] = []
    told: list[Advice] = []

    def planner(snapshot: Snapshot, **_: object) -> Advice:
        calls.append(snapshot.elapsed_s)
        # Materially different (4x as long) from 40 min on: the next look is a minute later.
        likely = 3600.0 if snapshot.elapsed_s >= 2400 else 900.0
        return Advice(
            source="observed", weight=5, elapsed_s=snapshot.elapsed_s, canary_rps=1.0,
            primary_rps=20.0, base_error_rate=0.01, expected_pass_s=likely,
            likely_pass_s=likely, expected_fail_s=None, budget_s=600.0, fits=False,
            extra_canary_rps=None, extra_entry_rps=None, message="m",
        )  # fmt: skip

    async def tell(advice: Advice | None) -> None:
        assert advice is not None
        runner._advice = advice
        told.append(advice)

    monkeypatch.setattr(runner_module, "observed_advice", planner)
    monkeypatch.setattr(runner, "_tell_advice", tell)
    for elapsed in range(10, 3600, 10):
        arm = ArmCounts(requests=10.0 * elapsed)
        await runner._observed_advice(Snapshot(elapsed_s=elapsed, primary=arm, canary=arm))
    assert calls[:6] == [60, 120, 240, 480, 960, 1560]
    assert MAX_RECHECK_S == 600 and calls[6] == 2160
    assert calls[7] == 2760 and calls[8] == 2820  # the change at 2760, then a minute again
    assert len(told) == 2
