"""Cross-cluster rollouts end to end: two emulated clusters, real PowerDNS, real Prometheus.

Each "cluster" is an API emulator (driven by the real kubernetes-asyncio client) plus a real
service process on its own loopback entry point (127.0.0.10 / 127.0.0.20, same port), scraped
by a real Prometheus. A load generator resolves the service's name through the real
pdns_server every TTL and sends its requests to the answer, so the traffic that moves is real.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.kube_emulator import KubeEmulator
from support.pdns import API_KEY, PdnsServer, pdns
from support.pool import ProcessPool

from canary.clusters.multicluster import (
    ENABLED_ANNOTATION,
    MultiClusterController,
    build_controller,
    build_router,
    error_ratio_probe,
    merge_replace,
    template_revision,
)
from canary.clusters.topology import Topology, parse_topology
from canary.core.records import read_record
from canary.demo.dnsload import DnsLoadGenerator
from canary.demo.procs import (
    HAProxyConfig,
    HAProxyProcess,
    PrometheusProcess,
    free_port,
)
from canary.demo.stack import service_process
from canary.kubernetes.client import Kube, RetryPolicy
from canary.routers.base import set_and_verify

__all__ = ["pdns"]

PRIMARY_IP, CANARY_IP = "127.0.0.10", "127.0.0.20"
NS = "shop"
FAST = RetryPolicy(attempts=2, initial_delay_s=0.01, max_delay_s=0.05)


def deployment(image: str, *, annotated: bool) -> dict[str, Any]:
    annotations = {ENABLED_ANNOTATION: "true"} if annotated else {}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "shop", "namespace": NS, "annotations": annotations},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "shop"}},
            "template": {
                "metadata": {"labels": {"app": "shop"}},
                "spec": {"containers": [{"name": "shop", "image": image}]},
            },
        },
    }


@dataclass
class Clusters:
    port: int
    prometheus: PrometheusProcess


def start_clusters(procs: ProcessPool, tmp_path: Path, *, canary_error_rate: float) -> Clusters:
    """The two entry points (one service version each) and a Prometheus scraping both."""
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
    return Clusters(port, prometheus)


def topology(pdns: PdnsServer, clusters: Clusters, tmp_path: Path, *, name: str) -> Topology:
    def cluster(cluster_name: str, ip: str) -> dict[str, Any]:
        return {
            "name": cluster_name,
            "entry_point": ip,
            "prometheus": {
                "url": clusters.prometheus.url,
                "selector": f'instance="{ip}:{clusters.port}"',
            },
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
                    "dns_name": f"{name}.{pdns.zone}",
                    "namespace": NS,
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
                    "max_step_s": 60,
                    "no_data_deadline_s": 30,
                    "tick_s": 0.5,
                    # errors only: showing latency equal takes thousands of requests (minutes)
                    "analysis": {
                        "errors": {"tolerance": 1.0, "abs_tolerance": 0.02},
                        "quantiles": [],
                    },
                    "metrics": {"latency_buckets": None},
                    "health": {"port": clusters.port, "interval_s": 0.2, "timeout_s": 0.5},
                    "failover": {"failures_to_failover": 3, "healthy_s_to_failback": 1},
                }
            ],
        }
    )


@dataclass
class Env:
    primary_api: KubeEmulator
    canary_api: KubeEmulator
    controller: MultiClusterController
    loadgen: DnsLoadGenerator
    topology: Topology


@contextlib.asynccontextmanager
async def emulated_clusters() -> AsyncIterator[tuple[KubeEmulator, KubeEmulator]]:
    async with KubeEmulator() as primary_api, KubeEmulator() as canary_api:
        primary_api.put("apps", "v1", "deployments", deployment("shop:1", annotated=False))
        canary_api.put("apps", "v1", "deployments", deployment("shop:1", annotated=True))
        yield primary_api, canary_api


@contextlib.asynccontextmanager
async def running(
    pdns: PdnsServer,
    clusters: Clusters,
    tmp_path: Path,
    *,
    name: str,
    apis: tuple[KubeEmulator, KubeEmulator] | None = None,
) -> AsyncIterator[Env]:
    """The controller over two emulated clusters (new ones, or `apis` kept from a run before)."""
    topo = topology(pdns, clusters, tmp_path, name=name)
    async with contextlib.AsyncExitStack() as stack:
        if apis is None:
            apis = await stack.enter_async_context(emulated_clusters())
        primary_api, canary_api = apis
        kubes = []
        for label, api in (("primary", primary_api), ("canary", canary_api)):
            path = api.write_kubeconfig(tmp_path / f"{label}.kubeconfig", context=label)
            kubes.append(await Kube.connect(kubeconfig=str(path), context=label, retry=FAST))
        session = aiohttp.ClientSession()
        loadgen = DnsLoadGenerator(
            "127.0.0.1", pdns.dns_port, topo.services[0].dns_name, clusters.port, rate=200
        )
        controller = build_controller(
            topo, session, primary=kubes[0], canary=kubes[1], probe_interval_s=0.2, poll_s=0.3
        )
        tasks = [asyncio.create_task(controller.run()), asyncio.create_task(loadgen.run())]
        try:
            yield Env(primary_api, canary_api, controller, loadgen, topo)
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
            # polling: the state changes inside the controller's tasks
            while not await predicate():  # noqa: ASYNC110
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what}") from None


def image(api: KubeEmulator) -> str:
    dep = api.get("apps", "v1", "deployments", NS, "shop")
    return str(dep["spec"]["template"]["spec"]["containers"][0]["image"])


def event_reasons(api: KubeEmulator) -> list[str]:
    return [obj["reason"] for key, obj in api.objects.items() if key[2] == "events"]


@pytest.fixture
def work(tmp_path: Path, procs: ProcessPool, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("PDNS_API_KEY", API_KEY)
    yield tmp_path


async def test_a_new_template_in_the_canary_cluster_is_promoted_to_the_primary_cluster(
    pdns: PdnsServer, work: Path, procs: ProcessPool
) -> None:
    """A good new template: DNS weight moves to the canary cluster, passes, lands in the primary cluster, weights return to steady."""
    clusters = start_clusters(procs, work, canary_error_rate=0.0)
    async with running(pdns, clusters, work, name="promote") as env:
        service = env.controller.services["shop"]
        router = service.failover.router
        rollouts = service.rollouts
        assert rollouts is not None
        await wait_for(lambda: _weight_is(router, 10), 10, "the steady 10%")
        started = env.loadgen.clock()
        new = deployment("shop:2", annotated=True)
        env.canary_api.put("apps", "v1", "deployments", new)
        await wait_for(lambda: _finished(rollouts), 90, "the rollout to end")
        assert rollouts.finished[0][1] == "promoted", rollouts.state()
        assert image(env.primary_api) == "shop:2"  # the template went to the primary cluster
        await wait_for(lambda: _weight_is(router, 10), 10, "the steady 10% again")
        # the traffic really moved: clients that resolved during the 50% step went to the canary
        share = env.loadgen.share(CANARY_IP, started)
        assert share is not None and share > 0.2, share
        reasons = event_reasons(env.canary_api)
        assert "RolloutStarted" in reasons and "Promoted" in reasons
        assert rollouts.runner is not None
        record = read_record(rollouts.runner.record_path)
        assert record[0].kind == "start" and record[-1].kind == "end"
        assert record[-1].outcome == "promoted"
        assert record[0].canary_version == "shop:2" and record[0].primary_version == "shop:1"


async def test_a_failing_template_is_rolled_back_and_the_canary_cluster_reverted(
    pdns: PdnsServer, work: Path, procs: ProcessPool
) -> None:
    """A canary cluster answering 30% errors: weight to 0, its Deployment back on the primary's template, the primary untouched."""
    clusters = start_clusters(procs, work, canary_error_rate=0.3)
    async with running(pdns, clusters, work, name="rollback") as env:
        service = env.controller.services["shop"]
        router = service.failover.router
        rollouts = service.rollouts
        assert rollouts is not None
        await wait_for(lambda: _weight_is(router, 10), 10, "the steady 10%")
        env.canary_api.put("apps", "v1", "deployments", deployment("shop:bad", annotated=True))
        await wait_for(lambda: _finished(rollouts), 60, "the rollout to end")
        assert rollouts.finished[0][1] == "rolled_back", rollouts.state()
        await wait_for(lambda: _image_is(env.canary_api, "shop:1"), 10, "the revert")
        assert image(env.primary_api) == "shop:1"
        assert env.primary_api.recorded(verb="patch", resource="deployments") == []
        await wait_for(lambda: _weight_is(router, 10), 10, "the steady 10% again")
        reasons = event_reasons(env.canary_api)
        assert "RolledBack" in reasons and "Reverted" in reasons
        # the same template is not rolled out again: the canary runs the primary's now
        await asyncio.sleep(1.0)
        assert len(rollouts.finished) == 1
        # the health check's error ratio (last minute, from each cluster's Prometheus) sees it too
        async with aiohttp.ClientSession() as session:
            clusters_, shop = env.topology.clusters, env.topology.services[0]
            bad = await error_ratio_probe(session, clusters_.canary, shop, 0.2)
            good = await error_ratio_probe(session, clusters_.primary, shop, 0.2)
        assert bad.healthy is False and "> 20.00%" in bad.detail, bad
        assert good.healthy is True, good
        notes = read_record(env.topology.record_dir / "shop-clusters.jsonl")
        assert any("reverted to the last promoted template" in n.message for n in notes)  # type: ignore[union-attr]


