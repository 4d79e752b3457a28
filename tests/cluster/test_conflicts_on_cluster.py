"""Real 409s: two writers with the controller's ServiceAccount token, through
canary.kubernetes.client, against the real API server. The one who writes second with the
resourceVersion both read gets Conflict, not a silent overwrite, and wins after a re-read; the
same for the record ConfigMaps and the leader-election Lease (each guarded write the
controller makes). The emulator's injected 409s (tests/kubernetes/) test the callers' retry
paths at a chosen request; this is the server's own answer to a real race."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.control_plane import ControlPlane

from canary.kubernetes.client import Conflict, Kube, LeaderElector, RetryPolicy

NAMESPACE = "e2e-conflicts"
RECORDS_NS = "canary-system"
# No retries: the test is about the first answer.
ONCE = RetryPolicy(attempts=1)


@pytest.fixture
async def writers(
    cluster: ControlPlane, controller_kubeconfig: Path
) -> AsyncIterator[tuple[Kube, Kube]]:
    """Two clients with the controller's ServiceAccount token, as two replicas would be."""
    first = await Kube.connect(kubeconfig=str(controller_kubeconfig), retry=ONCE)
    second = await Kube.connect(kubeconfig=str(controller_kubeconfig), retry=ONCE)
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


async def _read_and_patch(kube: Kube, annotation: str) -> str:
    """A guarded write as the controller makes it: read, patch with that resourceVersion,
    and on Conflict (the controller-manager writes the Deployment's status too) read again.
    Returns the resourceVersion the successful patch was guarded by."""
    for _ in range(20):
        version = str((await kube.get_deployment(NAMESPACE, "app"))["metadata"]["resourceVersion"])
        try:
            await kube.patch_deployment(
                NAMESPACE,
                "app",
                {"metadata": {"annotations": {annotation: "1"}}},
                resource_version=version,
            )
        except Conflict:
            continue
        return version
    raise AssertionError("20 conflicts in a row")


async def test_a_stale_resource_version_is_a_conflict(
    cluster: ControlPlane, writers: tuple[Kube, Kube]
) -> None:
    """The second writer, guarded by the resourceVersion the first writer's write was based
    on (as if both had read it), is refused with Conflict rather than overwriting; after a
    re-read its write goes through, and both writes are kept."""
    first, second = writers
    cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    cluster.kubectl(
        "create",
        "deployment",
        "app",
        "--image=example/app:1",
        "--replicas=0",
        "-n",
        NAMESPACE,
        check=False,
    )
    read_by_both = await _read_and_patch(first, "first")
    with pytest.raises(Conflict):
        await second.patch_deployment(
            NAMESPACE,
            "app",
            {"metadata": {"annotations": {"second": "1"}}},
            resource_version=read_by_both,
        )
    await _read_and_patch(second, "second")
    app = json.loads(
        cluster.kubectl("get", "deployment", "app", "-n", NAMESPACE, "-o", "json").stdout
    )
    assert {"first": "1", "second": "1"}.items() <= app["metadata"]["annotations"].items()


async def test_a_stale_configmap_replace_is_a_conflict(
    cluster: ControlPlane, writers: tuple[Kube, Kube]
) -> None:
    """A record ConfigMap replaced with a resourceVersion another writer has moved past is
    refused with Conflict, and the first writer's data stays."""
    first, second = writers
    name = "e2e-conflict-record"
    created = await first.put_configmap(RECORDS_NS, name, {"record": "a"})
    version = created["metadata"]["resourceVersion"]
    await first.put_configmap(RECORDS_NS, name, {"record": "ab"}, resource_version=version)
    with pytest.raises(Conflict):
        await second.put_configmap(RECORDS_NS, name, {"record": "ax"}, resource_version=version)
    with pytest.raises(Conflict):  # creating it again: AlreadyExists, also a 409
        await second.put_configmap(RECORDS_NS, name, {"record": "x"})
    assert (await second.get_configmap(RECORDS_NS, name))["data"] == {"record": "ab"}


async def test_two_candidates_racing_for_a_lease_never_both_win(
    writers: tuple[Kube, Kube],
) -> None:
    """Two electors at once on a new Lease: the server's 409 (on create or on the guarded
    replace) leaves exactly one of them holding it, and the other cannot take it while it
    is renewed."""
    first, second = writers
    electors = [
        LeaderElector(kube, namespace=RECORDS_NS, name="e2e-conflict-lease", identity=who)
        for kube, who in ((first, "one"), (second, "two"))
    ]
    won = await asyncio.gather(*(e.try_acquire_or_renew() for e in electors))
    assert sorted(won) == [False, True], won
    winner, loser = (electors[0], electors[1]) if won[0] else (electors[1], electors[0])
    assert await winner.try_acquire_or_renew()
    assert not await loser.try_acquire_or_renew()
    lease = await loser.kube.get_lease(RECORDS_NS, "e2e-conflict-lease")
    assert lease["spec"]["holderIdentity"] == winner.identity
