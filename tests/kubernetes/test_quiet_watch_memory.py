"""Issue 13: no list the controller's watches made stays alive while the watches wait.

In a quiet cluster a watch can wait for hours; a list of every Deployment, decoded, is
~12 KiB a Deployment. Held by a generator's or a consumer's local, it was 25 MiB of a
replica's heap at 2,000 rollouts (benchmarks/RESULTS.md, the heap under tracemalloc)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref
from pathlib import Path
from typing import Any

from support.kube_emulator import KubeEmulator
from test_operator import RECORDS_NS, connect, initialized, notes_for, seed, until

from canary.kubernetes.client import Relist
from canary.kubernetes.operator import Operator, OperatorSettings


async def test_the_operators_lists_are_not_held_once_applied(
    api: KubeEmulator, tmp_path: Path
) -> None:
    """Every watch of the operator (Deployments, HPAs, the routers' caches) lists once; once
    the operator is started and the cluster is quiet, no Relist is alive."""
    seed(api, "quiet", notes_for())
    kube = await connect(api, tmp_path, "token-a")
    listed: list[tuple[str, weakref.ref[Relist]]] = []
    real_list = kube._list

    async def recording_list(resource: Any, *args: Any, **kwargs: Any) -> Relist:
        relist = await real_list(resource, *args, **kwargs)
        listed.append((str(resource), weakref.ref(relist)))
        return relist

    kube._list = recording_list  # type: ignore[method-assign]
    operator = Operator(
        kube,
        OperatorSettings(
            prometheus_url="http://127.0.0.1:9",  # no rollout is started here
            record_namespace=RECORDS_NS,
            namespace="quiet",
            tick_s=0.2,
            record_flush_s=0.0,
            identity="token-a",
        ),
    )
    task = asyncio.create_task(operator.run())
    try:
        await until(lambda: initialized(api, "quiet"), timeout_s=60, what="init")
        await until(
            lambda: (
                {"deployments", "horizontalpodautoscalers", "ingresses"}
                <= {resource for resource, _ in listed}
            ),
            timeout_s=30,
            what="the watches' lists",
        )
        await asyncio.sleep(1.0)  # quiet: the watches wait for events
        gc.collect()
        alive = sorted(resource for resource, held in listed if held() is not None)
        assert alive == []
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await kube.close()
