"""A/B rollouts by the operator on the real control plane: `python -m canary kubernetes` as the
controller's ServiceAccount (RBAC enforced), metrics from a real Prometheus scraping exporter
processes, and a header (or cookie) match written into the real API server's canary Ingress
or HTTPRoute (the real CRD's schema). Four namespaces, one rollout each, all at once:

    e2e-ab-nginx      ingress-nginx, `X-Canary=always`, cookie affinity; promoted
    e2e-ab-nginx-bad  ingress-nginx, cookie `canary`; a canary with 50% errors, rolled back
    e2e-ab-gw         Gateway API, `X-Canary=always`; promoted
    e2e-ab-gw-bad     Gateway API, `X-Canary=always`; the bad canary, rolled back

What the controller wrote is read from the apiserver's audit log (the bodies of its traffic
writes) and from the objects themselves. Traffic stands in for the ingress controller and
the gateway: it reads the objects and sends requests with the header (or cookie) to the
canary exporter only while the match is in place, the others by weight (0 until promotion),
so the analysis sees canary traffic only through the match.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from support.control_plane import CONTROLLER_USER, LOOPBACK, MANIFESTS, ControlPlane, free_port

from canary.demo.procs import HttpReady, ManagedProcess, find_binary
from canary.routers.ingress_nginx import (
    AFFINITY,
    AFFINITY_CANARY,
    BY_COOKIE,
    BY_HEADER,
    BY_HEADER_VALUE,
    WEIGHT_ANNOTATION,
)
from cluster.test_operator_on_cluster import (
    CUSTOM_METRICS,
    NEW_IMAGE,
    Controller,
    _service,
    done,
    initialized,
    set_image,
    wait,
)

NGINX, NGINX_BAD, GW, GW_BAD = "e2e-ab-nginx", "e2e-ab-nginx-bad", "e2e-ab-gw", "e2e-ab-gw-bad"
NAMESPACES = (NGINX, NGINX_BAD, GW, GW_BAD)
BAD = (NGINX_BAD, GW_BAD)
GATEWAY = (GW, GW_BAD)
COOKIE = (NGINX_BAD,)
WAIT_S = 300.0
RATE = 30.0  # requests/s per namespace, half of them carrying the match
HEADER_MATCH = {"type": "Exact", "name": "X-Canary", "value": "always"}


def annotations_for(namespace: str) -> dict[str, str]:
    notes = {
        "canary.dev/enabled": "true",
        "canary.dev/router": "ingress-nginx",
        "canary.dev/ingress": "app",
        "canary.dev/match-header": "X-Canary=always",
        "canary.dev/ab-duration": "5s",
        "canary.dev/max-step-duration": "240s",
        "canary.dev/no-data-deadline": "90s",
        "canary.dev/analysis.error-tolerance": "5",
        **CUSTOM_METRICS,
    }
    if namespace == NGINX:
        notes["canary.dev/affinity"] = "cookie"
    if namespace in COOKIE:
        del notes["canary.dev/match-header"]
        notes["canary.dev/match-cookie"] = "canary"
    if namespace in GATEWAY:
        del notes["canary.dev/ingress"]
        notes["canary.dev/router"] = "gateway-api"
        notes["canary.dev/httproute"] = "app"
    return notes


def app_objects(namespace: str) -> list[dict[str, Any]]:
    import yaml

    example = "app-gateway-api.yaml" if namespace in GATEWAY else "app-ingress-nginx.yaml"
    out = []
    for doc in yaml.safe_load_all((MANIFESTS / "examples" / example).read_text()):
        if not doc or doc["kind"] == "Namespace":
            continue
        doc["metadata"]["namespace"] = namespace
        if doc["kind"] == "Deployment":
            doc["metadata"]["annotations"] = annotations_for(namespace)
            doc["spec"]["replicas"] = 1
        out.append(doc)
    return out


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


def _is_twin(rule: dict[str, Any]) -> bool:
    """A Gateway API A/B rule: the canary alone, behind a header match."""
    refs = rule.get("backendRefs") or []
    return [r.get("name") for r in refs] == ["app-canary"] and any(
        m.get("headers") for m in rule.get("matches") or []
    )


@dataclass
class Route:
    weight: int = 0
    match: bool = False


class Traffic:
    """Reads each namespace's canary Ingress / HTTPRoute (and accepts each HTTPRoute
    generation, as a gateway controller would) and sends requests as that routing says.
    Its own thread and event loop, so it runs while the tests wait synchronously."""

    def __init__(self, cluster: ControlPlane, urls: dict[str, str]) -> None:
        self.cluster = cluster
        self.urls = urls
        self.routes = {ns: Route() for ns in NAMESPACES}
        self.matched: dict[str, int] = dict.fromkeys(NAMESPACES, 0)  # sent to canary by match
        self.errors: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="ab-traffic", daemon=True)

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
                if namespace in GATEWAY:
                    self.routes[namespace] = await self._route(api, namespace)
                else:
                    self.routes[namespace] = await self._ingress(api, namespace)
            except (aiohttp.ClientError, TimeoutError, KeyError, ValueError) as exc:
                self.errors.append(f"{namespace}: {exc!r}")
            await asyncio.sleep(0.3)

    async def _ingress(self, api: aiohttp.ClientSession, namespace: str) -> Route:
        url = f"/apis/networking.k8s.io/v1/namespaces/{namespace}/ingresses/app-canary"
        async with api.get(url) as response:
            if response.status == 404:
                return Route()
            response.raise_for_status()
            notes = (await response.json())["metadata"].get("annotations") or {}
        if notes.get("nginx.ingress.kubernetes.io/canary") != "true":
            return Route()
        return Route(
            int(notes.get(WEIGHT_ANNOTATION, "0")), BY_HEADER in notes or BY_COOKIE in notes
        )

    async def _route(self, api: aiohttp.ClientSession, namespace: str) -> Route:
        url = f"/apis/gateway.networking.k8s.io/v1/namespaces/{namespace}/httproutes/app"
        async with api.get(url) as response:
            response.raise_for_status()
            route = await response.json()
        generation = route["metadata"]["generation"]
        parents = (route.get("status") or {}).get("parents") or []
        if not parents or parents[0]["conditions"][0]["observedGeneration"] != generation:
            await self._accept(api, url, route)
        rules = route["spec"]["rules"]
        weighted = next(r for r in rules if not _is_twin(r))
        refs = {r["name"]: int(r.get("weight", 1)) for r in weighted["backendRefs"]}
        total = refs.get("app-primary", 0) + refs.get("app-canary", 0)
        weight = round(100 * refs.get("app-canary", 0) / total) if total else 0
        return Route(weight, any(_is_twin(r) for r in rules))

    async def _accept(self, api: aiohttp.ClientSession, url: str, route: dict[str, Any]) -> None:
        conditions = [
            {
                "type": kind,
                "status": "True",
                "reason": kind,
                "message": "",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
                "observedGeneration": route["metadata"]["generation"],
            }
            for kind in ("Accepted", "ResolvedRefs")
        ]
        status = {
            "parents": [
                {
                    "parentRef": route["spec"]["parentRefs"][0],
                    "controllerName": "example.com/gateway",
                    "conditions": conditions,
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
        rng = random.Random(f"ab-{namespace}")
        with_match = False

        async def one(url: str, by_match: bool) -> None:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url) as response:
                    await response.read()
                    if by_match:
                        self.matched[namespace] += 1

        while True:
            batch = []
            for _ in range(6):
                with_match = not with_match
                route = self.routes[namespace]
                if with_match and route.match:
                    batch.append(one(self.urls[namespace], True))
                elif rng.random() * 100 < route.weight:
                    batch.append(one(self.urls[namespace], False))
                else:
                    batch.append(one(self.urls["primary"], False))
            await asyncio.gather(*batch, asyncio.sleep(6 / RATE))


@dataclass
class AbE2E:
    cluster: ControlPlane
    traffic: Traffic
    controller: Controller
    snapshots: dict[str, list[Any]] = field(default_factory=dict)

    def logs(self) -> str:
        return self.controller.text()[-4000:]


@pytest.fixture(scope="module")
def ab(cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AbE2E]:
    workdir = tmp_path_factory.mktemp("ab-e2e")
    started: list[ManagedProcess] = []
    controller: Controller | None = None
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
            cluster.kubectl(
                "apply",
                "-f",
                "-",
                stdin=json.dumps(
                    {"apiVersion": "v1", "kind": "List", "items": app_objects(namespace)}
                ),
            )
        urls = {
            "primary": f"http://{LOOPBACK}:{ports['primary']}/",
            **{
                ns: f"http://{LOOPBACK}:{ports['bad' if ns in BAD else 'good']}/"
                for ns in NAMESPACES
            },
        }
        kubeconfig = cluster.service_account_kubeconfig(workdir / "controller.kubeconfig")
        with Traffic(cluster, urls) as traffic:
            controller = Controller(
                "ab-replica",
                kubeconfig,
                f"http://{LOOPBACK}:{prom_port}",
                workdir / "ctl.log",
                lease="e2e-ab-leader",
            )
            controller.start()
            shared = AbE2E(cluster, traffic, controller)
            for namespace in NAMESPACES:
                wait(
                    f"{namespace}/app initialized",
                    lambda ns=namespace: initialized(cluster, ns),  # type: ignore[misc]
                )
                set_image(cluster, namespace, NEW_IMAGE)
            yield shared
    finally:
        if controller is not None:
            controller.stop()
        for process in reversed(started):
            process.stop_sync()


def traffic_writes(cluster: ControlPlane, namespace: str, resource: str) -> list[dict[str, Any]]:
    """The controller's successful writes of `resource` in `namespace`, in order (audit log)."""
    return [
        e["requestObject"]
        for e in cluster.audit_events()
        if e["stage"] == "ResponseComplete"
        and e["user"]["username"] == CONTROLLER_USER
        and e["verb"] in ("create", "patch", "update")
        and e.get("objectRef", {}).get("namespace") == namespace
        and e["objectRef"].get("resource") == resource
        and e["responseStatus"]["code"] < 300
    ]


