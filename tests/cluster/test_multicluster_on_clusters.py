"""Cross-cluster rollouts on two real control planes (issue 10): the session's cluster is the
primary cluster, a second one started for this module is the canary cluster. Each has its own
etcd, kube-apiserver, controller-manager, scheduler and kwok nodes, so the Deployments really
roll out (ReplicaSets, pods made Ready by kwok, status written by the controller-manager), and
the controller talks to both as the ServiceAccount from manifests/ (a TokenRequest token per
cluster, RBAC enforced).

The rest is real too, as in tests/clusters/test_multicluster.py: a service process per
"cluster" on its own loopback entry point (127.0.0.10 / 127.0.0.20), a real Prometheus
scraping both, a real PowerDNS whose weighted records move the traffic, and a load generator
that resolves the name through it every TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.control_plane import ControlPlane, start_control_plane
from support.pdns import API_KEY, PdnsServer, pdns
from support.pool import ProcessPool

from canary.clusters.multicluster import (
    ENABLED_ANNOTATION,
    MultiClusterController,
    build_controller,
    error_ratio_probe,
)
from canary.clusters.topology import Topology, parse_topology
from canary.core.records import read_record
from canary.demo.dnsload import DnsLoadGenerator
from canary.demo.procs import PrometheusProcess, free_port
from canary.demo.stack import service_process
from canary.kubernetes.client import Kube, RetryPolicy

__all__ = ["pdns"]

PRIMARY_IP, CANARY_IP = "127.0.0.10", "127.0.0.20"
NS = "shop"
RETRY = RetryPolicy(attempts=3, initial_delay_s=0.05, max_delay_s=0.5)


@pytest.fixture(scope="module")
def canary_cluster(
    tmp_path_factory: pytest.TempPathFactory, cluster: ControlPlane
) -> Iterator[ControlPlane]:
    """A second, independent control plane (the `cluster` fixture is the primary cluster)."""
    with start_control_plane(tmp_path_factory.mktemp("canary-cluster"), cluster.toolbox) as second:
        yield second


@pytest.fixture(scope="module")
def service_accounts(
    cluster: ControlPlane, canary_cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """The controller's ServiceAccount kubeconfig in each cluster (manifests/rbac.yaml)."""
    where = tmp_path_factory.mktemp("cross-cluster-identity")
    return (
        cluster.service_account_kubeconfig(where / "primary.kubeconfig"),
        canary_cluster.service_account_kubeconfig(where / "canary.kubeconfig"),
    )


def deployment(namespace: str, image: str, *, annotated: bool) -> dict[str, Any]:
    annotations = {ENABLED_ANNOTATION: "true"} if annotated else {}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "shop", "namespace": namespace, "annotations": annotations},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "shop"}},
            "template": {
                "metadata": {"labels": {"app": "shop"}},
                "spec": {"containers": [{"name": "shop", "image": image}]},
            },
        },
    }


