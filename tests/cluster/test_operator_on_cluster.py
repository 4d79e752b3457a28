"""The operator end to end on the real control plane: `python -m canary kubernetes` as the
controller's ServiceAccount from manifests/ (RBAC enforced), two replicas with leader election,
metrics from a real Prometheus scraping exporter processes (the demo service), and traffic split
between them by the weights the controller wrote into the real API server's canary Ingress or
HTTPRoute. Pods are made Ready by kwok; Deployment status is the controller-manager's.

One set of processes for the module, and one rollout per namespace, all running at once (each
costs a minute on 2 cores; in sequence they would cost five):

    e2e-spec      a bad annotation, then fixed; a stale app-canary Service is corrected
    e2e-commands  pause, resume, abort through the annotation, by a user with get/patch only
    e2e-resume    ingress-nginx, promoted, with the leader killed (-9) in the middle
    e2e-rollback  a canary answering half its requests with 500s, rolled back
    e2e-gateway   Gateway API: HTTPRoute weights (the real CRD's schema), promoted
    e2e-supersede a newer template mid-rollout: the running rollout is superseded

The module ends by stopping the replicas with SIGTERM: exit status 0, the Lease released.

The tests read what the controller did from the apiserver's audit log (every request of its
ServiceAccount, with the bodies of its traffic writes: tests/support/control_plane.py's
AUDIT_POLICY), which is how the last test proves each rule of manifests/rbac.yaml is used.

The exporters are shared: every namespace's `app-primary` is one process, every good canary
another, the bad canary a third; Prometheus labels each target with the namespace and Service
it stands for (the `custom` metrics preset queries them as it would in a cluster). Only error
counts are compared (no latency buckets): the analysis itself is tested in tests/analysis; here
the subject is the controller on a real API server, and errors decide fastest.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from support.control_plane import (
    CONTROLLER_USER,
    LOOPBACK,
    MANIFESTS,
    REPO,
    ControlPlane,
    free_port,
    write_kubeconfig,
)

from canary.core.records import EndEntry, ManualEntry, NoteEntry, StartEntry
from canary.demo.procs import HttpReady, ManagedProcess, find_binary
from canary.demo.stack import service_process
from canary.kubernetes.operator import KubeState
from canary.kubernetes.record_store import RECORD_LABEL, unpack_record
from canary.kubernetes.spec import ANNOTATION_SPEC_ERROR, ANNOTATION_STATUS

SPEC, COMMANDS, RESUME, ROLLBACK, GATEWAY, SUPERSEDE = (
    "e2e-spec",
    "e2e-commands",
    "e2e-resume",
    "e2e-rollback",
    "e2e-gateway",
    "e2e-supersede",
)
NAMESPACES = (SPEC, COMMANDS, RESUME, ROLLBACK, GATEWAY, SUPERSEDE)
BAD = (ROLLBACK,)
RECORDS_NS = "canary-system"
LEASE = "e2e-leader"
NEW_IMAGE = "ghcr.io/example/shop:1.5.0"
OLD_IMAGE = "ghcr.io/example/shop:1.4.0"
NEWER_IMAGE = "ghcr.io/example/shop:1.6.0"
# Waits, not measurements: generous, because the machine may be busy with other suites.
WAIT_S = 300.0
RATE_PER_NAMESPACE = 60.0  # requests/s of the traffic generator, per namespace

CUSTOM_METRICS = {
    "canary.dev/metrics": "custom",
    "canary.dev/metrics.requests": 'http_requests_total{namespace="{namespace}",service="{arm}"}',
    "canary.dev/metrics.errors": (
        'http_requests_total{namespace="{namespace}",service="{arm}",code=~"5.."}'
    ),
}


def annotations_for(namespace: str) -> dict[str, str]:
    """The example's annotations, with steps and timings a test can wait for."""
    notes = {
        "canary.dev/enabled": "true",
        "canary.dev/router": "ingress-nginx",
        "canary.dev/ingress": "app",
        "canary.dev/steps": "30,60",
        "canary.dev/min-step-duration": "1s",
        "canary.dev/max-step-duration": "240s",
        "canary.dev/no-data-deadline": "90s",
        "canary.dev/analysis.error-tolerance": "5",
        **CUSTOM_METRICS,
    }
    if namespace == SPEC:
        notes["canary.dev/steps"] = "10,5"  # not increasing: invalid
    if namespace in (COMMANDS, SUPERSEDE):
        notes["canary.dev/min-step-duration"] = "10m"  # stays at its first step until told
        notes["canary.dev/max-step-duration"] = "20m"
    if namespace == RESUME:
        notes["canary.dev/steps"] = "30,50,70"
        # Slow enough to be killed in the middle: the analysis passes in seconds here.
        notes["canary.dev/min-step-duration"] = "20s"
    if namespace == GATEWAY:
        del notes["canary.dev/ingress"]
        notes["canary.dev/router"] = "gateway-api"
        notes["canary.dev/httproute"] = "app"
    return notes


def app_objects(namespace: str) -> list[dict[str, Any]]:
    """manifests/examples/ (ingress-nginx, or Gateway API for e2e-gateway), moved into
    `namespace`, with annotations_for(namespace) and two replicas."""
    example = "app-gateway-api.yaml" if namespace == GATEWAY else "app-ingress-nginx.yaml"
    out = []
    for doc in yaml.safe_load_all((MANIFESTS / "examples" / example).read_text()):
        if not doc or doc["kind"] == "Namespace":
            continue
        doc["metadata"]["namespace"] = namespace
        if doc["kind"] == "Deployment":
            doc["metadata"]["annotations"] = annotations_for(namespace)
            doc["spec"]["replicas"] = 2
        out.append(doc)
    return out


