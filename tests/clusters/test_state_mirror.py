"""StateMirror: the failover state in a ConfigMap, written against the emulated API server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.kube import FAST_RETRY, THEIRS
from support.kube_emulator import KubeEmulator

from canary.clusters.multicluster import StateMirror
from canary.core.failover import FailoverState, Mode
from canary.kubernetes.client import Conflict, Kube

NS = "canary-system"


@pytest.fixture
async def api() -> AsyncIterator[KubeEmulator]:
    async with KubeEmulator() as emulator:
        yield emulator


@pytest.fixture
async def kube(api: KubeEmulator, tmp_path: Path) -> AsyncIterator[Kube]:
    config = api.write_kubeconfig(tmp_path / "kubeconfig", context="test")
    client = await Kube.connect(kubeconfig=str(config), context="test", retry=FAST_RETRY)
    try:
        yield client
    finally:
        await client.close()


async def test_the_state_is_saved_and_loaded(api: KubeEmulator, kube: Kube) -> None:
    """No ConfigMap yet: load finds nothing; save creates it, a second save replaces it."""
    mirror = StateMirror(kube, NS, "failover-shop")
    assert await mirror.load() is None
    await mirror.save(FailoverState(mode=Mode.STANDBY, reason="primary down"))
    await mirror.save(FailoverState(mode=Mode.PRIMARY, reason="failback"))
    loaded = await mirror.load()
    assert loaded is not None and (loaded.mode, loaded.reason) == (Mode.PRIMARY, "failback")
    assert len(api.recorded(verb="create", resource="configmaps")) == 1


async def test_a_conflict_is_retried_once_after_a_re_read(api: KubeEmulator, kube: Kube) -> None:
    """Another writer between our read and our write (409): read again, write again. A
    second 409 in a row is raised, not retried again."""
    mirror = StateMirror(kube, NS, "failover-shop")
    await mirror.save(FailoverState())
    api.inject(409, verb="update", resource="configmaps")
    await mirror.save(FailoverState(reason="after a conflict"))
    loaded = await mirror.load()
    assert loaded is not None and loaded.reason == "after a conflict"
    assert [r.status for r in api.recorded(verb="update", resource="configmaps")] == [409, 200]
    api.inject(409, times=2, verb="update", resource="configmaps")
    with pytest.raises(Conflict):
        await mirror.save(FailoverState(reason="lost"))
    assert len(api.recorded(verb="update", resource="configmaps")) == 4


async def test_a_save_keeps_what_others_set_on_the_configmap(api: KubeEmulator, kube: Kube) -> None:
    """A save replaces the ConfigMap (PUT): the labels, annotations, owner and finalizers
    another party set on it (a team's label, a backup tool's finalizer) are kept."""
    mirror = StateMirror(kube, NS, "failover-shop")
    await mirror.save(FailoverState())
    stored = api.get("", "v1", "configmaps", NS, "failover-shop")
    theirs = THEIRS
    stored["metadata"].update(theirs)
    api.put("", "v1", "configmaps", stored)
    await mirror.save(FailoverState(mode=Mode.STANDBY, reason="primary down"))
    metadata = api.get("", "v1", "configmaps", NS, "failover-shop")["metadata"]
    assert {key: metadata.get(key) for key in theirs} == theirs
    loaded = await mirror.load()
    assert loaded is not None and loaded.mode == Mode.STANDBY
