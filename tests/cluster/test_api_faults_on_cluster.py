"""Real 410s and 429s, through canary.kubernetes.client, from a real kube-apiserver.

- 410 Gone after an etcd compaction: a second, API-only control plane (etcd and
  kube-apiserver, `--watch-cache=false`, so watches are served by etcd itself) whose etcd
  history is compacted, through etcd's v3 JSON gateway, past the resourceVersion the client's
  Deployment watch holds. The server answers the watch's resume with a 410; the watch
  re-lists (the change it could no longer replay is in the new Relist) and carries on.
- 429 Too Many Requests from API Priority and Fairness on the session cluster: a
  PriorityLevelConfiguration with a few seats that rejects (no queues) and a FlowSchema
  sending a test ServiceAccount's requests to it; a burst of concurrent calls through one
  `Kube` meets real 429s with the server's own Retry-After, which the client waits out
  before retrying, and the apiserver's metrics count the same 429s the client saw.

The emulator's injected faults (tests/kubernetes/) still test a fault at one chosen request
or token; these are the real server's answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.control_plane import (
    ControlPlane,
    Toolbox,
    start_control_plane,
    write_kubeconfig,
)

import canary.kubernetes.client as client
from canary.kubernetes.client import Kube, Relist, RetryPolicy, Unavailable, WatchEvent

# -- 410 Gone ------------------------------------------------------------------------------

GONE_NS = "e2e-gone"
STEP = "canary.test/step"


@pytest.fixture(scope="module")
def uncached(toolbox: Toolbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """etcd and a kube-apiserver without a watch cache: a watch is an etcd watch, so a
    resourceVersion etcd has compacted away is answered 410 (with the cache, the
    apiserver's own window decides, and it holds everything since it started)."""
    with start_control_plane(
        tmp_path_factory.mktemp("uncached"),
        toolbox,
        apiserver_args=("--watch-cache=false",),
        api_only=True,
    ) as running:
        yield running


def _etcd(cluster: ControlPlane, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """A call to etcd's v3 JSON gateway (gRPC over HTTP/JSON)."""
    request = urllib.request.Request(
        cluster.etcd_url + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


def _annotate(cluster: ControlPlane, value: str) -> int:
    """Set the step annotation on the Deployment; the resourceVersion (etcd revision) after."""
    return int(
        cluster.kubectl(
            "annotate",
            "deployment",
            "app",
            f"{STEP}={value}",
            "--overwrite",
            "-n",
            GONE_NS,
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ).stdout
    )


def _step(obj: dict[str, Any]) -> str | None:
    annotations: dict[str, str] = obj["metadata"].get("annotations") or {}
    return annotations.get(STEP)


async def test_a_watch_past_an_etcd_compaction_relists_and_carries_on(
    uncached: ControlPlane, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The watch holds resourceVersion R (its first list); the Deployment is edited and etcd
    compacted past R before the watch opens its stream. The real server answers the watch
    from R with 410; the watch re-lists (the edit it could not replay is there, nothing is
    lost) and then sees a later edit as an event."""
    cluster = uncached
    kubeconfig = cluster.service_account_kubeconfig(tmp_path / "kubeconfig")
    cluster.kubectl("create", "namespace", GONE_NS)
    cluster.kubectl(
        "create", "deployment", "app", "--image=example/app:1", "--replicas=0", "-n", GONE_NS
    )
    _annotate(cluster, "listed")

    caplog.set_level(logging.INFO, logger="canary.kubernetes.client")
    async with await Kube.connect(kubeconfig=str(kubeconfig)) as kube:
        watch = kube.watch_deployments(GONE_NS, timeout_s=60)
        async with contextlib.aclosing(watch):
            first = await asyncio.wait_for(anext(watch), 30)
            assert isinstance(first, Relist)
            assert [_step(obj) for obj in first.objects] == ["listed"]
            held = int(first.resource_version)

            # The watch is paused before it opens its stream from `held` (a generator
            # runs only when asked for its next item): edit, then compact etcd up to now.
            missed = _annotate(cluster, "missed")
            assert missed > held
            # One more write, so that the compaction goes past the revision right after
            # `held` too (a watch from exactly the compacted revision would still start).
            compacted = int(
                cluster.kubectl(
                    "create",
                    "configmap",
                    "later",
                    "-n",
                    GONE_NS,
                    "-o",
                    "jsonpath={.metadata.resourceVersion}",
                ).stdout
            )
            answer = await asyncio.to_thread(
                _etcd, cluster, "/v3/kv/compaction", {"revision": compacted, "physical": True}
            )
            assert int(answer["header"]["revision"]) >= compacted > missed, answer

            # What the server now answers a watch from `held`: a 410 ERROR event.
            raw = cluster.kubectl(
                "get",
                "--raw",
                f"/apis/apps/v1/namespaces/{GONE_NS}/deployments"
                f"?watch=1&resourceVersion={held}&timeoutSeconds=5",
            ).stdout
            error = json.loads(raw.splitlines()[0])
            assert error["type"] == "ERROR", raw
            assert error["object"]["code"] == 410, raw

            second = await asyncio.wait_for(anext(watch), 30)
            assert isinstance(second, Relist), second
            assert [_step(obj) for obj in second.objects] == ["missed"]
            assert int(second.resource_version) >= compacted
            assert f"resourceVersion {held} is gone, re-listing" in caplog.text

            after = _annotate(cluster, "after")
            event = await asyncio.wait_for(anext(watch), 30)
            assert isinstance(event, WatchEvent), event
            assert event.type == "MODIFIED"
            assert _step(event.object) == "after"
            assert int(event.object["metadata"]["resourceVersion"]) == after


async def test_a_watch_resumed_at_the_compacted_revision_relists_after_a_real_500(
    uncached: ControlPlane, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The edge of the same fault: etcd compacted to exactly the revision after the one the
    watch holds. etcd lets the watch start there, but the first event's previous value is
    gone, and the real apiserver answers with an ERROR event, code 500 ("etcd event
    received with PrevKv=nil"), on every resume from that point. The watch re-lists after a
    backoff (resuming would meet the same 500) instead of ending with an error."""
    cluster = uncached
    kubeconfig = cluster.service_account_kubeconfig(tmp_path / "kubeconfig")
    namespace = GONE_NS + "-edge"
    cluster.kubectl("create", "namespace", namespace)
    cluster.kubectl(
        "create", "deployment", "app", "--image=example/app:1", "--replicas=0", "-n", namespace
    )

    def annotate(value: str) -> int:
        return int(
            cluster.kubectl(
                "annotate",
                "deployment",
                "app",
                f"{STEP}={value}",
                "--overwrite",
                "-n",
                namespace,
                "-o",
                "jsonpath={.metadata.resourceVersion}",
            ).stdout
        )

    caplog.set_level(logging.INFO, logger="canary.kubernetes.client")
    async with await Kube.connect(kubeconfig=str(kubeconfig)) as kube:
        # The edit must be the very next write after the list: the apiserver's own Lease
        # renewals (every 10 s) may come between, then try again.
        for _ in range(5):
            watch = kube.watch_deployments(namespace, timeout_s=60)
            first = await asyncio.wait_for(anext(watch), 30)
            assert isinstance(first, Relist)
            held = int(first.resource_version)
            missed = annotate(f"missed-{held}")
            if missed == held + 1:
                break
            await watch.aclose()
        else:
            pytest.fail("another write came between the list and the edit five times")
        async with contextlib.aclosing(watch):
            await asyncio.to_thread(
                _etcd, cluster, "/v3/kv/compaction", {"revision": missed, "physical": True}
            )
            raw = cluster.kubectl(
                "get",
                "--raw",
                f"/apis/apps/v1/namespaces/{namespace}/deployments"
                f"?watch=1&resourceVersion={held}&timeoutSeconds=5",
            ).stdout
            error = json.loads(raw.splitlines()[0])
            assert error["type"] == "ERROR", raw
            assert error["object"]["code"] == 500, raw
            assert "PrevKv=nil" in error["object"]["message"], raw

            second = await asyncio.wait_for(anext(watch), 30)
            assert isinstance(second, Relist), second
            assert [_step(obj) for obj in second.objects] == [f"missed-{held}"]
            assert f"watch deployments from resourceVersion {held}: " in caplog.text
            assert "re-listing" in caplog.text

            after = annotate("after")
            event = await asyncio.wait_for(anext(watch), 30)
            assert isinstance(event, WatchEvent), event
            assert _step(event.object) == "after"
            assert int(event.object["metadata"]["resourceVersion"]) == after


# -- 429 Too Many Requests -----------------------------------------------------------------

APF_NS = "e2e-apf"
APF_SA = "throttled"
PRIORITY_LEVEL = "e2e-apf-tiny"
FLOW_SCHEMA = "e2e-apf-throttled"
BURST = 60
MAX_BURSTS = 6
# The controller's default backoff with fewer attempts and a lower Retry-After cap: the
# server's Retry-After starts at 1 s and doubles while the rejections go on (up to 32 s), so
# these bound the test's wall time (at most 1 + 2 + 4 s of waits for a call).
POLICY = RetryPolicy(attempts=4, initial_delay_s=0.2, max_delay_s=10.0, max_retry_after_s=4.0)


def _apf_objects() -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "flowcontrol.apiserver.k8s.io/v1",
            "kind": "PriorityLevelConfiguration",
            "metadata": {"name": PRIORITY_LEVEL},
            "spec": {
                "type": "Limited",
                "limited": {
                    # The smallest share of the server's 600 seats: a handful of them.
                    "nominalConcurrencyShares": 1,
                    # Neither lend nor borrow: the level has exactly its nominal seats.
                    "lendablePercent": 0,
                    "borrowingLimitPercent": 0,
                    "limitResponse": {"type": "Reject"},
                },
            },
        },
        {
            "apiVersion": "flowcontrol.apiserver.k8s.io/v1",
            "kind": "FlowSchema",
            "metadata": {"name": FLOW_SCHEMA},
            "spec": {
                "priorityLevelConfiguration": {"name": PRIORITY_LEVEL},
                # Before every default schema but `exempt` (1) and the system's.
                "matchingPrecedence": 300,
                "distinguisherMethod": {"type": "ByUser"},
                "rules": [
                    {
                        "subjects": [
                            {
                                "kind": "ServiceAccount",
                                "serviceAccount": {"name": APF_SA, "namespace": APF_NS},
                            }
                        ],
                        "resourceRules": [
                            {
                                "verbs": ["*"],
                                "apiGroups": ["*"],
                                "resources": ["*"],
                                "namespaces": ["*"],
                                "clusterScope": True,
                            }
                        ],
                    }
                ],
            },
        },
    ]


def _metric(cluster: ControlPlane, name: str, **labels: str) -> float:
    """The sum of a metric's samples with these labels, from the apiserver's /metrics."""
    total = 0.0
    for line in cluster.kubectl("get", "--raw", "/metrics").stdout.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match is None:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


@pytest.fixture
def throttled(cluster: ControlPlane, tmp_path: Path) -> Iterator[Path]:
    """A kubeconfig of a ServiceAccount that may list Deployments in APF_NS and whose every
    request goes to a tiny priority level that rejects; the level and schema are deleted
    afterwards, so the rest of the session is unaffected."""
    cluster.kubectl("create", "namespace", APF_NS, check=False)
    cluster.kubectl("create", "serviceaccount", APF_SA, "-n", APF_NS, check=False)
    cluster.kubectl(
        "create",
        "role",
        "lister",
        "--verb=get,list",
        "--resource=deployments",
        "-n",
        APF_NS,
        check=False,
    )
    cluster.kubectl(
        "create",
        "rolebinding",
        "lister",
        "--role=lister",
        f"--serviceaccount={APF_NS}:{APF_SA}",
        "-n",
        APF_NS,
        check=False,
    )
    cluster.kubectl(
        "create",
        "deployment",
        "app",
        "--image=example/app:1",
        "--replicas=0",
        "-n",
        APF_NS,
        check=False,
    )
    token = cluster.kubectl("create", "token", APF_SA, "-n", APF_NS).stdout.strip()
    kubeconfig = write_kubeconfig(
        tmp_path / "kubeconfig",
        server=cluster.server,
        ca_file=cluster.ca_file,
        user=f"system:serviceaccount:{APF_NS}:{APF_SA}",
        token=token,
        namespace=APF_NS,
    )
    objects = {"apiVersion": "v1", "kind": "List", "items": _apf_objects()}
    cluster.kubectl("apply", "-f", "-", stdin=json.dumps(objects))
    try:
        # The APF controller has taken the schema in once it says it is not dangling, and
        # the level once its seats are in the metrics.
        cluster.kubectl(
            "wait", "--for=condition=Dangling=False", f"flowschema/{FLOW_SCHEMA}", "--timeout=30s"
        )
        deadline = time.monotonic() + 30
        while not _metric(
            cluster, "apiserver_flowcontrol_nominal_limit_seats", priority_level=PRIORITY_LEVEL
        ):
            assert time.monotonic() < deadline, f"{PRIORITY_LEVEL} has no seats in /metrics"
            time.sleep(0.2)
        yield kubeconfig
    finally:
        cluster.kubectl("delete", "flowschema", FLOW_SCHEMA, "--ignore-not-found", "--wait=true")
        cluster.kubectl(
            "delete", "prioritylevelconfiguration", PRIORITY_LEVEL, "--ignore-not-found"
        )


class _RetryWaits(logging.Handler):
    """The waits canary.retry schedules (its DEBUG line), by the task that waits."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.waits: dict[object, list[float]] = defaultdict(list)

    def emit(self, record: logging.LogRecord) -> None:
        assert isinstance(record.args, tuple)
        self.waits[asyncio.current_task()].append(float(record.args[3]))


async def test_a_burst_over_a_tiny_priority_level_meets_real_429s_and_waits_them_out(
    cluster: ControlPlane, throttled: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bursts of BURST concurrent lists through one client over a priority level of a few seats: the
    apiserver rejects some with 429 and a Retry-After. Every 429 the client saw is either
    retried no sooner than its Retry-After (and within the policy's cap) or, at the last
    attempt or past the cap, ends the call loudly with Unavailable; the rest succeed. The
    apiserver counts exactly as many rejections as the client saw."""
    seats = _metric(
        cluster, "apiserver_flowcontrol_nominal_limit_seats", priority_level=PRIORITY_LEVEL
    )
    assert 0 < seats < 10, seats
    rejected_before = _metric(
        cluster, "apiserver_flowcontrol_rejected_requests_total", priority_level=PRIORITY_LEVEL
    )

    # The answers each call's attempts got (status, Retry-After), as the client decoded them.
    answers: dict[object, list[tuple[int, float | None]]] = defaultdict(list)
    decode = client._decode

    def recording_decode(status: int, retry_after: str | None, body: bytes, what: str) -> Any:
        answers[asyncio.current_task()].append(
            (status, None if retry_after is None else float(retry_after))
        )
        return decode(status, retry_after, body, what)

    monkeypatch.setattr(client, "_decode", recording_decode)
    waits = _RetryWaits()
    retry_log = logging.getLogger("canary.retry")
    retry_log.addHandler(waits)
    monkeypatch.setattr(retry_log, "level", logging.DEBUG)

    started = time.monotonic()
    async with await Kube.connect(kubeconfig=str(throttled), retry=POLICY) as kube:

        async def one() -> tuple[object, Relist | Unavailable]:
            task = asyncio.current_task()
            try:
                return task, await kube.list_deployments(APF_NS)
            except Unavailable as exc:
                return task, exc

        def seen() -> bool:
            return any(status == 429 for got in answers.values() for status, _ in got)

        try:
            # At least twice: the second burst goes out on the first one's open connections,
            # all at once rather than at the pace of TLS handshakes. On a loaded machine the
            # client may send too slowly to fill the level's seats: then again, a few times.
            results: list[tuple[object, Relist | Unavailable]] = []
            for burst in range(MAX_BURSTS):
                results += await asyncio.gather(*(one() for _ in range(BURST)))
                if burst >= 1 and seen():
                    break
        finally:
            retry_log.removeHandler(waits)
    elapsed = time.monotonic() - started

    rejected = _metric(
        cluster, "apiserver_flowcontrol_rejected_requests_total", priority_level=PRIORITY_LEVEL
    )
    seen_429 = sum(status == 429 for got in answers.values() for status, _ in got)
    succeeded = [task for task, result in results if isinstance(result, Relist)]
    failed = [(task, result) for task, result in results if isinstance(result, Unavailable)]
    print(
        f"{len(results) // BURST} x {BURST} lists over {seats:g} seats in {elapsed:.1f}s: {seen_429} answered 429, "
        f"{len(succeeded)} succeeded, {len(failed)} gave up; server counted "
        f"{rejected - rejected_before:g} rejections; Retry-After values "
        f"{sorted({ra for got in answers.values() for s, ra in got if s == 429})}"
    )

    assert seen_429 > 0, "no 429: the burst never exceeded the level's seats"
    assert rejected - rejected_before == seen_429
    assert succeeded, "no call got through"
    assert any(len(answers[task]) > 1 for task in succeeded), "no call succeeded on a retry"
    for task, result in results:
        got, slept = answers[task], waits.waits.get(task, [])
        statuses = [status for status, _ in got]
        assert all(status in (200, 429) for status in statuses), got
        # Every answer but the last was a 429 that was waited out, no sooner than asked.
        assert statuses[:-1] == [429] * (len(got) - 1), got
        assert len(slept) == len(got) - 1, (got, slept)
        for (_, retry_after), wait in zip(got, slept, strict=False):
            assert retry_after is not None and retry_after >= 1, got
            assert retry_after <= wait <= POLICY.max_retry_after_s, (got, slept)
        if isinstance(result, Relist):
            assert statuses[-1] == 200
            assert [obj["metadata"]["name"] for obj in result.objects] == ["app"]
        else:  # a loud end: the attempts ran out, or the server asked for more than the cap
            assert statuses[-1] == 429
            last_retry_after = got[-1][1]
            assert last_retry_after is not None
            assert len(got) == POLICY.attempts or last_retry_after > POLICY.max_retry_after_s
            assert "HTTP 429" in str(result), result
