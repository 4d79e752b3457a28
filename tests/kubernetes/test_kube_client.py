"""canary.kubernetes.client against the emulated API server, through the real kubernetes-asyncio client."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import weakref
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from support.kube import FAST_RETRY, deployment
from support.kube_emulator import KubeEmulator

from canary.kubernetes.client import (
    Conflict,
    EventRecorder,
    Kube,
    KubeError,
    NotFound,
    ObjectRef,
    Relist,
    RetryPolicy,
    Unavailable,
    WatchEvent,
    deployment_rollout,
)

APPS = ("apps", "v1", "deployments")


async def next_item(stream: AsyncIterator[Relist | WatchEvent]) -> Relist | WatchEvent:
    return await asyncio.wait_for(anext(stream), 5)


def names(relist: Relist | WatchEvent) -> list[str]:
    assert isinstance(relist, Relist)
    return sorted(o["metadata"]["name"] for o in relist.objects)


# -- resourceVersion ---------------------------------------------------------------------


async def test_patch_with_stale_resource_version_is_a_conflict(
    api: KubeEmulator, kube: Kube
) -> None:
    """A patch guarded by a resourceVersion that has moved on raises Conflict and changes nothing."""
    api.put(*APPS, deployment())
    seen = await kube.get_deployment("default", "app")
    rv = seen["metadata"]["resourceVersion"]
    patched = await kube.patch_deployment(
        "default", "app", {"metadata": {"annotations": {"x": "1"}}}, resource_version=rv
    )
    assert patched["metadata"]["annotations"]["x"] == "1"
    with pytest.raises(Conflict, match="has been modified"):
        await kube.patch_deployment(
            "default", "app", {"metadata": {"annotations": {"x": "2"}}}, resource_version=rv
        )
    assert api.get(*APPS, "default", "app")["metadata"]["annotations"]["x"] == "1"
    assert api.recorded(verb="patch", status=409)


async def test_unguarded_patch_applies_over_any_version(api: KubeEmulator, kube: Kube) -> None:
    """Without a resourceVersion a merge patch always applies (scaling is last-writer-wins)."""
    api.put(*APPS, deployment())
    await kube.scale_deployment("default", "app", 0)
    assert api.get(*APPS, "default", "app")["spec"]["replicas"] == 0


async def test_configmap_create_then_guarded_replace(api: KubeEmulator, kube: Kube) -> None:
    """put_configmap creates once (a second create conflicts) and replaces only at its version."""
    created = await kube.put_configmap("default", "state", {"a": "1"})
    with pytest.raises(Conflict, match="already exists"):
        await kube.put_configmap("default", "state", {"a": "other"})
    rv = created["metadata"]["resourceVersion"]
    replaced = await kube.put_configmap("default", "state", {"a": "2"}, resource_version=rv)
    with pytest.raises(Conflict):
        await kube.put_configmap("default", "state", {"a": "3"}, resource_version=rv)
    current = await kube.get_configmap("default", "state")
    assert current["data"] == {"a": "2"}
    assert current["metadata"]["resourceVersion"] == replaced["metadata"]["resourceVersion"]


async def test_a_configmap_replace_keeps_what_it_is_told_to_and_a_create_nothing(
    api: KubeEmulator, kube: Kube
) -> None:
    """`keep` (the object's metadata as read) is carried by a replace, under our labels and
    owner (an owner already there is not listed twice); a create carries none of it."""
    theirs = {
        "labels": {"team": "shop", "canary.io/record": "old"},
        "annotations": {"note": "kept"},
        "finalizers": ["example.com/keep"],
        "ownerReferences": [  # ours first: the list is kept as it is, order and all
            {"apiVersion": "v1", "kind": "ConfigMap", "name": "head", "uid": "u2"},
            {"apiVersion": "v1", "kind": "Secret", "name": "s", "uid": "u1"},
        ],
        "uid": "not ours to send",
    }
    owner = {"apiVersion": "v1", "kind": "ConfigMap", "name": "head", "uid": "u2"}
    created = await kube.put_configmap("default", "c", {"a": "1"}, keep=theirs, owner=owner)
    assert "finalizers" not in created["metadata"] and "annotations" not in created["metadata"]
    assert created["metadata"]["ownerReferences"] == [owner]
    rv = created["metadata"]["resourceVersion"]
    replaced = await kube.put_configmap(
        "default",
        "c",
        {"a": "2"},
        resource_version=rv,
        labels={"canary.io/record": "head"},
        owner=owner,
        keep=theirs,
    )
    metadata = replaced["metadata"]
    assert metadata["labels"] == {"team": "shop", "canary.io/record": "head"}
    assert metadata["annotations"] == {"note": "kept"}
    assert metadata["finalizers"] == ["example.com/keep"]
    assert metadata["ownerReferences"] == theirs["ownerReferences"]
    assert metadata["uid"] == created["metadata"]["uid"]


async def test_missing_object_is_not_found_and_not_retried(api: KubeEmulator, kube: Kube) -> None:
    """A 404 is an answer, not a failure: NotFound at once, one request."""
    with pytest.raises(NotFound, match="not found"):
        await kube.get_deployment("default", "nope")
    assert len(api.recorded(verb="get", resource="deployments")) == 1


# -- retries -----------------------------------------------------------------------------


async def test_429_is_retried_no_sooner_than_retry_after(api: KubeEmulator, kube: Kube) -> None:
    """A 429 with Retry-After: 1 is retried, and the server sees the retry at least 1s later."""
    api.put(*APPS, deployment())
    api.inject(429, retry_after=1, verb="get")
    got = await kube.get_deployment("default", "app")
    assert got["metadata"]["name"] == "app"
    first, second = api.recorded(verb="get", resource="deployments")
    assert (first.status, second.status) == (429, 200)
    # FAST_RETRY's own backoff is <= 0.05s: only Retry-After explains a 1s gap.
    assert second.at - first.at >= 1.0


async def test_5xx_is_retried_with_backoff(api: KubeEmulator, kube: Kube) -> None:
    """Transient 500/503 answers are retried until the call succeeds."""
    api.put(*APPS, deployment())
    api.inject(503, times=1, verb="get")
    api.inject(500, times=1, verb="get")
    await kube.get_deployment("default", "app")
    assert [r.status for r in api.recorded(verb="get")] == [503, 500, 200]


async def test_retries_are_bounded(api: KubeEmulator, kube: Kube) -> None:
    """A server that keeps failing yields Unavailable after exactly `attempts` requests."""
    api.inject(503, times=100, verb="list")
    with pytest.raises(Unavailable, match=r"HTTP 503.*gave up after 4 attempts"):
        await kube.list_deployments()
    assert len(api.recorded(verb="list")) == FAST_RETRY.attempts


async def test_retry_after_beyond_the_limit_gives_up_at_once(
    api: KubeEmulator, tmp_path: Path
) -> None:
    """A Retry-After longer than the policy allows is an Unavailable, not a long hang."""
    config = api.write_kubeconfig(tmp_path / "kc")
    policy = RetryPolicy(attempts=3, initial_delay_s=0.01, max_delay_s=0.05, max_retry_after_s=5)
    async with await Kube.connect(kubeconfig=str(config), retry=policy) as kube:
        api.inject(429, retry_after=3600, verb="get")
        with pytest.raises(Unavailable, match="retry after 3600s"):
            await kube.get_configmap("default", "x")
    assert len(api.recorded(verb="get")) == 1


async def test_unreachable_server_is_unavailable(tmp_path: Path) -> None:
    """No server at all: connection errors are retried, then reported as Unavailable."""
    emulator = KubeEmulator()
    await emulator.start()
    config = emulator.write_kubeconfig(tmp_path / "kc")
    await emulator.stop()  # the port is closed now
    async with await Kube.connect(kubeconfig=str(config), retry=FAST_RETRY) as kube:
        with pytest.raises(Unavailable, match="no answer"):
            await kube.get_deployment("default", "app")


async def test_requests_past_the_limit_wait_their_turn_without_timing_out(
    api: KubeEmulator, tmp_path: Path
) -> None:
    """Eight GETs at once, two at a time on the wire, each served after 0.6 s with a 1 s
    timeout: all answer (none retried) and the last after about four turns. Waiting in the
    HTTP pool instead, with its timeout running, most would have timed out (issue 13)."""
    api.put(*APPS, deployment("app"))
    api.inject(0, times=8, verb="get", resource="deployments", delay_s=0.6)
    config = api.write_kubeconfig(tmp_path / "kc")
    async with await Kube.connect(
        kubeconfig=str(config), retry=FAST_RETRY, request_timeout_s=1.0, max_in_flight=2
    ) as kube:
        began = asyncio.get_running_loop().time()
        got = await asyncio.gather(*(kube.get_deployment("default", "app") for _ in range(8)))
        took = asyncio.get_running_loop().time() - began
    assert [d["metadata"]["name"] for d in got] == ["app"] * 8
    assert len(api.recorded(verb="get", resource="deployments")) == 8  # no retry
    assert took >= 4 * 0.6 - 0.05


@asynccontextmanager
async def _general_slots_held(api: KubeEmulator, tmp_path: Path) -> AsyncIterator[Kube]:
    """A client with two general slots, both held by slow GETs (2 s each), two more queued."""
    api.put(*APPS, deployment("app"))
    api.inject(0, times=4, verb="get", resource="deployments", delay_s=2.0)
    config = api.write_kubeconfig(tmp_path / "kc")
    async with await Kube.connect(
        kubeconfig=str(config), retry=FAST_RETRY, request_timeout_s=5.0, max_in_flight=2
    ) as kube:
        slow = [asyncio.create_task(kube.get_deployment("default", "app")) for _ in range(4)]
        await asyncio.sleep(0.3)  # two on the wire, two queued
        yield kube
        await asyncio.gather(*slow)


async def test_lease_requests_never_wait_behind_the_rest(api: KubeEmulator, tmp_path: Path) -> None:
    """Every general slot held by slow GETs: a Lease read still answers at once. Queued
    behind them, shard renewals missed their deadline at 2,000 rollouts (issue 13)."""
    async with _general_slots_held(api, tmp_path) as kube:
        began = asyncio.get_running_loop().time()
        with pytest.raises(NotFound):
            await kube.get_lease("default", "shard-0")
        took = asyncio.get_running_loop().time() - began
    assert took < 1.0, took


async def test_traffic_requests_never_wait_behind_the_rest(
    api: KubeEmulator, tmp_path: Path
) -> None:
    """Every general slot held by slow GETs: the routers' reads of an Ingress, an HTTPRoute
    and a DNSEndpoint still answer at once (their sets and read-backs timed out in that
    queue at 2,000 rollouts, issue 13), while a list of Ingresses (a watch cache's) waits
    its turn like the rest."""
    async with _general_slots_held(api, tmp_path) as kube:
        loop = asyncio.get_running_loop()
        began = loop.time()
        for read in (kube.get_ingress, kube.get_httproute, kube.get_dnsendpoint):
            with pytest.raises(NotFound):
                await read("default", "app")
        traffic_took = loop.time() - began
        await kube.list_ingresses("default")
        list_took = loop.time() - began
    assert traffic_took < 1.0, traffic_took
    assert list_took > 1.5, list_took


async def test_unknown_context_names_it(api: KubeEmulator, tmp_path: Path) -> None:
    """Like kubectl --context: a context missing from the kubeconfig is a clear error."""
    config = api.write_kubeconfig(tmp_path / "kc", context="real")
    with pytest.raises(KubeError, match="context nope"):
        await Kube.connect(kubeconfig=str(config), context="nope")


# -- watches -----------------------------------------------------------------------------


async def test_watch_resumes_from_last_resource_version(api: KubeEmulator, kube: Kube) -> None:
    """When the server ends a watch, the next one starts at the last resourceVersion seen,
    so no event is lost or repeated and no re-list is needed."""
    api.put(*APPS, deployment("a"))
    async with aclosing(kube.watch_deployments("default", timeout_s=30)) as stream:
        assert names(await next_item(stream)) == ["a"]
        api.put(*APPS, deployment("b"))
        added = await next_item(stream)
        assert isinstance(added, WatchEvent) and added.type == "ADDED"
        seen_rv = added.object["metadata"]["resourceVersion"]
        api.close_watches()
        api.delete(*APPS, "default", "a")  # happens while no watch is open
        deleted = await next_item(stream)
        assert isinstance(deleted, WatchEvent)
        assert (deleted.type, deleted.object["metadata"]["name"]) == ("DELETED", "a")
    watches = api.recorded(verb="watch")
    assert [w.query["resourceVersion"] for w in watches][-1] == seen_rv
    assert len(api.recorded(verb="list")) == 1


async def test_watch_relists_after_410_gone(api: KubeEmulator, kube: Kube) -> None:
    """A resume from a compacted resourceVersion gets 410 Gone; the watch re-lists, and the
    new Relist shows the truth, including a deletion whose event was never seen."""
    api.put(*APPS, deployment("a"))
    api.put(*APPS, deployment("b"))
    async with aclosing(kube.watch_deployments("default", timeout_s=30)) as stream:
        assert names(await next_item(stream)) == ["a", "b"]
        # The consumer is slow: meanwhile b goes, c comes, and history is compacted.
        api.delete(*APPS, "default", "b")
        api.put(*APPS, deployment("c"))
        api.compact()
        relist = await next_item(stream)
        assert names(relist) == ["a", "c"]
        api.put(*APPS, deployment("d"))
        event = await next_item(stream)
        assert isinstance(event, WatchEvent) and event.object["metadata"]["name"] == "d"
    assert len(api.recorded(verb="list")) == 2


async def test_watch_relists_after_410_mid_stream(api: KubeEmulator, kube: Kube) -> None:
    """An ERROR 410 event inside an open stream also leads to a re-list."""
    api.put(*APPS, deployment("a"))
    async with aclosing(kube.watch_deployments(None, timeout_s=30)) as stream:
        assert names(await next_item(stream)) == ["a"]
        api.put(*APPS, deployment("b"))
        assert isinstance(await next_item(stream), WatchEvent)
        api.close_watches(gone=True)
        assert names(await next_item(stream)) == ["a", "b"]
    assert len(api.recorded(verb="list")) == 2


async def test_watch_relists_after_a_500_mid_stream(api: KubeEmulator, kube: Kube) -> None:
    """An ERROR 500 event inside an open stream (the real server sends one for a watch
    resumed at the revision etcd was compacted to) leads to a re-list, not an exception."""
    api.put(*APPS, deployment("a"))
    async with aclosing(kube.watch_deployments("default", timeout_s=30)) as stream:
        assert names(await next_item(stream)) == ["a"]
        api.put(*APPS, deployment("b"))
        assert isinstance(await next_item(stream), WatchEvent)
        api.close_watches(error=500)
        api.put(*APPS, deployment("c"))
        assert names(await next_item(stream)) == ["a", "b", "c"]
        api.put(*APPS, deployment("d"))
        event = await next_item(stream)
        assert isinstance(event, WatchEvent) and event.object["metadata"]["name"] == "d"
    assert len(api.recorded(verb="list")) == 2


async def test_watch_gives_up_after_500s_in_a_row(api: KubeEmulator, kube: Kube) -> None:
    """Streams that keep ending in a 500 before any event: a re-list before each new
    stream, and Unavailable after the policy's attempts."""
    api.put(*APPS, deployment("a"))
    served = len(api.recorded(verb="watch"))

    async def end_every_stream() -> None:
        nonlocal served
        while True:
            watches = len(api.recorded(verb="watch"))
            if watches > served:  # a new stream is open: end it with a 500
                served = watches
                api.close_watches(error=500)
            await asyncio.sleep(0.005)

    breaker = asyncio.create_task(end_every_stream())
    relists = 0
    try:
        async with aclosing(kube.watch_deployments("default", timeout_s=30)) as stream:
            with pytest.raises(Unavailable, match="500"):
                while True:
                    assert names(await next_item(stream)) == ["a"]
                    relists += 1
    finally:
        breaker.cancel()
    assert relists == kube.retry.attempts


async def test_watch_open_is_retried_on_429(api: KubeEmulator, kube: Kube) -> None:
    """Opening a watch is retried like any call."""
    api.put(*APPS, deployment("a"))
    api.inject(429, verb="watch", retry_after=0)
    async with aclosing(kube.watch_deployments("default", timeout_s=30)) as stream:
        await next_item(stream)
        api.put(*APPS, deployment("b"))
        event = await next_item(stream)
        assert isinstance(event, WatchEvent) and event.object["metadata"]["name"] == "b"
    assert [w.status for w in api.recorded(verb="watch")][:2] == [429, 200]


# -- events ------------------------------------------------------------------------------


async def test_events_name_the_deployment(api: KubeEmulator, kube: Kube) -> None:
    """A Warning Event is recorded against the Deployment, as kubectl describe shows it."""
    api.put(*APPS, deployment())
    dep = await kube.get_deployment("default", "app")
    await kube.emit_event(
        ObjectRef.deployment(dep), type="Warning", reason="BadSpec", message="canary.dev/steps: x"
    )
    events: list[dict[str, Any]] = [o for k, o in api.objects.items() if k[2] == "events"]
    assert len(events) == 1
    event = events[0]
    assert event["type"] == "Warning" and event["reason"] == "BadSpec"
    assert event["involvedObject"]["kind"] == "Deployment"
    assert event["involvedObject"]["uid"] == dep["metadata"]["uid"]


async def test_missing_kubeconfig_is_named(tmp_path: Path) -> None:
    """A kubeconfig path that does not exist is reported as such."""
    with pytest.raises(KubeError, match=r"kubeconfig .*/absent does not exist"):
        await Kube.connect(kubeconfig=str(tmp_path / "absent"))


async def test_an_event_whose_answer_was_lost_counts_as_sent(
    api: KubeEmulator, tmp_path: Path
) -> None:
    """The first attempt lands but answers after the timeout; the retry gets 409 for the
    same name: that Event was sent, once (a loaded API server did this to 1,000 rollouts)."""
    api.put(*APPS, deployment())
    config = api.write_kubeconfig(tmp_path / "kc")
    async with await Kube.connect(
        kubeconfig=str(config), retry=FAST_RETRY, request_timeout_s=0.3
    ) as kube:
        ref = ObjectRef.deployment(await kube.get_deployment("default", "app"))
        api.inject(0, times=1, verb="create", resource="events", answer_late_s=0.6)
        recorder = EventRecorder(kube, repeat_after_s=600)
        assert await recorder.record(ref, type="Warning", reason="Slow", message="m")
    events = [o for k, o in api.objects.items() if k[2] == "events"]
    assert len(events) == 1 and events[0]["reason"] == "Slow"
    assert [r.status for r in api.recorded(verb="create", resource="events")] == [201, 409]


def test_only_kube_module_imports_the_client() -> None:
    """kubernetes_asyncio is imported by canary/kubernetes/client.py alone: one seam to the
    cluster (docstrings may name it; import statements may not)."""
    root = Path(__file__).resolve().parents[2]
    importers = sorted(
        str(path.relative_to(root))
        for folder in ("canary", "analysis")
        for path in (root / folder).rglob("*.py")
        if re.search(r"^\s*(from|import) kubernetes_asyncio\b", path.read_text(), re.M)
    )
    assert importers == ["canary/kubernetes/client.py"]


async def test_event_recorder_does_not_repeat_itself(api: KubeEmulator, kube: Kube) -> None:
    """The same Warning on every reconcile becomes one Event; a new message is a new Event;
    an API failure is reported as False, not raised."""
    api.put(*APPS, deployment())
    ref = ObjectRef.deployment(await kube.get_deployment("default", "app"))
    recorder = EventRecorder(kube, repeat_after_s=600)
    sent = [
        await recorder.record(ref, type="Warning", reason="BadSpec", message="steps: bad")
        for _ in range(3)
    ]
    assert sent == [True, False, False]
    assert await recorder.record(ref, type="Warning", reason="BadSpec", message="port: bad")
    api.inject(403, verb="create", resource="events")
    assert not await recorder.record(ref, type="Normal", reason="Progressing", message="10%")
    events = [o for k, o in api.objects.items() if k[2] == "events"]
    assert sorted(e["message"] for e in events) == ["port: bad", "steps: bad"]


@pytest.mark.parametrize(
    ("generation", "status", "state", "reason"),
    [
        (2, {"observedGeneration": 1}, "progressing", "generation 2"),
        (
            1,
            {"observedGeneration": 1, "updatedReplicas": 1, "replicas": 2},
            "progressing",
            "1 of 2 replicas updated",
        ),
        (
            1,
            {"observedGeneration": 1, "updatedReplicas": 2, "replicas": 3},
            "progressing",
            "1 old replicas",
        ),
        (
            1,
            {"observedGeneration": 1, "updatedReplicas": 2, "replicas": 2, "availableReplicas": 1},
            "progressing",
            "1 of 2 updated replicas available",
        ),
        (
            1,
            {"observedGeneration": 1, "updatedReplicas": 2, "replicas": 2, "availableReplicas": 2},
            "done",
            "2 replicas",
        ),
        (
            1,
            {
                "observedGeneration": 1,
                "conditions": [
                    {
                        "type": "Progressing",
                        "reason": "ProgressDeadlineExceeded",
                        "message": "timeout",
                    }
                ],
            },
            "failed",
            "progress deadline exceeded",
        ),
    ],
)
def test_deployment_rollout_state(
    generation: int, status: dict[str, Any], state: str, reason: str
) -> None:
    """Rollout completion is judged as kubectl rollout status does."""
    obj = deployment()
    obj["metadata"]["generation"] = generation
    obj["status"] = status
    got_state, got_reason = deployment_rollout(obj)
    assert got_state == state
    assert reason in got_reason


async def test_emulated_deployments_roll_out(api: KubeEmulator, kube: Kube) -> None:
    """The emulator's stand-in Deployment controller completes each new generation."""
    api.put(*APPS, deployment())
    patched = await kube.patch_deployment(
        "default",
        "app",
        {
            "spec": {
                "template": {"spec": {"containers": [{"name": "app", "image": "example/app:2"}]}}
            }
        },
    )
    assert patched["metadata"]["generation"] == 2
    assert deployment_rollout(patched)[0] == "done"


async def test_a_hung_server_costs_one_timeout_per_attempt(
    api: KubeEmulator, tmp_path: Path
) -> None:
    """A request the server never answers times out and is retried like any failure."""
    config = api.write_kubeconfig(tmp_path / "kc")
    async with await Kube.connect(
        kubeconfig=str(config), retry=FAST_RETRY, request_timeout_s=0.3
    ) as kube:
        api.put(*APPS, deployment())
        api.inject(0, delay_s=2.0, verb="get")  # the first get hangs
        got = await kube.get_deployment("default", "app")
    assert got["metadata"]["name"] == "app"
    assert len(api.recorded(verb="get")) == 2


@pytest.mark.parametrize("netrc_set", [False, True])
async def test_no_netrc_lookup_per_request_unless_the_environment_asks(
    api: KubeEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, netrc_set: bool
) -> None:
    """aiohttp looks for a netrc file on every request of a session that trusts the
    environment (in asyncio's default thread pool): not for ours, unless a proxy or NETRC is
    set, where the environment is the user's way to configure it."""
    import aiohttp.client

    for name in (
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NETRC",
    ):
        monkeypatch.delenv(name, raising=False)
    if netrc_set:
        (tmp_path / "netrc").write_text("")
        monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    lookups = 0
    real = aiohttp.client.netrc_from_env

    def counted() -> object:
        nonlocal lookups
        lookups += 1
        return real()

    monkeypatch.setattr(aiohttp.client, "netrc_from_env", counted)
    config = api.write_kubeconfig(tmp_path / "kc")
    async with await Kube.connect(kubeconfig=str(config), retry=FAST_RETRY) as kube:
        for _ in range(3):
            with pytest.raises(NotFound):
                await kube.get_configmap("default", "x")
    assert (lookups >= 3) if netrc_set else (lookups == 0), lookups


async def test_a_quiet_watch_does_not_hold_its_list(api: KubeEmulator, kube: Kube) -> None:
    """Once the consumer lets go of the Relist, nothing keeps it while the watch waits for
    an event that may not come for hours: a list of every Deployment, decoded, is ~12 KiB
    each (issue 13: 25 MiB of a replica's heap at 2,000 rollouts)."""
    api.put(*APPS, deployment("a"))
    async with aclosing(kube.watch_deployments("default", timeout_s=30)) as stream:
        relist = await next_item(stream)
        assert names(relist) == ["a"]
        held = weakref.ref(relist)
        del relist
        waiting = asyncio.ensure_future(anext(stream))
        try:
            await asyncio.sleep(0.3)  # the watch is open and waiting
            assert not waiting.done()
            gc.collect()
            assert held() is None
            api.put(*APPS, deployment("b"))  # and the watch still works
            added = await asyncio.wait_for(waiting, 5)
            assert isinstance(added, WatchEvent) and added.object["metadata"]["name"] == "b"
        finally:
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await waiting
