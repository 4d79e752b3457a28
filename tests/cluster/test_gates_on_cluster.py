"""A gate annotation end to end on the real control plane: `python -m canary kubernetes` as the
controller's ServiceAccount (manifests/ RBAC enforced), a Deployment annotated with
`canary.dev/webhook.confirm-promotion` (and a `rollout` hook with metadata) pointing at a real
HTTP receiver on 127.0.0.1 (allowed by `--allow-webhook-host`), metrics from a real Prometheus
scraping the demo service's exporters, and traffic split by the canary Ingress weight the
controller writes into the real API server.

The receiver answers 403 to confirm-promotion until the test has seen the rollout hold at its
last step, then 200: the rollout must wait at that weight, then promote. It is also the
Deployment's `canary.dev/webhook.event` (Flagger's event webhook), told of every Event the
controller records for the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from support.control_plane import LOOPBACK, MANIFESTS, REPO, ControlPlane, free_port

from canary.core.records import EndEntry, NoteEntry
from canary.demo.procs import HttpReady, ManagedProcess, find_binary
from canary.demo.stack import service_process
from canary.kubernetes.operator import KubeState
from canary.kubernetes.record_store import unpack_record
from canary.kubernetes.spec import ANNOTATION_STATUS

pytestmark = pytest.mark.slow

NS = "e2e-gate"
RECORDS_NS = "canary-system"  # where the controller's Role lets it keep records
OLD_IMAGE = "ghcr.io/example/shop:1.4.0"
NEW_IMAGE = "ghcr.io/example/shop:1.5.0"
WAIT_S = 300.0  # a wait, not a measurement: the machine may be busy
METADATA = {"url": "http://app-canary.e2e-gate/", "rps": "20", "duration": "30s"}


class Receiver:
    """Flagger-style gate receiver in a thread: answers each payload type with the status set
    for it (200 by default) and keeps every payload."""

    def __init__(self) -> None:
        self.status: dict[str, int] = {"confirm-promotion": 403}
        self.payloads: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                payload = json.loads(body)
                receiver.payloads.append(payload)
                self.send_response(receiver.status.get(str(payload.get("type")), 200))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def got(self, kind: str) -> list[dict[str, Any]]:
        return [p for p in list(self.payloads) if p.get("type") == kind]

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


class Traffic:
    """Requests split between the primary and canary exporters by the canary Ingress' weight
    as ingress-nginx would split them (seeded), in a thread with its own event loop."""

    def __init__(self, cluster: ControlPlane, primary: str, canary: str) -> None:
        self.cluster, self.primary, self.canary = cluster, primary, canary
        self.weight = 0
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        pki = self.cluster.pki
        tls = ssl.create_default_context(cafile=str(self.cluster.ca_file))
        tls.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        api = aiohttp.ClientSession(
            base_url=self.cluster.server,
            connector=aiohttp.TCPConnector(ssl=tls),
            timeout=aiohttp.ClientTimeout(total=10),
        )
        apps = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        tasks = [asyncio.create_task(self._poll(api)), asyncio.create_task(self._send(apps))]
        try:
            await self._stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await api.close()
            await apps.close()

    async def _poll(self, api: aiohttp.ClientSession) -> None:
        url = f"/apis/networking.k8s.io/v1/namespaces/{NS}/ingresses/app-canary"
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, KeyError, ValueError):
                async with api.get(url) as response:
                    if response.status == 404:
                        self.weight = 0
                    else:
                        notes = (await response.json())["metadata"].get("annotations") or {}
                        on = notes.get("nginx.ingress.kubernetes.io/canary") == "true"
                        weight = notes.get("nginx.ingress.kubernetes.io/canary-weight", "0")
                        self.weight = int(weight) if on else 0
            await asyncio.sleep(0.3)

    async def _send(self, session: aiohttp.ClientSession) -> None:
        rng = random.Random("gates")

        async def one(url: str) -> None:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url) as response:
                    await response.read()

        while True:
            urls = [
                self.canary if rng.random() * 100 < self.weight else self.primary for _ in range(6)
            ]
            await asyncio.gather(*(one(u) for u in urls), asyncio.sleep(0.1))


@dataclass
class Operator:
    """One `python -m canary kubernetes` as the controller's ServiceAccount, stopped by PID."""

    kubeconfig: Path
    prometheus_url: str
    log: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [
            sys.executable,
            "-m",
            "canary",
            "kubernetes",
            f"--kubeconfig={self.kubeconfig}",
            f"--namespace={NS}",
            f"--listen={LOOPBACK}:{self.port}",
            f"--prometheus-url={self.prometheus_url}",
            f"--record-namespace={RECORDS_NS}",
            f"--allow-webhook-host={LOOPBACK}",
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

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _app_objects(receiver_port: int) -> list[dict[str, Any]]:
    hooks = f"http://{LOOPBACK}:{receiver_port}"
    annotations = {
        "canary.dev/enabled": "true",
        "canary.dev/router": "ingress-nginx",
        "canary.dev/ingress": "app",
        "canary.dev/steps": "30,60",
        "canary.dev/min-step-duration": "1s",
        "canary.dev/max-step-duration": "240s",
        "canary.dev/no-data-deadline": "90s",
        "canary.dev/analysis.error-tolerance": "5",
        "canary.dev/metrics": "custom",
        "canary.dev/metrics.requests": 'http_requests_total{namespace="{namespace}",service="{arm}"}',
        "canary.dev/metrics.errors": (
            'http_requests_total{namespace="{namespace}",service="{arm}",code=~"5.."}'
        ),
        "canary.dev/webhook.confirm-promotion": f"{hooks}/confirm",
        "canary.dev/webhook.confirm-promotion.timeout": "5s",
        "canary.dev/webhook.rollout": f"{hooks}/load",
        "canary.dev/webhook.rollout.metadata": json.dumps(METADATA),
        "canary.dev/webhook.event": f"{hooks}/event",
        "canary.dev/webhook.event.metadata": '{"team": "payments", "eventType": "not this"}',
    }
    out = []
    for doc in yaml.safe_load_all((MANIFESTS / "examples" / "app-ingress-nginx.yaml").read_text()):
        if not doc or doc["kind"] == "Namespace":
            continue
        doc["metadata"]["namespace"] = NS
        if doc["kind"] == "Deployment":
            doc["metadata"]["annotations"] = annotations
            doc["spec"]["replicas"] = 1
        out.append(doc)
    return out


@dataclass
class Setup:
    cluster: ControlPlane
    receiver: Receiver
    traffic: Traffic
    operator: Operator

    def logs(self) -> str:
        return self.operator.log.read_text(errors="replace")[-4000:]


def _service(version: str, workdir: Path, tag: str) -> tuple[ManagedProcess, int]:
    port = free_port()
    process = service_process(
        version,
        port=port,
        log_path=workdir / f"{tag}.log",
        error_rate=0.05,
        latency_ms=2,
        seed=7,
        name=tag,
        cwd=REPO,
    )
    return process, port


@pytest.fixture(scope="module")
def setup(cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    workdir = tmp_path_factory.mktemp("gates-e2e")
    started: list[ManagedProcess] = []
    operator: Operator | None = None
    try:
        services = {"primary": _service("primary", workdir, "primary")}
        services["canary"] = _service("canary", workdir, "canary")
        for process, _ in services.values():
            started.append(process.start_sync())
        targets = "".join(
            f'      - targets: ["{LOOPBACK}:{port}"]\n'
            f'        labels: {{namespace: "{NS}", service: "app-{key}"}}\n'
            for key, (_, port) in services.items()
        )
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: apps\n    scrape_interval: 1s\n"
            "    scrape_timeout: 1s\n    static_configs:\n" + targets
        )
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
        cluster.kubectl("create", "namespace", NS)
        with Receiver() as receiver:
            cluster.kubectl(
                "apply",
                "-f",
                "-",
                stdin=json.dumps(
                    {"apiVersion": "v1", "kind": "List", "items": _app_objects(receiver.port)}
                ),
            )
            urls = {key: f"http://{LOOPBACK}:{port}/" for key, (_, port) in services.items()}
            with Traffic(cluster, urls["primary"], urls["canary"]) as traffic:
                kubeconfig = cluster.service_account_kubeconfig(workdir / "op.kubeconfig")
                operator = Operator(
                    kubeconfig, f"http://{LOOPBACK}:{prom_port}", workdir / "op.log"
                )
                operator.start()
                yield Setup(cluster, receiver, traffic, operator)
    finally:
        if operator is not None:
            operator.stop()
        for process in reversed(started):
            process.stop_sync()


def wait(what: str, probe: Any, setup: Setup, timeout_s: float = WAIT_S) -> Any:
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not seen within {timeout_s:g}s: {what}\n{setup.logs()}")
        time.sleep(0.5)


def get(cluster: ControlPlane, *what: str, namespace: str = NS) -> Any:
    result = cluster.kubectl("get", *what, "-n", namespace, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def state(cluster: ControlPlane) -> KubeState | None:
    app = get(cluster, "deployment", "app")
    if app is None:
        return None
    return KubeState.from_annotation(
        (app["metadata"].get("annotations") or {}).get(ANNOTATION_STATUS)
    )


def canary_weight(cluster: ControlPlane) -> int | None:
    ingress = get(cluster, "ingress", "app-canary")
    if ingress is None:
        return None
    notes = ingress["metadata"].get("annotations") or {}
    return int(notes.get("nginx.ingress.kubernetes.io/canary-weight", "0"))


def test_confirm_promotion_annotation_holds_then_opens_and_promotes(setup: Setup) -> None:
    """`canary.dev/webhook.confirm-promotion` answering 403 holds the rollout at its last
    step (60%) with the analysis passed; the hold and the gate's answer are in the status
    message and the record; once it answers 200 the rollout promotes. Every call carries
    Flagger's payload: the Deployment's name and namespace, the pod template's revision as
    checksum, and (for the rollout hook) the annotation's metadata verbatim."""
    cluster, receiver = setup.cluster, setup.receiver
    wait(
        "app initialized",
        lambda: (st := state(cluster)) is not None and bool(st.primary_revision),
        setup,
    )
    cluster.kubectl("set", "image", "deployment/app", f"app={NEW_IMAGE}", "-n", NS)
    wait(
        "confirm-promotion asked three times",
        lambda: len(receiver.got("confirm-promotion")) >= 3,
        setup,
    )
    st = state(cluster)
    assert st is not None and st.rollout is not None
    assert st.rollout.phase.value == "Progressing" and st.rollout.weight == 60, st.rollout
    assert "confirm-promotion gate" in st.rollout.message, st.rollout.message
    assert st.rollout.gate_answers["confirm-promotion"].startswith("closed (HTTP 403"), st.rollout
    assert canary_weight(cluster) == 60
    receiver.status["confirm-promotion"] = 200
    done = wait(
        "the promotion",
        lambda: (
            (s := state(cluster)) is not None and s.rollout is not None and s.rollout.done and s
        ),
        setup,
    )
    assert done.rollout.outcome == "promoted", done.rollout
    gates = [p for p in receiver.payloads if p.get("type") != "event"]
    assert gates and all(p["checksum"] == done.rollout.revision for p in gates)
    confirm = receiver.got("confirm-promotion")[0]
    assert {k: confirm[k] for k in ("name", "namespace", "phase", "type", "metadata")} == {
        "name": "app",
        "namespace": NS,
        "phase": "Progressing",
        "type": "confirm-promotion",
        "metadata": {},
    }
    loads = receiver.got("rollout")
    assert loads and all(p["metadata"] == METADATA for p in loads)
    namespace, _, name = done.record.partition("/")
    entries = unpack_record(get(cluster, "configmap", name, namespace=namespace))
    notes = [e.message for e in entries if isinstance(e, NoteEntry)]
    assert any(n.startswith("gate confirm-promotion: closed (HTTP 403") for n in notes), notes
    assert any(n.startswith("gate confirm-promotion: open (HTTP 200") for n in notes), notes
    assert isinstance(entries[-1], EndEntry) and entries[-1].outcome == "promoted"

    # `webhook.event`: every Event the controller recorded for the app was posted in
    # Flagger's event payload, with the rollout's phase and revision once it had begun.
    def recorded() -> list[tuple[str, str, str]]:
        items = get(cluster, "events")["items"]
        return sorted(
            (e["type"], e["reason"], e["message"])
            for e in items
            if e["involvedObject"]["kind"] == "Deployment"
            and e["involvedObject"]["name"] == "app"
            and e.get("reportingComponent") == "canary"  # not the controller-manager's
        )

    def posted() -> list[tuple[str, str, str]]:
        return sorted(
            (m["eventType"], m["eventReason"], m["eventMessage"])
            for m in (p["metadata"] for p in receiver.got("event"))
        )

    wait("every Event posted", lambda: recorded() and set(recorded()) <= set(posted()), setup)
    events = receiver.got("event")
    assert all((p["name"], p["namespace"]) == ("app", NS) for p in events), events
    assert {"Progressing", "Promoted"} <= {p["metadata"]["eventReason"] for p in events}
    promoted = [p for p in events if p["metadata"]["eventReason"] == "Promoted"]
    assert promoted[-1]["checksum"] == done.rollout.revision, promoted
    assert all(p["metadata"]["timestamp"].isdigit() for p in events)
    # the annotation's metadata, in the keys the Event's own leave free (Flagger's rule)
    assert all(p["metadata"]["team"] == "payments" for p in events), events
    assert {p["metadata"]["eventType"] for p in events} <= {"Normal", "Warning"}
