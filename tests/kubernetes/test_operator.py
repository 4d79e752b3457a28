"""The Kubernetes reconciler end to end on the API emulator, for what a real API server cannot
be made to do on cue: the real kubernetes-asyncio client, metrics from a real Prometheus
scraping per-version exporter processes (the demo service, run with sys.executable), and
traffic split by the weight the controller wrote into the canary Ingress.

The end-to-end cases a real server can carry (promote and roll back with ingress-nginx and
the Gateway API, kill and resume, two replicas, bad annotations, manual commands, a template
superseded mid-rollout, `canary kubernetes`' HTTP routes and `canary status`, records in
ConfigMaps) run on the real control plane in tests/cluster/test_operator_on_cluster.py. What
stays here needs a fault at a chosen request: a 409 on one particular status write and a 410
on the watches mid-rollout, every record ConfigMap write failing, one replica's Lease calls
failing while the other's succeed, a burst of 500s on the canary Ingress writes; and a
command written while no controller runs, answered by the next one (a race on a real
cluster, made certain here).

Each namespace below is one scenario; Prometheus labels every exporter with the namespace and
Service it stands for, so the `custom` metrics preset queries them as it would in a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import random
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from rich.console import Console
from support.kube import FAST_RETRY, deployment
from support.kube_emulator import KubeEmulator

from canary.core.records import EndEntry, NoteEntry, StartEntry, TickEntry
from canary.demo.procs import HttpReady, ManagedProcess, find_binary, free_port
from canary.demo.stack import service_process
from canary.kubernetes.client import Kube
from canary.kubernetes.commands import send_command
from canary.kubernetes.operator import (
    CommandAnswer,
    KubeState,
    MetricBrief,
    Operator,
    OperatorSettings,
)
from canary.kubernetes.record_store import RECORD_LABEL, unpack_record
from canary.kubernetes.spec import ANNOTATION_COMMAND, ANNOTATION_SPEC_ERROR, ANNOTATION_STATUS
from canary.reports.cluster import register_cluster_routes
from canary.server.app import Server, make_app
from canary.server.auth import TokenAccess
from canary.server.live import register_live

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENTS = ("apps", "v1", "deployments")
INGRESSES = ("networking.k8s.io", "v1", "ingresses")
RECORDS_NS = "canary-system"
GOOD = ("promote", "leader", "faults", "handover")
BAD = ("rollback",)

# Above `until`'s 240 s, so a rollout that is slow to pass fails with what it waited for; a
# good canary's first step can take ~100 s on a loaded 2-core machine (the p50 test sits on
# the lowest bucket, see notes_for); later steps pass on the evidence already gathered.
pytestmark = pytest.mark.timeout(300)


# ---- real exporters and Prometheus (once per module) ------------------------------------


def _service(version: str, error_rate: float, workdir: Path, tag: str) -> ManagedProcess:
    port = free_port()
    process = service_process(
        version,
        port=port,
        log_path=workdir / f"{tag}.log",
        error_rate=error_rate,
        latency_ms=2,
        seed=7,
        name=tag,
        cwd=ROOT,
    )
    process.port = port  # type: ignore[attr-defined]
    return process


def _prometheus_config(primary: int, good: int, bad: int) -> str:
    groups = []
    for namespace in (*GOOD, *BAD):
        canary = bad if namespace in BAD else good
        for service, port in (("app-primary", primary), ("app-canary", canary)):
            groups.append(
                f'      - targets: ["127.0.0.1:{port}"]\n'
                f'        labels: {{namespace: "{namespace}", service: "{service}"}}\n'
            )
    return (
        "global:\n  scrape_interval: 500ms\n  evaluation_interval: 500ms\n"
        "scrape_configs:\n  - job_name: apps\n    scrape_interval: 500ms\n"
        "    scrape_timeout: 500ms\n    static_configs:\n" + "".join(groups)
    )


class Stack:
    def __init__(self, prometheus_url: str, urls: dict[str, str]) -> None:
        self.prometheus_url = prometheus_url
        self.urls = urls  # primary, good, bad


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("operator-stack")
    services = {
        "primary": _service("primary", 0.01, workdir, "primary"),
        "good": _service("canary", 0.01, workdir, "canary-good"),
        "bad": _service("canary", 0.5, workdir, "canary-bad"),
    }
    started: list[ManagedProcess] = []
    try:
        for process in services.values():
            started.append(process.start_sync())
        ports = {k: p.port for k, p in services.items()}  # type: ignore[attr-defined]
        config = workdir / "prometheus.yml"
        config.write_text(_prometheus_config(ports["primary"], ports["good"], ports["bad"]))
        prom_port = free_port()
        prometheus = ManagedProcess(
            [
                find_binary("prometheus", fallbacks=("/usr/bin/prometheus",)),
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
                "--log.level=warn",
            ],
            log_path=workdir / "prometheus.log",
            ready=HttpReady(f"http://127.0.0.1:{prom_port}/-/ready"),
            ready_timeout=30,
            name="prometheus",
        )
        started.append(prometheus.start_sync())
        yield Stack(
            f"http://127.0.0.1:{prom_port}",
            {k: f"http://127.0.0.1:{port}/" for k, port in ports.items()},
        )
    finally:
        for process in reversed(started):
            process.stop_sync()


def canary_weight(api: KubeEmulator, namespace: str) -> int:
    """What ingress-nginx would send to the canary, read from the canary Ingress."""
    try:
        ingress = api.get(*INGRESSES, namespace, "web-canary")
    except KeyError:
        return 0
    annotations = ingress["metadata"].get("annotations") or {}
    if annotations.get("nginx.ingress.kubernetes.io/canary") != "true":
        return 0
    return int(annotations.get("nginx.ingress.kubernetes.io/canary-weight", "0"))


@contextlib.asynccontextmanager
async def traffic(
    api: KubeEmulator, stack: Stack, namespace: str, *, rate: float = 240.0
) -> AsyncIterator[None]:
    """Requests split between the two exporters by the canary Ingress' weight, as
    ingress-nginx would split them (seeded)."""
    rng = random.Random(11)
    canary_url = stack.urls["bad" if namespace in BAD else "good"]
    batch = 12

    async def run() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:

            async def one(url: str) -> None:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(url) as response:
                        await response.read()

            while True:
                weight = canary_weight(api, namespace)
                urls = [
                    canary_url if rng.random() * 100 < weight else stack.urls["primary"]
                    for _ in range(batch)
                ]
                await asyncio.gather(*(one(u) for u in urls), asyncio.sleep(batch / rate))

    task = asyncio.create_task(run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# ---- the cluster -------------------------------------------------------------------------


CUSTOM_METRICS = {
    "canary.dev/metrics": "custom",
    "canary.dev/metrics.requests": 'http_requests_total{namespace="{namespace}",service="{arm}"}',
    "canary.dev/metrics.errors": (
        'http_requests_total{namespace="{namespace}",service="{arm}",code=~"5.."}'
    ),
    "canary.dev/metrics.latency-buckets": (
        'http_request_duration_seconds_bucket{namespace="{namespace}",service="{arm}"}'
    ),
}


def notes_for(**overrides: str) -> dict[str, str]:
    base = {
        "canary.dev/enabled": "true",
        "canary.dev/router": "ingress-nginx",
        "canary.dev/ingress": "web",
        "canary.dev/steps": "30,60",
        "canary.dev/min-step-duration": "1s",
        # Generous: on a busy 2-core machine the exporters and Prometheus slow down, and a
        # pass at 30% can take longer than a minute; a quiet machine passes in seconds.
        "canary.dev/max-step-duration": "240s",
        "canary.dev/no-data-deadline": "60s",
        "canary.dev/analysis.quantiles": "p50",
        "canary.dev/analysis.error-tolerance": "5",
        "canary.dev/analysis.latency-tolerance": "1",
        **CUSTOM_METRICS,
    }
    base.update(overrides)
    return base


def seed(api: KubeEmulator, namespace: str, notes: dict[str, str]) -> None:
    """The user's Ingress `web` (to Service app-primary) and the annotated Deployment `app`."""
    api.put(
        *INGRESSES,
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "Ingress",
            "metadata": {"name": "web", "namespace": namespace},
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
    api.put(*DEPLOYMENTS, deployment("app", namespace, **notes))


def new_version(api: KubeEmulator, namespace: str, image: str) -> None:
    """The user (or CI) edits the pod template of `app`."""
    obj = api.get(*DEPLOYMENTS, namespace, "app")
    obj["spec"]["template"]["spec"]["containers"][0]["image"] = image
    api.put(*DEPLOYMENTS, obj)


def state(api: KubeEmulator, namespace: str) -> KubeState | None:
    obj = api.get(*DEPLOYMENTS, namespace, "app")
    return KubeState.from_annotation(obj["metadata"].get("annotations", {}).get(ANNOTATION_STATUS))


async def until(check: Callable[[], Any], *, timeout_s: float = 240.0, what: str = "") -> Any:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.1)


