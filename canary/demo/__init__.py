"""`canary demo`: a whole canary rollout on this machine, with real parts, in about two minutes.

A newcomer's first question is "does it work?", and the honest answer is to run the real
thing: two versions of a small service (canary.demo.service) as separate processes, Debian's
HAProxy splitting real requests between them, Debian's Prometheus scraping them every second,
an open-loop load generator, and the controller's own RolloutRunner deciding with the
analysis engine. Nothing is simulated; only the sizes are small.

The demo's defaults are chosen so that both outcomes fit in three minutes at 200 requests/s:

- steps 10, 25, 50 (then 100 on promotion), 10 s minimum each, a tick every second. The
  production default starts at 5%, but 5% of 200 requests/s is 10 requests/s, and showing
  that a canary is *as good as* the primary (a pass needs positive evidence) on so few
  requests takes minutes, not seconds;
- both versions share a 0.5% baseline error rate, so the error test has events to compare;
- the error metric passes when the canary's rate is within 2 points of the primary's (or
  twice it), looser than production, for the same reason. Failing is unaffected: the fail
  test asks whether the canary is worse *at all*, so `--canary-error-rate 0.05` is rolled
  back within seconds of the first canary requests.

Exit status: 0 promoted, 1 rolled back (or aborted), 2 setup error, 130 on Ctrl-C (143 on
SIGTERM).
Every child process is stopped by PID on the way out, Ctrl-C and SIGTERM included.

An entry point: may import any package (``procs`` starts the real servers for it and for the
tests); no package outside ``canary.demo`` and ``canary.cli`` imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analysis import AnalysisConfig, Analyzer, MetricConfig, plan
from canary.cli.common import parse_listen
from canary.core.logs import LOG_FORMATS, LogFormat, configure_logging
from canary.core.records import NoteEntry
from canary.core.rollout import (
    Command,
    Emit,
    RecordTransition,
    RolloutSpec,
    RolloutStatus,
    check_steps,
)
from canary.demo.loadgen import LoadGenerator, SplitStats
from canary.demo.procs import ProcessError, find_binary
from canary.demo.progress import format_duration, format_tick, format_transition, short
from canary.demo.running import EXIT_SETUP, complain, run_in_workdir, say
from canary.demo.stack import BACKEND, ServiceSpec, Stack, StackSettings
from canary.metrics.prometheus import PrometheusMetrics
from canary.routers.haproxy import HAProxyRouter
from canary.runner import CommandResult, RolloutRunner, TickReport

if TYPE_CHECKING:
    from canary.server.app import Server

__all__ = [
    "DEMO_ANALYSIS",
    "DEMO_STEPS",
    "DemoOptions",
    "MeasuringRouter",
    "main",
    "parse_args",
    "run_demo",
]

DEMO_STEPS = (10, 25, 50)
DEMO_TARGET = "demo"
# See the module docstring: a looser pass tolerance on errors, everything else as in production.
DEMO_ANALYSIS = AnalysisConfig(errors=MetricConfig(tolerance=1.0, abs_tolerance=0.02))

EXIT_PROMOTED, EXIT_ROLLED_BACK = 0, 1  # EXIT_SETUP 2; interrupted: 128 + signal number


@dataclass(frozen=True, slots=True)
class DemoOptions:
    rate: float = 200.0
    steps: tuple[int, ...] = DEMO_STEPS
    step_seconds: float = 10.0
    max_step_seconds: float = 150.0
    tick_seconds: float = 1.0
    baseline_error_rate: float = 0.005
    canary_error_rate: float = 0.0  # on top of the baseline
    latency_ms: float = 50.0
    canary_latency_ms: float | None = None  # None: same as latency_ms
    latency_jitter: float = 0.3
    seed: int = 1
    record_dir: Path = Path("canary-records")
    keep_workdir: bool = False
    log_format: LogFormat = "text"
    listen: tuple[str, int] = ("127.0.0.1", 0)  # the live view's address (port 0: a free one)
    linger_s: float = 0.0  # keep serving the live view this long after the end


@dataclass
class _Window:
    weight: int
    since: float  # load generator clock, right after the router accepted the weight
    until: float | None = None


@dataclass
class MeasuringRouter:
    """Wraps the real router to note when each weight took, on the load generator's clock.

    The split "since the weight took" then counts exactly the requests sent under it, which
    is what "the split at each step is within 3 points of the weight" is about.
    """

    router: HAProxyRouter
    loadgen: LoadGenerator
    windows: list[_Window] = field(default_factory=list)
    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.router.name

    async def set_weight(self, canary_percent: int) -> None:
        await self.router.set_weight(canary_percent)
        now = self.loadgen.now()
        if self.windows and self.windows[-1].until is None:
            if self.windows[-1].weight == canary_percent:
                return  # re-asserted, not changed: the window goes on
            self.windows[-1].until = now
        self.windows.append(_Window(canary_percent, now))

    async def get_weight(self) -> int:
        return await self.router.get_weight()

    def current_split(self, weight: int) -> SplitStats | None:
        """The split measured since `weight` last took (until the next weight, if any)."""
        for window in reversed(self.windows):
            if window.weight == weight:
                return self.loadgen.stats(since=window.since, until=window.until)
        return None

    def split_per_window(self) -> list[tuple[int, SplitStats]]:
        return [(w.weight, self.loadgen.stats(since=w.since, until=w.until)) for w in self.windows]


def _fraction(flag: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a number, got {text!r}") from None
        if not 0.0 <= value <= 1.0:
            raise argparse.ArgumentTypeError(f"{flag} must be within 0..1, got {text}")
        return value

    return parse


def _positive(flag: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{flag} must be positive, got {text}")
        return value

    return parse


def _steps(text: str) -> tuple[int, ...]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
        return check_steps(values)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--steps {text!r}: {exc}") from None


def build_parser(prog: str = "canary demo") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a whole canary rollout on this machine: two versions of a sample "
        "service, HAProxy, Prometheus and a load generator on 127.0.0.1. Exit status: 0 "
        "promoted, 1 rolled back, 2 setup error, 130 on Ctrl-C, 143 on SIGTERM.",
    )
    d = DemoOptions()
    parser.add_argument(
        "--canary-error-rate",
        type=_fraction("--canary-error-rate"),
        default=d.canary_error_rate,
        help="extra share of 500s from the canary, on top of the baseline (e.g. 0.05)",
    )
    parser.add_argument(
        "--canary-latency-ms",
        type=_positive("--canary-latency-ms"),
        default=None,
        help="the canary's median latency (default: --latency-ms)",
    )
    parser.add_argument(
        "--baseline-error-rate",
        type=_fraction("--baseline-error-rate"),
        default=d.baseline_error_rate,
        help=f"share of 500s from both versions (default {d.baseline_error_rate})",
    )
    parser.add_argument(
        "--latency-ms",
        type=_positive("--latency-ms"),
        default=d.latency_ms,
        help=f"median latency of both versions (default {d.latency_ms:g})",
    )
    parser.add_argument(
        "--latency-jitter",
        type=float,
        default=d.latency_jitter,
        help=f"sigma of the log-normal latency (default {d.latency_jitter})",
    )
    parser.add_argument(
        "--rate",
        type=_positive("--rate"),
        default=d.rate,
        help=f"requests per second from the load generator (default {d.rate:g})",
    )
    parser.add_argument(
        "--steps",
        type=_steps,
        default=d.steps,
        help=f"canary weights in percent (default {','.join(map(str, d.steps))})",
    )
    parser.add_argument(
        "--step-seconds",
        type=_positive("--step-seconds"),
        default=d.step_seconds,
        help=f"minimum time at each step (default {d.step_seconds:g})",
    )
    parser.add_argument(
        "--max-step-seconds",
        type=_positive("--max-step-seconds"),
        default=d.max_step_seconds,
        help=f"roll back if a step has not passed after this long (default {d.max_step_seconds:g})",
    )
    parser.add_argument(
        "--tick-seconds",
        type=_positive("--tick-seconds"),
        default=d.tick_seconds,
        help=f"how often the controller looks (default {d.tick_seconds:g})",
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the services' draws")
    parser.add_argument(
        "--record-dir",
        type=Path,
        default=d.record_dir,
        help=f"where the analysis record is written (default {d.record_dir})",
    )
    parser.add_argument(
        "--failover",
        action="store_true",
        help="instead: a primary-cluster outage and failback between two entry points behind "
        "PowerDNS (see `canary demo --failover --help`)",
    )
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        type=_listen,
        default="127.0.0.1:0",
        help="where the live view (a web page of the rollout) is served; it needs no token, "
        "so keep it on loopback (default 127.0.0.1 and a free port, printed at the start)",
    )
    parser.add_argument(
        "--linger",
        metavar="SECONDS",
        type=float,
        default=0.0,
        help="keep serving the live view this long after the rollout ends (default 0)",
    )
    parser.add_argument(
        "--keep-workdir",
        action="store_true",
        help="keep the processes' configs and logs (a temporary directory) after the demo",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=d.log_format,
        help="text (default: the controller logs errors only, the progress lines say the rest) "
        "or json: the controller's events at info level, one JSON object per line on stderr",
    )
    return parser


def parse_args(argv: Sequence[str] | None, prog: str = "canary demo") -> DemoOptions:
    """Options from the command line; a bad flag exits 2 with a message naming it."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.max_step_seconds < args.step_seconds:
        parser.error(
            f"--max-step-seconds ({args.max_step_seconds:g}) must be at least "
            f"--step-seconds ({args.step_seconds:g})"
        )
    if not 0.0 <= args.latency_jitter <= 3.0:
        parser.error(f"--latency-jitter must be within 0..3, got {args.latency_jitter}")
    if args.baseline_error_rate + args.canary_error_rate > 1.0:
        parser.error("--baseline-error-rate plus --canary-error-rate must not exceed 1")
    return DemoOptions(
        rate=args.rate,
        steps=args.steps,
        step_seconds=args.step_seconds,
        max_step_seconds=args.max_step_seconds,
        tick_seconds=args.tick_seconds,
        baseline_error_rate=args.baseline_error_rate,
        canary_error_rate=args.canary_error_rate,
        latency_ms=args.latency_ms,
        canary_latency_ms=args.canary_latency_ms,
        latency_jitter=args.latency_jitter,
        seed=args.seed,
        record_dir=args.record_dir,
        keep_workdir=args.keep_workdir,
        log_format=args.log_format,
        listen=args.listen,
        linger_s=max(0.0, args.linger),
    )