async def _weight_is(router: Any, weight: int) -> bool:
    try:
        return bool(await router.get_weight() == weight)
    except Exception:
        return False


async def _finished(rollouts: Any) -> bool:
    return bool(rollouts.finished)


async def _image_is(api: KubeEmulator, wanted: str) -> bool:
    return image(api) == wanted


async def test_a_restarted_controller_resumes_the_cross_cluster_rollout(
    pdns: PdnsServer, work: Path, procs: ProcessPool
) -> None:
    """Stopped mid-rollout and started again on the same clusters and record directory, the
    controller carries on at the same step in the same record, and the rollout is promoted:
    no step taken twice, no weight jump back to the first step (issue 11, point 11)."""
    clusters = start_clusters(procs, work, canary_error_rate=0.0)
    async with emulated_clusters() as apis:
        async with running(pdns, clusters, work, name="resume", apis=apis) as env:
            rollouts = env.controller.services["shop"].rollouts
            assert rollouts is not None
            router = env.controller.services["shop"].failover.router
            await wait_for(lambda: _weight_is(router, 10), 10, "the steady 10%")
            apis[1].put("apps", "v1", "deployments", deployment("shop:2", annotated=True))

            async def looking_at_50() -> bool:
                # At 50% for at least min_step_s (3 s) before any pass: polled every 0.1 s.
                runner = rollouts.runner
                return (
                    runner is not None
                    and runner.status.weight == 50
                    and runner.status.weight_verified
                    and runner.status.phase.value == "Progressing"
                )

            await wait_for(looking_at_50, 120, "the rollout looking at 50%")
            assert rollouts.runner is not None
            first_record = rollouts.runner.record_path
            step_before = rollouts.runner.status.step
        async with running(pdns, clusters, work, name="resume", apis=apis) as env:
            rollouts = env.controller.services["shop"].rollouts
            assert rollouts is not None
            await wait_for(lambda: _finished(rollouts), 120, "the resumed rollout to end")
            assert rollouts.finished[0][1] == "promoted", rollouts.state()
            assert rollouts.runner is not None and rollouts.runner.record_path == first_record
            assert image(apis[0]) == "shop:2"
    entries = read_record(first_record)
    assert sum(e.kind == "start" for e in entries) == 1 and entries[-1].kind == "end"
    notes = [e.message for e in entries if e.kind == "note"]  # type: ignore[union-attr]
    assert any(n.startswith(f"resumed during Progressing at step {step_before}") for n in notes), notes
    steps = [e.step for e in entries if e.kind == "transition" and e.to_phase == "Progressing"]  # type: ignore[union-attr]
    assert steps == sorted(steps) and len(steps) == len(set(steps)), steps