def weights_written(api: KubeEmulator, namespace: str, token: str | None = None) -> list[int]:
    """Every canary-weight the controller wrote into the canary Ingress, in order."""
    out = []
    for r in api.recorded(resource="ingresses", namespace=namespace):
        if r.verb not in ("create", "patch") or r.status >= 300 or r.body is None:
            continue
        if token is not None and r.token != token:
            continue
        value = (r.body.get("metadata", {}).get("annotations") or {}).get(
            "nginx.ingress.kubernetes.io/canary-weight"
        )
        if value is not None:
            out.append(int(value))
    return out


def events(api: KubeEmulator, namespace: str) -> list[dict[str, Any]]:
    return [o for k, o in api.objects.items() if k[2] == "events" and k[3] == namespace]


def record_entries(api: KubeEmulator, st: KubeState) -> list[Any]:
    """The record's head and chunks (by their label), as `kubectl get -l` would dump them."""
    namespace, _, name = st.record.partition("/")
    items = [
        o
        for k, o in api.objects.items()
        if k[2] == "configmaps"
        and k[3] == namespace
        and (o["metadata"].get("labels") or {}).get(RECORD_LABEL) == name
    ]
    return unpack_record({"kind": "List", "items": items})


async def connect(api: KubeEmulator, tmp_path: Path, token: str) -> Kube:
    config = api.write_kubeconfig(tmp_path / f"kc-{token}", token=token)
    return await Kube.connect(kubeconfig=str(config), retry=FAST_RETRY)