# ---- processes ---------------------------------------------------------------------------


def _prometheus_config(primary: int, good: int, bad: int) -> str:
    groups = []
    for namespace in NAMESPACES:
        canary = bad if namespace in BAD else good
        for service, port in (("app-primary", primary), ("app-canary", canary)):
            groups.append(
                f'      - targets: ["{LOOPBACK}:{port}"]\n'
                f'        labels: {{namespace: "{namespace}", service: "{service}"}}\n'
            )
    return (
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: apps\n    scrape_interval: 1s\n"
        "    scrape_timeout: 1s\n    static_configs:\n" + "".join(groups)
    )


@dataclass
class Controller:
    """One `python -m canary kubernetes` replica, started with sys.executable, stopped by PID."""

    name: str
    kubeconfig: Path
    prometheus_url: str
    log: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    # Other modules start this class too: each its own Lease, or this module's RBAC check
    # would find the Lease already created.
    lease: str = LEASE

    def start(self) -> None:
        argv = [
            sys.executable,
            "-m",
            "canary",
            "kubernetes",
            f"--kubeconfig={self.kubeconfig}",
            "--all-namespaces",
            "--leader-elect",
            f"--lease-name={self.lease}",
            f"--lease-namespace={RECORDS_NS}",
            f"--identity={self.name}",
            f"--listen={LOOPBACK}:{self.port}",
            f"--prometheus-url={self.prometheus_url}",
            f"--record-namespace={RECORDS_NS}",
            "--tick=1",
        ]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)},
                start_new_session=True,
            )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """kill -9, as the kernel's OOM killer or a node failure would."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def readyz(self) -> int:
        return self.http("/readyz")[0]

    def http(self, path: str, *, method: str = "GET", token: str = "") -> tuple[int, str]:
        """(status, body) of a request to the replica's HTTP server; 0 if it does not answer."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if method == "POST":
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(
            f"http://{LOOPBACK}:{self.port}{path}", method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()
        except OSError:
            return 0, ""


class Traffic:
    """Requests split between the exporters by the weights in the real API server, as
    ingress-nginx (the canary Ingress' canary-weight) or a gateway (the HTTPRoute's
    backendRefs weights) would split them; seeded. Also a stand-in gateway controller: it
    accepts each generation of the HTTPRoutes (status.parents[].conditions, through the
    status subresource, so the CRD's status schema checks it).

    Runs in its own thread with its own event loop, so that it keeps going while the tests
    wait (synchronously) and across them."""

    def __init__(self, cluster: ControlPlane, urls: dict[str, str]) -> None:
        self.cluster = cluster
        self.urls = urls
        self.weights: dict[str, int] = dict.fromkeys(NAMESPACES, 0)
        self.sent: dict[str, dict[str, int]] = {
            ns: {"primary": 0, "canary": 0} for ns in NAMESPACES
        }
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)
        self.errors: list[str] = []

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)

    def _tls(self) -> ssl.SSLContext:
        pki = self.cluster.pki
        context = ssl.create_default_context(cafile=str(self.cluster.ca_file))
        context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        return context

    def _run(self) -> None:
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        api = aiohttp.ClientSession(
            base_url=self.cluster.server,
            connector=aiohttp.TCPConnector(ssl=self._tls()),
            timeout=aiohttp.ClientTimeout(total=10),
        )
        apps = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        tasks = [asyncio.create_task(self._poll(api, ns)) for ns in NAMESPACES]
        tasks += [asyncio.create_task(self._send(apps, ns)) for ns in NAMESPACES]
        try:
            await self._stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await api.close()
            await apps.close()

    async def _poll(self, api: aiohttp.ClientSession, namespace: str) -> None:
        while True:
            try:
                if namespace == GATEWAY:
                    self.weights[namespace] = await self._route_weight(api, namespace)
                else:
                    self.weights[namespace] = await self._ingress_weight(api, namespace)
            except (aiohttp.ClientError, TimeoutError, KeyError, ValueError) as exc:
                self.errors.append(f"{namespace}: {exc!r}")
            await asyncio.sleep(0.3)

    async def _ingress_weight(self, api: aiohttp.ClientSession, namespace: str) -> int:
        url = f"/apis/networking.k8s.io/v1/namespaces/{namespace}/ingresses/app-canary"
        async with api.get(url) as response:
            if response.status == 404:
                return 0
            response.raise_for_status()
            ingress = await response.json()
        annotations = ingress["metadata"].get("annotations") or {}
        if annotations.get("nginx.ingress.kubernetes.io/canary") != "true":
            return 0
        return int(annotations.get("nginx.ingress.kubernetes.io/canary-weight", "0"))

    async def _route_weight(self, api: aiohttp.ClientSession, namespace: str) -> int:
        url = f"/apis/gateway.networking.k8s.io/v1/namespaces/{namespace}/httproutes/app"
        async with api.get(url) as response:
            if response.status == 404:
                return 0
            response.raise_for_status()
            route = await response.json()
        generation = route["metadata"]["generation"]
        parents = (route.get("status") or {}).get("parents") or []
        if not parents or parents[0]["conditions"][0]["observedGeneration"] != generation:
            await self._accept(api, url, route)
        refs = {
            r["name"]: int(r.get("weight", 1)) for r in route["spec"]["rules"][0]["backendRefs"]
        }
        total = refs.get("app-primary", 0) + refs.get("app-canary", 0)
        return round(100 * refs.get("app-canary", 0) / total) if total else 0

    async def _accept(self, api: aiohttp.ClientSession, url: str, route: dict[str, Any]) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        status = {
            "parents": [
                {
                    "parentRef": route["spec"]["parentRefs"][0],
                    "controllerName": "example.com/gateway",
                    "conditions": [
                        {
                            "type": kind,
                            "status": "True",
                            "reason": kind,
                            "message": "",
                            "lastTransitionTime": now,
                            "observedGeneration": route["metadata"]["generation"],
                        }
                        for kind in ("Accepted", "ResolvedRefs")
                    ],
                }
            ]
        }
        async with api.patch(
            url + "/status",
            data=json.dumps({"status": status}),
            headers={"Content-Type": "application/merge-patch+json"},
        ) as response:
            if response.status >= 300:
                self.errors.append(f"status of {url}: {response.status} {await response.text()}")

    async def _send(self, session: aiohttp.ClientSession, namespace: str) -> None:
        rng = random.Random(f"traffic-{namespace}")
        canary_url = self.urls["bad" if namespace in BAD else "good"]
        batch = 6

        async def one(arm: str, url: str) -> None:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url) as response:
                    await response.read()
                    self.sent[namespace][arm] += 1

        while True:
            weight = self.weights[namespace]
            arms = [
                ("canary", canary_url)
                if rng.random() * 100 < weight
                else ("primary", self.urls["primary"])
                for _ in range(batch)
            ]
            await asyncio.gather(
                *(one(arm, url) for arm, url in arms), asyncio.sleep(batch / RATE_PER_NAMESPACE)
            )


