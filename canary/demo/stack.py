"""The demo's processes: two service versions, HAProxy in front, Prometheus, a load generator.

Everything listens on 127.0.0.1 on free ports and runs under canary.demo.procs' supervision, so
each child is stopped by the PID we started, whichever way the demo ends (normal exit,
Ctrl-C, SIGTERM, or a setup error half way through). The stack is an async context manager
built on AsyncExitStack: whatever was started is stopped, in reverse order, and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import aiohttp

from canary.demo.loadgen import LoadGenerator
from canary.demo.procs import (
    HAProxyConfig,
    HAProxyProcess,
    HttpReady,
    ManagedProcess,
    ProcessError,
    PrometheusProcess,
    free_port,
)

__all__ = ["ServiceSpec", "Stack", "StackSettings", "service_process"]

LOOPBACK = "127.0.0.1"
BACKEND = "app"


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """How one version of the demo service behaves."""

    error_rate: float
    latency_ms: float
    latency_jitter: float
    seed: int | None = None


def service_process(
    version: str,
    *,
    port: int,
    log_path: Path,
    latency_ms: float,
    host: str = LOOPBACK,
    error_rate: float = 0.0,
    latency_jitter: float | None = None,
    seed: int | None = None,
    stop_grace: float = 5.0,
    name: str | None = None,
    cwd: Path | None = None,
) -> ManagedProcess:
    """The demo service (canary.demo.service) under this interpreter, ready once /healthz
    answers; not started yet."""
    argv = [sys.executable, "-m", "canary.demo.service", "--host", host, "--port", str(port)]
    argv += ["--version", version, "--error-rate", repr(error_rate)]
    argv += ["--latency-ms", repr(latency_ms)]
    if latency_jitter is not None:
        argv += ["--latency-jitter", repr(latency_jitter)]
    if seed is not None:
        argv += ["--seed", str(seed)]
    return ManagedProcess(
        argv,
        log_path=log_path,
        ready=HttpReady(f"http://{host}:{port}/healthz"),
        stop_grace=stop_grace,
        name=name,
        cwd=cwd,
    )


@dataclass(frozen=True, slots=True)
class StackSettings:
    primary: ServiceSpec
    canary: ServiceSpec
    rate: float = 200.0
    scrape_interval_s: float = 1.0


class Stack:
    """Starts the demo's processes on enter; stops every one of them on exit."""

    def __init__(self, settings: StackSettings, *, workdir: Path) -> None:
        self.settings = settings
        self.workdir = workdir
        self.processes: list[ManagedProcess] = []
        self.primary_addr = ""
        self.canary_addr = ""
        self.haproxy: HAProxyProcess | None = None
        self.prometheus: PrometheusProcess | None = None
        self.loadgen: LoadGenerator | None = None
        self._exit = contextlib.AsyncExitStack()
        self._loadgen_task: asyncio.Task[None] | None = None

    @property
    def socket_path(self) -> Path:
        return self.workdir / "haproxy.sock"

    @property
    def state_file(self) -> Path:
        return self.workdir / "haproxy.state"

    def pids(self) -> list[int]:
        """PIDs of every child started so far (for checks that none outlives the demo)."""
        return [p.pid for p in self.processes if p.pid is not None]

    async def _start(self, process: ManagedProcess) -> None:
        # Registered before starting: a process that fails readiness is stopped all the same.
        self.processes.append(process)
        self._exit.push_async_callback(process.stop)
        await process.start()

    def _service(self, version: str, spec: ServiceSpec, port: int) -> ManagedProcess:
        return service_process(
            version,
            port=port,
            log_path=self.workdir / f"service-{version}.log",
            error_rate=spec.error_rate,
            latency_ms=spec.latency_ms,
            latency_jitter=spec.latency_jitter,
            seed=spec.seed,
            stop_grace=3.0,
            name=f"service-{version}",
        )

    async def __aenter__(self) -> Self:
        try:
            await self._start_all()
        except BaseException:
            await self._exit.aclose()
            raise
        return self

    async def _start_all(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        primary_port, canary_port = free_port(), free_port()
        self.primary_addr = f"{LOOPBACK}:{primary_port}"
        self.canary_addr = f"{LOOPBACK}:{canary_port}"
        await asyncio.gather(
            self._start(self._service("primary", self.settings.primary, primary_port)),
            self._start(self._service("canary", self.settings.canary, canary_port)),
        )
        self.haproxy = HAProxyProcess(
            HAProxyConfig(
                frontend_port=free_port(),
                primary_addr=self.primary_addr,
                canary_addr=self.canary_addr,
                socket_path=self.socket_path,
                state_file=self.state_file,
                backend=BACKEND,
                primary_weight=100,
                canary_weight=0,
            ),
            workdir=self.workdir,
        )
        self.prometheus = PrometheusProcess(
            [self.primary_addr, self.canary_addr],
            workdir=self.workdir / "prometheus",
            scrape_interval_s=self.settings.scrape_interval_s,
        )
        await asyncio.gather(self._start(self.haproxy), self._start(self.prometheus))
        self.loadgen = LoadGenerator(self.haproxy.url, rate=self.settings.rate)
        self._loadgen_task = asyncio.create_task(self.loadgen.run(), name="loadgen")
        self._exit.push_async_callback(self._stop_loadgen)

    async def _stop_loadgen(self) -> None:
        task = self._loadgen_task
        if task is None:
            return
        if self.loadgen is not None:
            self.loadgen.stop()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=2.0)
        except TimeoutError:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def wait_for_metrics(self, *, timeout_s: float = 30.0) -> None:
        """Wait until Prometheus scrapes both services and has the primary's traffic.

        Without this the rollout's first ticks would be "no data" only because the first
        scrape has not happened yet; the analysis would cope, but the demo would mislead.
        """
        assert self.prometheus is not None
        url = f"{self.prometheus.url}/api/v1/query"
        checks = {
            'count(up{job="canary"} == 1)': 2.0,
            'count(http_requests_total{version="primary"})': 1.0,
        }
        deadline = asyncio.get_running_loop().time() + timeout_s
        timeout = aiohttp.ClientTimeout(total=2.0)
        last = "no answer yet"
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while asyncio.get_running_loop().time() < deadline:
                try:
                    ready = True
                    for query, wanted in checks.items():
                        async with session.get(url, params={"query": query}) as response:
                            body = await response.json()
                        result = body.get("data", {}).get("result", [])
                        value = float(result[0]["value"][1]) if result else 0.0
                        if value < wanted:
                            ready, last = False, f"{query} is {value:g}, waiting for {wanted:g}"
                            break
                    if ready:
                        return
                except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
                    last = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(0.25)
        raise ProcessError(
            f"Prometheus at {self.prometheus.url} has no metrics from the services after "
            f"{timeout_s:g}s ({last}); its log: {self.prometheus.log_path}"
        )

    def loadgen_failed(self) -> BaseException | None:
        """The load generator's exception if it died (it should not)."""
        task = self._loadgen_task
        if task is None or not task.done() or task.cancelled():
            return None
        return task.exception()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._exit.aclose()