def ingress_written(cluster: ControlPlane, namespace: str) -> list[tuple[int, dict[str, Any]]]:
    """(canary-weight, A/B and affinity annotations) of each canary Ingress write."""
    out = []
    for body in traffic_writes(cluster, namespace, "ingresses"):
        notes = body.get("metadata", {}).get("annotations") or {}
        if notes.get(WEIGHT_ANNOTATION) is None:
            continue
        keys = (BY_HEADER, BY_HEADER_VALUE, BY_COOKIE, AFFINITY, AFFINITY_CANARY)
        out.append((int(notes[WEIGHT_ANNOTATION]), {k: notes[k] for k in keys if notes.get(k)}))
    return out


def route_written(cluster: ControlPlane, namespace: str) -> list[tuple[int, int]]:
    """(canary weight, number of A/B rules) of each HTTPRoute write."""
    out = []
    for body in traffic_writes(cluster, namespace, "httproutes"):
        rules = body["spec"]["rules"]
        weighted = next(r for r in rules if not _is_twin(r))
        canary = {r["name"]: r["weight"] for r in weighted["backendRefs"]}["app-canary"]
        out.append((canary, sum(1 for r in rules if _is_twin(r))))
    return out


def canary_ingress_notes(cluster: ControlPlane, namespace: str) -> dict[str, str]:
    ingress = cluster.get_json("ingress", "app-canary", "-n", namespace)
    return dict(ingress["metadata"].get("annotations") or {})