@contextlib.asynccontextmanager
async def running(
    api: KubeEmulator,
    tmp_path: Path,
    stack: Stack,
    namespace: str,
    *,
    token: str = "token-a",
    **settings: Any,
) -> AsyncIterator[tuple[Operator, asyncio.Task[None]]]:
    """An Operator on its own client, watching `namespace`, stopped (cancelled) at the end."""
    kube = await connect(api, tmp_path, token)
    defaults: dict[str, Any] = {
        "tick_s": 0.4,
        "record_flush_s": 0.0,
        "promote_poll_s": 0.05,
        "identity": token,
        "allow_webhook_hosts": ("127.0.0.1",),  # the tests' webhook receivers are on loopback
    }
    operator = Operator(
        kube,
        OperatorSettings(
            prometheus_url=stack.prometheus_url,
            record_namespace=RECORDS_NS,
            namespace=namespace,
            **{**defaults, **settings},
        ),
    )
    task = asyncio.create_task(operator.run())
    try:
        yield operator, task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await kube.close()


def initialized(api: KubeEmulator, namespace: str) -> bool:
    st = state(api, namespace)
    return st is not None and bool(st.primary_revision)


async def served_by_the_controller(operator: Operator, rollout_id: str) -> None:
    """`canary kubernetes`'s server: /reports/ lists the rollout from its record ConfigMap and
    renders its report, /rollouts?history=1 has its ticks and metrics, / is the live view."""
    app = make_app(
        operator,
        access=TokenAccess("reader-token-0123456789"),
        public_reads=True,
        ready=operator.ready,
        extensions=[
            register_live,
            functools.partial(
                register_cluster_routes, api=operator.kube, refs=operator.record_refs
            ),
        ],
    )
    async with Server(app) as server, aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}/reports/?format=json") as response:
            (listed,) = (await response.json())["reports"]
        assert (listed["rollout"], listed["outcome"]) == (rollout_id, "promoted")
        async with session.get(f"{server.url}/reports/{listed['id']}") as response:
            assert response.status == 200 and response.content_type == "text/html"
            assert "promoted" in (await response.text()).lower()
        async with session.get(f"{server.url}/reports/{listed['id']}?format=md") as response:
            assert response.status == 200 and rollout_id in await response.text()
        async with session.get(f"{server.url}/reports/no-such-rollout") as response:
            assert response.status == 404
        async with session.get(f"{server.url}/rollouts?history=1") as response:
            (rollout,) = (await response.json())["rollouts"]
        assert rollout["rollout"] == rollout_id and len(rollout["history"]) >= 3
        assert rollout["metrics"]["errors"]["decision"] in ("pass", "continue")
        async with session.get(f"{server.url}/") as response:
            assert response.status == 200 and "canary: live view" in await response.text()


