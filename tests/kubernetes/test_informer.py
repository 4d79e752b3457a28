"""The routers' read-back from a watch cache (canary.kubernetes.informer), on the emulator.

Two kinds of test: a cache fed by hand (`apply`, `set_watching`), where the order of events is
the test's to choose (a write whose watch event has not arrived yet), and a cache fed by its
own list + watch (`run`), for what only the real stream does (re-listing on 410, a missing CRD).
Each counts the GETs the emulator served."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from support.kube_emulator import KubeEmulator
from support.waiting import eventually

from canary.kubernetes.client import Kube, NotFound, Relist, WatchEvent
from canary.kubernetes.informer import ObjectCache, slim
from canary.routers.base import RouterRejected, set_and_verify
from canary.routers.gateway_api import GatewayApiRouter
from canary.routers.ingress_nginx import WEIGHT_ANNOTATION, IngressNginxRouter

INGRESSES = ("networking.k8s.io", "v1", "ingresses")
ROUTES = ("gateway.networking.k8s.io", "v1", "httproutes")


def user_ingress() -> dict[str, Any]:
    backend = {"service": {"name": "app-primary", "port": {"number": 80}}}
    return {
        "metadata": {"name": "app", "namespace": "shop"},
        "spec": {
            "rules": [
                {
                    "host": "app.example.com",
                    "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": backend}]},
                }
            ]
        },
    }


def http_route() -> dict[str, Any]:
    return {
        "metadata": {"name": "app", "namespace": "shop"},
        "spec": {"rules": [{"backendRefs": [{"name": "app-primary", "port": 8080}]}]},
    }


def gets(api: KubeEmulator, resource: str = "ingresses", name: str = "app-canary") -> int:
    return len(api.recorded(verb="get", resource=resource, name=name))


def nginx(kube: Kube, cache: ObjectCache) -> IngressNginxRouter:
    return IngressNginxRouter(
        kube,
        namespace="shop",
        ingress="app",
        primary_service="app-primary",
        canary_service="app-canary",
        cache=cache,
    )


async def fed_by_hand(kube: Kube, resource: Any = "ingresses") -> ObjectCache:
    """A cache with the current list applied and its watch marked open; events are the
    test's to apply."""
    cache = ObjectCache(kube, resource, "shop")
    lister = kube.list_ingresses if resource == "ingresses" else kube.list_httproutes
    cache.apply(await lister("shop"))
    cache.set_watching(True)
    return cache


async def test_after_a_write_reads_get_until_the_cache_has_the_written_version(
    api: KubeEmulator, kube: Kube
) -> None:
    api.put(*INGRESSES, user_ingress())
    cache = await fed_by_hand(kube)
    router = nginx(kube, cache)
    await router.set_weight(30)  # creates the canary Ingress: its event is not applied yet
    before = gets(api)
    assert await router.get_weight() == 30
    assert await router.get_weight() == 30
    assert gets(api) == before + 2, "the cache has not seen the write: each read GETs"

    written = api.get(*INGRESSES, "shop", "app-canary")
    cache.apply(WatchEvent("ADDED", written))
    hits = cache.hits
    assert await router.get_weight() == 30
    assert await router.get_weight() == 30
    assert gets(api) == before + 2, "the cache has seen the write: no more GETs"
    assert cache.hits == hits + 2

    # A weight change: the write reads the current version from the cache, the read-back in
    # set_and_verify GETs; once the cache has the new version, it answers again.
    assert await set_and_verify(router, 60) == 60
    assert gets(api) == before + 3
    cache.apply(WatchEvent("MODIFIED", api.get(*INGRESSES, "shop", "app-canary")))
    assert await router.get_weight() == 60
    assert gets(api) == before + 3


async def test_a_write_from_a_stale_cache_conflicts_and_is_retried_after_a_get(
    api: KubeEmulator, kube: Kube
) -> None:
    """The write reads the canary Ingress from the cache; if someone wrote since (the event
    not applied yet), the guarded patch is a 409 and the retry GETs the current version."""
    api.put(*INGRESSES, user_ingress())
    cache = await fed_by_hand(kube)
    router = nginx(kube, cache)
    await router.set_weight(10)
    cache.apply(WatchEvent("ADDED", api.get(*INGRESSES, "shop", "app-canary")))
    edited = api.get(*INGRESSES, "shop", "app-canary")
    edited["metadata"]["labels"]["team"] = "shop"  # someone else's write, not seen yet
    api.put(*INGRESSES, edited)
    before = gets(api)
    await router.set_weight(20)
    assert [r.status for r in api.recorded(verb="patch", resource="ingresses")] == [409, 200]
    assert gets(api) == before + 1  # the retry's read
    assert await router.get_weight() == 20