def test_merge_replace_turns_old_into_new() -> None:
    """The merge patch nulls keys that are gone and replaces changed ones, so applying it gives `new`."""
    old = {"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"containers": [{"image": "x:1"}]}}
    new = {"metadata": {"labels": {"a": "1"}}, "spec": {"containers": [{"image": "x:2"}]}}
    patch = merge_replace(old, new)
    assert patch == {
        "metadata": {"labels": {"b": None}},
        "spec": {"containers": [{"image": "x:2"}]},
    }
    from support.kube_emulator import merge_patch

    assert merge_patch(old, patch) == new
    assert template_revision(new) == template_revision({**new}) != template_revision(old)


async def test_a_global_haproxy_in_front_of_both_entry_points_is_a_router_too(
    tmp_path: Path, sockdir: Path, procs: ProcessPool, haproxy_binary: str
) -> None:
    """router kind haproxy drives a real HAProxy whose two servers are the clusters' entry points."""
    port = free_port()
    config = HAProxyConfig(
        frontend_port=free_port(),
        primary_addr=f"{PRIMARY_IP}:{port}",
        canary_addr=f"{CANARY_IP}:{port}",
        socket_path=sockdir / "lb.sock",
        state_file=tmp_path / "lb.state",
        backend="shop",
    )
    procs.start(HAProxyProcess(config, workdir=tmp_path, binary=haproxy_binary))
    data = {
        "clusters": {
            side: {
                "name": side,
                "entry_point": ip,
                "prometheus": {"url": "http://127.0.0.1:9090", "selector": f'cluster="{side}"'},
            }
            for side, ip in (("primary", PRIMARY_IP), ("canary", CANARY_IP))
        },
        "services": [
            {
                "name": "shop",
                "dns_name": "shop.example.test",
                "deployment": "shop",
                "router": {"kind": "haproxy", "socket": "lb.sock", "backend": "shop"},
            }
        ],
    }
    topo = parse_topology(data, base=sockdir)  # the socket path is relative to the file
    router = build_router(topo, topo.services[0], primary=None, canary=None)
    assert await set_and_verify(router, 10) == 10
    assert await set_and_verify(router, 100) == 100