# ---- tests -------------------------------------------------------------------------------


async def test_new_template_is_analysed_and_promoted(
    api: KubeEmulator, tmp_path: Path, stack: Stack
) -> None:
    """A 409 on the status write (re-read and retried) and a compacted watch (410, re-listed)
    on the way do not stop a promotion; the record holds the whole rollout, gzipped in chunk
    ConfigMaps under the size limit, and `canary report` reads it. (The plain promotion runs on
    the real control plane: tests/cluster/test_operator_on_cluster.py.)"""
    ns = "promote"
    seed(api, ns, notes_for())
    async with running(api, tmp_path, stack, ns, record_max_bytes=6000) as (operator, _):
        await until(lambda: initialized(api, ns), what="initialization")
        primary = api.get(*DEPLOYMENTS, ns, "app-primary")
        assert primary["spec"]["template"]["spec"]["containers"][0]["image"] == "example/app:1"
        assert primary["spec"]["selector"]["matchLabels"] == {"app": "app-primary"}
        assert primary["metadata"]["ownerReferences"][0]["name"] == "app"
        assert api.get(*DEPLOYMENTS, ns, "app")["spec"]["replicas"] == 0
        assert api.get("", "v1", "services", ns, "app-canary")["spec"]["selector"] == {"app": "app"}
        assert api.get("", "v1", "services", ns, "app-primary")["spec"]["selector"] == {
            "app": "app-primary"
        }
        assert canary_weight(api, ns) == 0

        # A stale write and a compacted watch on the way: re-read and retry, re-list.
        api.inject(409, times=1, verb="patch", resource="deployments")
        api.compact()
        api.close_watches(gone=True)
        async with traffic(api, stack, ns):
            new_version(api, ns, "example/app:2")
            st = await until(
                lambda: (s := state(api, ns)) and s.rollout and s.rollout.done and s,
                what="the rollout to end",
            )
        await served_by_the_controller(operator, st.rollout_id)
    assert st.rollout.outcome == "promoted", st.rollout
    primary = api.get(*DEPLOYMENTS, ns, "app-primary")
    assert primary["spec"]["template"]["spec"]["containers"][0]["image"] == "example/app:2"
    assert st.primary_revision == st.rollout.revision
    assert canary_weight(api, ns) == 0
    assert api.get(*DEPLOYMENTS, ns, "app")["spec"]["replicas"] == 0
    assert weights_written(api, ns) == [0, 30, 60, 100, 0]
    status_patches = [
        r
        for r in api.recorded(verb="patch", resource="deployments", namespace=ns, name="app")
        if ANNOTATION_STATUS in (r.body or {}).get("metadata", {}).get("annotations", {})
    ]
    (stale,) = api.recorded(verb="patch", resource="deployments", namespace=ns, status=409)
    after = [
        r
        for r in api.requests[api.requests.index(stale) + 1 :]
        if r.resource == "deployments" and r.name == "app" and r.verb in ("get", "patch")
    ]
    assert [r.verb for r in after[:2]] == ["get", "patch"] and after[1].status == 200
    assert after[1] in status_patches, "the status write was retried after a re-read"
    assert all(r.body["metadata"].get("resourceVersion") for r in status_patches)
    relists = api.recorded(verb="list", resource="deployments", namespace=ns)
    assert len(relists) >= 2, "410 Gone made the watch list again"

    reasons = {(e["type"], e["reason"]) for e in events(api, ns)}
    assert {("Normal", "Progressing"), ("Normal", "Promoting"), ("Normal", "Succeeded")} <= reasons
    assert ("Normal", "Promoted") in reasons

    # Past the 6000-byte limit the record goes on in chunk ConfigMaps: every write fits it.
    record_writes = [
        r
        for r in api.requests
        if r.resource == "configmaps"
        and r.verb in ("create", "update")
        and r.namespace == RECORDS_NS
    ]
    assert record_writes and all(len(json.dumps(r.body["data"])) <= 6000 for r in record_writes)
    entries = record_entries(api, st)
    assert int(api.get("", "v1", "configmaps", *st.record.split("/"))["data"]["record.chunks"]) > 0
    assert isinstance(entries[0], StartEntry) and entries[0].rollout == st.rollout_id
    assert isinstance(entries[-1], EndEntry) and entries[-1].outcome == "promoted"
    ticks = [e for e in entries if isinstance(e, TickEntry)]
    assert ticks and ticks[-1].verdict is not None
    # the status annotation keeps each metric's last result (`canary status` in a cluster)
    assert set(st.metrics) == set(ticks[-1].verdict.metrics)
    for name, brief in st.metrics.items():
        result = ticks[-1].verdict.metrics[name]
        assert (brief.decision, brief.estimate, brief.upper) == (
            result.decision.value,
            result.estimate,
            result.upper,
        )
    assert not any(isinstance(e, NoteEntry) and "downsampled" in e.message for e in entries)

    # `canary report ROLLOUT -n NS` reads this ConfigMap (F's cluster mode).
    from canary.cli.report import main as report_main

    out = tmp_path / "report.md"
    code = await asyncio.to_thread(
        report_main,
        [
            st.rollout_id,
            "-n",
            RECORDS_NS,
            "--kubeconfig",
            str(tmp_path / "kc-token-a"),
            "--format",
            "md",
            "-o",
            str(out),
        ],
    )
    assert code == 0 and "promoted" in out.read_text().lower()
    # ... and so does `canary report DEPLOYMENT -n APP_NAMESPACE`, through its status.
    out.unlink()
    code = await asyncio.to_thread(
        report_main,
        [
            "app",
            "-n",
            ns,
            "--kubeconfig",
            str(tmp_path / "kc-token-a"),
            "--format",
            "md",
            "-o",
            str(out),
        ],
    )
    assert code == 0 and "promoted" in out.read_text().lower()