async def test_an_older_event_after_the_write_does_not_make_the_cache_trusted(
    api: KubeEmulator, kube: Kube
) -> None:
    """Watch events lag: one from before our write must not count as having seen it."""
    api.put(*INGRESSES, user_ingress())
    cache = await fed_by_hand(kube)
    router = nginx(kube, cache)
    await router.set_weight(10)
    at_10 = api.get(*INGRESSES, "shop", "app-canary")
    cache.apply(WatchEvent("ADDED", at_10))
    await router.set_weight(20)
    cache.apply(WatchEvent("ADDED", at_10))  # the same old event, late (e.g. a resumed watch)
    before = gets(api)
    assert await router.get_weight() == 20  # not the cache's stale 10
    assert gets(api) == before + 1


async def test_a_write_without_an_answer_makes_reads_get(api: KubeEmulator, kube: Kube) -> None:
    """A patch whose answer is lost (here: the API server fails it) leaves its outcome
    unknown: reads GET until a GET's version is in the cache."""
    api.put(*INGRESSES, user_ingress())
    cache = await fed_by_hand(kube)
    router = nginx(kube, cache)
    await router.set_weight(10)
    cache.apply(WatchEvent("ADDED", api.get(*INGRESSES, "shop", "app-canary")))
    api.inject(503, times=100, verb="patch", resource="ingresses")
    with pytest.raises(Exception):  # noqa: B017 - RouterUnreachable, whatever its wording
        await router.set_weight(20)
    api.faults.clear()
    before = gets(api)
    assert await router.get_weight() == 10
    assert gets(api) == before + 1
    assert await router.get_weight() == 10  # the GET's version is the cache's: trusted again
    assert gets(api) == before + 1


async def test_a_written_version_the_watch_moved_past_before_the_answer_is_still_seen(
    api: KubeEmulator, kube: Kube
) -> None:
    """The watch may apply a write's version, and the next one (the gateway controller's
    status, another writer), before the write's answer is looked at: the cache has then
    seen the write, and reads come from it again, not a GET each for good. The same for a
    GET whose version the watch applied, and moved past, while it was in flight."""
    api.put(*INGRESSES, user_ingress())
    cache = await fed_by_hand(kube)
    router = nginx(kube, cache)
    await router.set_weight(10)
    cache.apply(WatchEvent("ADDED", api.get(*INGRESSES, "shop", "app-canary")))

    # The write, its event and someone else's after it, all before its answer is taken.
    cache.writing("shop", "app-canary")
    written = api.get(*INGRESSES, "shop", "app-canary")
    written["metadata"]["annotations"][WEIGHT_ANNOTATION] = "20"
    api.put(*INGRESSES, written)
    ours = api.get(*INGRESSES, "shop", "app-canary")
    cache.apply(WatchEvent("MODIFIED", ours))
    theirs = json.loads(json.dumps(ours))
    theirs["metadata"]["labels"] = {**theirs["metadata"].get("labels", {}), "team": "shop"}
    api.put(*INGRESSES, theirs)
    cache.apply(WatchEvent("MODIFIED", api.get(*INGRESSES, "shop", "app-canary")))
    cache.wrote("shop", "app-canary", ours)
    before = gets(api)
    assert await router.get_weight() == 20
    assert await router.get_weight() == 20
    assert gets(api) == before, "the cache saw the written version: no GET"

    # A read that must GET (a write without an answer), whose version the watch applies,
    # and moves past, while the GET is in flight.
    cache.writing("shop", "app-canary")
    served = kube.get_ingress

    async def get_meanwhile_moved(namespace: str, name: str) -> Any:
        obj = await served(namespace, name)
        cache.apply(WatchEvent("MODIFIED", obj))
        later = json.loads(json.dumps(obj))
        later["metadata"]["labels"]["team"] = "books"
        api.put(*INGRESSES, later)
        cache.apply(WatchEvent("MODIFIED", api.get(*INGRESSES, "shop", "app-canary")))
        return obj

    kube.get_ingress = get_meanwhile_moved  # type: ignore[method-assign]
    try:
        assert await router.get_weight() == 20
    finally:
        kube.get_ingress = served  # type: ignore[method-assign]
    before = gets(api)
    assert await router.get_weight() == 20
    assert gets(api) == before, "the GET's version was seen meanwhile: the cache answers"
    assert cache._in_flight == {} and cache._seen_during == {}


async def test_a_cache_whose_watch_is_down_falls_back_to_get(api: KubeEmulator, kube: Kube) -> None:
    api.put(*INGRESSES, user_ingress())
    cache = await fed_by_hand(kube)
    router = nginx(kube, cache)
    await router.set_weight(40)
    cache.apply(WatchEvent("ADDED", api.get(*INGRESSES, "shop", "app-canary")))
    before = gets(api)
    assert await router.get_weight() == 40
    assert gets(api) == before

    cache.set_watching(False)  # re-listing, or backing off after an error
    assert await router.get_weight() == 40
    assert gets(api) == before + 1
    cache.set_watching(True)
    assert await router.get_weight() == 40
    assert gets(api) == before + 1


