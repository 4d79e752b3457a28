"""Issue 13: a rollout's series leave /metrics when the controller forgets the rollout for good
(its Deployment deleted, or no longer opted in), so that a controller that sees ~1,000
rollouts a day does not export (and hold) every one it ever saw."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from pathlib import Path

from prometheus_client import generate_latest
from support.kube_emulator import KubeEmulator
from test_operator import (
    DEPLOYMENTS,
    RECORDS_NS,
    connect,
    initialized,
    new_version,
    notes_for,
    seed,
    state,
    until,
)

from canary.kubernetes.client import Kube
from canary.kubernetes.operator import Operator, OperatorSettings
from canary.kubernetes.shards import ShardElector, shard_of


def _operator(kube: Kube, identity: str, shards: ShardElector | None = None) -> Operator:
    return Operator(
        kube,
        OperatorSettings(
            prometheus_url="http://127.0.0.1:9",  # no data: the rollouts hold at their first step
            record_namespace=RECORDS_NS,
            tick_s=0.2,
            record_flush_s=0.0,
            identity=identity,
        ),
        shards=shards,
    )


def _exported(operator: Operator, namespace: str) -> int:
    """/metrics' series of the Deployment `app` in `namespace`."""
    body = generate_latest(operator.telemetry.registry).decode()
    return body.count(f'rollout="{namespace}/app"')


async def test_a_deleted_deployments_series_leave_metrics(
    api: KubeEmulator, tmp_path: Path
) -> None:
    """Opted out (annotation removed): the series go; opted in again: they come back with the
    resumed rollout; the Deployment deleted: they go for good. Another Deployment's stay."""
    ns, other = "gone", "stays"
    for namespace in (ns, other):
        seed(api, namespace, notes_for(**{"canary.dev/no-data-deadline": "600s"}))
    kube = await connect(api, tmp_path, "token-a")
    operator = _operator(kube, "token-a")

    exported = functools.partial(_exported, operator)
    task = asyncio.create_task(operator.run())
    try:
        for namespace in (ns, other):
            await until(lambda n=namespace: initialized(api, n), timeout_s=60, what="init")
            new_version(api, namespace, "example/app:2")
            await until(
                lambda n=namespace: (s := state(api, n)) and s.rollout and s.rollout.active,
                timeout_s=60,
                what="a rollout",
            )
            await until(lambda n=namespace: exported(n) >= 10, timeout_s=30, what="series")
        kept = exported(other)

        obj = api.get(*DEPLOYMENTS, ns, "app")
        del obj["metadata"]["annotations"]["canary.dev/enabled"]
        api.put(*DEPLOYMENTS, obj)
        await until(lambda: exported(ns) == 0, timeout_s=30, what="the series to go")
        assert (ns, "app") not in operator.workers

        obj = api.get(*DEPLOYMENTS, ns, "app")
        obj["metadata"]["annotations"]["canary.dev/enabled"] = "true"
        api.put(*DEPLOYMENTS, obj)
        await until(lambda: exported(ns) >= 10, timeout_s=30, what="the series to come back")

        api.delete(*DEPLOYMENTS, ns, "app")
        await until(lambda: exported(ns) == 0, timeout_s=30, what="the series to go for good")
        await asyncio.sleep(1.0)  # five ticks: no tick of the stopped rollout sets them again
        assert exported(ns) == 0
        # the other rollout's series stay (it may have added some since: its looks go on)
        assert exported(other) >= kept and operator.telemetry.rollouts() == 1
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await kube.close()


async def test_a_shard_that_moves_takes_its_series_along(api: KubeEmulator, tmp_path: Path) -> None:
    """Two shards, a rollout in each, both held by replica a; replica b joins and is handed one
    shard: that shard's rollout is exported by b alone from then on (a's copy would stay
    frozen at the handover), the other's by a alone."""
    namespaces = ("stays", "moves")  # shard 0 and shard 1 of 2
    assert [shard_of(ns, "app", 2) for ns in namespaces] == [0, 1]
    for namespace in namespaces:
        seed(api, namespace, notes_for(**{"canary.dev/no-data-deadline": "600s"}))
    clients, operators, stops, tasks = [], [], [], []

    def start(identity: str) -> Operator:
        elector = ShardElector(
            clients[-1],
            namespace=RECORDS_NS,
            prefix="canary-shard",
            shards=2,
            identity=identity,
            lease_duration_s=1,
            renew_deadline_s=0.6,
            retry_period_s=0.1,
        )
        operator = _operator(clients[-1], identity, elector)
        stops.append(asyncio.Event())
        tasks.append(asyncio.create_task(operator.run(stops[-1])))
        operators.append(operator)
        return operator

    try:
        clients.append(await connect(api, tmp_path, "token-a"))
        a = start("token-a")
        await until(lambda: len(a.shards.held()) == 2, timeout_s=30, what="a to hold both")
        for namespace in namespaces:
            await until(lambda n=namespace: initialized(api, n), timeout_s=60, what="init")
            new_version(api, namespace, "example/app:2")
            await until(lambda n=namespace: _exported(a, n) >= 10, timeout_s=60, what="series")
        clients.append(await connect(api, tmp_path, "token-b"))
        b = start("token-b")
        await until(lambda: len(b.shards.held()) == 1, timeout_s=30, what="b to take a shard")
        (moved,) = b.shards.held()
        await until(lambda: _exported(b, namespaces[moved]) >= 10, timeout_s=30, what="b's")
        assert _exported(a, namespaces[moved]) == 0
        assert _exported(a, namespaces[1 - moved]) >= 10
        assert _exported(b, namespaces[1 - moved]) == 0
        assert a.telemetry.rollouts() == b.telemetry.rollouts() == 1
        # Each keeps every Deployment packed as its JSON text (a few KiB instead of dicts),
        # its workers too; the one whose shard moved is acted on by b alone, from its text.
        here, there = (namespaces[moved], "app"), (namespaces[1 - moved], "app")
        for replica in (a, b):
            assert {type(kept) for kept in replica.objects.values()} == {bytes}
        assert here not in a.workers and there not in b.workers
        for replica, key in ((a, there), (b, here)):
            worker = replica.workers[key]
            assert worker._held is replica.objects[key]  # one copy of the text, shared
            assert worker.obj == json.loads(replica.objects[key])
        parked = json.loads(a.objects[here])
        assert parked["metadata"]["namespace"] == namespaces[moved]
        assert "managedFields" not in parked["metadata"]
    finally:
        for stop in stops:
            stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in clients:
            await client.close()