async def test_failing_canary_is_rolled_back_and_record_failures_are_reported(
    api: KubeEmulator, tmp_path: Path, stack: Stack
) -> None:
    """A canary answering half its requests with 500s is rolled back (weight 0, scaled to
    zero, primary untouched, the rollback webhook told) even though every write of its
    record ConfigMap fails; that failure is in the status and a Warning Event."""
    ns = "rollback"
    received: list[Any] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    receiver = web.AppRunner(app)
    await receiver.setup()
    port = free_port()
    await web.TCPSite(receiver, "127.0.0.1", port).start()
    seed(api, ns, notes_for(**{"canary.dev/webhook.rolled-back": f"http://127.0.0.1:{port}/hook"}))
    async with running(api, tmp_path, stack, ns):
        await until(lambda: initialized(api, ns), what="initialization")
        api.inject(500, times=10_000, resource="configmaps")
        async with traffic(api, stack, ns):
            new_version(api, ns, "example/app:2")
            st = await until(
                lambda: (s := state(api, ns)) and s.rollout and s.rollout.done and s,
                what="the rollout to end",
            )
    assert st.rollout.outcome == "rolled_back", st.rollout
    assert "analysis failed" in st.rollout.reason
    assert (
        api.get(*DEPLOYMENTS, ns, "app-primary")["spec"]["template"]["spec"]["containers"][0][
            "image"
        ]
        == "example/app:1"
    )
    assert canary_weight(api, ns) == 0
    assert api.get(*DEPLOYMENTS, ns, "app")["spec"]["replicas"] == 0
    written = weights_written(api, ns)
    assert written[:2] == [0, 30] and written[-1] == 0 and 100 not in written
    assert "could not write record" in st.record_error
    warnings = {e["reason"] for e in events(api, ns) if e["type"] == "Warning"}
    assert {"RollingBack", "RecordWriteFailed", "RolledBack"} <= warnings
    try:
        await until(lambda: received, what="the rollback webhook", timeout_s=10)
    finally:
        await receiver.cleanup()
    (payload,) = received
    assert "rolled back" in json.dumps(payload).lower() and f"{ns}/app" in json.dumps(payload)