async def test_an_object_absent_from_a_trusted_cache_is_not_found(
    api: KubeEmulator, kube: Kube
) -> None:
    """ingress-nginx: no canary Ingress reads as 0%; Gateway API: a missing route is an
    error, as a 404 was. Neither GETs."""
    cache = await fed_by_hand(kube)
    assert await nginx(kube, cache).get_weight() == 0
    routes = await fed_by_hand(kube, "httproutes")
    router = GatewayApiRouter(
        kube,
        namespace="shop",
        route="app",
        primary_service="app-primary",
        canary_service="app-canary",
        cache=routes,
    )
    with pytest.raises(RouterRejected, match="not found"):
        await router.get_weight()
    assert gets(api) == 0 and gets(api, "httproutes", "app") == 0


async def test_a_selected_cache_gets_what_it_does_not_hold(api: KubeEmulator, kube: Kube) -> None:
    """The Services cache holds only those canary manages (a label selector): a Service it
    does not hold may exist without the label, so it is read with a GET, never taken as
    absent. One it holds is read from it."""
    svc = ("", "v1", "services")
    api.put(*svc, {"metadata": {"name": "theirs", "namespace": "shop"}, "spec": {"ports": []}})
    cache = ObjectCache(
        kube, "services", "shop", label_selector="app.kubernetes.io/managed-by=canary"
    )
    cache.apply(Relist([], "1"))  # the selected list: none of canary's yet
    cache.set_watching(True)
    assert cache.trusted
    assert (await cache.get("shop", "theirs"))["metadata"]["name"] == "theirs"
    assert gets(api, "services", "theirs") == 1
    with pytest.raises(NotFound):
        await cache.get("shop", "nobody")
    assert gets(api, "services", "nobody") == 1
    ours = {
        "metadata": {
            "name": "ours",
            "namespace": "shop",
            "labels": {"app.kubernetes.io/managed-by": "canary"},
            "resourceVersion": "7",
        },
        "spec": {"selector": {"app": "x"}},
    }
    cache.apply(WatchEvent("ADDED", ours))
    assert (await cache.get("shop", "ours"))["spec"] == {"selector": {"app": "x"}}
    assert gets(api, "services", "ours") == 0 and cache.hits == 1


def test_slim_drops_what_routers_do_not_read() -> None:
    obj: dict[str, Any] = {
        "metadata": {
            "name": "app",
            "namespace": "shop",
            "resourceVersion": "7",
            "generation": 2,
            "labels": {"a": "b"},
            "annotations": {
                WEIGHT_ANNOTATION: "5",
                "kubectl.kubernetes.io/last-applied-configuration": "{" + "x" * 5000 + "}",
            },
            "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}],
        },
        "spec": {"rules": []},
        "status": {"loadBalancer": {}},
    }
    assert slim(obj, keep_status=False) == {
        "metadata": {
            "name": "app",
            "namespace": "shop",
            "resourceVersion": "7",
            "generation": 2,
            "labels": {"a": "b"},
            "annotations": {WEIGHT_ANNOTATION: "5"},
        },
        "spec": {"rules": []},
    }
    assert slim(obj, keep_status=True)["status"] == {"loadBalancer": {}}


async def test_the_cache_holds_compact_text_and_each_read_is_its_own_copy(
    api: KubeEmulator, kube: Kube
) -> None:
    """Thousands of cached objects are held as their slim JSON text, not as dicts (issue 13's
    RSS); a read decodes the object as slim() left it, and a caller that changes what it
    read changes nothing for the next reader."""
    api.put(*INGRESSES, user_ingress())
    cache = await fed_by_hand(kube)
    listed = api.get(*INGRESSES, "shop", "app")
    assert {type(held) for held in cache._objects.values()} == {tuple}
    rv, text = cache._objects["shop", "app"]
    assert (rv, json.loads(text)) == (
        listed["metadata"]["resourceVersion"],
        slim(listed, keep_status=False),
    )
    read = await cache.get("shop", "app")
    assert read == slim(listed, keep_status=False)
    read["spec"]["rules"].clear()
    read["metadata"]["name"] = "changed by a caller"
    again = await cache.get("shop", "app")
    assert again == slim(listed, keep_status=False) and again is not read
    assert gets(api, name="app") == 0