def _listen(text: str) -> tuple[str, int]:
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _LiveSource:
    """The demo's one rollout, as the HTTP server sees it (read-only: no commands)."""

    def __init__(self, runner: RolloutRunner) -> None:
        from canary.runner.telemetry import Telemetry

        self.runner = runner
        self.started = asyncio.Event()
        self.started.set()
        self.telemetry = Telemetry()

    def states(self) -> list[dict[str, Any]]:
        return [self.runner.state()]

    async def command(self, name: str, command: Command) -> CommandResult:
        return CommandResult(False, self.runner.status.phase.value, "the demo takes no commands")


async def _serve_live(runner: RolloutRunner, options: DemoOptions) -> Server:
    """The live view and the /reports/ pages, open to reads (loopback by default); commands
    would need a token nobody is told."""
    # Imported here: `python -m canary.demo.service` (each service process) imports this
    # package too, and needs none of it.
    from canary.reports.pages import register_routes
    from canary.server.app import Server, make_app
    from canary.server.auth import TokenAccess
    from canary.server.live import register_live

    app = make_app(
        _LiveSource(runner),
        access=TokenAccess(secrets.token_urlsafe(32)),
        public_reads=True,
        extensions=[
            functools.partial(register_routes, record_dir=options.record_dir),
            register_live,
        ],
    )
    host, port = options.listen
    server = Server(app, host=host, port=port)
    await server.start()
    return server