def apply(cluster: ControlPlane, obj: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-f", "-", stdin=json.dumps(obj))


def seed(primary: ControlPlane, canary: ControlPlane, namespace: str) -> None:
    """The same Deployment in both clusters, rolled out; only the canary cluster's is annotated
    (new versions start there)."""
    for cluster, annotated in ((primary, False), (canary, True)):
        cluster.kubectl("create", "namespace", namespace)
        apply(cluster, deployment(namespace, "shop:1", annotated=annotated))
    for cluster in (primary, canary):
        cluster.kubectl("rollout", "status", "deployment/shop", "-n", namespace, "--timeout=180s")


def image(cluster: ControlPlane, namespace: str) -> str:
    dep = cluster.get_json("deployment", "shop", "-n", namespace)
    return str(dep["spec"]["template"]["spec"]["containers"][0]["image"])


def generation(cluster: ControlPlane, namespace: str) -> int:
    return int(cluster.get_json("deployment", "shop", "-n", namespace)["metadata"]["generation"])


def event_reasons(cluster: ControlPlane, namespace: str) -> list[str]:
    return [e["reason"] for e in cluster.get_json("events", "-n", namespace)["items"]]


def start_services(
    procs: ProcessPool, tmp_path: Path, *, canary_error_rate: float
) -> tuple[int, PrometheusProcess]:
    port = free_port()
    for version, ip, errors in (
        ("primary", PRIMARY_IP, 0.0),
        ("canary", CANARY_IP, canary_error_rate),
    ):
        procs.start(
            service_process(
                version,
                host=ip,
                port=port,
                log_path=tmp_path / f"{version}.log",
                error_rate=errors,
                latency_ms=5,
                seed=7,
                name=f"service-{version}",
            )
        )
    prometheus = PrometheusProcess(
        [f"{PRIMARY_IP}:{port}", f"{CANARY_IP}:{port}"],
        workdir=tmp_path / "prometheus",
        scrape_interval_s=0.5,
    )
    procs.start(prometheus)
    return port, prometheus


def topology(
    pdns: PdnsServer, port: int, prometheus: PrometheusProcess, tmp_path: Path, namespace: str
) -> Topology:
    def cluster(name: str, ip: str) -> dict[str, Any]:
        return {
            "name": name,
            "entry_point": ip,
            "prometheus": {"url": prometheus.url, "selector": f'instance="{ip}:{port}"'},
        }

    return parse_topology(
        {
            "clusters": {
                "primary": cluster("eu-1", PRIMARY_IP),
                "canary": cluster("eu-2", CANARY_IP),
            },
            "state_dir": str(tmp_path / "state"),
            "record_dir": str(tmp_path / "records"),
            "services": [
                {
                    "name": "shop",
                    "dns_name": f"{namespace}.{pdns.zone}",
                    "namespace": namespace,
                    "deployment": "shop",
                    "router": {
                        "kind": "powerdns",
                        "api_url": pdns.api_url,
                        "zone": pdns.zone,
                        "ttl": 1,
                        "dns_server": "127.0.0.1",
                        "dns_port": pdns.dns_port,
                    },
                    "steady_canary_percent": 10,
                    "steps": [50],
                    "min_step_s": 3,
                    "max_step_s": 120,
                    "no_data_deadline_s": 60,
                    "tick_s": 0.5,
                    # A rollout on the real control planes waits for the canary cluster's
                    # Deployment to roll out (kwok makes the pods Ready in a few seconds).
                    "rollout_timeout_s": 120,
                    # errors only: showing latency equal takes thousands of requests (minutes)
                    "analysis": {
                        "errors": {"tolerance": 1.0, "abs_tolerance": 0.02},
                        "quantiles": [],
                    },
                    "metrics": {"latency_buckets": None},
                    "health": {"port": port, "interval_s": 0.2, "timeout_s": 0.5},
                    "failover": {"failures_to_failover": 3, "healthy_s_to_failback": 1},
                }
            ],
        }
    )


@contextlib.asynccontextmanager
async def running(
    pdns: PdnsServer, topo: Topology, kubeconfigs: tuple[Path, Path], port: int
) -> AsyncIterator[tuple[MultiClusterController, DnsLoadGenerator]]:
    kubes = [await Kube.connect(kubeconfig=str(path), retry=RETRY) for path in kubeconfigs]
    session = aiohttp.ClientSession()
    loadgen = DnsLoadGenerator(
        "127.0.0.1", pdns.dns_port, topo.services[0].dns_name, port, rate=200
    )
    controller = build_controller(
        topo, session, primary=kubes[0], canary=kubes[1], probe_interval_s=0.2, poll_s=0.3
    )
    tasks = [asyncio.create_task(controller.run()), asyncio.create_task(loadgen.run())]
    try:
        yield controller, loadgen
    finally:
        controller.stop()
        loadgen.stop()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await session.close()
        for kube in kubes:
            await kube.close()
        for service in controller.services.values():
            if service.rollouts is not None:
                service.rollouts.metrics.close()


async def wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            while not await predicate():  # noqa: ASYNC110 - the state changes in other tasks
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what}") from None