def test_ingress_nginx_ab_rollout_with_affinity_is_promoted_and_the_match_removed(
    ab: AbE2E,
) -> None:
    """The canary Ingress gets canary-by-header X-Canary=always at weight 0 with cookie
    affinity (sticky), only matching requests reach the canary, the analysis passes and
    promotes, and the match is gone from the canary Ingress afterwards."""
    st = wait(
        "the ingress-nginx A/B rollout to end", lambda: done(ab.cluster, NGINX), timeout_s=WAIT_S
    )
    assert st.rollout.outcome == "promoted", (st.rollout, ab.logs())
    assert any("A/B analysis passed" in t.reason for t in st.rollout.history), st.rollout
    sticky = {AFFINITY: "cookie", AFFINITY_CANARY: "sticky"}
    matched = {BY_HEADER: "X-Canary", BY_HEADER_VALUE: "always", **sticky}
    # The canary Ingress is created at 0% when the app is initialized, before any rollout.
    assert ingress_written(ab.cluster, NGINX) == [
        (0, sticky),
        (0, matched),
        (100, sticky),
        (0, sticky),
    ]
    notes = canary_ingress_notes(ab.cluster, NGINX)
    assert BY_HEADER not in notes and BY_HEADER_VALUE not in notes
    assert notes[WEIGHT_ANNOTATION] == "0" and notes[AFFINITY] == "cookie"
    assert ab.traffic.matched[NGINX] > 0


