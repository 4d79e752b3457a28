"""The ingress-nginx and Gateway API routers, through canary.kubernetes.client, against the emulator."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from support.kube_emulator import KubeEmulator
from support.waiting import eventually

from canary.kubernetes.client import Kube
from canary.kubernetes.informer import ObjectCache
from canary.routers.base import RouterRejected, RouterUnreachable, TrafficRouter, set_and_verify
from canary.routers.gateway_api import GatewayApiRouter, RouteNotReady
from canary.routers.ingress_nginx import CANARY_ANNOTATION, WEIGHT_ANNOTATION, IngressNginxRouter

INGRESSES = ("networking.k8s.io", "v1", "ingresses")
ROUTES = ("gateway.networking.k8s.io", "v1", "httproutes")


def user_ingress(service: str = "app-primary") -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {
            "name": "app",
            "namespace": "shop",
            "annotations": {"nginx.ingress.kubernetes.io/rewrite-target": "/"},
        },
        "spec": {
            "ingressClassName": "nginx",
            "tls": [{"hosts": ["app.example.com"], "secretName": "app-tls"}],
            "rules": [
                {
                    "host": "app.example.com",
                    "http": {
                        "paths": [
                            {
                                "path": "/",
                                "pathType": "Prefix",
                                "backend": {"service": {"name": service, "port": {"number": 80}}},
                            }
                        ]
                    },
                }
            ],
        },
    }


def ingress_router(kube: Kube) -> IngressNginxRouter:
    return IngressNginxRouter(
        kube,
        namespace="shop",
        ingress="app",
        primary_service="app-primary",
        canary_service="app-canary",
    )


# -- ingress-nginx -----------------------------------------------------------------------


async def test_ingress_canary_is_created_then_updated_and_verified(
    api: KubeEmulator, kube: Kube
) -> None:
    """set_and_verify creates app-canary beside the user's Ingress with the canary
    annotations and the canary Service, then moves its weight; the user's Ingress is untouched."""
    api.put(*INGRESSES, user_ingress())
    before = api.get(*INGRESSES, "shop", "app")
    router = ingress_router(kube)
    assert isinstance(router, TrafficRouter)
    assert await router.get_weight() == 0  # no canary Ingress yet
    assert await set_and_verify(router, 10) == 10
    canary = api.get(*INGRESSES, "shop", "app-canary")
    annotations = canary["metadata"]["annotations"]
    assert annotations[CANARY_ANNOTATION] == "true"
    assert annotations[WEIGHT_ANNOTATION] == "10"
    assert annotations["nginx.ingress.kubernetes.io/rewrite-target"] == "/"
    backend = canary["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "app-canary", "port": {"number": 80}}
    assert "tls" not in canary["spec"]
    assert canary["metadata"]["ownerReferences"][0]["uid"] == before["metadata"]["uid"]

    assert await set_and_verify(router, 50) == 50
    assert (
        api.get(*INGRESSES, "shop", "app-canary")["metadata"]["annotations"][WEIGHT_ANNOTATION]
        == "50"
    )
    assert api.get(*INGRESSES, "shop", "app") == before
    patches = api.recorded(verb="patch", resource="ingresses")
    assert len(patches) == 1
    # The update was guarded by the resourceVersion it was computed from.
    assert patches[0].body["metadata"]["resourceVersion"] == canary["metadata"]["resourceVersion"]


async def test_ingress_read_back_sees_an_edit_by_someone_else(
    api: KubeEmulator, kube: Kube
) -> None:
    """The weight is read from the API server, so a hand edit shows up as drift."""
    api.put(*INGRESSES, user_ingress())
    router = ingress_router(kube)
    await set_and_verify(router, 25)
    edited = api.get(*INGRESSES, "shop", "app-canary")
    edited["metadata"]["annotations"][WEIGHT_ANNOTATION] = "70"
    api.put(*INGRESSES, edited)
    assert await router.get_weight() == 70
    edited["metadata"]["annotations"][WEIGHT_ANNOTATION] = "lots"
    api.put(*INGRESSES, edited)
    with pytest.raises(RouterRejected, match="canary-weight is 'lots'"):
        await router.get_weight()


async def test_ingress_without_the_primary_backend_is_rejected(
    api: KubeEmulator, kube: Kube
) -> None:
    """A user Ingress that does not route to the primary Service leaves nothing to split."""
    api.put(*INGRESSES, user_ingress(service="something-else"))
    with pytest.raises(RouterRejected, match="no backend for Service 'app-primary'"):
        await ingress_router(kube).set_weight(10)
    assert ("networking.k8s.io", "v1", "ingresses", "shop", "app-canary") not in api.objects


async def test_ingress_not_ours_is_not_overwritten(api: KubeEmulator, kube: Kube) -> None:
    """An existing app-canary Ingress that canary does not manage is left alone."""
    api.put(*INGRESSES, user_ingress())
    foreign = user_ingress()
    foreign["metadata"]["name"] = "app-canary"
    api.put(*INGRESSES, foreign)
    with pytest.raises(RouterRejected, match="not managed by canary"):
        await ingress_router(kube).set_weight(10)


async def test_missing_user_ingress_is_named(api: KubeEmulator, kube: Kube) -> None:
    """The error names the Ingress that is missing."""
    with pytest.raises(RouterRejected, match="Ingress shop/app not found"):
        await ingress_router(kube).set_weight(10)


async def test_api_server_down_is_router_unreachable(api: KubeEmulator, kube: Kube) -> None:
    """Persistent 503s from the API server become RouterUnreachable (data for the machine)."""
    api.put(*INGRESSES, user_ingress())
    api.inject(503, times=1000, resource="ingresses")
    with pytest.raises(RouterUnreachable, match="503"):
        await ingress_router(kube).set_weight(10)


# -- Gateway API -------------------------------------------------------------------------


def http_route() -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "app", "namespace": "shop"},
        "spec": {
            "parentRefs": [{"name": "public"}],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                    "backendRefs": [{"name": "app-primary", "port": 8080}],
                },
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/static"}}],
                    "backendRefs": [{"name": "cdn", "port": 80}],
                },
            ],
        },
    }


