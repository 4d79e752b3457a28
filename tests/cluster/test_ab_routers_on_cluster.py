"""A/B routing written by the ingress-nginx and Gateway API routers into the real API
server, with the controller's ServiceAccount token (RBAC enforced) and the real Gateway
API CRD's schema: the match is set, read back, refused when someone else changed it, and
removed again. The operator's whole A/B rollouts are in test_ab_on_cluster.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from support.control_plane import ControlPlane

from canary.kubernetes.client import Kube
from canary.routers.base import Match, RouterRejected, set_and_verify
from canary.routers.gateway_api import GatewayApiRouter
from canary.routers.ingress_nginx import (
    AFFINITY,
    AFFINITY_CANARY,
    BY_COOKIE,
    BY_HEADER,
    BY_HEADER_VALUE,
    WEIGHT_ANNOTATION,
    IngressNginxRouter,
)

NAMESPACE = "e2e-ab-routers"
HEADER = Match.header("X-Canary=always")


def _objects() -> list[dict[str, Any]]:
    backend = {"service": {"name": "app-primary", "port": {"number": 80}}}
    ingress = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": "app", "namespace": NAMESPACE},
        "spec": {
            "ingressClassName": "nginx",
            "rules": [
                {
                    "host": "shop.example.com",
                    "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": backend}]},
                }
            ],
        },
    }
    route = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "app", "namespace": NAMESPACE},
        "spec": {
            "parentRefs": [{"name": "public", "namespace": "gateway"}],
            "hostnames": ["shop.example.com"],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                    "backendRefs": [
                        {"name": "app-primary", "port": 80, "weight": 100},
                        {"name": "app-canary", "port": 80, "weight": 0},
                    ],
                }
            ],
        },
    }
    return [ingress, route]


@pytest.fixture(scope="module")
def namespace(cluster: ControlPlane) -> str:
    cluster.kubectl("create", "namespace", NAMESPACE)
    cluster.kubectl(
        "apply",
        "-f",
        "-",
        stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": _objects()}),
    )
    return NAMESPACE


@pytest.fixture
async def kube(controller_kubeconfig: Path, namespace: str) -> AsyncIterator[Kube]:
    client = await Kube.connect(kubeconfig=str(controller_kubeconfig))
    try:
        yield client
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def gateway_accepting(cluster: ControlPlane, route: str) -> AsyncIterator[None]:
    """A stand-in gateway controller: accepts each generation of the HTTPRoute (through the
    status subresource, so the CRD's status schema checks it)."""

    def accept_once() -> None:
        current = cluster.get_json("httproute", route, "-n", NAMESPACE)
        generation = current["metadata"]["generation"]
        parents = (current.get("status") or {}).get("parents") or []
        if parents and parents[0]["conditions"][0]["observedGeneration"] == generation:
            return
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        conditions = [
            {
                "type": kind,
                "status": "True",
                "reason": kind,
                "message": "",
                "lastTransitionTime": now,
                "observedGeneration": generation,
            }
            for kind in ("Accepted", "ResolvedRefs")
        ]
        status = {
            "parents": [
                {
                    "parentRef": current["spec"]["parentRefs"][0],
                    "controllerName": "example.com/gateway",
                    "conditions": conditions,
                }
            ]
        }
        cluster.kubectl(
            "patch",
            "httproute",
            route,
            "-n",
            NAMESPACE,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps({"status": status}),
        )

    stop = asyncio.Event()

    async def loop() -> None:
        while not stop.is_set():
            await asyncio.to_thread(accept_once)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        stop.set()
        await task


def _canary_annotations(cluster: ControlPlane) -> dict[str, str]:
    ingress = cluster.get_json("ingress", "app-canary", "-n", NAMESPACE)
    return dict(ingress["metadata"].get("annotations") or {})


async def test_ingress_nginx_header_match_and_affinity_are_set_read_back_and_removed(
    cluster: ControlPlane, kube: Kube
) -> None:
    """At weight 0 with the match on, the canary Ingress carries canary-by-header and its
    value and cookie affinity (sticky); get_match reads it back; a match someone else
    changed is refused by name; the match off removes the annotations and affinity stays."""
    router = IngressNginxRouter(
        kube,
        namespace=NAMESPACE,
        ingress="app",
        primary_service="app-primary",
        canary_service="app-canary",
        match=HEADER,
        affinity="cookie",
    )
    assert await set_and_verify(router, 0, match=True) == 0
    notes = _canary_annotations(cluster)
    assert (notes[BY_HEADER], notes[BY_HEADER_VALUE], notes[WEIGHT_ANNOTATION]) == (
        "X-Canary",
        "always",
        "0",
    )
    assert (notes[AFFINITY], notes[AFFINITY_CANARY]) == ("cookie", "sticky")
    assert await router.get_match() is True

    cluster.kubectl(
        "annotate", "ingress", "app-canary", "-n", NAMESPACE, "--overwrite", f"{BY_HEADER_VALUE}=x"
    )
    with pytest.raises(RouterRejected, match="A/B annotations"):
        await router.get_match()

    await set_and_verify(router, 0, match=False)
    notes = _canary_annotations(cluster)
    assert BY_HEADER not in notes and BY_HEADER_VALUE not in notes
    assert notes[AFFINITY] == "cookie"
    assert await router.get_match() is False

    cluster.kubectl("annotate", "ingress", "app-canary", "-n", NAMESPACE, f"{AFFINITY}-")
    with pytest.raises(RouterRejected, match="session affinity not in place"):
        await router.get_weight()


async def test_ingress_nginx_cookie_match(cluster: ControlPlane, kube: Kube) -> None:
    """A cookie match is ingress-nginx's canary-by-cookie (value `always`), read back too."""
    router = IngressNginxRouter(
        kube,
        namespace=NAMESPACE,
        ingress="app",
        primary_service="app-primary",
        canary_service="app-canary",
        match=Match.cookie("canary"),
    )
    await set_and_verify(router, 0, match=True)
    notes = _canary_annotations(cluster)
    assert notes[BY_COOKIE] == "canary" and BY_HEADER not in notes
    await set_and_verify(router, 0, match=False)
    assert BY_COOKIE not in _canary_annotations(cluster)
    with pytest.raises(ValueError, match="always"):
        IngressNginxRouter(
            kube,
            namespace=NAMESPACE,
            ingress="app",
            primary_service="app-primary",
            canary_service="app-canary",
            match=Match.cookie("canary=yes"),
        )


@pytest.mark.parametrize(
    ("match", "header"),
    [
        (HEADER, {"type": "Exact", "name": "X-Canary", "value": "always"}),
        (
            Match.cookie("canary"),
            {
                "type": "RegularExpression",
                "name": "Cookie",
                "value": r"(^|.*; ?)canary=always(;.*|$)",
            },
        ),
    ],
)
async def test_gateway_api_match_rule_is_accepted_by_the_crd_read_back_and_removed(
    cluster: ControlPlane, kube: Kube, match: Match, header: dict[str, str]
) -> None:
    """With the match on, the HTTPRoute gets a rule before the weighted one with the same
    path plus the header match and only the canary backend; the real CRD accepts it, the
    weights read back 0 and the match on; a promotion to 100% removes the rule; a lone
    match rule left by someone else is reported, not taken for ours."""
    router = GatewayApiRouter(
        kube,
        namespace=NAMESPACE,
        route="app",
        primary_service="app-primary",
        canary_service="app-canary",
        port=80,
        match=match,
    )
    async with gateway_accepting(cluster, "app"):
        await set_and_verify(router, 0, match=True)
        rules = cluster.get_json("httproute", "app", "-n", NAMESPACE)["spec"]["rules"]
        assert len(rules) == 2
        twin, weighted = rules
        assert twin["matches"][0]["headers"] == [header]
        assert twin["matches"][0]["path"] == {"type": "PathPrefix", "value": "/"}
        assert [(r["name"], r["weight"]) for r in twin["backendRefs"]] == [("app-canary", 1)]
        assert [(r["name"], r["weight"]) for r in weighted["backendRefs"]] == [
            ("app-primary", 100),
            ("app-canary", 0),
        ]
        assert await router.get_match() is True and await router.get_weight() == 0

        # Someone adds a second weighted rule by hand: one twin for two rules is refused.
        extra = {
            "matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
            "backendRefs": [
                {"name": "app-primary", "port": 80, "weight": 100},
                {"name": "app-canary", "port": 80, "weight": 0},
            ],
        }
        cluster.kubectl(
            "patch",
            "httproute",
            "app",
            "-n",
            NAMESPACE,
            "--type=json",
            "-p",
            json.dumps([{"op": "add", "path": "/spec/rules/-", "value": extra}]),
        )
        await asyncio.sleep(1.0)  # the stand-in gateway accepts the new generation
        with pytest.raises(RouterRejected, match="1 A/B rules for 2 weighted rules"):
            await router.get_match()

        await set_and_verify(router, 100, match=False)
        rules = cluster.get_json("httproute", "app", "-n", NAMESPACE)["spec"]["rules"]
        assert len(rules) == 2 and not any(
            header in (m.get("headers") or []) for r in rules for m in r.get("matches") or []
        )
        assert await router.get_match() is False and await router.get_weight() == 100
        # back to the example's single rule for the next case
        cluster.kubectl(
            "patch",
            "httproute",
            "app",
            "-n",
            NAMESPACE,
            "--type=json",
            "-p",
            json.dumps([{"op": "remove", "path": "/spec/rules/1"}]),
        )
        await set_and_verify(router, 0, match=False)
