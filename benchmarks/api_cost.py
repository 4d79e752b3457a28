"""What one Kubernetes API write costs the controller's process, by kind (issue 13).

At 1,000 rollouts the controller's two steady writes are a Deployment merge-PATCH (the status
annotation) and a ConfigMap replace (a record's head, ~16 KiB); a PATCH also comes back as a
watch event, which the operator decodes. This measures the client side of each, on the real
control plane (api_only: etcd and kube-apiserver), as the controller's ServiceAccount, through
`canary.kubernetes.client.Kube`: process CPU per write, with a Deployment watch open in the
same process (as in the controller) so its echo is counted too, and cProfile's top entries.

    PYTHONPATH=. python -m benchmarks.api_cost [--writes 400] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import cProfile
import io
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from canary.kubernetes.client import Kube  # noqa: E402

NAMESPACE = "team0"
RECORD_NAMESPACE = "canary-system"


def deployment(i: int) -> dict[str, Any]:
    labels = {"app": f"app{i}"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": f"app{i}", "namespace": NAMESPACE, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "app", "image": "example/app:1"}]},
            },
        },
    }


async def measure(
    kube: Kube, writes: int, objects: int, prof: cProfile.Profile | None, versions: dict[str, str]
) -> dict[str, float]:
    echoes = 0

    async def watch() -> None:
        nonlocal echoes
        async for _ in kube.watch_deployments(NAMESPACE):
            echoes += 1

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(1.0)
    # A status annotation as the controller writes it: ~1.2 KiB of JSON.
    status = '{"rollout":{"stage":"Progressing","step":0,"weight":5,' + '"x":"' + "y" * 1100 + '"}}'
    record = base64.b64encode(os.urandom(12 * 1024)).decode()  # ~16 KiB, incompressible as gzip
    for j in range(objects):
        if f"rec{j}" in versions:
            continue
        made = await kube.put_configmap(RECORD_NAMESPACE, f"rec{j}", {"head": record})
        versions[f"rec{j}"] = made["metadata"]["resourceVersion"]
    result: dict[str, float] = {}

    async def patches() -> None:
        for k in range(writes):
            await kube.patch_deployment(
                NAMESPACE,
                f"app{k % objects}",
                {"metadata": {"annotations": {"canary.dev/status": status + str(k)}}},
            )

    async def replaces() -> None:
        for k in range(writes):
            name = f"rec{k % objects}"
            written = await kube.put_configmap(
                RECORD_NAMESPACE, name, {"head": record[:-8] + f"{k:08d}"},
                resource_version=versions[name],
            )  # fmt: skip
            versions[name] = written["metadata"]["resourceVersion"]

    for label, run in (
        ("deployment PATCH (+ its watch echo)", patches),
        ("configmap replace", replaces),
    ):
        before_echoes = echoes
        cpu, wall = time.process_time(), time.monotonic()
        if prof is not None:
            prof.enable()
        await run()
        await asyncio.sleep(0.5)  # the last echoes
        if prof is not None:
            prof.disable()
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        result[f"{label}: CPU ms per write"] = round(1000 * cpu / writes, 3)
        result[f"{label}: wall ms per write"] = round(1000 * wall / writes, 3)
        result[f"{label}: echoes"] = echoes - before_echoes
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    return result


def main() -> None:
    from support.control_plane import start_control_plane

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=400)
    parser.add_argument("--objects", type=int, default=50)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory() as tmp,
        start_control_plane(Path(tmp) / "cluster", api_only=True) as cluster,
    ):
        cluster.kubectl("create", "namespace", NAMESPACE)
        kubeconfig = cluster.service_account_kubeconfig(Path(tmp) / "sa.kubeconfig")
        manifest = Path(tmp) / "apps.json"

        manifest.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "List",
                    "items": [deployment(i) for i in range(args.objects)],
                }
            )
        )
        cluster.kubectl("apply", "-f", str(manifest))
        prof = cProfile.Profile() if args.profile else None

        async def go() -> dict[str, float]:
            kube = await Kube.connect(kubeconfig=str(kubeconfig))
            async with kube:
                versions: dict[str, str] = {}
                await measure(kube, 50, args.objects, None, versions)  # warm up: connections
                return await measure(kube, args.writes, args.objects, prof, versions)

        result = asyncio.run(go())
        for key, value in result.items():
            print(f"{key}: {value}")
        if prof is not None:
            out = io.StringIO()
            stats = pstats.Stats(prof, stream=out)
            stats.sort_stats("tottime").print_stats(30)
            print(out.getvalue())


if __name__ == "__main__":
    main()