def condition(kind: str, ok: bool, generation: int, reason: str) -> dict[str, Any]:
    return {
        "type": kind,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": f"{kind} {reason}",
        "observedGeneration": generation,
    }


@pytest.fixture
async def gateway(api: KubeEmulator) -> AsyncIterator[dict[str, Any]]:
    """A stand-in gateway controller: writes the route's status for each new generation,
    with the outcome the test sets in the returned dict."""
    outcome: dict[str, Any] = {"accepted": True, "resolved": True, "running": True}

    async def reconcile() -> None:
        while True:
            await asyncio.sleep(0.02)
            if not outcome["running"]:
                continue
            for key, obj in list(api.objects.items()):
                if key[2] != "httproutes":
                    continue
                generation = obj["metadata"]["generation"]
                parents = (obj.get("status") or {}).get("parents") or []
                if parents and parents[0]["conditions"][0]["observedGeneration"] == generation:
                    continue
                route = api.get(*key)
                route["status"] = {
                    "parents": [
                        {
                            "parentRef": {"name": "public"},
                            "controllerName": "example.com/gateway",
                            "conditions": [
                                condition(
                                    "Accepted",
                                    outcome["accepted"],
                                    generation,
                                    "Accepted" if outcome["accepted"] else "NotAllowedByListeners",
                                ),
                                condition(
                                    "ResolvedRefs",
                                    outcome["resolved"],
                                    generation,
                                    "ResolvedRefs" if outcome["resolved"] else "BackendNotFound",
                                ),
                            ],
                        }
                    ]
                }
                api.put(*key[:3], route)

    task = asyncio.create_task(reconcile())
    try:
        yield outcome
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def route_router(kube: Kube, *, settle_timeout_s: float = 5.0) -> GatewayApiRouter:
    return GatewayApiRouter(
        kube,
        namespace="shop",
        route="app",
        primary_service="app-primary",
        canary_service="app-canary",
        settle_timeout_s=settle_timeout_s,
        poll_s=0.02,
    )


async def test_httproute_weights_are_set_and_verified(
    api: KubeEmulator, kube: Kube, gateway: dict[str, Any]
) -> None:
    """backendRefs become primary 100-p / canary p in the rule that routes to the app;
    other rules keep their backends; the read-back waits for the gateway's acceptance."""
    api.put(*ROUTES, http_route())
    router = route_router(kube)
    assert isinstance(router, TrafficRouter)
    assert await set_and_verify(router, 20) == 20
    rules = api.get(*ROUTES, "shop", "app")["spec"]["rules"]
    assert rules[0]["backendRefs"] == [
        {"name": "app-primary", "port": 8080, "weight": 80},
        {"name": "app-canary", "port": 8080, "weight": 20},
    ]
    assert rules[1]["backendRefs"] == [{"name": "cdn", "port": 80}]
    assert await set_and_verify(router, 100) == 100
    assert await set_and_verify(router, 0) == 0
    patch = api.recorded(verb="patch", resource="httproutes")[0]
    assert patch.body["metadata"]["resourceVersion"]  # guarded


@pytest.mark.parametrize(
    ("accepted", "resolved", "message"),
    [
        (False, True, r"parent shop/public: Accepted is False \(NotAllowedByListeners"),
        (True, False, r"parent shop/public: ResolvedRefs is False \(BackendNotFound"),
    ],
)
async def test_unaccepted_route_is_reported(
    api: KubeEmulator,
    kube: Kube,
    gateway: dict[str, Any],
    accepted: bool,
    resolved: bool,
    message: str,
) -> None:
    """A route the gateway did not accept, or whose backends it cannot resolve, fails the
    verification with the condition, its reason and the parent named."""
    gateway.update(accepted=accepted, resolved=resolved)
    api.put(*ROUTES, http_route())
    with pytest.raises(RouteNotReady, match=message):
        await set_and_verify(route_router(kube), 10)