def _shown(path: Path) -> str:
    """A path as the user should type it: relative to the working directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path.resolve())


def _canary_command() -> str:
    """How to run `canary` from here: the venv's console script, else `python -m canary`."""
    script = Path(sys.executable).parent / "canary"
    if script.exists():
        return _shown(script)
    return f"{sys.executable} -m canary"


def _describe(spec: ServiceSpec) -> str:
    return f"{100 * spec.error_rate:.1f}% errors, {spec.latency_ms:g} ms median"


class _Progress:
    """The runner's observer: prints one line per tick, plus state changes and warnings."""

    def __init__(self, router: MeasuringRouter, steps: int) -> None:
        self.router = router
        self.steps = steps

    def __call__(self, report: TickReport) -> None:
        entry = report.entry
        say(format_tick(entry, steps=self.steps, split=self.router.current_split(entry.weight_set)))
        for action in report.actions:
            if isinstance(action, RecordTransition):
                say(format_transition(action, elapsed_s=entry.elapsed_s))
            elif (
                isinstance(action, Emit)
                and action.level == "warning"
                and not action.message.startswith("rolling back")  # the transition says it
            ):
                say(f"{entry.elapsed_s:6.1f}s  !! {short(action.message)}")


def _plan(options: DemoOptions) -> dict[str, float | None]:
    """What the demo knows better than the runner's own estimate (StartEntry.plan): the time to
    catch the regression it injects (--canary-error-rate), not the runner's assumed doubling.
    The time to pass comes from the runner (expected_rps, expected_error_rate)."""
    baseline = options.baseline_error_rate
    ratio = (baseline + options.canary_error_rate) / baseline if baseline > 0 else 2.0
    if ratio <= 1:
        return {}  # no regression injected: the runner's doubling is the right question
    try:
        estimate = plan(
            rate_rps=options.rate,
            canary_weight=options.steps[0] / 100,
            baseline_error_rate=baseline,
            error_ratio=ratio,
            config=DEMO_ANALYSIS,
        )
    except ValueError:  # e.g. a zero baseline: nothing to estimate from
        return {}
    return {"expected_fail_s": estimate.expected_fail_s}


