"""Issue 13, point 4: the controller's own writes to a Deployment (its status annotation, the
app Deployment scaled) come back as watch events; those must not trigger a reconcile, or
every status write costs a second pass over the object, at every tick, for every rollout."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

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

from canary.kubernetes.operator import Operator, OperatorSettings


async def test_our_own_writes_do_not_trigger_a_reconcile(api: KubeEmulator, tmp_path: Path) -> None:
    ns = "echo"
    seed(api, ns, notes_for(**{"canary.dev/no-data-deadline": "600s"}))
    kube = await connect(api, tmp_path, "token-a")
    operator = Operator(
        kube,
        OperatorSettings(
            prometheus_url="http://127.0.0.1:9",  # no data: the rollout holds at its first step
            record_namespace=RECORDS_NS,
            namespace=ns,
            tick_s=0.2,
            record_flush_s=0.0,
            identity="token-a",
        ),
    )
    task = asyncio.create_task(operator.run())
    try:
        await until(lambda: initialized(api, ns), timeout_s=60, what="initialization")
        new_version(api, ns, "example/app:2")
        await until(
            lambda: (s := state(api, ns)) and s.rollout and s.rollout.active,
            timeout_s=60,
            what="a rollout",
        )
        worker = operator.workers[(ns, "app")]
        await asyncio.sleep(1.0)
        user_edits = 2  # the seed's Deployment and the new pod template
        ours = [
            r
            for r in api.recorded(resource="deployments", namespace=ns)
            if r.verb in ("patch", "update") and r.status < 300 and r.token == "token-a"
        ]
        assert ours, "the controller wrote nothing to its Deployment"
        await asyncio.sleep(2.0)  # ten ticks holding on no data
        before = worker.reconciles
        await asyncio.sleep(2.0)
        # Holding: nothing changes from outside, so nothing to reconcile (the runner ticks on
        # its own timer); before the fix every status write came back as a reconcile.
        assert worker.reconciles - before <= 1, (worker.reconciles, before)
        # One reconcile per edit from outside (plus one, for an echo that can arrive before
        # the answer to our own write has told us its resourceVersion); an echo per write
        # before the fix (6 here for 5 writes).
        assert worker.reconciles <= user_edits + 1, (worker.reconciles, len(ours))
        # An edit from outside still reconciles.
        obj = api.get(*DEPLOYMENTS, ns, "app")
        obj["metadata"]["labels"] = {**obj["metadata"].get("labels", {}), "team": "blue"}
        api.put(*DEPLOYMENTS, obj)
        seen = worker.reconciles
        await until(lambda: worker.reconciles > seen, timeout_s=10, what="a reconcile")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await kube.close()