@dataclass
class E2E:
    """Everything the module's tests share."""

    cluster: ControlPlane
    workdir: Path
    prometheus_url: str
    traffic: Traffic
    kubeconfigs: dict[str, Path]
    replicas: dict[str, Controller] = field(default_factory=dict)

    def start(self, name: str, kubeconfig: str) -> Controller:
        replica = Controller(
            name,
            self.kubeconfigs[kubeconfig],
            self.prometheus_url,
            self.workdir / f"{kubeconfig}.log",
        )
        self.replicas[kubeconfig] = replica
        replica.start()
        return replica

    def logs(self) -> str:
        return "\n".join(
            f"--- {key} ({r.name}) ---\n{r.text()[-3000:]}" for key, r in self.replicas.items()
        )


def _service(
    version: str, error_rate: float, workdir: Path, tag: str
) -> tuple[ManagedProcess, int]:
    port = free_port()
    return (
        service_process(
            version,
            port=port,
            log_path=workdir / f"{tag}.log",
            error_rate=error_rate,
            latency_ms=2,
            seed=7,
            name=tag,
            cwd=REPO,
        ),
        port,
    )


def _credential(kubeconfig: Path) -> str:
    """The token's JTI, as the audit log names it (user.extra credential-id)."""

    token = json.loads(kubeconfig.read_text())["users"][0]["user"]["token"]
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return f"JTI={claims['jti']}"


def _alice(cluster: ControlPlane, path: Path) -> Path:
    """A person who may get and patch Deployments in e2e-commands, and nothing else: a
    ServiceAccount there with a Role, and a kubeconfig with its token."""
    rbac = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "alice"}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "rollout-operator"},
            "rules": [
                {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "patch"]}
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "alice"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "rollout-operator",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "alice", "namespace": COMMANDS}],
        },
    ]
    cluster.kubectl(
        "apply",
        "-n",
        COMMANDS,
        "-f",
        "-",
        stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": rbac}),
    )
    token = cluster.kubectl("create", "token", "alice", "-n", COMMANDS).stdout.strip()
    return write_kubeconfig(
        path,
        server=cluster.server,
        ca_file=cluster.ca_file,
        user=f"system:serviceaccount:{COMMANDS}:alice",
        token=token,
        namespace=COMMANDS,
    )


@pytest.fixture(scope="module")
def e2e(cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2E]:
    """Exporters, Prometheus, the apps in their namespaces, two controller replicas (a and
    b, each with its own token of the controller's ServiceAccount; a starts first and leads)
    and the traffic; new versions of the apps are applied once they are initialized."""
    workdir = tmp_path_factory.mktemp("operator-e2e")
    # Three tokens of the same ServiceAccount: replica a, replica b, and a restarted a.
    kubeconfigs = {
        key: cluster.service_account_kubeconfig(workdir / f"{key}.kubeconfig")
        for key in ("a", "b", "a2")
    }
    kubeconfigs["alice"] = workdir / "alice.kubeconfig"
    started: list[ManagedProcess] = []
    shared: E2E | None = None
    try:
        services = {
            "primary": _service("primary", 0.05, workdir, "primary"),
            "good": _service("canary", 0.05, workdir, "canary-good"),
            "bad": _service("canary", 0.5, workdir, "canary-bad"),
        }
        for process, _ in services.values():
            started.append(process.start_sync())
        ports = {key: port for key, (_, port) in services.items()}
        config = workdir / "prometheus.yml"
        config.write_text(_prometheus_config(ports["primary"], ports["good"], ports["bad"]))
        prom_port = free_port()
        prometheus = ManagedProcess(
            [
                find_binary("prometheus", fallbacks=("/usr/bin/prometheus",)),
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address={LOOPBACK}:{prom_port}",
                "--log.level=warn",
            ],
            log_path=workdir / "prometheus.log",
            ready=HttpReady(f"http://{LOOPBACK}:{prom_port}/-/ready"),
            ready_timeout=60,
            name="prometheus",
        )
        started.append(prometheus.start_sync())

        for namespace in NAMESPACES:
            cluster.kubectl("create", "namespace", namespace)
        _alice(cluster, kubeconfigs["alice"])
        # A Service of the controller's name left behind with a wrong selector: the controller
        # corrects it once the app's annotations are valid (RBAC: patch services).
        cluster.kubectl("create", "service", "clusterip", "app-canary", "--tcp=80:8080", "-n", SPEC)
        for namespace in NAMESPACES:
            cluster.kubectl(
                "apply",
                "-f",
                "-",
                stdin=json.dumps(
                    {"apiVersion": "v1", "kind": "List", "items": app_objects(namespace)}
                ),
            )
        urls = {key: f"http://{LOOPBACK}:{port}/" for key, port in ports.items()}
        with Traffic(cluster, urls) as traffic:
            shared = E2E(cluster, workdir, f"http://{LOOPBACK}:{prom_port}", traffic, kubeconfigs)
            shared.start("replica-a", "a")
            wait(
                "replica-a to hold the Lease",
                lambda: lease_holder(cluster) == "replica-a",
                shared,
            )
            shared.start("replica-b", "b")
            for namespace in (COMMANDS, RESUME, ROLLBACK, GATEWAY, SUPERSEDE):
                wait(
                    f"{namespace}/app initialized",
                    lambda ns=namespace: initialized(cluster, ns),  # type: ignore[misc]
                    shared,
                )
                set_image(cluster, namespace, NEW_IMAGE)
            yield shared
    finally:
        for replica in shared.replicas.values() if shared is not None else ():
            replica.stop()
        for process in reversed(started):
            process.stop_sync()