async def weight_is(router: Any, weight: int) -> bool:
    try:
        return bool(await router.get_weight() == weight)
    except Exception:
        return False


async def at_steady(controller: MultiClusterController) -> tuple[Any, Any]:
    """The service's router and rollouts, once DNS sends the steady 10% to the canary cluster."""
    service = controller.services["shop"]
    router, rollouts = service.failover.router, service.rollouts
    assert rollouts is not None
    await wait_for(lambda: weight_is(router, 10), 30, "the steady 10%")
    return router, rollouts


async def finished(rollouts: Any) -> bool:
    return bool(rollouts.finished)


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PDNS_API_KEY", API_KEY)
    return tmp_path


async def test_a_template_is_promoted_from_the_canary_cluster_to_the_primary_cluster(
    pdns: PdnsServer,
    work: Path,
    procs: ProcessPool,
    cluster: ControlPlane,
    canary_cluster: ControlPlane,
    service_accounts: tuple[Path, Path],
) -> None:
    """A new template in the canary cluster's Deployment: DNS weight moves to the canary
    cluster, the analysis passes, and the template lands in the primary cluster's Deployment,
    which the real controller-manager rolls out; weights go back to steady."""
    ns = "shop-promote"
    await asyncio.to_thread(seed, cluster, canary_cluster, ns)
    port, prometheus = start_services(procs, work, canary_error_rate=0.0)
    topo = topology(pdns, port, prometheus, work, ns)
    async with running(pdns, topo, service_accounts, port) as (controller, loadgen):
        router, rollouts = await at_steady(controller)
        started = loadgen.clock()
        await asyncio.to_thread(apply, canary_cluster, deployment(ns, "shop:2", annotated=True))
        await wait_for(lambda: finished(rollouts), 240, "the rollout to end")
        assert rollouts.finished[0][1] == "promoted", rollouts.state()
        await wait_for(lambda: weight_is(router, 10), 30, "the steady 10% again")
        share = loadgen.share(CANARY_IP, started)
        assert share is not None and share > 0.2, share  # the 50% step really moved clients
    assert await asyncio.to_thread(image, cluster, ns) == "shop:2"
    # The primary cluster's controller-manager rolled the promoted template out.
    await asyncio.to_thread(
        cluster.kubectl, "rollout", "status", "deployment/shop", "-n", ns, "--timeout=120s"
    )
    reasons = await asyncio.to_thread(event_reasons, canary_cluster, ns)
    assert "RolloutStarted" in reasons and "Promoted" in reasons, reasons
    assert rollouts.runner is not None
    record = read_record(rollouts.runner.record_path)
    assert record[0].kind == "start" and record[-1].kind == "end"
    assert record[-1].outcome == "promoted"  # type: ignore[union-attr]
    assert record[0].canary_version == "shop:2" and record[0].primary_version == "shop:1"  # type: ignore[union-attr]


