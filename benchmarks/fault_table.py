"""Faults injected during rollouts: the outcome of each, and that nothing promoted without evidence.

    python -m benchmarks.fault_table [--only NAME ...] [--seed S]

Issue 11's figure: "faults injected during rollouts (Prometheus down, router down or lying,
API 409/429/5xx, disk full, read-only disk, clock +-1 h): for each, the outcome and that
nothing promoted without evidence". Each row is one rollout, run to its end (or to a bound,
then reported as held in its phase).

Static mode: the one RolloutRunner in this process, with the real HAProxy router and the real
Prometheus of a demo stack (canary.demo.stack: two demo-service processes, HAProxy, Prometheus,
load through HAProxy), its status and record in files. What is real and what is not:

- Prometheus down: the Prometheus process is stopped by PID (and, in the "back" row, a new one
  started on the same port and TSDB).
- router down: the HAProxy process is stopped by PID (and, in the "back" row, started again
  from its config and server-state file).
- router lying: a wrapper around the real HAProxyRouter (a fake: HAProxy itself does not lie):
  "reads wrong" reports 30 points more than HAProxy has; "drops writes" acknowledges and
  reports the wanted weight but never sends it to HAProxy.
- disk full: the record and status live on a 64 KiB tmpfs (`mount -t tmpfs -o size=64k`), filled
  up by a filler file mid-rollout (and freed again in the "freed" row).
- read-only disk: the record lives on a tmpfs remounted read-only mid-rollout (`mount -o
  remount,ro`); the status stays on the normal disk, because its lock file is held open for
  writing and a mount with a writer cannot be made read-only.
- clock +-1 h: the runner's clock is `MonotonicWallClock(wall=...)` with a wall function that
  steps by +-3600 s mid-rollout. The machine's clock is shared and not stepped, so Prometheus
  (which stamps samples with it) cannot follow; these rows use a fake metric source (equal
  error rates on both arms, counts growing with the HAProxy weight read back) with the real
  HAProxy router.

Kubernetes mode: the Operator in this process on the API emulator (tests/support/kube_emulator.py:
the one place faults are injected, by status, verb, resource and count), metrics from a real
Prometheus scraping two demo-service exporters, requests split by the canary Ingress' weight.

"Promoted without evidence": a rollout that promoted although, before an `analysis passed`
transition, the tick that caused it did not read back the step's weight from the router
(weight_read == weight_set == the step's weight) with a `pass` verdict, or although some step
never had such a tick. Checked on every entry the runner produced (entry observers, so also
entries a full disk kept out of the file) and, in Kubernetes, on the record ConfigMap.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
STEPS = (20, 50)


@dataclass
class Row:
    mode: str
    fault: str
    injected: str
    outcome: str = ""
    evidence: str = ""
    record: str = ""
    detail: str = ""
    final_weight: int | None = None
    seconds: float = 0.0


def evidence_problems(entries: list[Any], steps: tuple[int, ...]) -> list[str]:
    """Why a promotion in `entries` lacked evidence ([] when every step had it)."""
    from analysis import Decision
    from canary.core.records import EndEntry, TickEntry, TransitionEntry

    problems: list[str] = []
    last_tick: Any = None
    proven: set[int] = set()
    for entry in entries:
        if isinstance(entry, TickEntry):
            last_tick = entry
        elif isinstance(entry, TransitionEntry) and entry.reason.startswith("analysis passed"):
            tick = last_tick
            if tick is None:
                problems.append(f"'{entry.reason}' with no tick before it")
                continue
            wanted = steps[tick.step] if tick.step < len(steps) else None
            decision = tick.verdict.decision if tick.verdict is not None else None
            if decision != Decision.PASS:
                problems.append(f"step {tick.step} passed on verdict {decision}")
            if not (tick.weight_read == tick.weight_set == wanted):
                problems.append(
                    f"step {tick.step} passed with weight read {tick.weight_read}, "
                    f"set {tick.weight_set}, step weight {wanted}"
                )
            proven.add(tick.step)
        elif isinstance(entry, EndEntry) and entry.outcome == "promoted":
            missing = sorted(set(range(len(steps))) - proven)
            if missing:
                problems.append(f"promoted with no passing, verified tick at steps {missing}")
    return problems


def _analysis() -> Any:
    from analysis import AnalysisConfig, Analyzer

    config = AnalysisConfig.model_validate(
        {
            "min_samples": 100,
            "quantiles": [0.5],
            "errors": {"tolerance": 5.0, "abs_tolerance": 0.05},
            "latency": {"tolerance": 1.0, "abs_tolerance": 0.05},
        }
    )
    return lambda: Analyzer(config)


# ---- fakes where the fault cannot be produced for real -----------------------------------


class LyingRouter:
    """The real router, lying: `mode` "reads-wrong" adds 30 points to what it reads back;
    "drops-writes" acknowledges every write without sending it and reads back the last
    weight asked for."""

    def __init__(self, router: Any, mode: str) -> None:
        self.router = router
        self.name = f"lying:{router.name}"
        self.mode = mode
        self.lying = False
        self.asked: int | None = None

    async def set_weight(self, canary_percent: int) -> None:
        self.asked = canary_percent
        if self.lying and self.mode == "drops-writes":
            return
        await self.router.set_weight(canary_percent)

    async def get_weight(self) -> int:
        real = int(await self.router.get_weight())
        if not self.lying:
            return real
        if self.mode == "reads-wrong":
            return min(100, real + 30)
        return self.asked if self.asked is not None else real


class FakeCounts:
    """A metric source without Prometheus: both arms at 300 requests/s split by the weight
    HAProxy reports, 0.5% errors, latency under 0.1 s; cumulative since the first fetch of
    each analysis (`since`), in the runner's own time domain."""

    def __init__(self, router: Any, seed: int) -> None:
        from analysis import ArmCounts

        self.router = router
        self.rng = random.Random(seed)
        self.ArmCounts = ArmCounts
        self.since: float | None = None
        self.last: float | None = None
        self.counts = {"primary": [0, 0, 0], "canary": [0, 0, 0]}  # requests, errors, fast

    async def fetch(self, *, since: float, now: float) -> Any:
        from canary.metrics.base import ArmsCounts

        if self.since is None or abs(since - self.since) > 1e-6:
            self.since, self.last = since, since
            self.counts = {"primary": [0, 0, 0], "canary": [0, 0, 0]}
        weight = await self.router.get_weight()
        dt = max(0.0, now - (self.last or now))
        self.last = now
        for arm, share in (("primary", 100 - weight), ("canary", weight)):
            n = int(300 * dt * share / 100)
            errors = sum(self.rng.random() < 0.005 for _ in range(n))
            fast = sum(self.rng.random() < 0.6 for _ in range(n))
            c = self.counts[arm]
            c[0], c[1], c[2] = c[0] + n, c[1] + errors, c[2] + fast
        arms = {
            arm: self.ArmCounts(
                requests=c[0],
                errors=c[1],
                latency_buckets={0.05: c[2], 0.1: c[0], float("inf"): c[0]},
            )
            for arm, c in self.counts.items()
        }
        return ArmsCounts(primary=arms["primary"], canary=arms["canary"])