# ---- reading the cluster -----------------------------------------------------------------


def wait(
    what: str, probe: Callable[[], Any], e2e: E2E | None = None, timeout_s: float = WAIT_S
) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not seen within {timeout_s:g}s: {what}\n{e2e.logs() if e2e else ''}")
        time.sleep(0.5)


def get(cluster: ControlPlane, namespace: str, *what: str) -> Any:
    result = cluster.kubectl("get", *what, "-n", namespace, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def lease_holder(cluster: ControlPlane) -> str | None:
    lease = get(cluster, RECORDS_NS, "lease", LEASE)
    holder = (lease or {}).get("spec", {}).get("holderIdentity")
    return str(holder) if holder else None


def state(cluster: ControlPlane, namespace: str) -> KubeState | None:
    app = get(cluster, namespace, "deployment", "app")
    if app is None:
        return None
    return KubeState.from_annotation(
        (app["metadata"].get("annotations") or {}).get(ANNOTATION_STATUS)
    )


def initialized(cluster: ControlPlane, namespace: str) -> bool:
    st = state(cluster, namespace)
    return st is not None and bool(st.primary_revision)


def done(cluster: ControlPlane, namespace: str) -> KubeState | None:
    st = state(cluster, namespace)
    return st if st is not None and st.rollout is not None and st.rollout.done else None


def set_image(cluster: ControlPlane, namespace: str, image: str) -> None:
    cluster.kubectl("set", "image", "deployment/app", f"app={image}", "-n", namespace)


def record(cluster: ControlPlane, st: KubeState) -> list[Any]:
    """The record's head and chunks, as `kubectl get configmap -l canary.io/record=` dumps it."""
    namespace, _, name = st.record.partition("/")
    return unpack_record(get(cluster, namespace, "configmaps", "-l", f"{RECORD_LABEL}={name}"))


def events(cluster: ControlPlane, namespace: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = get(cluster, namespace, "events")["items"]
    return items


def controller_requests(
    cluster: ControlPlane, namespace: str | None = None
) -> list[dict[str, Any]]:
    """The controller ServiceAccount's completed requests, in order, from the audit log."""
    return [
        e
        for e in cluster.audit_events()
        if e["stage"] == "ResponseComplete"
        and e["user"]["username"] == CONTROLLER_USER
        and (namespace is None or e.get("objectRef", {}).get("namespace") == namespace)
    ]


def credential(event: dict[str, Any]) -> str:
    return str(
        event["user"].get("extra", {}).get("authentication.kubernetes.io/credential-id", ["?"])[0]
    )


def ours(event: dict[str, Any]) -> bool:
    """A request about this module's apps: in their namespaces, or their record ConfigMaps
    (other tests in the session run controllers of their own, with other tokens)."""
    ref = event.get("objectRef") or {}
    return ref.get("namespace") in NAMESPACES or (
        ref.get("namespace") == RECORDS_NS
        and ref.get("resource") == "configmaps"
        # (other modules' namespaces start with e2e- too: e2e-ab-nginx, e2e-gone, ...)
        and str(ref.get("name", "")).startswith(
            tuple(f"canary-record-{ns}-app-" for ns in NAMESPACES)
        )
    )


def writes(cluster: ControlPlane, namespace: str | None = None) -> list[dict[str, Any]]:
    """The controller's successful writes about this module's apps, but the Lease's."""
    return [
        e
        for e in controller_requests(cluster, namespace)
        if e["verb"] in ("create", "patch", "update")
        and e["objectRef"].get("resource") != "leases"
        and e["responseStatus"]["code"] < 300
        and ours(e)
    ]


def ingress_weights(cluster: ControlPlane, namespace: str) -> list[int]:
    """Every canary-weight the controller wrote into the canary Ingress, in order."""
    out = []
    for e in writes(cluster, namespace):
        if e["objectRef"].get("resource") != "ingresses":
            continue
        value = (e["requestObject"].get("metadata", {}).get("annotations") or {}).get(
            "nginx.ingress.kubernetes.io/canary-weight"
        )
        if value is not None:
            out.append(int(value))
    return out


def image_of(deployment: dict[str, Any]) -> str:
    return str(deployment["spec"]["template"]["spec"]["containers"][0]["image"])


def rolled_out(cluster: ControlPlane, namespace: str, name: str, image: str) -> bool:
    """The Deployment has `image` and every replica updated and available, as the
    controller-manager reports it (pods made Ready by kwok)."""
    obj = get(cluster, namespace, "deployment", name)
    if obj is None or image_of(obj) != image:
        return False
    status, replicas = obj.get("status") or {}, obj["spec"]["replicas"]
    return bool(
        status.get("observedGeneration") == obj["metadata"]["generation"]
        and status.get("updatedReplicas") == replicas
        and status.get("availableReplicas") == replicas
        and status.get("replicas") == replicas
    )


# ---- tests -------------------------------------------------------------------------------


def test_bad_annotation_warns_and_traffic_is_never_touched(e2e: E2E) -> None:
    """`canary.dev/steps: 10,5` gives a Warning Event and the spec-error annotation naming
    the key, and the controller writes no traffic object, Service or app-primary; fixed, it
    is picked up without a restart, and the app-canary Service it finds with a wrong selector
    is corrected."""
    cluster = e2e.cluster

    def spec_error() -> str | None:
        app = get(cluster, SPEC, "deployment", "app")
        return (app["metadata"].get("annotations") or {}).get(ANNOTATION_SPEC_ERROR)

    error = json.loads(wait("the spec-error annotation", spec_error, e2e))
    assert "strictly increasing" in error["canary.dev/steps"], error
    warning = wait(
        "an InvalidSpec Event",
        lambda: [e for e in events(cluster, SPEC) if e["reason"] == "InvalidSpec"],
        e2e,
    )[0]
    assert warning["type"] == "Warning" and "canary.dev/steps" in warning["message"]
    touched = [
        (e["verb"], e["objectRef"].get("resource"))
        for e in writes(cluster, SPEC)
        if e["objectRef"].get("resource") in ("ingresses", "services", "httproutes")
        or (e["objectRef"].get("resource") == "deployments" and e["verb"] == "create")
    ]
    assert touched == []
    assert get(cluster, SPEC, "ingress", "app-canary") is None
    assert get(cluster, SPEC, "deployment", "app-primary") is None
    assert state(cluster, SPEC) is None

    cluster.kubectl(
        "annotate", "deployment", "app", "canary.dev/steps=10,20", "--overwrite", "-n", SPEC
    )
    wait("initialization after the fix", lambda: initialized(cluster, SPEC), e2e)
    assert spec_error() is None
    assert get(cluster, SPEC, "service", "app-canary")["spec"]["selector"] == {"app": "app"}
    ingress = get(cluster, SPEC, "ingress", "app-canary")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/canary-weight"] == "0"


def test_leader_killed_mid_rollout_the_rollout_resumes_and_is_promoted(e2e: E2E) -> None:
    """Two replicas: only the Lease holder writes (the other says in its log that it is
    standby, and is not ready). The leader is killed (-9) at the second step; the standby
    takes over after the Lease expires and resumes the rollout at the same step, no weight
    moved back or written twice, one start in the record; a restarted replica is standby.
    The rollout is promoted: the canary Ingress' weight steps up to 100 and back to 0,
    app-primary gets the new template and its pods are made Ready by kwok."""
    cluster = e2e.cluster
    a, b = e2e.replicas["a"], e2e.replicas["b"]
    wait("b's standby line", lambda: "held by replica-a; replica-b is standby" in b.text(), e2e)
    assert (a.readyz(), b.readyz()) == (200, 503)
    before = wait(
        "the second step",
        lambda: (
            (s := state(cluster, RESUME))
            and s.rollout
            and s.rollout.step >= 1
            and s.rollout.weight_verified
            and s
        ),
        e2e,
    )
    assert lease_holder(cluster) == "replica-a"
    a.kill()
    # As a newer canary would have left it (a downgrade): fields this one does not know, at
    # the top, in the rollout and in a transition. They are ignored and named in a warning;
    # the rollout is resumed, not started over.
    status = json.loads(
        get(cluster, RESUME, "deployment", "app")["metadata"]["annotations"][ANNOTATION_STATUS]
    )
    status["from_a_newer_canary"] = {"x": 1}
    status["rollout"]["newer_field"] = 2
    status["rollout"]["history"][0]["newer_detail"] = "3"
    cluster.kubectl(
        "annotate",
        "--overwrite",
        "deployment/app",
        "-n",
        RESUME,
        f"{ANNOTATION_STATUS}={json.dumps(status)}",
    )
    by_a = _credential(a.kubeconfig)
    assert {credential(e) for e in writes(cluster)} <= {by_a}, "only the leader wrote"
    assert all(credential(e) == by_a for e in writes(cluster, RESUME))

    wait("replica-b to take the Lease", lambda: lease_holder(cluster) == "replica-b", e2e)
    restarted = e2e.start("replica-a", "a2")
    st = wait("the resumed rollout to end", lambda: done(cluster, RESUME), e2e)
    assert st.rollout.outcome == "promoted", st.rollout
    assert st.rollout_id == before.rollout_id
    wait(
        "the restarted replica's standby line",
        lambda: "held by replica-b; replica-a is standby" in restarted.text(),
        e2e,
    )

    warned = [
        line
        for line in b.text().splitlines()
        if "the status annotation has fields this canary does not know" in line
    ]
    assert warned, b.text()[-4000:]
    for name in ("from_a_newer_canary", "rollout.newer_field", "rollout.history[0].newer_detail"):
        assert name in warned[0], warned
    by_b = _credential(b.kubeconfig)
    resume_writes = writes(cluster, RESUME)
    assert {credential(e) for e in resume_writes} == {by_a, by_b}
    last_a = max(e["stageTimestamp"] for e in resume_writes if credential(e) == by_a)
    first_b = min(e["stageTimestamp"] for e in resume_writes if credential(e) == by_b)
    assert last_a < first_b
    assert not [e for e in writes(cluster) if credential(e) == _credential(restarted.kubeconfig)]
    weights = ingress_weights(cluster, RESUME)
    assert weights == [0, 30, 50, 70, 100, 0], weights

    entries = record(cluster, st)
    assert sum(isinstance(e, StartEntry) for e in entries) == 1
    notes = [e.message for e in entries if isinstance(e, NoteEntry)]
    assert any(n.startswith("resumed by replica-b") for n in notes), notes
    assert isinstance(entries[-1], EndEntry) and entries[-1].outcome == "promoted"

    wait(
        "app-primary rolled out with the new template",
        lambda: rolled_out(cluster, RESUME, "app-primary", NEW_IMAGE),
        e2e,
    )
    pods = get(cluster, RESUME, "pods", "-l", "app=app-primary")["items"]
    ready = [
        p
        for p in pods
        if image_of({"spec": {"template": p}}) == NEW_IMAGE
        and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"]["conditions"])
    ]
    assert len(ready) >= 2
    assert get(cluster, RESUME, "deployment", "app")["spec"]["replicas"] == 0
    reasons = {(e["type"], e["reason"]) for e in events(cluster, RESUME)}
    assert {("Normal", "Progressing"), ("Normal", "Promoted")} <= reasons
    text = "\n".join(r.text() for r in e2e.replicas.values()).lower()
    assert "forbidden" not in text and " 403" not in text, text[-4000:]


def _canary_cli(e2e: E2E, *argv: str) -> tuple[int, str]:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "canary",
            *argv,
            f"--kubeconfig={e2e.kubeconfigs['alice']}",
            "-n",
            COMMANDS,
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "CANARY_WAIT": "60"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


def test_manual_commands_through_the_annotation(e2e: E2E) -> None:
    """pause, resume and abort from `canary` by a user who may only get and patch the
    Deployment are answered by the controller; a refused command says why; `canary status`
    reads the status. The user's token reads /rollouts and is asked for (TokenReview,
    SubjectAccessReview as the controller's ServiceAccount); /metrics and the probes answer.
    The record ConfigMap in canary-system has the commands and who sent them, also after
    someone else changed its head mid-rollout (the controller's next save is refused on the
    head's resourceVersion, reads the head back and rewrites it: nothing is lost)."""
    cluster = e2e.cluster
    wait(
        "the first step",
        lambda: (s := state(cluster, COMMANDS)) and s.rollout and s.rollout.weight_verified,
        e2e,
    )
    st = state(cluster, COMMANDS)
    assert st is not None
    head_ns, _, head = st.record.partition("/")
    wait("the record's head", lambda: get(cluster, head_ns, "configmap", head), e2e)
    # Another writer (here an admin's label) moves the head's resourceVersion: the rewrite
    # path (GET, then update) is taken whatever the save timing, so the RBAC test below sees
    # the controller use 'update configmaps'.
    cluster.kubectl("label", "configmap", head, "-n", head_ns, "team=shop")
    # ... and the leader's Lease (renewed by a replace every retry period): the label stays
    # through the renewals and the release (test_replicas_stop_on_sigterm_...)
    cluster.kubectl("label", "lease", LEASE, "-n", RECORDS_NS, "team=platform")
    code, out = _canary_cli(e2e, "pause", "app", "--who", "alice")
    assert code == 0 and "Paused" in out, out
    code, out = _canary_cli(e2e, "resume", "app", "--who", "alice")
    assert code == 0 and "Progressing" in out, out

    code, out = _canary_cli(e2e, "status", "app")
    assert code == 0 and out.startswith("NAME"), out
    assert out.splitlines()[1].split()[:2] == [f"{COMMANDS}/app", "Progressing"], out
    code, out = _canary_cli(e2e, "status", "missing")
    assert code == 4 and "no Deployment" in out, out

    leader = next(r for r in e2e.replicas.values() if r.readyz() == 200)
    token = json.loads(e2e.kubeconfigs["alice"].read_text())["users"][0]["user"]["token"]
    code, body = leader.http(f"/rollouts/{COMMANDS}/app", token=token)
    assert code == 200, body
    view = json.loads(body)
    assert view["deployment"] == "app" and view["phase"] == "Progressing", view
    assert leader.http(f"/rollouts/{COMMANDS}/app")[0] == 401  # no token
    assert leader.http(f"/rollouts/{COMMANDS}/app/pause", method="POST")[0] == 401
    code, body = leader.http("/metrics")
    assert code == 200 and "canary_errors" in body
    assert all(r.http("/healthz")[0] == 200 for r in e2e.replicas.values() if r.running)

    code, out = _canary_cli(e2e, "abort", "app", "--who", "alice", "--reason", "bad feeling")
    assert code == 0, out
    st = wait("the abort", lambda: done(cluster, COMMANDS), e2e)
    assert st.rollout.outcome == "aborted", st.rollout
    code, out = _canary_cli(e2e, "promote", "app", "--who", "alice")
    assert code == 1 and "refused" in out, out
    code, out = _canary_cli(e2e, "pause", "app", "--who", "alice")
    assert code == 1 and "no rollout is in progress" in out, out
    code, body = leader.http(f"/rollouts/{COMMANDS}/app/pause", method="POST", token=token)
    assert code == 409 and "no rollout is in progress" in body, body

    alice = [
        e
        for e in cluster.audit_events()
        if e["stage"] == "ResponseComplete" and e["user"]["username"].endswith(":alice")
    ]
    patches = [e for e in alice if e["verb"] == "patch"]
    assert patches and {e["verb"] for e in alice} <= {"get", "patch"}
    assert all(set(e["requestObject"]) == {"metadata"} for e in patches)
    assert all(set(e["requestObject"]["metadata"]) == {"annotations"} for e in patches)
    entries = record(cluster, st)
    manual = [(e.command, e.who) for e in entries if isinstance(e, ManualEntry)]
    assert manual == [("pause", "alice"), ("resume", "alice"), ("abort", "alice")]
    head_after = get(cluster, head_ns, "configmap", head)
    assert head_after["metadata"]["labels"]["team"] == "shop"  # the rewrite kept the label
    rewrites = [
        e
        for e in controller_requests(cluster, head_ns)
        if e["verb"] == "update" and e["objectRef"].get("name") == head
    ]
    assert rewrites, "the head changed under the controller was never rewritten"
    assert isinstance(entries[-1], EndEntry) and entries[-1].outcome == "aborted"
    assert (
        get(cluster, COMMANDS, "deployment", "app-primary")
        and image_of(get(cluster, COMMANDS, "deployment", "app-primary")) == OLD_IMAGE
    )

    # Issue 13: the finished rollout's series stay while its Deployment exists (dashboards
    # show the last outcome), and leave /metrics once it is deleted: none pile up over days.
    series = f'rollout="{COMMANDS}/app"'
    failed = (
        f'canary_rollout_phase{{name="app",namespace="{COMMANDS}",phase="Failed",{series}}} 1.0'
    )
    wait("the finished rollout's series", lambda: failed in leader.http("/metrics")[1], e2e)
    cluster.kubectl("delete", "deployment", "app", "-n", COMMANDS, "--wait=false")
    wait(
        "the deleted Deployment's series to leave /metrics",
        lambda: series not in leader.http("/metrics")[1],
        e2e,
    )


def test_a_newer_template_mid_rollout_supersedes_it(e2e: E2E) -> None:
    """A new template during a rollout ends the running record as superseded and starts a
    new rollout of the newer template from the first step, with a record and an Event that
    say so, and reports that say so."""
    from canary.kubernetes.operator import template_hash
    from canary.reports import build_report, render_markdown

    cluster = e2e.cluster
    first = wait(
        "the first rollout",
        lambda: (s := state(cluster, SUPERSEDE)) and s.rollout and s.rollout.weight_verified and s,
        e2e,
    )
    set_image(cluster, SUPERSEDE, NEWER_IMAGE)
    newest = template_hash(get(cluster, SUPERSEDE, "deployment", "app"))
    second = wait(
        "the second rollout",
        lambda: (
            (s := state(cluster, SUPERSEDE))
            and s.rollout
            and s.rollout.revision == newest
            and s.rollout.weight_verified
            and s
        ),
        e2e,
    )
    assert second.rollout.active and second.rollout.step == 0 and second.rollout.weight == 30
    assert second.rollout_id != first.rollout_id and second.record != first.record
    old = record(cluster, first)
    assert isinstance(old[-1], EndEntry) and old[-1].outcome == "superseded"
    new = record(cluster, second)
    assert isinstance(new[0], StartEntry)
    assert f"superseded {first.rollout_id}" in new[0].config["reason"]
    assert any(e.kind == "transition" and "restarting the analysis" in e.reason for e in new)
    assert any(e["reason"] == "Superseded" for e in events(cluster, SUPERSEDE))
    for entries in (old, new):
        text = render_markdown(
            build_report([e.model_dump(mode="json", by_alias=True) for e in entries])
        )
        assert "superseded" in text.lower(), text[:2000]


def test_failing_canary_is_rolled_back(e2e: E2E) -> None:
    """A canary answering half its requests with 500s is rolled back: weight 0, never 100,
    the canary scaled to zero, app-primary untouched; Warning Events say so; its report is
    served under /reports/."""
    cluster = e2e.cluster
    st = wait("the rollback", lambda: done(cluster, ROLLBACK), e2e)
    assert st.rollout.outcome == "rolled_back", st.rollout
    assert "analysis failed" in st.rollout.reason
    assert image_of(get(cluster, ROLLBACK, "deployment", "app-primary")) == OLD_IMAGE
    weights = ingress_weights(cluster, ROLLBACK)
    assert weights[:2] == [0, 30] and weights[-1] == 0 and 100 not in weights, weights
    assert get(cluster, ROLLBACK, "deployment", "app")["spec"]["replicas"] == 0
    warnings = {e["reason"] for e in events(cluster, ROLLBACK) if e["type"] == "Warning"}
    assert {"RollingBack", "RolledBack"} <= warnings
    entries = record(cluster, st)
    assert isinstance(entries[-1], EndEntry) and entries[-1].outcome == "rolled_back"

    # The leader serves the rollout's report from its record ConfigMap (`get` by name, the
    # RBAC it has) to a reader the cluster allows, and the live view's page to anyone.
    leader = next(r for r in e2e.replicas.values() if r.readyz() == 200)
    token = json.loads(e2e.kubeconfigs["a"].read_text())["users"][0]["user"]["token"]
    code, body = leader.http("/reports/?format=json", token=token)
    assert code == 200, body
    listed = {r["rollout"]: r for r in json.loads(body)["reports"]}
    assert listed[st.rollout_id]["outcome"] == "rolled_back", listed
    code, page = leader.http(f"/reports/{listed[st.rollout_id]['id']}", token=token)
    assert code == 200 and "rolled back" in page.lower(), page[:500]
    assert leader.http("/reports/?format=json")[0] == 401
    code, page = leader.http("/")
    assert code == 200 and "canary: live view" in page


def test_gateway_api_weights_are_promoted(e2e: E2E) -> None:
    """With `canary.dev/router: gateway-api` the HTTPRoute's backendRefs weights carry the
    rollout (written through the real CRD's schema, which refuses a negative weight) and
    it is promoted."""
    cluster = e2e.cluster
    st = wait("the Gateway API rollout to end", lambda: done(cluster, GATEWAY), e2e)
    assert st.rollout.outcome == "promoted", st.rollout
    written = [
        {r["name"]: r.get("weight") for r in e["requestObject"]["spec"]["rules"][0]["backendRefs"]}
        for e in writes(cluster, GATEWAY)
        if e["objectRef"].get("resource") == "httproutes"
    ]
    # The example's route starts at 100/0 already: nothing to write before the first step.
    assert [w["app-canary"] for w in written] == [30, 60, 100, 0], written
    assert all(w["app-primary"] + w["app-canary"] == 100 for w in written)
    wait(
        "app-primary rolled out with the new template",
        lambda: rolled_out(cluster, GATEWAY, "app-primary", NEW_IMAGE),
        e2e,
    )
    route = get(cluster, GATEWAY, "httproute", "app")
    bad = json.loads(json.dumps(route["spec"]["rules"]))
    bad[0]["backendRefs"][0]["weight"] = -1
    refused = cluster.kubectl(
        "patch",
        "httproute",
        "app",
        "-n",
        GATEWAY,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"rules": bad}}),
        check=False,
    )
    assert refused.returncode != 0 and "weight" in refused.stderr, refused.stderr
    assert not [m for m in e2e.traffic.errors if "status of" in m], e2e.traffic.errors