def _say_advice(entry: object) -> None:
    """The planner's advice notes, as they come (the runner also logs and records them)."""
    if isinstance(entry, NoteEntry) and entry.plan:
        say(f"  planner: {short(entry.message)}")


def _observed_share(
    router: MeasuringRouter,
) -> Callable[[str, RolloutStatus], dict[str, Any]]:
    def hook(name: str, status: RolloutStatus) -> dict[str, Any]:
        if not status.weight_verified:
            return {}
        split = router.current_split(status.weight)
        if split is None or split.canary_share is None:
            return {}
        return {"observed_canary_share": split.canary_share}

    return hook


async def run_demo(options: DemoOptions, *, workdir: Path) -> tuple[int, Path | None]:
    """Start everything, run one rollout, stop everything. Returns (exit status, record)."""
    canary_latency = options.canary_latency_ms or options.latency_ms
    primary = ServiceSpec(
        options.baseline_error_rate, options.latency_ms, options.latency_jitter, options.seed
    )
    canary = ServiceSpec(
        options.baseline_error_rate + options.canary_error_rate,
        canary_latency,
        options.latency_jitter,
        options.seed + 1,
    )
    settings = StackSettings(primary=primary, canary=canary, rate=options.rate)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    record = options.record_dir / f"{DEMO_TARGET}-{stamp}.jsonl"
    say(f"canary demo: primary v1 ({_describe(primary)}), canary v2 ({_describe(canary)})")
    say(f"starting services, HAProxy and Prometheus on 127.0.0.1 (logs in {workdir}) ...")
    async with Stack(settings, workdir=workdir) as stack:
        assert stack.haproxy is not None and stack.prometheus is not None
        assert stack.loadgen is not None
        say(
            f"  primary {stack.primary_addr}  canary {stack.canary_addr}  "
            f"haproxy {stack.haproxy.url}  prometheus {stack.prometheus.url}"
        )
        pids = ", ".join(f"{p.name} {p.pid}" for p in stack.processes)
        say(f"  processes (pid): {pids}")
        say(f"  load generator: {options.rate:g} requests/s through HAProxy")
        await stack.wait_for_metrics()
        router = MeasuringRouter(
            HAProxyRouter(
                stack.socket_path,
                BACKEND,
                "primary",
                "canary",
                name="haproxy:demo",
                state_file=stack.state_file,
            ),
            stack.loadgen,
        )
        spec = RolloutSpec(
            steps=options.steps,
            min_step_s=options.step_seconds,
            max_step_s=options.max_step_seconds,
            no_data_deadline_s=max(30.0, 10 * options.tick_seconds),
            promotion="shift",
        )
        # Building the client imports prometheus-api-client and its dependencies: a few
        # hundred ms that would stall the load generator if done on the event loop.
        metrics = await asyncio.to_thread(PrometheusMetrics, stack.prometheus.url)
        runner = RolloutRunner(
            name=DEMO_TARGET,
            spec=spec,
            router=router,
            metrics=metrics,
            record_path=record,
            tick_s=options.tick_seconds,
            analyzer_factory=lambda: Analyzer(DEMO_ANALYSIS),
            revision=stamp,
            primary_version=f"v1 ({_describe(primary)})",
            canary_version=f"v2 ({_describe(canary)})",
            config={
                "analysis": DEMO_ANALYSIS.model_dump(mode="json"),
                "demo": {
                    "rate": options.rate,
                    "baseline_error_rate": options.baseline_error_rate,
                    "canary_error_rate": options.canary_error_rate,
                    "latency_ms": options.latency_ms,
                    "canary_latency_ms": canary_latency,
                    "seed": options.seed,
                },
            },
            analysis=DEMO_ANALYSIS,
            expected_rps=options.rate,
            expected_error_rate=options.baseline_error_rate,
            plan=_plan(options),
            tick_hook=_observed_share(router),
            observers=[_Progress(router, len(options.steps))],
            entry_observers=[_say_advice],
        )
        steps = " -> ".join(f"{w}%" for w in (*options.steps, 100))
        say(
            f"rollout: {steps}, at least {options.step_seconds:g}s per step, "
            f"a tick every {options.tick_seconds:g}s; record {_shown(record)}"
        )
        try:
            server = await _serve_live(runner, options)
        except OSError as exc:
            raise ProcessError(f"cannot serve the live view on {options.listen}: {exc}") from None
        say(f"live view: {server.url}/   (the rollout's charts; reports at {server.url}/reports/)")
        started = time.monotonic()
        try:
            status = await runner.run()
            if options.linger_s > 0:
                say(f"serving the live view for {options.linger_s:g}s more ...")
                await asyncio.sleep(options.linger_s)
        finally:
            metrics.close()
            await server.stop()
        duration = time.monotonic() - started
        windows = router.split_per_window()
        overall = stack.loadgen.stats()
        if (failure := stack.loadgen_failed()) is not None:
            say(f"!! the load generator failed: {failure!r}")
        if overall.failed or overall.dropped:
            # Not errors of either version: no answer at all, or not sent (concurrency bound).
            last = stack.loadgen.last_failure
            say(
                f"!! load generator: {overall.failed} requests without an answer, "
                f"{overall.dropped} not sent at the concurrency bound"
                + (f"; last failure: {last}" if last else "")
            )
    _summary(status, duration, windows, record, options.record_dir)
    return (EXIT_PROMOTED if status.outcome == "promoted" else EXIT_ROLLED_BACK), record


