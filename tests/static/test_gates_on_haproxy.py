"""Gate webhooks end to end in static mode: real HAProxy, real Prometheus, real analysis, and a
real aiohttp receiver on 127.0.0.1 answering as a Flagger-style gate would.

The runner is the static target's own (`build_runner` from a parsed config), run in this
event loop beside the receiver; the weights are read back from HAProxy's runtime API.
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from rich.console import Console
from support.pool import ProcessPool

from canary.cli.status import from_server, render_panel
from canary.core.records import EndEntry, NoteEntry, TickEntry, TransitionEntry, read_record
from canary.core.rollout import Phase
from canary.demo.procs import HAProxyConfig, HAProxyProcess, PrometheusProcess, free_port
from canary.reports.build import build_report
from canary.reports.html import render_html
from canary.routers.haproxy import HAProxyRouter
from canary.static.config import parse_config
from canary.static.targets import build_runner

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def prometheus_env(
    module_procs: ProcessPool, tmp_path_factory: pytest.TempPathFactory, prometheus_binary: str
) -> tuple[str, int]:
    """A Prometheus scraping a test exporter every second: (its URL, the exporter's port)."""
    exporter_port = free_port()
    module_procs.support_server("exporter", exporter_port)
    prometheus = PrometheusProcess(
        [f"127.0.0.1:{exporter_port}"],
        workdir=tmp_path_factory.mktemp("prometheus"),
        scrape_interval_s=1.0,
        binary=prometheus_binary,
    )
    module_procs.start(prometheus)
    return prometheus.url, exporter_port


class Traffic:
    """Counts requests at the exporter from a thread: 2000/s per arm, 1% errors on both."""

    def __init__(self, port: int, primary: str, canary: str) -> None:
        self.calls = [(primary, 200, 198), (primary, 500, 2), (canary, 200, 198), (canary, 500, 2)]
        self.port = port
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            for version, code, n in self.calls:
                url = f"http://127.0.0.1:{self.port}/inc?version={version}&code={code}&n={n}&seconds=0.02"
                with urllib.request.urlopen(url, timeout=5) as response:
                    response.read()

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


class Receiver:
    """A gate receiver: answers each webhook type with the status set for it (200 by default)
    and keeps every payload it got."""

    def __init__(self) -> None:
        self.status: dict[str, int] = {}
        self.payloads: list[dict[str, Any]] = []
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def got(self, kind: str) -> list[dict[str, Any]]:
        return [p for p in self.payloads if p.get("type") == kind]

    async def _hook(self, request: web.Request) -> web.Response:
        payload = await request.json()
        self.payloads.append(payload)
        return web.Response(status=self.status.get(str(payload.get("type")), 200))

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/{name}", self._hook)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


def _haproxy(procs: ProcessPool, workdir: Path, sockdir: Path, binary: str) -> HAProxyConfig:
    primary_port, canary_port = free_port(), free_port()
    procs.support_server("name", primary_port, "primary")
    procs.support_server("name", canary_port, "canary")
    config = HAProxyConfig(
        frontend_port=free_port(),
        primary_addr=f"127.0.0.1:{primary_port}",
        canary_addr=f"127.0.0.1:{canary_port}",
        socket_path=sockdir / "admin.sock",
        state_file=workdir / "server-state",
    )
    procs.start(HAProxyProcess(config, workdir=workdir, binary=binary))
    return config


def _config(
    haproxy: HAProxyConfig, prometheus_url: str, case: str, workdir: Path, **extra: Any
) -> Any:
    return parse_config(  # steps and timing as tests/cli's run-to-the-end test
        {
            "name": "app",
            "router": {"kind": "haproxy", "socket": str(haproxy.socket_path), "backend": "app"},
            "metrics": {
                "kind": "prometheus",
                "url": prometheus_url,
                "queries": {"primary_arm": f"{case}-p", "canary_arm": f"{case}-c"},
            },
            "steps": [10, 50],
            "min_step_s": 1,
            "max_step_s": 60,
            "tick_s": 0.5,
            "no_data_deadline_s": 30,
            "record_dir": str(workdir / "records"),
            "canary_version": "v2",
            **extra,
        }
    )


async def _until(predicate: Any, what: str, timeout_s: float = 120.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"never saw {what}")
        await asyncio.sleep(0.1)


async def test_confirm_promotion_holds_the_last_step_until_it_opens(
    procs: ProcessPool,
    workdir: Path,
    sockdir: Path,
    haproxy_binary: str,
    prometheus_env: tuple[str, int],
) -> None:
    """A confirm-promotion gate answering 403 holds the canary at 50% once the analysis passed
    there, while the rollout hook is called each tick with its metadata verbatim; once the
    gate answers 200 the rollout promotes to 100%. The record notes the gate's answers."""
    prometheus_url, exporter_port = prometheus_env
    haproxy = _haproxy(procs, workdir, sockdir, haproxy_binary)
    router = HAProxyRouter(haproxy.socket_path, "app", "primary", "canary")
    metadata = {"url": "http://app-canary/", "rps": "20", "duration": "1m"}
    async with Receiver() as receiver:
        receiver.status["confirm-promotion"] = 403
        config = _config(
            haproxy,
            prometheus_url,
            "gate-hold",
            workdir,
            webhooks=[
                {"type": "confirm-promotion", "url": receiver.url("promote")},
                {"type": "rollout", "url": receiver.url("load"), "metadata": metadata},
            ],
        )
        runner = build_runner(config, allow_webhook_hosts=("127.0.0.1",))
        with Traffic(exporter_port, "gate-hold-p", "gate-hold-c"):
            task = asyncio.create_task(runner.run())
            try:
                await _until(lambda: len(receiver.got("confirm-promotion")) >= 1, "a confirm call")
                held_since = asyncio.get_running_loop().time()
                # Held: still Progressing at the last step's 50%, asked again each tick.
                await _until(
                    lambda: asyncio.get_running_loop().time() - held_since > 3,
                    "the hold",
                    timeout_s=20,
                )
                assert runner.status.phase is Phase.PROGRESSING, runner.status
                assert runner.status.weight == 50 and await router.get_weight() == 50
                assert "confirm-promotion" in runner.status.message
                assert runner.state()["gates"]["confirm-promotion"].startswith("closed (HTTP 403")
                # `canary status` shows the gate's answer
                console = Console(width=200, record=True)
                console.print(render_panel(from_server(runner.state()), time.time()))
                assert "confirm-promotion closed (HTTP 403" in console.export_text()
                asked = len(receiver.got("confirm-promotion"))
                assert asked >= 3  # asked again each tick while closed
                receiver.status["confirm-promotion"] = 200
                status = await asyncio.wait_for(task, 60)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    assert status.phase is Phase.SUCCEEDED
    assert await router.get_weight() == 100
    entries = read_record(runner.record_path)
    assert isinstance(entries[-1], EndEntry) and entries[-1].outcome == "promoted"
    notes = [e.message for e in entries if isinstance(e, NoteEntry)]
    assert any(n.startswith("gate confirm-promotion: closed (HTTP 403") for n in notes), notes
    assert any(n.startswith("gate confirm-promotion: open (HTTP 200") for n in notes), notes
    # ... and so are the report's timeline
    report = build_report([e.model_dump(mode="json", by_alias=True) for e in entries])
    gates = [e.text for e in report.timeline if e.kind == "gate"]
    # the rollout hook's metadata asks for load: the timeline shows it as a load test
    loads = [e.text for e in report.timeline if e.kind == "load"]
    assert loads == ["load test: 20 req/s to app-canary for 1m, open (HTTP 200)"], loads
    confirms = [g for g in gates if g.startswith("confirm-promotion")]
    assert len(confirms) == 2, gates  # noted when the answer changes, not at every call
    assert confirms[0].startswith("confirm-promotion: closed (HTTP 403"), gates
    assert confirms[1].startswith("confirm-promotion: open (HTTP 200"), gates
    assert "confirm-promotion: closed (HTTP 403" in render_html(report)
    # the rollout hook: Flagger's payload, metadata verbatim, called while Progressing
    loads = receiver.got("rollout")
    assert len(loads) >= 3
    assert loads[0] == {
        "name": "app",
        "namespace": "",
        "phase": "Progressing",
        "checksum": "v2",
        "type": "rollout",
        "metadata": metadata,
    }
    confirm = receiver.got("confirm-promotion")[0]
    assert confirm["checksum"] == "v2" and confirm["metadata"] == {}


async def test_failing_pre_rollout_rolls_back_before_any_traffic_moves(
    procs: ProcessPool,
    workdir: Path,
    sockdir: Path,
    haproxy_binary: str,
    prometheus_env: tuple[str, int],
) -> None:
    """A pre-rollout hook that answers 500 counts against the failure threshold (2 here) and
    rolls the rollout back; the canary never had any traffic: HAProxy's weight stayed 0 and
    no look was taken at any other weight."""
    prometheus_url, exporter_port = prometheus_env
    haproxy = _haproxy(procs, workdir, sockdir, haproxy_binary)
    router = HAProxyRouter(haproxy.socket_path, "app", "primary", "canary")
    async with Receiver() as receiver:
        receiver.status["pre-rollout"] = 500
        config = _config(
            haproxy,
            prometheus_url,
            "gate-pre",
            workdir,
            gate_failure_threshold=2,
            webhooks=[{"type": "pre-rollout", "url": receiver.url("pre"), "timeout_s": 2}],
        )
        runner = build_runner(config, allow_webhook_hosts=("127.0.0.1",))
        weights: list[int] = []

        async def watch() -> None:
            while True:
                weights.append(await router.get_weight())
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        with Traffic(exporter_port, "gate-pre-p", "gate-pre-c"):
            try:
                status = await asyncio.wait_for(runner.run(), 60)
            finally:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
    assert status.phase is Phase.FAILED and status.outcome == "rolled_back"
    assert "pre-rollout gate failed 2 times (threshold 2)" in status.reason
    assert weights and set(weights) == {0}
    assert await router.get_weight() == 0
    assert len(receiver.got("pre-rollout")) == 2
    entries = read_record(runner.record_path)
    moves = [e.to_phase for e in entries if isinstance(e, TransitionEntry)]
    assert moves == ["RollingBack", "Failed"]
    assert all(e.weight_set == 0 for e in entries if isinstance(e, TickEntry))
    end = entries[-1]
    assert isinstance(end, EndEntry) and end.outcome == "rolled_back"