_HPA_RULES = {
    ("autoscaling", "horizontalpodautoscalers", verb)
    for verb in ("get", "list", "watch", "create", "patch", "delete")
}


# The HTTPRoute GET is the route cache's fallback: a read before the watch has shown the
# router's own write, or before the cache has synced. Whether a run needs it is a race (the
# watch event and the PATCH's answer arrive together), so this run may not use it; it stays
# checked for refusals below, and tests/kubernetes/test_informer.py shows when it is used.
_CACHE_FALLBACK_RULES = {("gateway.networking.k8s.io", "httproutes", "get")}


def _granted() -> set[tuple[str, str, str]]:
    """Each (apiGroup, resource, verb) that manifests/rbac.yaml grants."""
    return {
        (group, resource, verb)
        for doc in yaml.safe_load_all((MANIFESTS / "rbac.yaml").read_text())
        if doc and doc["kind"] in ("ClusterRole", "Role")
        for rule in doc["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_every_rbac_rule_is_used_and_none_is_missing(e2e: E2E) -> None:
    """After the rollouts above, the apiserver's audit log shows that the controller (the
    replicas' own tokens of its ServiceAccount, not the other tests') used every (group,
    resource, verb) that manifests/rbac.yaml grants at least once, and was never refused: a
    rule it does not use is named here, and so is a permission it lacks."""
    replicas = {_credential(path) for key, path in e2e.kubeconfigs.items() if key != "alice"}
    seen: dict[tuple[str, str, str], int] = {}
    refused = set()
    for event in e2e.cluster.audit_events():
        if event["user"]["username"] != CONTROLLER_USER or credential(event) not in replicas:
            continue
        ref = event.get("objectRef") or {}
        triple = (ref.get("apiGroup", ""), ref.get("resource", ""), event["verb"])
        if ref.get("subresource"):
            triple = (triple[0], f"{triple[1]}/{ref['subresource']}", triple[2])
        if event["annotations"].get("authorization.k8s.io/decision") == "allow":
            seen[triple] = seen.get(triple, 0) + 1
        else:
            refused.add(triple)
    # No app here has an HPA: tests/cluster/test_hpa_on_cluster.py shows each HPA rule used.
    unused = sorted(_granted() - set(seen) - _HPA_RULES - _CACHE_FALLBACK_RULES)
    assert unused == [], "granted in manifests/rbac.yaml but never used: " + ", ".join(
        f"{verb} {resource}.{group or 'core'}" for group, resource, verb in unused
    )
    assert refused == set(), f"refused to the controller: {sorted(refused)}"
    assert set(seen) <= _granted()


def test_replicas_stop_on_sigterm_and_the_leader_releases_the_lease(e2e: E2E) -> None:
    """SIGTERM stops each running replica with exit status 0, and the leader gives the
    Lease up on the way out (an empty holder), so a successor need not wait for it."""
    holder = lease_holder(e2e.cluster)
    assert holder in {r.name for r in e2e.replicas.values() if r.running}
    for replica in e2e.replicas.values():
        if replica.running:
            replica.stop()
            assert replica.process is not None and replica.process.returncode == 0, replica.text()[
                -3000:
            ]
    assert lease_holder(e2e.cluster) is None
    lease = get(e2e.cluster, RECORDS_NS, "lease", LEASE)
    assert lease["metadata"]["labels"] == {"team": "platform"}, lease["metadata"]  # kept