async def test_only_the_leader_acts(api: KubeEmulator, tmp_path: Path, stack: Stack) -> None:
    """Two instances with leader election: when the leader's own Lease calls fail (the
    other's do not, which only the emulator can arrange) it stops acting before the other
    takes over and carries on the rollout. (Only the holder writing, and a killed leader's
    rollout resumed, run on the real control plane.)"""
    from canary.kubernetes.client import LeaderElector

    ns = "leader"
    seed(api, ns, notes_for())
    clients = [await connect(api, tmp_path, t) for t in ("token-a", "token-b")]
    operators = [
        Operator(
            kube,
            OperatorSettings(
                prometheus_url=stack.prometheus_url,
                record_namespace=RECORDS_NS,
                namespace=ns,
                tick_s=0.4,
                record_flush_s=0.0,
                identity=ident,
            ),
            elector=LeaderElector(
                kube,
                namespace=RECORDS_NS,
                name="canary-leader",
                identity=ident,
                lease_duration_s=1,
                renew_deadline_s=0.6,
                retry_period_s=0.1,
            ),
        )
        for kube, ident in zip(clients, ("a", "b"), strict=True)
    ]
    stops = [asyncio.Event(), asyncio.Event()]
    tasks = [asyncio.create_task(op.run(stop)) for op, stop in zip(operators, stops, strict=True)]
    try:
        await until(lambda: initialized(api, ns), what="initialization")
        leader = 0 if operators[0].acting() else 1
        other = 1 - leader
        assert not operators[other].acting()
        tokens = ("token-a", "token-b")

        def writers() -> set[str | None]:
            return {
                r.token
                for r in api.requests
                if r.verb in ("create", "patch", "update") and r.resource != "leases"
            }

        assert writers() == {tokens[leader]}
        new_version(api, ns, "example/app:2")
        await until(
            lambda: (s := state(api, ns)) and s.rollout and s.rollout.active, what="a rollout"
        )
        assert writers() == {tokens[leader]}
        series = [op.telemetry.rollouts for op in operators]  # rollouts with series on /metrics
        await until(lambda: series[leader]() == 1, what="the rollout's series", timeout_s=10)
        assert series[other]() == 0  # a standby exports no rollout's series

        # The leader can no longer renew its Lease (its API calls for it fail): it must stop
        # acting by itself before the other may take over, and the other then carries on.
        api.inject(503, times=100_000, resource="leases", token=tokens[leader])
        await until(lambda: operators[other].acting(), what="the take-over", timeout_s=15)
        assert not operators[leader].acting() and not operators[leader].workers
        await until(
            lambda: any(
                r.token == tokens[other]
                and r.verb in ("create", "patch", "update")
                and r.resource != "leases"
                for r in api.requests
            ),
            what="the new leader to resume the rollout (its record gets a note)",
            timeout_s=10,
        )
        (worker,) = operators[other].workers.values()
        assert worker.runner is not None and not worker.runner.status.done
        # The series moved with the rollout: the old leader's would be frozen at the handover.
        assert series[leader]() == 0
        await until(lambda: series[other]() == 1, what="the new leader's series", timeout_s=10)
        writes = [
            r
            for r in api.requests
            if r.verb in ("create", "patch", "update") and r.resource != "leases"
        ]
        first_other = min(r.at for r in writes if r.token == tokens[other])
        assert max(r.at for r in writes if r.token == tokens[leader]) < first_other
        st = state(api, ns)
        assert st is not None and st.rollout is not None and st.rollout.active
    finally:
        for stop in stops:
            stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for kube in clients:
            await kube.close()