def _summary(
    status: RolloutStatus,
    duration: float,
    windows: list[tuple[int, SplitStats]],
    record: Path,
    record_dir: Path,
) -> None:
    outcome = {"promoted": "PROMOTED", "rolled_back": "ROLLED BACK", "aborted": "ABORTED"}.get(
        status.outcome or "", status.phase.value
    )
    say("")
    say(f"outcome:  {outcome} after {format_duration(duration)}: {short(status.message)}")
    say("split measured at the load generator, per weight, since it took:")
    for weight, split in windows:
        if split.completed == 0:
            continue  # e.g. 100% at the very end: the demo stops right after promoting
        share = "-" if split.canary_share is None else f"{100 * split.canary_share:5.1f}%"
        say(f"  weight {weight:>3}%: canary {share} of {split.completed} requests")
    say(f"record:   {_shown(record)}")
    say(
        f"report:   {_canary_command()} report {DEMO_TARGET} --record-dir {_shown(record_dir)}"
        "   (writes an HTML report next to the record and prints its path)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`canary demo [flags]`: see the module docstring for the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if "--failover" in arguments:  # the two-cluster outage demo has its own flags
        from canary.demo.failover import main as failover_main

        return failover_main([a for a in arguments if a != "--failover"])
    options = parse_args(arguments)
    if options.log_format == "json":
        # Progress on stdout for people, the controller's events on stderr for machines.
        configure_logging("info", "json")
    else:
        # The progress lines show the controller's warnings already; keep its log for errors.
        logging.getLogger("canary").setLevel(logging.ERROR)
    try:
        find_binary("haproxy", fallbacks=("/usr/sbin/haproxy",))
        find_binary("prometheus", fallbacks=("/usr/bin/prometheus",))
    except FileNotFoundError as exc:
        complain(f"canary demo: {exc}")
        return EXIT_SETUP
    try:
        options.record_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        # Checked first: a rollout whose record cannot be written would explain nothing.
        complain(
            f"canary demo: --record-dir {options.record_dir}: cannot create it: "
            f"{exc.strerror or exc}"
        )
        return EXIT_SETUP
    # Short path: HAProxy's admin socket lives here, and unix socket paths are limited.
    return run_in_workdir(
        lambda workdir: _run(options, workdir),
        program="canary demo",
        prefix="canary-demo-",
        keep_workdir=options.keep_workdir,
        # A server that would not start (its log's tail is in the message), a busy port, ...
        errors=(ProcessError, OSError),
        stopping="stopping the rollout and every process",
        stopped="stopped: every process the demo started has been stopped",
    )


async def _run(options: DemoOptions, workdir: Path) -> int:
    code, _ = await run_demo(options, workdir=workdir)
    return code


if __name__ == "__main__":  # pragma: no cover - `python -m canary.demo` goes via __main__.py
    sys.exit(main())