def test_ingress_nginx_cookie_ab_rollout_of_a_bad_canary_is_rolled_back(ab: AbE2E) -> None:
    """canary-by-cookie for the bad canary: the analysis fails on the matching requests,
    the rollout rolls back, and the cookie match is removed (weight 0 throughout)."""
    st = wait(
        "the cookie A/B rollout to end", lambda: done(ab.cluster, NGINX_BAD), timeout_s=WAIT_S
    )
    assert st.rollout.outcome == "rolled_back", (st.rollout, ab.logs())
    assert "errors" in st.rollout.reason
    assert ingress_written(ab.cluster, NGINX_BAD) == [(0, {}), (0, {BY_COOKIE: "canary"}), (0, {})]
    assert BY_COOKIE not in canary_ingress_notes(ab.cluster, NGINX_BAD)
    assert ab.traffic.matched[NGINX_BAD] > 0


def test_gateway_api_ab_rollout_is_promoted_and_the_match_rule_removed(ab: AbE2E) -> None:
    """The HTTPRoute gets a header-matched rule to the canary alone beside the weighted
    rule at 100/0 (through the real CRD's schema), the analysis passes and promotes, and
    the route ends with its one weighted rule back at 100/0."""
    st = wait("the Gateway API A/B rollout to end", lambda: done(ab.cluster, GW), timeout_s=WAIT_S)
    assert st.rollout.outcome == "promoted", (st.rollout, ab.logs())
    # The example's route starts at 100/0 already: nothing to write before the rollout.
    assert route_written(ab.cluster, GW) == [(0, 1), (100, 0), (0, 0)]
    rules = ab.cluster.get_json("httproute", "app", "-n", GW)["spec"]["rules"]
    assert len(rules) == 1 and not _is_twin(rules[0])
    assert not [m for m in ab.traffic.errors if "status of" in m], ab.traffic.errors


def test_gateway_api_ab_rollout_of_a_bad_canary_is_rolled_back(ab: AbE2E) -> None:
    """The bad canary behind the Gateway API match rule is rolled back and the rule removed."""
    st = wait(
        "the bad Gateway API A/B rollout to end", lambda: done(ab.cluster, GW_BAD), timeout_s=WAIT_S
    )
    assert st.rollout.outcome == "rolled_back", (st.rollout, ab.logs())
    written = route_written(ab.cluster, GW_BAD)
    assert written == [(0, 1), (0, 0)], written
    twin = next(
        r
        for body in traffic_writes(ab.cluster, GW_BAD, "httproutes")
        for r in body["spec"]["rules"]
        if _is_twin(r)
    )
    assert twin["matches"][0]["headers"] == [HEADER_MATCH]
    rules = ab.cluster.get_json("httproute", "app", "-n", GW_BAD)["spec"]["rules"]
    assert len(rules) == 1 and not _is_twin(rules[0])