class SteppedWall:
    """time.time(), plus `offset` once stepped."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


# ---- static mode -------------------------------------------------------------------------


class Tmpfs:
    """A small tmpfs mounted at `path` (root only), unmounted at the end."""

    def __init__(self, path: Path, size: str = "64k") -> None:
        self.path = path
        self.size = size

    def __enter__(self) -> Tmpfs:
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(self.path)], check=True
        )
        return self

    def remount(self, mode: str) -> None:
        for _ in range(50):  # EBUSY while a record append holds the file open
            done = subprocess.run(
                ["mount", "-o", f"remount,{mode}", str(self.path)], capture_output=True
            )
            if done.returncode == 0:
                return
            time.sleep(0.02)
        raise RuntimeError(f"remount,{mode} {self.path}: {done.stderr.decode().strip()}")

    def fill(self) -> None:
        with contextlib.suppress(OSError), open(self.path / "filler", "wb", buffering=0) as handle:
            while True:
                handle.write(b"\0" * 512)

    def free(self) -> None:
        with contextlib.suppress(OSError):
            (self.path / "filler").unlink()

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.remount("rw")
        subprocess.run(["umount", str(self.path)], check=False)


@dataclass
class Scenario:
    name: str
    injected: str
    inject: Callable[[Any], Awaitable[None]]
    heal: Callable[[Any], Awaitable[None]] | None = None
    heal_after_s: float = 0.0
    router: str = "real"  # real | reads-wrong | drops-writes
    fake_metrics: bool = False
    disk: str = ""  # "" | "full" | "ro"
    bound_s: float = 45.0
    # After the rollout: free the disk and start a second controller on the same files.
    restart_after: bool = False


@dataclass
class StaticWorld:
    stack: Any
    base: Path
    haproxy: Any = None  # restarted HAProxyProcess, if any
    prometheus: Any = None  # restarted PrometheusProcess, if any
    runner: Any = None
    lying: LyingRouter | None = None
    wall: SteppedWall | None = None
    tmpfs: Tmpfs | None = None
    extra: list[Any] = field(default_factory=list)

    @property
    def current_haproxy(self) -> Any:
        return self.haproxy or self.stack.haproxy

    @property
    def current_prometheus(self) -> Any:
        return self.prometheus or self.stack.prometheus


async def stop_prometheus(world: StaticWorld) -> None:
    await world.current_prometheus.stop()


async def start_prometheus(world: StaticWorld) -> None:
    from canary.demo.procs import PrometheusProcess

    old = world.stack.prometheus
    proc = PrometheusProcess(
        [world.stack.primary_addr, world.stack.canary_addr],
        workdir=old.config_path.parent,
        port=old.port,
        scrape_interval_s=old.scrape_interval_s,
    )
    await proc.start()
    world.prometheus = proc
    world.extra.append(proc)


async def stop_haproxy(world: StaticWorld) -> None:
    await world.current_haproxy.stop()


async def start_haproxy(world: StaticWorld) -> None:
    from canary.demo.procs import HAProxyProcess

    proc = HAProxyProcess(world.stack.haproxy.config, workdir=world.stack.workdir)
    await proc.start()
    world.haproxy = proc
    world.extra.append(proc)


async def lie(world: StaticWorld) -> None:
    assert world.lying is not None
    world.lying.lying = True


async def truth(world: StaticWorld) -> None:
    assert world.lying is not None
    world.lying.lying = False


def step_clock(offset: float) -> Callable[[StaticWorld], Awaitable[None]]:
    async def inject(world: StaticWorld) -> None:
        assert world.wall is not None
        world.wall.offset = offset

    return inject


async def fill_disk(world: StaticWorld) -> None:
    assert world.tmpfs is not None
    await asyncio.to_thread(world.tmpfs.fill)


async def free_disk(world: StaticWorld) -> None:
    assert world.tmpfs is not None
    await asyncio.to_thread(world.tmpfs.free)


async def read_only(world: StaticWorld) -> None:
    assert world.tmpfs is not None
    await asyncio.to_thread(world.tmpfs.remount, "ro")


async def read_write(world: StaticWorld) -> None:
    assert world.tmpfs is not None
    await asyncio.to_thread(world.tmpfs.remount, "rw")


STATIC: list[Scenario] = [
    Scenario("none (baseline)", "nothing", lambda w: asyncio.sleep(0)),
    Scenario(
        "Prometheus down, back after 4 s",
        "Prometheus process stopped at 20%, a new one started 4 s later",
        stop_prometheus,
        start_prometheus,
        4.0,
    ),
    Scenario(
        "Prometheus down for good",
        "Prometheus process stopped at 20%",
        stop_prometheus,
        start_prometheus,
        30.0,
    ),
    Scenario(
        "router down, back after 4 s",
        "HAProxy stopped at 20%, restarted 4 s later (state file)",
        stop_haproxy,
        start_haproxy,
        4.0,
    ),
    Scenario(
        "router down for good",
        "HAProxy stopped at 20%, never restarted in the bound",
        stop_haproxy,
        start_haproxy,
        30.0,
        bound_s=25.0,
    ),
    Scenario(
        "router lying: reads 30 points high",
        "wrapper adds 30 to every read from 20% on",
        lie,
        truth,
        30.0,
        router="reads-wrong",
        bound_s=25.0,
    ),
    Scenario(
        "router lying: drops writes, reports them done",
        "wrapper acknowledges writes without sending them from 20% on",
        lie,
        truth,
        60.0,
        router="drops-writes",
        bound_s=30.0,
    ),
    Scenario(
        "disk full",
        "64 KiB tmpfs (record + status) filled at 20%, never freed",
        fill_disk,
        None,
        0.0,
        disk="full",
    ),
    Scenario(
        "disk full, then a restart",
        "64 KiB tmpfs filled at 20%; after the end, the disk "
        "freed and a new runner started on the same status and record",
        fill_disk,
        None,
        0.0,
        disk="full",
        restart_after=True,
    ),
    Scenario(
        "disk full, freed after 3 s",
        "64 KiB tmpfs filled at 20%, filler deleted 3 s later",
        fill_disk,
        free_disk,
        3.0,
        disk="full",
    ),
    Scenario(
        "read-only disk",
        "record tmpfs remounted ro at 20%, never rw again",
        read_only,
        None,
        0.0,
        disk="ro",
    ),
    Scenario(
        "read-only disk, rw after 3 s",
        "record tmpfs remounted ro at 20%, rw 3 s later",
        read_only,
        read_write,
        3.0,
        disk="ro",
    ),
    Scenario(
        "clock +1 h",
        "runner's wall clock stepped +3600 s at 20% (fake metrics)",
        step_clock(3600.0),
        fake_metrics=True,
    ),
    Scenario(
        "clock -1 h",
        "runner's wall clock stepped -3600 s at 20% (fake metrics)",
        step_clock(-3600.0),
        fake_metrics=True,
    ),
]


async def run_static(scenario: Scenario, world: StaticWorld, index: int, seed: int) -> Row:
    from canary.core.records import read_record
    from canary.core.rollout import RolloutSpec
    from canary.metrics.prometheus import PrometheusMetrics, PromQueries
    from canary.routers.haproxy import HAProxyRouter
    from canary.runner import RolloutRunner
    from canary.runner.clock import MonotonicWallClock

    row = Row("static", scenario.name, scenario.injected)
    run_dir = world.base / f"static-{index:02d}"
    run_dir.mkdir(parents=True)
    real = HAProxyRouter(world.stack.socket_path, "app", "primary", "canary", timeout_s=2)
    await real.set_weight(0)
    router: Any = real
    world.lying = None
    if scenario.router != "real":
        world.lying = router = LyingRouter(real, scenario.router)
    world.wall = SteppedWall()
    clock = MonotonicWallClock(wall=world.wall)
    metrics: Any
    if scenario.fake_metrics:
        metrics = FakeCounts(real, seed)
    else:
        metrics = PrometheusMetrics(
            world.stack.prometheus.url, queries=PromQueries(selector='job="canary"'), timeout_s=2
        )
    record_dir = run_dir / "records"
    status_dir = record_dir
    world.tmpfs = None
    stack = contextlib.ExitStack()
    if scenario.disk:
        world.tmpfs = stack.enter_context(Tmpfs(record_dir))
        if scenario.disk == "ro":
            status_dir = run_dir / "status"
    seen: list[Any] = []

    def make_runner() -> Any:
        return RolloutRunner(
            name="ft",
            spec=RolloutSpec(steps=STEPS, min_step_s=1, max_step_s=20, no_data_deadline_s=8),
            router=router,
            metrics=metrics,
            record_path=record_dir / "ft.jsonl",
            status_path=status_dir / "ft.status.json",
            tick_s=0.25,
            analyzer_factory=_analysis(),
            revision=f"v{index}",
            canary_version=f"v{index}",
            clock=clock,
            router_timeout_s=3,
            entry_observers=[seen.append],
        )

    runner = make_runner()
    world.runner = runner
    started = time.monotonic()
    with stack:
        task = asyncio.create_task(runner.run())
        healer: asyncio.Task[None] | None = None
        try:
            # Inject once the first step's weight is verified and a few ticks have passed.
            while not (
                runner.status.stage == "Progressing"
                and runner.status.weight_verified
                and runner.status.step_started_at is not None
            ):
                if task.done():
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            step_at = runner.status.step
            await scenario.inject(world)
            row.injected += f" (injected at step {step_at}, {runner.status.weight}%)"
            if scenario.heal is not None:

                async def heal() -> None:
                    await asyncio.sleep(scenario.heal_after_s)
                    await scenario.heal(world)  # type: ignore[misc]

                healer = asyncio.create_task(heal())
            try:
                await asyncio.wait_for(asyncio.shield(task), scenario.bound_s)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if healer is not None:
                healer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await healer
        row.seconds = time.monotonic() - started
        status = runner.status
        row.outcome = (
            status.outcome
            if status.done
            else f"held: {status.phase.value} at {status.weight}% after {scenario.bound_s:g}s"
        )
        if status.done and status.outcome:
            row.outcome = status.outcome
        row.detail = status.reason[:140]
        problems = evidence_problems(seen, STEPS)
        promoted = status.done and status.outcome == "promoted"
        row.evidence = (
            "no: " + "; ".join(problems) if problems and promoted else "yes" if promoted else "n/a"
        )
        if scenario.restart_after and world.tmpfs is not None:
            world.tmpfs.free()
            first = row.outcome
            before = await real.get_weight()
            second = make_runner()
            polled: list[int] = []

            async def poll() -> None:
                while True:
                    with contextlib.suppress(Exception):
                        weight = await real.get_weight()
                        if not polled or polled[-1] != weight:
                            polled.append(weight)
                    await asyncio.sleep(0.05)

            poller = asyncio.create_task(poll())
            try:
                await asyncio.wait_for(second.run(), 15)
            except TimeoutError:
                pass
            except Exception as exc:
                row.detail += f" | restart: {exc!r}"[:160]
            finally:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller
            after = await real.get_weight()
            row.outcome = (
                f"{first}; after the restart: {second.status.phase.value} "
                f"({second.status.outcome or 'no outcome'}), router {before}% -> "
                f"{' -> '.join(f'{w}%' for w in polled) or after}"
            )
            problems = evidence_problems(seen, STEPS)
            if second.status.done and second.status.outcome == "promoted" and problems:
                row.evidence = "no: " + "; ".join(problems)
        try:
            entries = read_record(record_dir / "ft.jsonl")
            row.record = f"readable, {len(entries)} of {len(seen)} entries"
        except Exception as exc:
            row.record = f"UNREADABLE: {exc}"[:160]
        if world.tmpfs is not None:
            if scenario.disk == "ro":
                world.tmpfs.remount("rw")
            import shutil  # the tmpfs goes away with the row: keep its files

            shutil.copytree(record_dir, run_dir / "records-kept", dirs_exist_ok=True)
    # heal for the next scenario: a stopped server is started again
    if not world.current_prometheus.running:
        await start_prometheus(world)
    if not world.current_haproxy.running:
        await start_haproxy(world)
    with contextlib.suppress(Exception):
        row.final_weight = await real.get_weight()
    if scenario.router == "drops-writes":
        row.detail += f" | HAProxy really at {row.final_weight}%"
    metrics_close = getattr(metrics, "close", None)
    if metrics_close is not None:
        metrics_close()
    return row


async def static_table(args: argparse.Namespace, base: Path) -> list[Row]:
    from canary.demo.stack import ServiceSpec, Stack, StackSettings

    spec = ServiceSpec(error_rate=0.005, latency_ms=5.0, latency_jitter=0.3, seed=args.seed)
    settings = StackSettings(primary=spec, canary=spec, rate=300.0, scrape_interval_s=0.5)
    rows: list[Row] = []
    async with Stack(settings, workdir=base / "stack") as stack:
        world = StaticWorld(stack, base)
        try:
            await stack.wait_for_metrics()
            for index, scenario in enumerate(STATIC):
                if args.only and not any(o in scenario.name for o in args.only):
                    continue
                row = await run_static(scenario, world, index, args.seed)
                rows.append(row)
                print(_line(row), flush=True)
        finally:
            for proc in reversed(world.extra):
                await proc.stop()
    return rows


# ---- Kubernetes mode ---------------------------------------------------------------------


@dataclass
class KubeScenario:
    name: str
    faults: list[dict[str, Any]]  # KubeEmulator.inject keyword arguments


KUBE: list[KubeScenario] = [
    KubeScenario("none (baseline)", []),
    KubeScenario(
        "API 409 on Deployment writes",
        [dict(status=409, times=6, verb="patch", resource="deployments")],
    ),
    KubeScenario(
        "API 429 (Retry-After 1) on everything", [dict(status=429, times=8, retry_after=1)]
    ),
    KubeScenario(
        "API 500 on Ingress reads and writes", [dict(status=500, times=20, resource="ingresses")]
    ),
    KubeScenario("API 503 on everything, 40 requests", [dict(status=503, times=40)]),
    KubeScenario(
        "API 500 on record ConfigMaps", [dict(status=500, times=30, resource="configmaps")]
    ),
    KubeScenario(
        "API 500 on Ingresses for good",
        [dict(status=500, times=100_000, resource="ingresses")],
    ),
]


async def kube_table(args: argparse.Namespace, base: Path) -> list[Row]:
    import aiohttp

    sys.path.insert(0, str(ROOT / "tests"))
    from support.kube import FAST_RETRY
    from support.kube_emulator import KubeEmulator

    from benchmarks.kill_campaign import (
        DEPLOYMENTS,
        NS,
        RECORDS_NS,
        _seed_cluster,
        ingress_weight,
        kube_state,
    )
    from canary.demo.procs import HttpReady, ManagedProcess, find_binary, free_port
    from canary.demo.stack import service_process
    from canary.kubernetes.client import Kube
    from canary.kubernetes.operator import Operator, OperatorSettings, template_hash
    from canary.kubernetes.record_store import unpack_record

    rows: list[Row] = []
    procs: list[ManagedProcess] = []
    ports = {"primary": free_port(), "canary": free_port()}
    try:
        for version, port in ports.items():
            proc = service_process(
                version,
                port=port,
                log_path=base / f"{version}.log",
                error_rate=0.005,
                latency_ms=5,
                seed=args.seed,
                name=version,
                cwd=ROOT,
            )
            procs.append(proc)
            await proc.start()
        prom_port = free_port()
        groups = "".join(
            f'      - targets: ["{LOOPBACK}:{ports[arm]}"]\n'
            f'        labels: {{namespace: "{NS}", service: "app-{arm}"}}\n'
            for arm in ("primary", "canary")
        )
        (base / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 500ms\n  evaluation_interval: 500ms\n"
            "scrape_configs:\n  - job_name: apps\n    scrape_interval: 500ms\n"
            "    scrape_timeout: 500ms\n    static_configs:\n" + groups
        )
        prometheus = ManagedProcess(
            [
                find_binary("prometheus", fallbacks=("/usr/bin/prometheus",)),
                f"--config.file={base / 'prometheus.yml'}",
                f"--storage.tsdb.path={base / 'tsdb'}",
                f"--web.listen-address={LOOPBACK}:{prom_port}",
                "--log.level=warn",
            ],
            log_path=base / "prometheus.log",
            ready=HttpReady(f"http://{LOOPBACK}:{prom_port}/-/ready"),
            ready_timeout=30,
            name="prometheus",
        )
        procs.append(prometheus)
        await prometheus.start()
        urls = {arm: f"http://{LOOPBACK}:{port}/" for arm, port in ports.items()}
        async with KubeEmulator() as api:
            _seed_cluster(api)
            config = api.write_kubeconfig(base / "kubeconfig", token="ft")
            kube = await Kube.connect(kubeconfig=str(config), retry=FAST_RETRY)
            operator = Operator(
                kube,
                OperatorSettings(
                    prometheus_url=f"http://{LOOPBACK}:{prom_port}",
                    record_namespace=RECORDS_NS,
                    namespace=NS,
                    tick_s=0.3,
                    record_flush_s=0.0,
                    promote_poll_s=0.05,
                    identity="fault-table",
                ),
            )
            op_task = asyncio.create_task(operator.run())
            rng = random.Random(args.seed)

            async def traffic() -> None:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:

                    async def one(url: str) -> None:
                        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                            async with s.get(url) as response:
                                await response.read()

                    while True:
                        weight = ingress_weight(api)
                        chosen = [
                            urls["canary"] if rng.random() * 100 < weight else urls["primary"]
                            for _ in range(10)
                        ]
                        await asyncio.gather(*(one(u) for u in chosen), asyncio.sleep(10 / 300))

            load = asyncio.create_task(traffic())
            try:
                deadline = time.monotonic() + 60
                while not ((st := kube_state(api)) and st.primary_revision):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the operator never initialised")
                    await asyncio.sleep(0.1)
                for index, scenario in enumerate(KUBE):
                    if args.only and not any(o in scenario.name for o in args.only):
                        continue
                    row = Row("kubernetes", scenario.name, "")
                    obj = api.get(*DEPLOYMENTS, NS, "app")
                    image = f"example/app:{index + 2}"
                    obj["spec"]["template"]["spec"]["containers"][0]["image"] = image
                    revision = template_hash(obj)
                    api.put(*DEPLOYMENTS, obj)
                    started = time.monotonic()

                    def ours() -> Any:
                        st = kube_state(api)
                        ok = st and st.rollout and st.rollout.revision == revision  # noqa: B023 (used in this iteration only)
                        return st if ok else None

                    while not (
                        (st := ours())
                        and st.rollout.stage == "Progressing"
                        and st.rollout.weight_verified
                        and st.rollout.step_started_at is not None
                    ):
                        if time.monotonic() - started > 60:
                            break
                        await asyncio.sleep(0.05)
                    await asyncio.sleep(0.5)
                    st = ours()
                    where = f"{st.rollout.weight}%" if st and st.rollout else "?"
                    for fault in scenario.faults:
                        api.inject(**fault)
                    row.injected = (
                        ", ".join(
                            f"{f['status']} x{f['times']}"
                            + (
                                " on "
                                + " ".join(x for x in (f.get("verb"), f.get("resource")) if x)
                                if f.get("resource") or f.get("verb")
                                else " on every request"
                            )
                            + (f" Retry-After {f['retry_after']}" if f.get("retry_after") else "")
                            for f in scenario.faults
                        )
                        or "nothing"
                    ) + f" (at {where})"
                    bound = 60.0
                    while time.monotonic() - started < bound:
                        st = ours()
                        if st and st.rollout.done:
                            break
                        await asyncio.sleep(0.1)
                    # the faults left are cleared for the next row
                    api.faults.clear()
                    row.seconds = time.monotonic() - started
                    st = ours()
                    if st is None:
                        row.outcome = "never started"
                        rows.append(row)
                        print(_line(row), flush=True)
                        continue
                    status = st.rollout
                    row.outcome = (
                        status.outcome
                        if status.done
                        else f"held: {status.phase.value} at {status.weight}% after {bound:g}s"
                    )
                    row.detail = (status.reason or status.message)[:140]
                    if st.record_error:
                        row.detail += f" | record error: {st.record_error[:80]}"
                    row.final_weight = ingress_weight(api)
                    entries: list[Any] = []
                    try:
                        namespace, _, name = st.record.partition("/")
                        entries = unpack_record(_record_dump(api, namespace, name))
                        row.record = f"readable, {len(entries)} entries"
                    except Exception as exc:
                        row.record = f"UNREADABLE: {exc!r}"[:160]
                    promoted = status.done and status.outcome == "promoted"
                    problems = evidence_problems(entries, STEPS)
                    primary_image = api.get(*DEPLOYMENTS, NS, "app-primary")["spec"]["template"][
                        "spec"
                    ]["containers"][0]["image"]
                    if promoted and primary_image != image:
                        problems.append(f"promoted but app-primary runs {primary_image}")
                    if not promoted and primary_image == image:
                        problems.append(f"not promoted but app-primary runs {primary_image}")
                    row.evidence = (
                        "no: " + "; ".join(problems) if problems else "yes" if promoted else "n/a"
                    )
                    if not status.done:
                        # end this rollout on purpose before the next row
                        row.detail += " | then aborted by the table"
                        from canary.kubernetes.commands import send_command

                        with contextlib.suppress(Exception):
                            await send_command(
                                kube,
                                NS,
                                "app",
                                "abort",
                                who="fault-table",
                                reason="end of row",
                                wait_s=20,
                            )
                    rows.append(row)
                    print(_line(row), flush=True)
            finally:
                load.cancel()
                op_task.cancel()
                for task in (load, op_task):
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
                await kube.close()
    finally:
        for proc in reversed(procs):
            await proc.stop()
    return rows


# ---- output ------------------------------------------------------------------------------


def _line(row: Row) -> str:
    return (
        f"{row.mode:10} | {row.fault:45} | {row.outcome:30} | evidence {row.evidence:5} | "
        f"{row.record} | weight {row.final_weight} | {row.seconds:.0f}s | {row.detail}"
    )


def check_end(row: Row) -> None:
    """A promotion must leave the real router where the promotion puts it (static: 100% to
    the canary; Kubernetes: 0%, the template copied): a router that only says so (the lying
    rows) promoted a canary that was never observed at the later steps."""
    if not row.outcome.startswith("promoted") or row.final_weight is None:
        return
    wanted = 100 if row.mode == "static" else 0
    if row.final_weight != wanted and not row.evidence.startswith("no"):
        row.evidence = (
            f"no: promoted while the router really serves {row.final_weight}% "
            f"(the record's read-backs said {wanted}%)"
        )


def table(rows: list[Row]) -> str:
    lines = [
        "| mode | fault | injected | outcome | promoted only with evidence | record | router at end | why (status) |",
        "|---|---|---|---|---|---|---:|---|",
    ]
    for r in rows:
        cells = [
            r.mode,
            r.fault,
            r.injected,
            r.outcome,
            r.evidence,
            r.record,
            "" if r.final_weight is None else f"{r.final_weight}%",
            r.detail,
        ]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("static", "kubernetes", "both"), default="both")
    parser.add_argument("--only", nargs="*", default=[], help="rows whose name contains this")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--table", type=Path, help="only print the table of a rows.json")
    args = parser.parse_args(argv)
    if args.table:
        loaded = [Row(**r) for r in json.loads(args.table.read_text())]
        for row in loaded:
            check_end(row)
        print(table(loaded))
        return 0
    if os.geteuid() != 0 and args.mode != "kubernetes":
        print("the disk rows mount a tmpfs: run as root", file=sys.stderr)
    base = args.workdir or Path(tempfile.mkdtemp(prefix="faults-"))
    base.mkdir(parents=True, exist_ok=True)
    print(f"workdir {base}", flush=True)
    started = time.monotonic()
    rows: list[Row] = []
    if args.mode in ("static", "both"):
        rows += asyncio.run(static_table(args, base / "static"))
    if args.mode in ("kubernetes", "both"):
        (base / "kube").mkdir(exist_ok=True)
        rows += asyncio.run(kube_table(args, base / "kube"))
    for row in rows:
        check_end(row)
    print(f"\nwall {time.monotonic() - started:.0f} s\n")
    print(table(rows), flush=True)
    (base / "rows.json").write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    bad = [r for r in rows if r.evidence.startswith("no") or r.record.startswith("UNREADABLE")]
    return 1 if bad else 0


def _record_dump(api: Any, namespace: str, head: str) -> dict[str, Any]:
    """A record's head and chunks (by their label), as `kubectl get -l` dumps them."""
    items = [
        o
        for k, o in api.objects.items()
        if k[2] == "configmaps"
        and k[3] == namespace
        and (
            o["metadata"].get("name") == head
            or (o["metadata"].get("labels") or {}).get("canary.io/record") == head
        )
    ]
    return {"kind": "List", "items": items}


if __name__ == "__main__":
    sys.exit(main())
