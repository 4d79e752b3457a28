"""Random SIGKILLs mid-rollout: does a killed and restarted controller end where its record says?

    python -m benchmarks.kill_campaign --runs 100 --mode static --seed 1
    python -m benchmarks.kill_campaign --runs 100 --mode kubernetes --seed 1

Issue 11's figure: "random SIGKILLs mid-rollout, at least 100 runs (static and Kubernetes
mode): 0 runs that end in a weight other than the rollout's last recorded one, 0 records
unreadable, 0 silent restarts". Everything is real except the Kubernetes API server:

- static: the demo stack (canary.demo.stack: two demo-service processes, HAProxy, Prometheus
  scraping both, an open-loop load generator through HAProxy) is started once; each run is a
  new `python -m canary run --config X` subprocess on a fresh record directory and a new
  canary_version, SIGKILLed at random times and restarted on the same config until it ends.
- kubernetes: the API emulator (tests/support/kube_emulator.py) serves HTTP on loopback in
  this process; two demo-service exporters stand for app-primary and app-canary, a real
  Prometheus scrapes them, and requests are split between them by the canary Ingress' weight
  (as ingress-nginx would). The controller is `python -m canary kubernetes` as a subprocess;
  each run is a new pod template on Deployment `app`, and the controller is SIGKILLed at
  random times and restarted until that rollout ends.

Per run, the checks:

(a) weight: the router's weight at the end (HAProxy's `show servers state`, or the canary
    Ingress' canary-weight) equals the rollout's last recorded wanted weight (the weight of
    its last transition entry: 100 promoted / 0 rolled back for static targets, 0 for both in
    Kubernetes, where promotion copies the template and hands the traffic back), and the
    end entry's outcome agrees with it. Also: the weight never moved back and forth (polled
    HAProxy weights / every canary-weight written to the Ingress, in order).
(b) record: `read_record` / `unpack_record` reads it, and `canary report` renders it.
(c) silent restart: one `start` entry per rollout id (over every record of the run), one
    `resumed` note for each kill that found an unfinished rollout saved, no Progressing step
    index entered twice, and the same rollout id from the first start to the end.

Kill times are uniform in [0.05 s, horizon] after each (re)start, horizon about one
rollout's duration, so kills land during start-up, mid-tick, mid-write and mid-promotion.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"


@dataclass
class RunResult:
    index: int
    kills: int = 0
    kills_active: int = 0  # kills that found an unfinished rollout saved
    restarts: int = 0
    outcome: str = "unfinished"
    final_weight: int | None = None
    recorded_weight: int | None = None
    resumed_notes: int = 0
    starts: int = 0
    duration_s: float = 0.0
    violations: dict[str, list[str]] = field(
        default_factory=lambda: {"a": [], "w": [], "b": [], "c": []}
    )
    info: list[str] = field(default_factory=list)
    # per controller process: (entries before its start, entries at its end, resumable at start)
    lives: list[tuple[int, int, bool]] = field(default_factory=list)

    def bad(self, kind: str, why: str) -> None:
        self.violations[kind].append(why)


# ---- shared checks -----------------------------------------------------------------------


def check_entries(result: RunResult, entries: list[Any], rollout_id: str | None) -> None:
    """(a)'s recorded side and (c) on one run's entries (all its records together)."""
    from canary.core.records import EndEntry, NoteEntry, StartEntry, TransitionEntry

    starts = [e for e in entries if isinstance(e, StartEntry)]
    by_id = collections.Counter(e.rollout for e in starts)
    result.starts = len(starts)
    for rid, count in by_id.items():
        if count != 1:
            result.bad("c", f"{count} start entries for rollout {rid}")
    if rollout_id is not None and by_id.get(rollout_id, 0) == 0:
        result.bad("c", f"no start entry for rollout {rollout_id}")
    ids = {e.rollout for e in entries}
    if len(ids) != 1:
        result.bad("c", f"several rollout ids in one run: {sorted(ids)}")
    resumed = [e for e in entries if isinstance(e, NoteEntry) and e.message.startswith("resumed")]
    result.resumed_notes = len(resumed)
    # Each controller process that wrote anything: its first entry says what it did. After
    # a kill that left an unfinished rollout saved it must be a `resumed` note; otherwise a
    # `start` (and then the start count above catches a rollout started twice).
    for number, (before, after, active) in enumerate(result.lives):
        if after <= before or before >= len(entries):
            continue
        first = entries[before]
        if active:
            if not (isinstance(first, NoteEntry) and first.message.startswith("resumed")):
                result.bad(
                    "c",
                    f"controller {number + 1} found an unfinished rollout saved and first wrote "
                    f"{first.kind} {getattr(first, 'message', '')[:80]!r}, not a resumed note",
                )
        elif not isinstance(first, StartEntry):
            result.bad(
                "c", f"controller {number + 1} found nothing to resume yet wrote {first.kind}"
            )
    transitions = [e for e in entries if isinstance(e, TransitionEntry)]
    entered = [
        t.step for t in transitions if t.to_phase == "Progressing" and t.from_phase != "Paused"
    ]
    if len(entered) != len(set(entered)):
        result.bad("c", f"a step entered twice: Progressing steps {entered}")
    ends = [e for e in entries if isinstance(e, EndEntry)]
    if len(ends) > 1:
        result.bad("c", f"{len(ends)} end entries")
    if ends:
        result.outcome = ends[-1].outcome
    if transitions:
        result.recorded_weight = transitions[-1].weight


def weight_path_ok(weights: list[int], outcome: str) -> str | None:
    """Weights in time order (duplicates collapsed) go up, then at most once down to 0 for a
    rollback (or the final hand-back after a Kubernetes promotion). None when fine."""
    seq = [w for i, w in enumerate(weights) if i == 0 or w != weights[i - 1]]
    down = next((i for i in range(1, len(seq)) if seq[i] < seq[i - 1]), None)
    if down is None:
        return None
    tail = seq[down - 1 :]
    if any(tail[i] > tail[i - 1] for i in range(1, len(tail))):
        return f"weight moved back and forth: {seq}"
    return None


# ---- static mode -------------------------------------------------------------------------


def static_config(run_dir: Path, stack: Any, index: int, tick_s: float) -> Path:
    import yaml

    config = {
        "name": "kc",
        "router": {
            "kind": "haproxy",
            "socket": str(stack.socket_path),
            "backend": "app",
            "primary_server": "primary",
            "canary_server": "canary",
            "state_file": str(stack.state_file),
            "timeout_s": 2,
        },
        "metrics": {
            "kind": "prometheus",
            "url": stack.prometheus.url,
            "timeout_s": 2,
            "queries": {"selector": 'job="canary"'},
        },
        "steps": [20, 50],
        "min_step_s": 1,
        "max_step_s": 120,
        "no_data_deadline_s": 30,
        "tick_s": tick_s,
        "analysis": {
            "min_samples": 100,
            "quantiles": [0.5],
            "errors": {"tolerance": 5.0, "abs_tolerance": 0.05},
            "latency": {"tolerance": 1.0, "abs_tolerance": 0.05},
        },
        "record_dir": str(run_dir / "records"),
        "primary_version": "v0",
        "canary_version": f"v{index}",
    }
    path = run_dir / "rollout.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Controller:
    """One controller subprocess at a time, started by PID and killed by PID."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.argv = argv
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=fd,
                stderr=fd,
                start_new_session=True,
            )
        finally:
            os.close(fd)

    def servings(self) -> int:
        """How many controllers have said "serving on" in the shared log so far."""
        try:
            return self.log_path.read_text(errors="replace").count("canary: serving on")
        except OSError:
            return 0

    async def kill_delay(self, rng: random.Random, horizon: float, before: int) -> float:
        """Wait for a random kill time: a quarter of kills land in start-up (0-2.5 s after
        the spawn: imports, lock, resume), the rest uniform in [0, horizon] once serving."""
        if rng.random() < 0.25:
            return rng.uniform(0.05, 2.5)
        deadline = time.monotonic() + 30
        while self.servings() <= before and self.running and time.monotonic() < deadline:  # noqa: ASYNC110 (polls a log file)
            await asyncio.sleep(0.05)
        return rng.uniform(0.0, horizon)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s (the end of a campaign)."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                await self.kill()

    async def wait(self, timeout_s: float) -> bool:
        assert self.proc is not None
        try:
            await asyncio.wait_for(self.proc.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


def _saved_active(status_path: Path) -> bool:
    try:
        saved = json.loads(status_path.read_text())
    except (OSError, ValueError):
        return False
    stage = saved.get("status", {}).get("stage", "Initializing")
    return stage not in ("Initializing", "Succeeded", "Failed")


async def static_run(
    index: int, stack: Any, base: Path, rng: random.Random, args: argparse.Namespace
) -> RunResult:
    from canary.core.records import read_record
    from canary.routers.haproxy import HAProxyRouter

    result = RunResult(index)
    run_dir = base / f"run-{index:04d}"
    run_dir.mkdir(parents=True)
    router = HAProxyRouter(stack.socket_path, "app", "primary", "canary", timeout_s=2)
    await router.set_weight(0)  # every run starts from the primary
    config = static_config(run_dir, stack, index, args.tick)
    status_path = run_dir / "records" / "kc.status.json"
    argv = [sys.executable, "-m", "canary", "run", "--config", str(config)]
    argv += ["--listen", f"{LOOPBACK}:0"]
    ctl = Controller(argv, run_dir / "controller.log")
    seen: list[int] = []
    polling = True

    async def poll() -> None:
        while polling:
            with contextlib.suppress(Exception):
                seen.append(await router.get_weight())
            await asyncio.sleep(0.05)

    poller = asyncio.create_task(poll())
    started = time.monotonic()
    kills = rng.randint(1, args.max_kills)
    records_dir = run_dir / "records"
    life = (0, False)
    try:
        before = ctl.servings()
        await ctl.start()
        for _ in range(kills):
            delay = await ctl.kill_delay(rng, args.horizon, before)
            if await ctl.wait(delay):
                break  # it ended before this kill
            result.kills_active += _saved_active(status_path)
            await ctl.kill()
            result.lives.append((life[0], _count_entries(records_dir), life[1]))
            result.kills += 1
            await asyncio.sleep(rng.uniform(0.0, 0.5))
            before = ctl.servings()
            life = (_count_entries(records_dir), _saved_active(status_path))
            await ctl.start()
            result.restarts += 1
        if not await ctl.wait(args.run_timeout):
            result.info.append(f"not over after {args.run_timeout:g}s: stopped")
            await ctl.stop()
        result.lives.append((life[0], _count_entries(records_dir), life[1]))
        code = ctl.proc.returncode if ctl.proc else None
        if code not in (0, 1):
            result.info.append(f"last controller exit status {code}")
    finally:
        await ctl.kill()
        polling = False
        await poller
    result.duration_s = time.monotonic() - started
    with contextlib.suppress(Exception):
        seen.append(await router.get_weight())

    # (b) every record of the run reads, and `canary report` renders the rollout's
    records = sorted((run_dir / "records").glob("*.jsonl"))
    entries: list[Any] = []
    if not records:
        result.bad("b", "no record file")
    for path in records:
        try:
            entries.extend(read_record(path))
        except Exception as exc:
            result.bad("b", f"{path.name}: {exc}")
    if len(records) > 1:
        result.bad("c", f"{len(records)} record files for one rollout: {[p.name for p in records]}")
    for path in records:
        code = await asyncio.to_thread(_report, [str(path), "--format", "md", "-o", os.devnull])
        if code != 0:
            result.bad("b", f"canary report {path.name} exited {code}")
    check_entries(result, entries, f"kc@v{index}")

    # (a) the router ends where the record says
    try:
        result.final_weight = await router.get_weight()
    except Exception as exc:
        result.bad("a", f"router unreadable at the end: {exc}")
    expected = {"promoted": 100, "rolled_back": 0, "aborted": 0}.get(result.outcome)
    if result.recorded_weight is None:
        result.bad("a", "no transition recorded")
    elif result.final_weight != result.recorded_weight:
        result.bad(
            "a", f"router at {result.final_weight}%, last recorded {result.recorded_weight}%"
        )
    if expected is not None and result.final_weight != expected:
        result.bad("a", f"outcome {result.outcome} but router at {result.final_weight}%")
    problem = weight_path_ok(seen, result.outcome)
    if problem:
        result.bad("w", problem)
    if result.outcome == "promoted" and any(w < max(seen, default=0) for w in seen[-1:]):
        result.bad("a", f"promoted but polled weights end {seen[-5:]}")
    return result


def _count_entries(records_dir: Path) -> int:
    from canary.core.records import read_record

    total = 0
    for path in sorted(records_dir.glob("*.jsonl")):
        with contextlib.suppress(Exception):
            total += len(read_record(path))
    return total


def _report(argv: list[str]) -> int:
    from canary.cli.report import main as report_main

    with (
        open(os.devnull, "w") as sink,
        contextlib.redirect_stdout(sink),
        contextlib.redirect_stderr(sink),
    ):
        return report_main(argv)


async def static_campaign(args: argparse.Namespace, base: Path) -> list[RunResult]:
    from canary.demo.stack import ServiceSpec, Stack, StackSettings

    rng = random.Random(args.seed)
    spec = ServiceSpec(error_rate=0.005, latency_ms=5.0, latency_jitter=0.3, seed=args.seed)
    settings = StackSettings(primary=spec, canary=spec, rate=args.rate, scrape_interval_s=0.5)
    results: list[RunResult] = []
    async with Stack(settings, workdir=base / "stack") as stack:
        await stack.wait_for_metrics()
        deadline = time.monotonic() + args.budget_s
        for index in range(args.runs):
            if time.monotonic() > deadline:
                print(f"time budget spent after {index} runs", flush=True)
                break
            result = await static_run(index, stack, base, rng, args)
            results.append(result)
            _progress(result)
    return results


# ---- Kubernetes mode ---------------------------------------------------------------------

NS = "kc"
RECORDS_NS = "canary-system"
DEPLOYMENTS = ("apps", "v1", "deployments")
INGRESSES = ("networking.k8s.io", "v1", "ingresses")


def _annotations() -> dict[str, str]:
    return {
        "canary.dev/enabled": "true",
        "canary.dev/router": "ingress-nginx",
        "canary.dev/ingress": "web",
        "canary.dev/steps": "20,50",
        "canary.dev/min-step-duration": "1s",
        "canary.dev/max-step-duration": "120s",
        "canary.dev/no-data-deadline": "30s",
        "canary.dev/analysis.quantiles": "p50",
        "canary.dev/analysis.error-tolerance": "5",
        "canary.dev/analysis.latency-tolerance": "1",
        "canary.dev/metrics": "custom",
        "canary.dev/metrics.requests": 'http_requests_total{namespace="{namespace}",service="{arm}"}',
        "canary.dev/metrics.errors": (
            'http_requests_total{namespace="{namespace}",service="{arm}",code=~"5.."}'
        ),
        "canary.dev/metrics.latency-buckets": (
            'http_request_duration_seconds_bucket{namespace="{namespace}",service="{arm}"}'
        ),
    }


def _seed_cluster(api: Any) -> None:
    from support.kube import deployment

    api.put(
        *INGRESSES,
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "Ingress",
            "metadata": {"name": "web", "namespace": NS},
            "spec": {
                "rules": [
                    {
                        "host": "app.example",
                        "http": {
                            "paths": [
                                {
                                    "path": "/",
                                    "pathType": "Prefix",
                                    "backend": {
                                        "service": {"name": "app-primary", "port": {"number": 80}}
                                    },
                                }
                            ]
                        },
                    }
                ]
            },
        },
    )
    api.put(*DEPLOYMENTS, deployment("app", NS, **_annotations()))


