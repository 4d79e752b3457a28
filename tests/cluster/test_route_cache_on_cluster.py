"""The routers' read-back comes from the watch cache, not a GET per tick (issue 13), on the
real control plane: `python -m canary kubernetes` as the controller's ServiceAccount (RBAC of
manifests/ enforced, so list + watch of Ingresses must be granted), a rollout of four steps
with the ingress-nginx router at one tick a second, metrics from a real Prometheus scraping
exporter processes, and traffic split by the canary Ingress' weight as ingress-nginx would.

Mid-rollout the test edits the canary weight as a person with kubectl would (`kubectl
annotate --overwrite`): the controller must notice it on a tick, through the watch, and set
the step's weight again, which is what the rollout machine does with a weight that does not
read back (canary.core.rollout `_reassert_weight`).

What the controller did comes from the apiserver's audit log, filtered by this controller's
own token: its GETs of the canary Ingress are about one per write (the read-back after a
weight change, which must prove the server holds it), not one per tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from support.control_plane import CONTROLLER_USER, LOOPBACK, MANIFESTS, ControlPlane, free_port

from canary.core.records import EndEntry, NoteEntry, TickEntry
from canary.demo.procs import HttpReady, ManagedProcess, find_binary
from canary.routers.ingress_nginx import CANARY_ANNOTATION, WEIGHT_ANNOTATION
from cluster.test_operator_on_cluster import (
    CUSTOM_METRICS,
    NEW_IMAGE,
    Controller,
    _credential,
    _service,
    credential,
    done,
    initialized,
    record,
    set_image,
    wait,
)

NS = "e2e-routecache"
LEASE = "e2e-routecache-leader"
STEPS = (10, 20, 30, 40)
DRIFT_AT = 20  # the step whose weight the test overwrites
DRIFT_TO = 77  # a weight no step has
RATE = 60.0  # requests/s


def app_objects() -> list[dict[str, Any]]:
    out = []
    for doc in yaml.safe_load_all((MANIFESTS / "examples" / "app-ingress-nginx.yaml").read_text()):
        if not doc or doc["kind"] == "Namespace":
            continue
        doc["metadata"]["namespace"] = NS
        if doc["kind"] == "Deployment":
            doc["metadata"]["annotations"] = {
                "canary.dev/enabled": "true",
                "canary.dev/router": "ingress-nginx",
                "canary.dev/ingress": "app",
                "canary.dev/steps": ",".join(map(str, STEPS)),
                # Long enough for many ticks per step, and for the drift to be seen at its step.
                "canary.dev/min-step-duration": "6s",
                "canary.dev/max-step-duration": "240s",
                "canary.dev/no-data-deadline": "90s",
                "canary.dev/analysis.error-tolerance": "5",
                **CUSTOM_METRICS,
            }
            doc["spec"]["replicas"] = 1
        out.append(doc)
    return out


def _prometheus_config(primary: int, canary: int) -> str:
    targets = "".join(
        f'      - targets: ["{LOOPBACK}:{port}"]\n'
        f'        labels: {{namespace: "{NS}", service: "{service}"}}\n'
        for service, port in (("app-primary", primary), ("app-canary", canary))
    )
    return (
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: apps\n    scrape_interval: 1s\n"
        "    scrape_timeout: 1s\n    static_configs:\n" + targets
    )


class Traffic:
    """Reads the canary Ingress' weight (as admin, which the audit policy does not log) and
    sends requests split by it, as ingress-nginx would. Its own thread and event loop."""

    def __init__(self, cluster: ControlPlane, primary: str, canary: str) -> None:
        self.cluster = cluster
        self.urls = {"primary": primary, "canary": canary}
        self.weight = 0
        self.errors: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="routecache-traffic", daemon=True)

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
            try:
                async with api.get(url) as response:
                    if response.status == 404:
                        self.weight = 0
                    else:
                        response.raise_for_status()
                        notes = (await response.json())["metadata"].get("annotations") or {}
                        on = notes.get(CANARY_ANNOTATION) == "true"
                        self.weight = int(notes.get(WEIGHT_ANNOTATION, "0")) if on else 0
            except (aiohttp.ClientError, TimeoutError, KeyError, ValueError) as exc:
                self.errors.append(repr(exc))
            await asyncio.sleep(0.1)

    async def _send(self, session: aiohttp.ClientSession) -> None:
        rng = random.Random("routecache")
        batch = 6

        async def one(url: str) -> None:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url) as response:
                    await response.read()

        while True:
            weight = min(self.weight, 100)
            urls = [
                self.urls["canary" if rng.random() * 100 < weight else "primary"]
                for _ in range(batch)
            ]
            await asyncio.gather(*(one(u) for u in urls), asyncio.sleep(batch / RATE))


@dataclass
class Run:
    cluster: ControlPlane
    controller: Controller
    traffic: Traffic
    credential: str
    drifted_at: float = 0.0  # time.time() of the test's kubectl edit


@pytest.fixture(scope="module")
def run(cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    workdir = tmp_path_factory.mktemp("routecache-e2e")
    started: list[ManagedProcess] = []
    controller: Controller | None = None
    try:
        primary, primary_port = _service("primary", 0.05, workdir, "primary")
        canary, canary_port = _service("canary", 0.05, workdir, "canary")
        started += [primary.start_sync(), canary.start_sync()]
        config = workdir / "prometheus.yml"
        config.write_text(_prometheus_config(primary_port, canary_port))
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
        cluster.kubectl(
            "apply",
            "-f",
            "-",
            stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": app_objects()}),
        )
        kubeconfig: Path = cluster.service_account_kubeconfig(workdir / "controller.kubeconfig")
        with Traffic(
            cluster, f"http://{LOOPBACK}:{primary_port}/", f"http://{LOOPBACK}:{canary_port}/"
        ) as traffic:
            controller = Controller(
                "routecache-replica",
                kubeconfig,
                f"http://{LOOPBACK}:{prom_port}",
                workdir / "ctl.log",
                lease=LEASE,
            )
            controller.start()
            shared = Run(cluster, controller, traffic, _credential(kubeconfig))
            wait(f"{NS}/app initialized", lambda: initialized(cluster, NS))
            set_image(cluster, NS, NEW_IMAGE)
            # Overwrite the weight as soon as the step starts: it lasts 6 ticks at least.
            wait(f"{NS} at {DRIFT_AT}%", lambda: traffic.weight == DRIFT_AT, timeout_s=300)
            cluster.kubectl(
                "annotate",
                "ingress",
                "app-canary",
                "-n",
                NS,
                "--overwrite",
                f"{WEIGHT_ANNOTATION}={DRIFT_TO}",
            )
            shared.drifted_at = time.time()
            yield shared
    finally:
        if controller is not None:
            controller.stop()
        for process in reversed(started):
            process.stop_sync()


def canary_ingress_requests(r: Run) -> list[dict[str, Any]]:
    """This controller's completed requests about the canary Ingress, in order."""
    return [
        e
        for e in r.cluster.audit_events()
        if e["stage"] == "ResponseComplete"
        and e["user"]["username"] == CONTROLLER_USER
        and credential(e) == r.credential
        and e.get("objectRef", {}).get("namespace") == NS
        and e["objectRef"].get("resource") == "ingresses"
        and e["objectRef"].get("name") == "app-canary"
    ]


