"""`canary demo --failover`: a primary-cluster outage and the failback, on this machine, measured.

Two "clusters" are two copies of the demo service on distinct loopback entry points
(127.0.0.10 and 127.0.0.20, same port), behind a real PowerDNS whose LUA `pickwrandom` record
(TTL 1 s) splits the service's name 90/10 between them. A load generator plays 20 clients that
resolve the name through that PowerDNS every TTL and send their requests to the answer. The
real FailoverController probes both entry points.

Then the demo stops the primary's service, and prints when the controller moved the DNS
weight and when every client had moved (measured at the load generator, from the requests it
sent), against the bound: probe interval x N (+ one probe timeout) + TTL. It brings the primary
back and runs `failback` (as `canary failback` would; or waits for the automatic one with
--auto-failback) and prints how long that move took too.

Exit status: 0 both moves within their bounds, 1 otherwise, 2 setup error (pdns_server
missing: `scripts/setup --dns`), 130/143 when interrupted. Every child is stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import os
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from canary.clusters.failover_controller import FailoverController
from canary.clusters.health import EntryPointHealth, HealthMonitor, http_check
from canary.core.failover import FailoverCommand, FailoverPolicy, Mode
from canary.core.logs import LOG_FORMATS, LogFormat, configure_logging
from canary.demo.dnsload import DnsLoadGenerator
from canary.demo.procs import (
    POWERDNS_SQLITE3_SCHEMA,
    ManagedProcess,
    PowerDNSProcess,
    ProcessError,
    find_binary,
    free_port,
)
from canary.demo.running import EXIT_SETUP, complain, run_in_workdir, say
from canary.demo.stack import service_process
from canary.routers.powerdns import PowerDNSRouter

__all__ = ["FailoverDemoOptions", "main", "parse_args", "run_failover_demo"]

PRIMARY_IP, STANDBY_IP = "127.0.0.10", "127.0.0.20"
ZONE = "demo.test."
NAME = "shop.demo.test."
API_KEY = "canary-demo"
EXIT_OK, EXIT_SLOW = 0, 1  # EXIT_SETUP 2


class FailoverDemoOptions(argparse.Namespace):
    rate: float
    probe_interval: float
    failures: int
    ttl: int
    steady: int
    auto_failback: bool
    healthy_seconds: float
    keep_workdir: bool
    record_dir: Path
    log_format: LogFormat


def build_parser(prog: str = "canary demo --failover") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="A primary-cluster outage on this machine: two entry points on 127.0.0.10 "
        "and 127.0.0.20 behind a real PowerDNS, a load generator resolving through it, the "
        "failover controller, then failback. Prints how long each move took.",
    )
    parser.add_argument("--rate", type=float, default=100.0, help="requests/s (default 100)")
    parser.add_argument(
        "--probe-interval", type=float, default=0.5, help="seconds between probes (default 0.5)"
    )
    parser.add_argument(
        "--failures", type=int, default=3, help="failed probes before failing over, N (default 3)"
    )
    parser.add_argument("--ttl", type=int, default=1, help="DNS TTL in seconds (default 1)")
    parser.add_argument(
        "--steady", type=int, default=10, help="the standby's share in percent (default 10)"
    )
    parser.add_argument(
        "--auto-failback",
        action="store_true",
        help="wait for the automatic failback instead of running `failback` by hand",
    )
    parser.add_argument(
        "--healthy-seconds",
        type=float,
        default=3.0,
        help="with --auto-failback: healthy time before failing back, M (default 3)",
    )
    parser.add_argument("--keep-workdir", action="store_true", help="keep configs and logs")
    parser.add_argument(
        "--record-dir",
        type=Path,
        default=Path("canary-records"),
        help="where the failover record is written (default canary-records)",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="text (default) or json: the controller's events, one JSON object per line on stderr",
    )
    return parser


def parse_args(argv: Sequence[str] | None) -> FailoverDemoOptions:
    parser = build_parser()
    options = parser.parse_args(argv, namespace=FailoverDemoOptions())
    if not 0 < options.rate <= 1000:
        parser.error(f"--rate must be within (0, 1000], got {options.rate:g}")
    if not 0.05 <= options.probe_interval <= 10:
        parser.error(f"--probe-interval must be within 0.05..10 s, got {options.probe_interval:g}")
    if not 1 <= options.failures <= 20:
        parser.error(f"--failures must be within 1..20, got {options.failures}")
    if not 1 <= options.ttl <= 60:
        parser.error(f"--ttl must be within 1..60 s, got {options.ttl}")
    if not 0 <= options.steady <= 50:
        parser.error(f"--steady must be within 0..50, got {options.steady}")
    if options.healthy_seconds < 0:
        parser.error(f"--healthy-seconds must not be negative, got {options.healthy_seconds:g}")
    return options


def _service(version: str, host: str, port: int, workdir: Path) -> ManagedProcess:
    return service_process(
        version,
        host=host,
        port=port,
        log_path=workdir / f"service-{version}.log",
        latency_ms=5,
        stop_grace=2.0,
        name=f"{version}-cluster",
    )


def _moved_to(controller: FailoverController, mode: Mode) -> bool:
    """The weight move (not just the decision) has been applied and verified."""
    return bool(controller.moves) and controller.moves[-1][1] is mode


async def _wait(predicate: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g}s waiting for {what}")
        await asyncio.sleep(0.05)


async def run_failover_demo(options: FailoverDemoOptions, *, workdir: Path) -> int:
    """Start everything, stage the outage and the failback, stop everything."""
    binary = find_binary("pdns_server", fallbacks=("/usr/sbin/pdns_server",))
    port = free_port()
    interval, timeout = options.probe_interval, min(1.0, options.probe_interval * 2)
    policy = FailoverPolicy(
        failures_to_failover=options.failures,
        healthy_s_to_failback=options.healthy_seconds,
        auto_failback=options.auto_failback,
    )
    bound = (options.failures + 1) * (interval + timeout) + options.ttl
    record = options.record_dir / f"failover-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.jsonl"
    async with contextlib.AsyncExitStack() as stack:
        pdns = PowerDNSProcess(workdir=workdir / "pdns", api_key=API_KEY, binary=binary)
        stack.push_async_callback(pdns.stop)
        await pdns.start()
        await pdns.create_zone(ZONE)
        primary = _service("primary", PRIMARY_IP, port, workdir)
        standby = _service("canary", STANDBY_IP, port, workdir)
        for process in (primary, standby):
            stack.push_async_callback(process.stop)
        await asyncio.gather(primary.start(), standby.start())
        say(
            f"clusters: primary {PRIMARY_IP}:{port} (pid {primary.pid}), standby {STANDBY_IP}:{port} "
            f"(pid {standby.pid}); PowerDNS pid {pdns.pid} on 127.0.0.1:{pdns.dns_port}"
        )
        router = PowerDNSRouter(
            api_url=pdns.api_url,
            api_key=API_KEY,
            zone=ZONE,
            record_name=NAME,
            primary_address=PRIMARY_IP,
            canary_address=STANDBY_IP,
            ttl=options.ttl,
            dns_server="127.0.0.1",
            dns_port=pdns.dns_port,
        )
        await router.set_weight(options.steady)
        session = aiohttp.ClientSession()
        stack.push_async_callback(session.close)

        def side(name: str, host: str) -> EntryPointHealth:
            url = f"http://{host}:{port}/healthz"
            return EntryPointHealth(name, [lambda: http_check(session, url, timeout_s=timeout)])

        monitor = HealthMonitor(
            primary=side("primary", PRIMARY_IP), standby=side("standby", STANDBY_IP)
        )
        controller = FailoverController(
            name="shop",
            policy=policy,
            probe=monitor.probe,
            router=router,
            state_path=workdir / "failover.json",
            record_path=record,
            steady_canary_percent=options.steady,
            probe_interval_s=interval,
        )
        loadgen = DnsLoadGenerator("127.0.0.1", pdns.dns_port, NAME, port, rate=options.rate)
        tasks = [asyncio.create_task(controller.run()), asyncio.create_task(loadgen.run())]

        async def stop_tasks() -> None:
            loadgen.stop()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

        stack.push_async_callback(stop_tasks)
        say(
            f"DNS: {NAME} LUA pickwrandom, TTL {options.ttl}s, {100 - options.steady}/{options.steady}; "
            f"{options.rate:g} requests/s from 20 clients resolving through it"
        )
        say(
            f"failover policy: {options.failures} failed probes every {interval:g}s; failback "
            + (
                f"automatic after {options.healthy_seconds:g}s healthy"
                if options.auto_failback
                else "by hand"
            )
        )
        await asyncio.sleep(3.0)
        now = loadgen.clock()
        share = loadgen.share(STANDBY_IP, now - 2.0) or 0.0
        say(
            f"steady state: standby serves {100 * share:.0f}% of requests (weight {options.steady}%)"
        )

        # -- the outage --------------------------------------------------------------
        outage = loadgen.clock()
        outage_wall = time.time()
        await primary.stop()
        say("outage: the primary cluster's service is stopped")
        await _wait(lambda: _moved_to(controller, Mode.STANDBY), bound + 10, "the failover")
        weight_s = controller.moves[-1][0] - outage_wall
        say(f"  controller moved the DNS weight to the standby after {weight_s:.2f}s")
        await asyncio.sleep(options.ttl + 1.5)
        moved = loadgen.moved_at(STANDBY_IP, outage)
        failover_s = None if moved is None else moved - outage
        failed = loadgen.failed(outage)
        if failover_s is None:
            say("  !! clients have not all moved to the standby")
        else:
            say(
                f"  every client on the standby after {failover_s:.2f}s "
                f"(bound: {options.failures + 1} probes x ({interval:g}s + {timeout:g}s timeout) "
                f"+ TTL {options.ttl}s = {bound:.2f}s); {failed} requests failed meanwhile"
            )

        # -- the primary comes back, failback ---------------------------------------------
        primary = _service("primary", PRIMARY_IP, port, workdir)
        stack.push_async_callback(primary.stop)
        await primary.start()
        say(f"recovery: the primary cluster's service is back (pid {primary.pid})")
        await _wait(
            lambda: controller.state.primary_healthy_since is not None, 10, "a healthy probe"
        )
        back = loadgen.clock()
        back_wall = time.time()
        if options.auto_failback:
            await _wait(
                lambda: _moved_to(controller, Mode.PRIMARY),
                options.healthy_seconds + bound + 10,
                "the automatic failback",
            )
        else:
            who = os.environ.get("USER") or getpass.getuser()
            say(f"  $ canary failback --as {who} --reason 'primary recovered (demo)'")
            await controller.command(FailoverCommand(Mode.PRIMARY, who, "primary recovered (demo)"))
        failback_weight_s = controller.moves[-1][0] - back_wall
        await asyncio.sleep(options.ttl + 2.0)
        returned = [s.at for s in loadgen.window(back) if s.address == PRIMARY_IP]
        failback_s = None if not returned else returned[0] - back
        share = loadgen.share(STANDBY_IP, loadgen.clock() - 1.5) or 0.0
        if failback_s is None:
            say("  !! no client went back to the primary")
        else:
            say(
                f"  weight back to {100 - options.steady}/{options.steady} after {failback_weight_s:.2f}s; "
                f"first client back on the primary after {failback_s:.2f}s; standby now serves "
                f"{100 * share:.0f}%"
            )
        say(f"record: {record}")
        ok = failover_s is not None and failover_s <= bound + options.ttl and failback_s is not None
        return EXIT_OK if ok else EXIT_SLOW
    return EXIT_SETUP  # pragma: no cover - the context manager returns above


def main(argv: Sequence[str] | None = None) -> int:
    """`canary demo --failover [flags]`: see the module docstring for the exit status."""
    options = parse_args(argv)
    if options.log_format == "json":
        configure_logging("info", "json")
    try:
        find_binary("pdns_server", fallbacks=("/usr/sbin/pdns_server",))
    except FileNotFoundError as exc:
        complain(f"canary demo --failover: {exc} (run scripts/setup --dns)")
        return EXIT_SETUP
    if not POWERDNS_SQLITE3_SCHEMA.exists():
        complain(
            f"canary demo --failover: {POWERDNS_SQLITE3_SCHEMA} is missing (pdns-backend-sqlite3): "
            "run scripts/setup --dns"
        )
        return EXIT_SETUP
    return run_in_workdir(
        lambda workdir: run_failover_demo(options, workdir=workdir),
        program="canary demo --failover",
        prefix="canary-failover-",
        keep_workdir=options.keep_workdir,
        errors=(ProcessError, OSError, TimeoutError),
        stopping="stopping every process",
    )