def ingress_weight(api: Any) -> int:
    try:
        ingress = api.get(*INGRESSES, NS, "web-canary")
    except KeyError:
        return 0
    notes = ingress["metadata"].get("annotations") or {}
    if notes.get("nginx.ingress.kubernetes.io/canary") != "true":
        return 0
    return int(notes.get("nginx.ingress.kubernetes.io/canary-weight", "0"))


def weights_written(api: Any, since: int) -> list[int]:
    out = []
    for r in api.requests[since:]:
        if r.resource != "ingresses" or r.namespace != NS:
            continue
        if r.verb not in ("create", "patch", "update") or r.status >= 300 or r.body is None:
            continue
        value = (r.body.get("metadata", {}).get("annotations") or {}).get(
            "nginx.ingress.kubernetes.io/canary-weight"
        )
        if value is not None:
            out.append(int(value))
    return out


def kube_state(api: Any) -> Any:
    from canary.kubernetes.operator import KubeState
    from canary.kubernetes.spec import ANNOTATION_STATUS

    obj = api.get(*DEPLOYMENTS, NS, "app")
    return KubeState.from_annotation(obj["metadata"].get("annotations", {}).get(ANNOTATION_STATUS))


async def _until(check: Any, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await asyncio.sleep(0.05)
    return None


async def kube_campaign(args: argparse.Namespace, base: Path) -> list[RunResult]:
    import aiohttp

    sys.path.insert(0, str(ROOT / "tests"))
    from support.kube_emulator import KubeEmulator

    from canary.demo.procs import HttpReady, ManagedProcess, find_binary, free_port
    from canary.demo.stack import service_process

    rng = random.Random(args.seed)
    results: list[RunResult] = []
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
        prom_url = f"http://{LOOPBACK}:{prom_port}"

        async with KubeEmulator() as api:
            _seed_cluster(api)
            kubeconfig = api.write_kubeconfig(base / "kubeconfig", token="controller")
            traffic_rng = random.Random(args.seed)
            urls = {arm: f"http://{LOOPBACK}:{port}/" for arm, port in ports.items()}

            async def traffic() -> None:
                batch = 10
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:

                    async def one(url: str) -> None:
                        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                            async with s.get(url) as response:
                                await response.read()

                    while True:
                        weight = ingress_weight(api)
                        chosen = [
                            urls["canary"]
                            if traffic_rng.random() * 100 < weight
                            else urls["primary"]
                            for _ in range(batch)
                        ]
                        await asyncio.gather(
                            *(one(u) for u in chosen), asyncio.sleep(batch / args.rate)
                        )

            load = asyncio.create_task(traffic())
            generation = 0
            ctl: Controller | None = None
            try:
                generation += 1
                ctl = _kube_controller(base, kubeconfig, prom_url, args, generation)
                await ctl.start()
                ready = await _until(lambda: (s := kube_state(api)) and s.primary_revision, 60)
                if not ready:
                    raise RuntimeError(f"the controller never initialised; see {ctl.log_path}")
                deadline = time.monotonic() + args.budget_s
                for index in range(args.runs):
                    if time.monotonic() > deadline:
                        print(f"time budget spent after {index} runs", flush=True)
                        break
                    result, ctl, generation = await kube_run(
                        index, api, ctl, generation, base, kubeconfig, prom_url, rng, args
                    )
                    results.append(result)
                    _progress(result)
            finally:
                if ctl is not None:
                    await ctl.stop()
                load.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await load
    finally:
        for proc in reversed(procs):
            await proc.stop()
    return results


def _kube_controller(
    base: Path, kubeconfig: Path, prom_url: str, args: argparse.Namespace, generation: int
) -> Controller:
    argv = [sys.executable, "-m", "canary", "kubernetes", f"--kubeconfig={kubeconfig}"]
    argv += [f"--namespace={NS}", f"--listen={LOOPBACK}:0", f"--prometheus-url={prom_url}"]
    argv += [f"--record-namespace={RECORDS_NS}", f"--tick={args.tick}"]
    argv += [f"--identity=controller-{generation}"]
    return Controller(argv, base / "controller.log")


async def kube_run(
    index: int,
    api: Any,
    ctl: Controller,
    generation: int,
    base: Path,
    kubeconfig: Path,
    prom_url: str,
    rng: random.Random,
    args: argparse.Namespace,
) -> tuple[RunResult, Controller, int]:
    from canary.kubernetes.operator import template_hash
    from canary.kubernetes.record_store import unpack_record

    result = RunResult(index)
    mark = len(api.requests)
    obj = api.get(*DEPLOYMENTS, NS, "app")
    obj["spec"]["template"]["spec"]["containers"][0]["image"] = f"example/app:{index + 2}"
    revision = template_hash(obj)
    api.put(*DEPLOYMENTS, obj)
    started = time.monotonic()

    def over() -> Any:
        st = kube_state(api)
        return (
            st is not None
            and st.rollout is not None
            and st.rollout.revision == revision
            and st.rollout.done
            and st
        )

    def active() -> bool:
        st = kube_state(api)
        return bool(st and st.rollout and st.rollout.revision == revision and st.rollout.active)

    def count() -> int:
        st = kube_state(api)
        if st is None or st.rollout is None or st.rollout.revision != revision or not st.record:
            return 0
        namespace, _, name = st.record.partition("/")
        try:
            return len(unpack_record(_record_dump(api, namespace, name)))
        except Exception:
            return 0

    kills = rng.randint(1, args.max_kills)
    before = ctl.servings() - 1  # already serving
    life = (0, False)
    for _ in range(kills):
        delay = await ctl.kill_delay(rng, args.horizon, before)
        if await _until(over, delay):
            break
        result.kills_active += active()
        await ctl.kill()
        result.lives.append((life[0], count(), life[1]))
        result.kills += 1
        await asyncio.sleep(rng.uniform(0.0, 0.5))
        generation += 1
        ctl = _kube_controller(base, kubeconfig, prom_url, args, generation)
        before = ctl.servings()
        life = (count(), active())
        await ctl.start()
        result.restarts += 1
    st = await _until(over, args.run_timeout)
    result.lives.append((life[0], count(), life[1]))
    result.duration_s = time.monotonic() - started
    if not st:
        result.info.append(f"not over after {args.run_timeout:g}s")
        st = kube_state(api)
    # The controller stays up between runs (the next template starts the next rollout).
    rollout_id = st.rollout_id if st is not None else None

    # (b) the record ConfigMap reads, and `canary report` renders it
    entries: list[Any] = []
    try:
        namespace, _, name = st.record.partition("/")
        entries = unpack_record(_record_dump(api, namespace, name))
    except Exception as exc:
        result.bad("b", f"record {getattr(st, 'record', None)}: {exc!r}")
    if rollout_id:
        argv = [rollout_id, "-n", RECORDS_NS, "--kubeconfig", str(kubeconfig)]
        code = await asyncio.to_thread(_report, [*argv, "--format", "md", "-o", os.devnull])
        if code != 0:
            result.bad("b", f"canary report {rollout_id} exited {code}")
    if st is not None and st.rollout is not None and st.rollout.revision != revision:
        result.bad("c", f"the status holds revision {st.rollout.revision}, not {revision}")
    check_entries(result, entries, rollout_id)

    # (a) the Ingress ends where the record says
    result.final_weight = ingress_weight(api)
    if result.recorded_weight is None:
        result.bad("a", "no transition recorded")
    elif result.final_weight != result.recorded_weight:
        result.bad(
            "a", f"Ingress at {result.final_weight}%, last recorded {result.recorded_weight}%"
        )
    if result.outcome in ("promoted", "rolled_back", "aborted") and result.final_weight != 0:
        result.bad("a", f"outcome {result.outcome} but Ingress at {result.final_weight}%")
    written = weights_written(api, mark)
    problem = weight_path_ok(written, result.outcome)
    if problem:
        result.bad("w", problem)
    repeats = sum(1 for i in range(1, len(written)) if written[i] == written[i - 1])
    if repeats:
        result.info.append(f"same weight written again {repeats}x: {written}")
    if result.outcome == "promoted":
        image = api.get(*DEPLOYMENTS, NS, "app-primary")["spec"]["template"]["spec"]["containers"][
            0
        ]["image"]
        if image != f"example/app:{index + 2}":
            result.bad("a", f"promoted but app-primary runs {image}")
    return result, ctl, generation


# ---- summary -----------------------------------------------------------------------------


def _progress(result: RunResult) -> None:
    flags = "".join(k for k, v in result.violations.items() if v) or "-"
    print(
        f"run {result.index:3d}: kills {result.kills} (active {result.kills_active}) "
        f"resumed {result.resumed_notes} {result.outcome:<11} weight {result.final_weight} "
        f"recorded {result.recorded_weight} {result.duration_s:5.1f}s violations {flags} "
        + "; ".join(v for vs in result.violations.values() for v in vs)
        + (" | " + "; ".join(result.info) if result.info else ""),
        flush=True,
    )


def summary(results: list[RunResult], args: argparse.Namespace, wall_s: float) -> str:
    lines = [
        f"mode {args.mode}, seed {args.seed}, {len(results)} runs, wall {wall_s:.0f} s",
        "",
        *table_rows({args.mode: results}),
    ]
    return "\n".join(lines + violation_lines(results))


def table_rows(by_mode: dict[str, list[RunResult]]) -> list[str]:
    lines = [
        "| mode | runs | kills | kills of an unfinished rollout | resumed notes "
        "| (a) end weight != last recorded | (w) weight moved back | (b) record unreadable "
        "| (c) silent restart | outcomes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for mode, results in by_mode.items():
        outcomes = collections.Counter(r.outcome for r in results)
        count = {k: sum(1 for r in results if r.violations.get(k)) for k in "awbc"}
        lines.append(
            f"| {mode} | {len(results)} | {sum(r.kills for r in results)} | "
            f"{sum(r.kills_active for r in results)} | {sum(r.resumed_notes for r in results)} | "
            f"{count['a']} | {count['w']} | {count['b']} | {count['c']} | "
            + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
            + " |"
        )
    return lines


def violation_lines(results: list[RunResult], label: str = "") -> list[str]:
    lines: list[str] = []
    bad = [r for r in results if any(r.violations.values())]
    if bad:
        lines += ["", f"Violations{label}:"]
        for r in bad:
            for kind, whys in r.violations.items():
                for why in whys:
                    lines.append(f"- run {r.index} ({kind}): {why}")
    notes = [r for r in results if r.info]
    if notes:
        lines += ["", f"Notes{label}:"] + [f"- run {r.index}: {'; '.join(r.info)}" for r in notes]
    return lines


def load_results(path: Path) -> list[RunResult]:
    """Results written with --json (older files put the weight path under (a): moved to (w))."""
    out = []
    for data in json.loads(path.read_text()):
        data["lives"] = [tuple(x) for x in data.get("lives", [])]
        violations = {"a": [], "w": [], "b": [], "c": []}
        for kind, whys in data.get("violations", {}).items():
            for why in whys:
                violations["w" if why.startswith("weight moved back") else kind].append(why)
        data["violations"] = violations
        out.append(RunResult(**data))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--mode", choices=("static", "kubernetes"), default="static")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-kills", type=int, default=3, help="kills per run: 1..N")
    parser.add_argument(
        "--horizon", type=float, default=4.0, help="kill within this many s of serving"
    )
    parser.add_argument("--tick", type=float, default=0.3)
    parser.add_argument("--rate", type=float, default=300.0, help="requests/s")
    parser.add_argument("--run-timeout", type=float, default=90.0)
    parser.add_argument("--budget-s", type=float, default=14 * 60, help="stop starting runs after")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write per-run results here")
    parser.add_argument(
        "--summarize", nargs="+", metavar="MODE=FILE", help="print one table of --json files"
    )
    args = parser.parse_args(argv)
    if args.summarize:
        by_mode: dict[str, list[RunResult]] = {}
        details: list[str] = []
        for item in args.summarize:
            mode, _, name = item.partition("=")
            loaded = load_results(Path(name))
            by_mode.setdefault(mode, []).extend(loaded)
            details += violation_lines(loaded, f" ({mode}, {Path(name).name})")
        print("\n".join(table_rows(by_mode) + details))
        return 0
    import tempfile

    base = args.workdir or Path(tempfile.mkdtemp(prefix=f"kill-{args.mode}-"))
    base.mkdir(parents=True, exist_ok=True)
    print(f"workdir {base}", flush=True)
    started = time.monotonic()
    campaign = static_campaign if args.mode == "static" else kube_campaign
    results = asyncio.run(campaign(args, base))
    wall = time.monotonic() - started
    text = summary(results, args, wall)
    print(text, flush=True)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=1, default=str))
    return 1 if any(any(r.violations.values()) for r in results) else 0


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
