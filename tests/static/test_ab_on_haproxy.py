"""A/B rollouts of a static target, end to end: real services, real HAProxy routing by a
header through a runtime map, real Prometheus, the runner built from a YAML config.

Every request is sent by a real HTTP client through HAProxy and the version that answered
is read from the service's own response header, so "only matching requests reach the
canary" is measured at the client, not taken from what the router says.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import yaml

from canary.core.rollout import RolloutStatus
from canary.demo.procs import HAProxyConfig, HAProxyProcess, PrometheusProcess, free_port
from canary.demo.service import VERSION_HEADER
from canary.demo.stack import service_process
from canary.reports.build import build_report
from canary.reports.html import render_html
from canary.reports.markdown import render_markdown
from canary.routers.base import Match
from canary.routers.haproxy import HAProxyRouter
from canary.static.config import load_config
from canary.static.targets import build_runner

pytestmark = pytest.mark.slow

MATCH = Match.header("X-Canary=always")
SENDERS = 4  # concurrent clients, each alternating with and without the header


@dataclass
class AbStack:
    haproxy: HAProxyProcess
    config: HAProxyConfig
    prometheus_url: str

    def router(self) -> HAProxyRouter:
        return HAProxyRouter(
            self.config.socket_path,
            "app",
            "primary",
            "canary",
            match=MATCH,
            ab_map=self.config.ab_map,
        )


@contextlib.asynccontextmanager
async def ab_stack(
    workdir: Path, sockdir: Path, *, canary_error_rate: float
) -> AsyncIterator[AbStack]:
    primary_port, canary_port = free_port(), free_port()
    config = HAProxyConfig(
        frontend_port=free_port(),
        primary_addr=f"127.0.0.1:{primary_port}",
        canary_addr=f"127.0.0.1:{canary_port}",
        socket_path=sockdir / "admin.sock",
        state_file=workdir / "server-state",
        ab_match=MATCH,
        ab_map=workdir / "app-ab.map",
    )
    async with contextlib.AsyncExitStack() as stack:
        for version, port, errors in (
            ("primary", primary_port, 0.005),
            ("canary", canary_port, canary_error_rate),
        ):
            await stack.enter_async_context(
                service_process(
                    version,
                    port=port,
                    log_path=workdir / f"{version}.log",
                    latency_ms=5.0,
                    error_rate=errors,
                    seed=7,
                )
            )
        haproxy = await stack.enter_async_context(HAProxyProcess(config, workdir=workdir))
        prometheus = await stack.enter_async_context(
            PrometheusProcess(
                [config.primary_addr, config.canary_addr], workdir=workdir / "prometheus"
            )
        )
        yield AbStack(haproxy, config, prometheus.url)


class Traffic:
    """Half the requests carry the A/B header. Each answer is counted by the version that
    sent it, under `ab` when the rollout had the match on (and read back) both when the
    request was sent and when it was answered, else under `other`. The machine turns the
    match off before the router is touched, so an `ab` request was routed with it on."""

    def __init__(self, url: str, match_on: Callable[[], bool]) -> None:
        self.url = url
        self.match_on = match_on
        self.seen: dict[tuple[str, bool], Counter[str]] = defaultdict(Counter)
        self.strays: list[str] = []  # requests routed against the match, for the failure message
        self.epoch = 0
        self.stopped = False

    def reset(self) -> None:
        """Count afresh, from requests sent from now on."""
        self.epoch += 1
        self.seen = defaultdict(Counter)

    async def run(self, session: aiohttp.ClientSession) -> None:
        flag = False
        while not self.stopped:
            flag = not flag
            headers = {MATCH.name: MATCH.value} if flag else {}
            before, epoch = self.match_on(), self.epoch
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(self.url, headers=headers) as response:
                    await response.read()
                    if epoch != self.epoch:
                        continue  # sent before the counts were reset: not this window's
                    phase = "ab" if before and self.match_on() else "other"
                    version = response.headers.get(VERSION_HEADER, "none")
                    self.seen[phase, flag][version] += 1
                    if phase == "ab" and flag != (version == "canary"):
                        self.strays.append(
                            f"{'with' if flag else 'without'} the header: {version} at {time.time():.3f}"
                        )
            await asyncio.sleep(0.005)


def write_config(stack: AbStack, workdir: Path) -> Path:
    path = workdir / "rollout.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "app",
                "router": {
                    "kind": "haproxy",
                    "socket": str(stack.config.socket_path),
                    "backend": "app",
                    "state_file": str(stack.config.state_file),
                    "ab_map": str(stack.config.ab_map),
                },
                "metrics": {"kind": "prometheus", "url": stack.prometheus_url},
                "match_header": "X-Canary=always",
                "ab_duration_s": 5,
                "min_step_s": 0,
                "max_step_s": 240,
                "no_data_deadline_s": 60,
                "tick_s": 0.5,
                # The median only: p99 needs more samples than a short test sends.
                "analysis": {
                    "errors": {"tolerance": 1.0, "abs_tolerance": 0.02},
                    "quantiles": [0.5],
                },
                "record_dir": "records",
            }
        )
    )
    return path


async def run_rollout(
    stack: AbStack, workdir: Path
) -> tuple[RolloutStatus, dict[bool, Counter[str]], dict[bool, Counter[str]]]:
    """Run the A/B rollout with traffic flowing; return its end status, what requests with
    and without the header reached while the match was on, and after the rollout."""
    runner = build_runner(load_config(write_config(stack, workdir)))
    traffic = Traffic(
        stack.haproxy.url, lambda: runner.status.match and runner.status.weight_verified
    )
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        senders = [asyncio.create_task(traffic.run(session)) for _ in range(SENDERS)]
        try:
            rollout = asyncio.create_task(runner.run())
            try:
                status = await asyncio.wait_for(asyncio.shield(rollout), timeout=270)
            finally:
                rollout.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await rollout
            during = {flag: traffic.seen["ab", flag] for flag in (True, False)}
            traffic.reset()
            await asyncio.sleep(1.5)
            after = {flag: traffic.seen["other", flag] for flag in (True, False)}
        finally:
            traffic.stopped = True
            for sender in senders:
                sender.cancel()
            for sender in senders:
                with contextlib.suppress(asyncio.CancelledError):
                    await sender
    assert not traffic.strays, (
        traffic.strays,
        [(t.at, t.to_phase, t.reason) for t in status.history],
    )
    return status, during, after


async def test_ab_rollout_routes_only_matching_requests_and_promotes(
    workdir: Path, sockdir: Path
) -> None:
    """A good canary: while the analysis runs, requests with `X-Canary: always` reach only
    the canary and requests without it only the primary; the analysis passes and promotes
    (the canary takes 100%) and the map entry is gone."""
    async with ab_stack(workdir, sockdir, canary_error_rate=0.005) as stack:
        status, during, after = await run_rollout(stack, workdir)
        assert status.outcome == "promoted" and status.stage == "Succeeded", status.reason
        assert any("A/B analysis passed" in t.reason for t in status.history)
        # Before promotion: the header decides, the weight (0) sends nothing else.
        assert (
            during[True]["canary"] > 50 and during[True]["primary"] <= during[True]["canary"] // 20
        )
        assert during[False]["primary"] > 50
        router = stack.router()
        assert await router.get_match() is False
        assert await router.get_weight() == 100
        assert stack.config.ab_map is not None
        assert stack.config.ab_map.read_text() == ""
        assert after[False]["canary"] > 0 and after[False]["primary"] == 0
        # The record of an A/B rollout (no weight steps) makes a report like any other.
        (path,) = (workdir / "records").glob("app-*.jsonl")
        entries = [json.loads(line) for line in path.read_text().splitlines()]
        assert entries[0]["steps"] == [] and entries[0]["config"]["rollout"]["ab_duration_s"] == 5
        report = build_report(entries)
        assert "promoted" in render_markdown(report).lower()
        assert "<svg" in render_html(report)


async def test_ab_rollout_of_a_bad_canary_rolls_back_and_removes_the_match(
    workdir: Path, sockdir: Path
) -> None:
    """A canary with 30% errors: the analysis fails on the matching requests alone, the
    rollout rolls back, the match is removed, and afterwards no request reaches the canary,
    header or not."""
    async with ab_stack(workdir, sockdir, canary_error_rate=0.3) as stack:
        status, during, after = await run_rollout(stack, workdir)
        assert status.outcome == "rolled_back" and status.stage == "Failed", status.reason
        assert "errors" in status.reason
        assert during[True]["canary"] > 0 and during[True]["primary"] == 0
        assert during[False]["primary"] > 0 and during[False]["canary"] == 0
        router = stack.router()
        assert await router.get_match() is False
        assert await router.get_weight() == 0
        assert after[True]["canary"] == 0 and after[True]["primary"] > 0
        assert after[False]["canary"] == 0