async def test_route_without_status_is_not_ready(api: KubeEmulator, kube: Kube) -> None:
    """With no gateway controller at all, the weight is written but never counts as applied."""
    api.put(*ROUTES, http_route())
    with pytest.raises(RouteNotReady, match="no parent status"):
        await set_and_verify(route_router(kube, settle_timeout_s=0.2), 10)


async def test_stale_route_status_is_not_ready(
    api: KubeEmulator, kube: Kube, gateway: dict[str, Any]
) -> None:
    """Conditions about an older generation do not vouch for the weights just written."""
    api.put(*ROUTES, http_route())
    router = route_router(kube, settle_timeout_s=0.2)
    await set_and_verify(router, 10)
    gateway["running"] = False
    with pytest.raises(RouteNotReady, match="has not caught up"):
        await set_and_verify(router, 30)


async def test_route_without_our_services_is_rejected(api: KubeEmulator, kube: Kube) -> None:
    """A route that never mentions the app's Services cannot be split."""
    route = http_route()
    route["spec"]["rules"] = route["spec"]["rules"][1:]
    api.put(*ROUTES, route)
    with pytest.raises(RouterRejected, match="no rule with a backendRef"):
        await route_router(kube).set_weight(10)


# -- a guarded write that meets another writer --------------------------------------------


async def test_ingress_conflict_is_retried_once_after_a_re_read(
    api: KubeEmulator, kube: Kube
) -> None:
    """A 409 on the guarded patch (someone wrote in between): read again, write again. A
    second 409 in a row is reported, not retried again."""
    api.put(*INGRESSES, user_ingress())
    router = ingress_router(kube)
    await router.set_weight(10)  # creates app-canary
    api.inject(409, verb="patch", resource="ingresses")
    await router.set_weight(20)
    assert await router.get_weight() == 20
    assert [r.status for r in api.recorded(verb="patch", resource="ingresses")] == [409, 200]
    api.inject(409, times=2, verb="patch", resource="ingresses")
    with pytest.raises(RouterRejected, match="HTTP 409"):
        await router.set_weight(30)
    assert len(api.recorded(verb="patch", resource="ingresses")) == 4


async def test_httproute_conflict_is_retried_once_after_a_re_read(
    api: KubeEmulator, kube: Kube, gateway: dict[str, Any]
) -> None:
    """A 409 on the HTTPRoute patch: read again, write again; a second 409 is reported."""
    api.put(*ROUTES, http_route())

    def observed() -> bool:  # the stand-in gateway's status write: a real 409 if it races
        route = api.get(*ROUTES, "shop", "app")
        parents = (route.get("status") or {}).get("parents") or []
        generation = route["metadata"]["generation"]
        return bool(parents) and parents[0]["conditions"][0]["observedGeneration"] == generation

    await eventually(observed, "the gateway to take the route")
    router = route_router(kube)
    api.inject(409, verb="patch", resource="httproutes")
    assert await set_and_verify(router, 20) == 20
    assert [r.status for r in api.recorded(verb="patch", resource="httproutes")] == [409, 200]
    api.inject(409, times=2, verb="patch", resource="httproutes")
    with pytest.raises(RouterRejected, match="HTTP 409"):
        await router.set_weight(40)
    assert len(api.recorded(verb="patch", resource="httproutes")) == 4


async def test_the_weight_read_from_an_unchanged_cached_route_is_decoded_once(
    api: KubeEmulator, kube: Kube, gateway: dict[str, Any]
) -> None:
    """Each tick reads the weight back; while the cache's text of the route is the same, the
    weight read from it stands; a change (the gateway's status, someone's edit) is read at
    once, and a route that is not ready is refused at every read."""
    api.put(*ROUTES, http_route())
    cache = ObjectCache(kube, "httproutes", "shop", retry_s=0.05, absent_retry_s=0.05)
    task = asyncio.create_task(cache.run())
    try:
        router = route_router(kube)
        router.cache = cache
        await eventually(lambda: cache.trusted, "the cache to list and watch")
        assert await set_and_verify(router, 20) == 20

        def cached_version() -> int:
            return int(cache._objects["shop", "app"][0])

        await eventually(lambda: cached_version() == api.resource_version, "the status' event")
        start = router._weight_seen.reads
        router._weight_seen.forget()  # (the settling read-back read this text already)
        assert [await router.get_weight() for _ in range(5)] == [20] * 5
        assert router._weight_seen.reads - start == 1

        gateway["running"] = False  # the edit's generation is not accepted yet
        edited = api.get(*ROUTES, "shop", "app")
        edited["spec"]["rules"][0]["backendRefs"][0]["weight"] = 60
        edited["spec"]["rules"][0]["backendRefs"][1]["weight"] = 40
        api.put(*ROUTES, edited)
        version = api.resource_version
        await eventually(lambda: cached_version() == version, "the edit's event")
        for _ in range(2):
            with pytest.raises(RouteNotReady, match="has not caught up"):
                await router.get_weight()
        assert router._weight_seen.reads - start == 3

        gateway["running"] = True
        await eventually(lambda: cached_version() > version, "the new status' event")
        assert [await router.get_weight() for _ in range(3)] == [40] * 3
        assert router._weight_seen.reads - start == 4
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