async def test_a_command_sent_while_no_controller_runs_goes_to_the_resumed_rollout(
    api: KubeEmulator, tmp_path: Path, stack: Stack
) -> None:
    """A command written while no replica runs the rollout (a restart, a leader hand-over)
    is answered by the next controller once it has resumed the rollout, not refused with
    "no rollout is in progress" (found on the real control plane: the command was handled
    before the rollout was resumed)."""
    ns = "handover"
    notes = {"canary.dev/min-step-duration": "10m", "canary.dev/max-step-duration": "20m"}
    seed(api, ns, notes_for(**notes))
    async with running(api, tmp_path, stack, ns, token="token-a"):
        await until(lambda: initialized(api, ns), what="initialization")
        new_version(api, ns, "example/app:2")
        await until(
            lambda: (s := state(api, ns)) and s.rollout and s.rollout.weight_verified,
            what="the first step",
        )
    cli = await connect(api, tmp_path, "token-cli")
    try:
        pause = asyncio.create_task(send_command(cli, ns, "app", "pause", who="alice", wait_s=60))
        await until(
            lambda: (
                ANNOTATION_COMMAND in api.get(*DEPLOYMENTS, ns, "app")["metadata"]["annotations"]
            ),
            what="the command annotation",
        )
        async with running(api, tmp_path, stack, ns, token="token-b"):
            code, message = await pause
    finally:
        await cli.close()
    assert code == 0 and "Paused" in message, message


def test_readme_documents_every_annotation() -> None:
    """The README's annotation table is canary.kubernetes.spec's, so the docs cannot drift."""
    from canary.kubernetes.spec import markdown_table

    assert markdown_table() in (ROOT / "README.md").read_text()


def test_services_and_primary_follow_the_app() -> None:
    """app-primary's labels are the app's selector labels suffixed -primary (so app-canary
    never selects primary pods), and Services target the pods' own port."""
    from canary.kubernetes.workload import _container_port, primary_template

    app = deployment("shop")
    app["spec"]["template"]["metadata"]["labels"]["tier"] = "web"
    selector, template = primary_template(app)
    assert selector == {"app": "shop-primary"}
    assert template["metadata"]["labels"] == {"app": "shop-primary", "tier": "web"}
    assert _container_port(app, default=80) == 80
    app["spec"]["template"]["spec"]["containers"][0]["ports"] = [{"containerPort": 8080}]
    assert _container_port(app, default=80) == 8080
    app["spec"]["template"]["spec"]["containers"][0]["ports"].append(
        {"name": "http", "containerPort": 9000}
    )
    assert _container_port(app, default=80) == "http"
    with pytest.raises(ValueError, match=r"no spec\.selector\.matchLabels"):
        primary_template({"metadata": {"name": "x"}, "spec": {}})


