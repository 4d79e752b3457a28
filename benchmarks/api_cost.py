"""What one Kubernetes API write costs the controller's process, by kind (issue 13).

At 1,000 rollouts the controller's two steady writes are a Deployment merge-PATCH (the status
annotation) and a ConfigMap replace (a record's head, ~16 KiB); a PATCH also comes back as a
watch event, which the operator decodes. This measures the client side of each, on the real
control plane (api_only: etcd and kube-apiserver), as the controller's ServiceAccount, through
`canary.kubernetes.client.Kube`: process CPU per write, with a Deployment watch open in the
same process (as in the controller) so its echo is counted too, and cProfile's top entries.

Also what each write costs the servers (CPU ms of kube-apiserver, etcd and, with `--full`,
kube-controller-manager, which watches Deployments and every ConfigMap): on the 2-core
machine of benchmarks/scale.py they share the cores with the controllers, and past 1,000
rollouts it is their CPU that runs out first. A third kind is the record's steady write: a
merge-PATCH adding a part (~3 KiB) to a head of `--head-kib` (its tail grows to ~40 KiB
before it seals).

    PYTHONPATH=. python -m benchmarks.api_cost [--writes 400] [--profile] [--full] [--head-kib 24]
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

from benchmarks.scale import proc_cpu  # noqa: E402
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
    kube: Kube,
    writes: int,
    objects: int,
    prof: cProfile.Profile | None,
    versions: dict[str, str],
    servers: dict[str, int] | None = None,
    head_kib: int = 24,
) -> dict[str, float]:
    echoes = 0
    servers = servers or {}

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
    head = base64.b64encode(os.urandom(head_kib * 768)).decode()  # head_kib of base64
    part = base64.b64encode(os.urandom(3 * 768)).decode()
    for j in range(objects):
        if f"head{j}" not in versions:
            await kube.put_configmap(RECORD_NAMESPACE, f"head{j}", {"tail": head})
            versions[f"head{j}"] = ""
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

    async def appends() -> None:
        for k in range(writes):
            # the parts cycle, so the head stays at its size (the record's merges do that)
            await kube.patch_configmap(
                RECORD_NAMESPACE, f"head{k % objects}", {f"part{k % 6}": part + str(k)}
            )

    for label, run in (
        ("deployment PATCH (+ its watch echo)", patches),
        ("configmap replace", replaces),
        (f"configmap merge-PATCH of a part (head ~{head_kib + 18} KiB)", appends),
    ):
        before_echoes = echoes
        before = {name: proc_cpu(pid) for name, pid in servers.items()}
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
        for name, pid in servers.items():
            used = proc_cpu(pid) - before[name]
            result[f"{label}: {name} CPU ms per write"] = round(1000 * used / writes, 3)
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
    parser.add_argument("--full", action="store_true", help="the whole control plane")
    parser.add_argument("--head-kib", type=int, default=24)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory() as tmp,
        start_control_plane(Path(tmp) / "cluster", api_only=not args.full) as cluster,
    ):
        servers = {
            p.name: p.popen.pid
            for p in cluster.processes
            if p.popen is not None
            and p.name in ("etcd", "kube-apiserver", "kube-controller-manager")
        }
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
                # warm up: connections
                await measure(kube, 50, args.objects, None, versions, head_kib=args.head_kib)
                return await measure(
                    kube, args.writes, args.objects, prof, versions, servers, args.head_kib
                )

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