async def test_a_failing_template_is_rolled_back_and_the_canary_cluster_reverted(
    pdns: PdnsServer,
    work: Path,
    procs: ProcessPool,
    cluster: ControlPlane,
    canary_cluster: ControlPlane,
    service_accounts: tuple[Path, Path],
) -> None:
    """The canary cluster answers 30% errors: weight back to steady, the canary cluster's
    Deployment back on the primary's template, and the primary cluster's Deployment never
    written (its generation unchanged)."""
    ns = "shop-rollback"
    await asyncio.to_thread(seed, cluster, canary_cluster, ns)
    primary_generation = await asyncio.to_thread(generation, cluster, ns)
    port, prometheus = start_services(procs, work, canary_error_rate=0.3)
    topo = topology(pdns, port, prometheus, work, ns)
    async with running(pdns, topo, service_accounts, port) as (controller, _):
        router, rollouts = await at_steady(controller)
        await asyncio.to_thread(apply, canary_cluster, deployment(ns, "shop:bad", annotated=True))
        await wait_for(lambda: finished(rollouts), 240, "the rollout to end")
        assert rollouts.finished[0][1] == "rolled_back", rollouts.state()

        async def reverted() -> bool:
            return await asyncio.to_thread(image, canary_cluster, ns) == "shop:1"

        await wait_for(reverted, 60, "the canary cluster's revert")
        await wait_for(lambda: weight_is(router, 10), 30, "the steady 10% again")
        # the same template is not rolled out again: the canary cluster runs the primary's now
        await asyncio.sleep(1.0)
        assert len(rollouts.finished) == 1
        # the health check's error ratio (last minute, from each cluster's Prometheus) sees it
        async with aiohttp.ClientSession() as session:
            shop = topo.services[0]
            bad = await error_ratio_probe(session, topo.clusters.canary, shop, 0.2)
            good = await error_ratio_probe(session, topo.clusters.primary, shop, 0.2)
        assert bad.healthy is False and "> 20.00%" in bad.detail, bad
        assert good.healthy is True, good
    assert await asyncio.to_thread(image, cluster, ns) == "shop:1"
    assert await asyncio.to_thread(generation, cluster, ns) == primary_generation
    reasons = await asyncio.to_thread(event_reasons, canary_cluster, ns)
    assert "RolledBack" in reasons and "Reverted" in reasons, reasons
    notes = read_record(topo.record_dir / "shop-clusters.jsonl")
    assert any("reverted to the last promoted template" in n.message for n in notes)  # type: ignore[union-attr]


async def test_a_restarted_controller_resumes_the_cross_cluster_rollout(
    pdns: PdnsServer,
    work: Path,
    procs: ProcessPool,
    cluster: ControlPlane,
    canary_cluster: ControlPlane,
    service_accounts: tuple[Path, Path],
) -> None:
    """Stopped mid-rollout and started again on the same clusters and record directory, the
    controller carries on at the same step in the same record, and the rollout is promoted:
    no step taken twice, no weight jump back to the first step (issue 11, point 11)."""
    ns = "shop-resume"
    await asyncio.to_thread(seed, cluster, canary_cluster, ns)
    port, prometheus = start_services(procs, work, canary_error_rate=0.0)
    topo = topology(pdns, port, prometheus, work, ns)
    async with running(pdns, topo, service_accounts, port) as (controller, _):
        _, rollouts = await at_steady(controller)
        await asyncio.to_thread(apply, canary_cluster, deployment(ns, "shop:2", annotated=True))

        async def looking_at_50() -> bool:
            # At 50% for at least min_step_s (3 s) before any pass: polled every 0.2 s.
            runner = rollouts.runner
            return (
                runner is not None
                and runner.status.weight == 50
                and runner.status.weight_verified
                and runner.status.phase.value == "Progressing"
            )

        await wait_for(looking_at_50, 240, "the rollout looking at 50%")
        assert rollouts.runner is not None
        first_record = rollouts.runner.record_path
        step_before = rollouts.runner.status.step
    async with running(pdns, topo, service_accounts, port) as (controller, _):
        rollouts = controller.services["shop"].rollouts
        assert rollouts is not None
        await wait_for(lambda: finished(rollouts), 240, "the resumed rollout to end")
        assert rollouts.finished[0][1] == "promoted", rollouts.state()
        assert rollouts.runner is not None and rollouts.runner.record_path == first_record
    assert await asyncio.to_thread(image, cluster, ns) == "shop:2"
    entries = read_record(first_record)
    assert sum(e.kind == "start" for e in entries) == 1 and entries[-1].kind == "end"
    notes = [e.message for e in entries if e.kind == "note"]  # type: ignore[union-attr]
    assert any(n.startswith(f"resumed during Progressing at step {step_before}") for n in notes), (
        notes
    )
    steps = [e.step for e in entries if e.kind == "transition" and e.to_phase == "Progressing"]  # type: ignore[union-attr]
    assert steps == sorted(steps) and len(steps) == len(set(steps)), steps