@pytest.fixture
async def running(kube: Kube) -> AsyncIterator[ObjectCache]:
    """An Ingress cache fed by its own list + watch."""
    cache = ObjectCache(kube, "ingresses", "shop", retry_s=0.05, absent_retry_s=0.05)
    task = asyncio.create_task(cache.run())
    try:
        yield cache
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_change_by_someone_else_reaches_the_next_read_through_the_watch(
    api: KubeEmulator, kube: Kube, running: ObjectCache
) -> None:
    api.put(*INGRESSES, user_ingress())
    router = nginx(kube, running)
    await eventually(lambda: running.trusted, "the cache to list and watch")
    await router.set_weight(30)
    await eventually(lambda: not running._pending, "the write's event")
    before = gets(api)
    assert await router.get_weight() == 30

    edited = api.get(*INGRESSES, "shop", "app-canary")
    edited["metadata"]["annotations"][WEIGHT_ANNOTATION] = "77"  # kubectl edit
    api.put(*INGRESSES, edited)
    await eventually(
        lambda: (
            len(running) == 2
            and api.resource_version == int(running._objects["shop", "app-canary"][0])
        ),
        "the edit's event",
    )
    assert await router.get_weight() == 77
    assert gets(api) == before


async def test_a_410_re_lists_and_reads_get_meanwhile(
    api: KubeEmulator, kube: Kube, running: ObjectCache
) -> None:
    api.put(*INGRESSES, user_ingress())
    router = nginx(kube, running)
    await eventually(lambda: running.trusted, "the cache to list and watch")
    await router.set_weight(30)
    await eventually(lambda: not running._pending, "the write's event")
    lists = len(api.recorded(verb="list", resource="ingresses"))
    api.inject(0, verb="list", resource="ingresses", delay_s=0.5)  # a slow re-list
    api.compact()
    api.close_watches(gone=True)
    await eventually(lambda: not running.trusted, "the watch to end")
    before = gets(api)
    assert await router.get_weight() == 30
    assert gets(api) == before + 1, "re-listing: the read GETs"
    await eventually(lambda: running.trusted, "the re-list and a new watch")
    assert len(api.recorded(verb="list", resource="ingresses")) == lists + 1
    assert await router.get_weight() == 30
    assert gets(api) == before + 1


async def test_without_the_httproute_crd_the_cache_stays_unsynced_and_logs_once(
    api: KubeEmulator, kube: Kube, caplog: pytest.LogCaptureFixture
) -> None:
    api.inject(404, times=1000, verb="list", resource="httproutes")
    api.put(*ROUTES, http_route())  # GETs still work: only the list is refused here
    cache = ObjectCache(kube, "httproutes", None, retry_s=0.01, absent_retry_s=0.02)
    caplog.set_level(logging.INFO, logger="canary.kubernetes.informer")
    task = asyncio.create_task(cache.run())
    try:
        await eventually(
            lambda: len(api.recorded(verb="list", resource="httproutes")) >= 4, "retries"
        )
        assert not cache.trusted
        route = await cache.get("shop", "app")
        assert route["metadata"]["name"] == "app"
        assert gets(api, "httproutes", "app") == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    lines = [r for r in caplog.records if "httproutes" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]


async def test_the_weight_read_from_an_unchanged_cache_is_decoded_once(
    api: KubeEmulator, kube: Kube, running: ObjectCache
) -> None:
    """Each tick reads the weight back; while the cache's text of the canary Ingress is the
    same, the weight read from it stands (not decoded and worked out again); an edit is read
    at once, and an Ingress the router refuses is refused at every read."""
    api.put(*INGRESSES, user_ingress())
    router = nginx(kube, running)
    await eventually(lambda: running.trusted, "the cache to list and watch")
    await router.set_weight(30)
    await eventually(lambda: not running._pending, "the write's event")
    start = router._weight_seen.reads
    assert [await router.get_weight() for _ in range(5)] == [30] * 5
    assert router._weight_seen.reads - start == 1

    def edit(change: Callable[[dict[str, Any]], None]) -> Callable[[], bool]:
        edited = api.get(*INGRESSES, "shop", "app-canary")
        change(edited)
        api.put(*INGRESSES, edited)
        version = api.resource_version
        return lambda: int(running._objects["shop", "app-canary"][0]) == version

    seen = edit(lambda obj: obj["metadata"]["annotations"].__setitem__(WEIGHT_ANNOTATION, "55"))
    await eventually(seen, "the edit's event")
    assert [await router.get_weight() for _ in range(3)] == [55] * 3
    assert router._weight_seen.reads - start == 2

    def other_backend(obj: dict[str, Any]) -> None:
        path = obj["spec"]["rules"][0]["http"]["paths"][0]
        path["backend"]["service"]["name"] = "someone-else"

    await eventually(edit(other_backend), "the second edit's event")
    for _ in range(2):
        with pytest.raises(RouterRejected, match="someone-else"):
            await router.get_weight()
    assert router._weight_seen.reads - start == 4