def test_read_back_comes_from_the_watch_and_an_edit_by_kubectl_is_undone(run: Run) -> None:
    st = wait(f"{NS} done", lambda: done(run.cluster, NS), timeout_s=400)
    assert st.rollout is not None and st.rollout.outcome == "promoted", run.controller.text()[
        -4000:
    ]

    entries = record(run.cluster, st)
    ticks = [e for e in entries if isinstance(e, TickEntry)]
    requests = canary_ingress_requests(run)
    gets = [e for e in requests if e["verb"] == "get"]
    writes = [e for e in requests if e["verb"] in ("create", "patch")]
    written = [
        int((e["requestObject"]["metadata"].get("annotations") or {})[WEIGHT_ANNOTATION])
        for e in writes
        if (e.get("requestObject", {}).get("metadata", {}).get("annotations") or {}).get(
            WEIGHT_ANNOTATION
        )
    ]
    user_gets = [
        e
        for e in run.cluster.audit_events()
        if e["stage"] == "ResponseComplete"
        and credential(e) == run.credential
        and e["verb"] == "get"
        and e.get("objectRef", {}).get("namespace") == NS
        and e["objectRef"].get("resource") == "ingresses"
        and e["objectRef"].get("name") == "app"
    ]
    figures = {
        "ticks": len(ticks),
        "canary_ingress_gets": len(gets),
        "canary_ingress_writes": len(writes),
        "user_ingress_gets": len(user_gets),
        "gets_per_tick": round(len(gets) / max(1, len(ticks)), 3),
        "weights_written": written,
    }
    print(f"\nROUTECACHE_FIGURES {json.dumps(figures)}")

    # The steps were written in order, and the step the test edited was written twice: once
    # as the step, once to undo the edit.
    steps_written = [w for w in written if w in STEPS]
    assert [w for i, w in enumerate(steps_written) if i == 0 or steps_written[i - 1] != w] == list(
        STEPS
    ), written
    assert steps_written.count(DRIFT_AT) >= 2, written
    assert DRIFT_TO not in written
    # The edit was read back on a tick (from the watch: no GET came between), and said so.
    assert any(t.weight_read == DRIFT_TO for t in ticks), [t.weight_read for t in ticks]
    assert any(
        isinstance(e, NoteEntry) and f"router reports {DRIFT_TO}%" in e.message for e in entries
    ), [e for e in entries if isinstance(e, NoteEntry)]
    # Every other tick read the weight that was set.
    assert sum(t.weight_read == t.weight_set for t in ticks) >= len(ticks) - 3
    assert isinstance(entries[-1], EndEntry)

    # The point: GETs of the canary Ingress are about one per write (the read-back that
    # proves a new weight), not one per tick.
    assert len(ticks) >= 25, figures
    assert len(gets) <= len(writes) + 3, figures
    assert len(gets) * 3 < len(ticks), figures
    assert len(user_gets) <= 3, figures