def test_a_newer_versions_status_fields_are_ignored_and_named() -> None:
    """A status a newer canary wrote (a downgrade) is read with its unknown fields ignored,
    not refused (which started every rollout over), and unknown_fields names them for the
    operator's warning; the rollout's own fields are read as written."""
    from canary.core.rollout import RolloutStatus, Transition

    st = KubeState(
        primary_revision="aaa",
        rollout=RolloutStatus(
            stage="Progressing",
            revision="bbb",
            step=1,
            weight=25,
            history=(
                Transition(at=1.0, from_phase="a", to_phase="b", step=0, weight=0, reason=""),
            ),
        ),
        command=CommandAnswer(id="1", command="pause", accepted=True),
        metrics={"errors": MetricBrief(decision="pass")},
    )
    data = json.loads(st.to_json())
    assert KubeState.unknown_fields(st.to_json()) == []
    data["later"] = [1]
    data["rollout"]["surge"] = 3
    data["rollout"]["history"][0]["why"] = "x"
    data["command"]["by"] = "bob"
    data["metrics"]["errors"]["sigma"] = 0.5
    newer = json.dumps(data)
    assert KubeState.from_annotation(newer) == st
    assert sorted(KubeState.unknown_fields(newer)) == [
        "command.by",
        "later",
        "metrics.errors.sigma",
        "rollout.history[0].why",
        "rollout.surge",
    ]
    assert KubeState.unknown_fields("not json") == []
    # the static mode's state file holds a RolloutStatus too
    assert RolloutStatus.from_json(json.dumps(data["rollout"])) == st.rollout
    # user input stays strict: an unknown annotation is an error that names it
    from canary.kubernetes.spec import SpecError, parse_annotations

    with pytest.raises(SpecError, match=r"canary\.dev/later"):
        parse_annotations({"canary.dev/enabled": "true", "canary.dev/later": "1"})


def test_status_rows_say_phase_step_weight_and_record() -> None:
    """`canary status` shows a rollout's phase, step, weight and record, and a spec error."""
    from canary.cli.kubernetes import _row
    from canary.core.rollout import RolloutStatus

    st = KubeState(
        primary_revision="aaa",
        rollout=RolloutStatus(
            stage="Progressing", revision="bbb", step=1, weight=25, message="pass; step 2/4"
        ),
        rollout_id="shop/app@bbb",
        record="canary-system/canary-record-shop-app-bbb",
    )
    obj = deployment("app", "shop", **{ANNOTATION_STATUS: st.to_json()})
    row = _row(obj)
    assert (row.key, row.phase, row.revision) == ("shop/app", "Progressing", "bbb")
    assert (row.step, row.weight, row.weight_read, row.weight_verified) == (1, 25, 25, True)
    assert row.rollout_id == "shop/app@bbb" and row.record.endswith("canary-record-shop-app-bbb")
    assert row.metrics == {}
    with_metrics = st.model_copy(
        update={
            "metrics": {
                "errors": MetricBrief(decision="pass", estimate=0.8, lower=0.1, upper=1.4),
                "latency_p99": MetricBrief(decision="continue", critical=False),
            }
        }
    )
    row = _row(deployment("app", "shop", **{ANNOTATION_STATUS: with_metrics.to_json()}))
    assert row.metrics["errors"]["decision"] == "pass"
    assert (row.metrics["errors"]["estimate"], row.metrics["errors"]["upper"]) == (0.8, 1.4)
    assert row.metrics["latency_p99"]["critical"] is False
    from canary.cli.status import render_table

    console = Console(width=200, record=True, file=io.StringIO())
    console.print(render_table([row], wide=True))
    assert "errors pass 0.8 [0.1, 1.4]" in console.export_text()
    bad = _row(deployment("app", "shop", **{ANNOTATION_SPEC_ERROR: '{"canary.dev/steps":"bad"}'}))
    assert bad.note == "invalid annotations" and "canary.dev/steps" in bad.message


async def test_router_failure_is_a_warning_and_the_weight_is_set_again(
    api: KubeEmulator, tmp_path: Path, stack: Stack
) -> None:
    """An API server failing the canary Ingress writes gives a Warning Event; the rollout
    holds and sets the weight again on the next tick instead of failing."""
    ns = "faults"
    seed(api, ns, notes_for())
    async with running(api, tmp_path, stack, ns):
        await until(lambda: initialized(api, ns), what="initialization")
        api.inject(500, times=4, verb="patch", resource="ingresses")  # one whole retried write
        new_version(api, ns, "example/app:2")
        st = await until(
            lambda: (s := state(api, ns)) and s.rollout and s.rollout.weight_verified and s,
            what="the first step, set again",
        )
    assert st.rollout.weight == 30 and canary_weight(api, ns) == 30
    warnings = [e["message"] for e in events(api, ns) if e["type"] == "Warning"]
    assert any("could not set 30%" in m for m in warnings), warnings
