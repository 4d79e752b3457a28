"""external-dns router: Route 53 weights written into two emulated clusters by the real client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.kube_emulator import KubeEmulator

from canary.kubernetes.client import Kube, RetryPolicy
from canary.routers.base import RouterError, RouterRejected, RouterUnreachable, set_and_verify
from canary.routers.external_dns import (
    SET_IDENTIFIER_ANNOTATION,
    WEIGHT_ANNOTATION,
    ClusterSide,
    ExternalDNSRouter,
)

FAST = RetryPolicy(attempts=2, initial_delay_s=0.01, max_delay_s=0.02)
NS = "shop"


@dataclass
class Cluster:
    api: KubeEmulator
    kube: Kube


@pytest.fixture
async def clusters(tmp_path: Path) -> AsyncIterator[tuple[Cluster, Cluster]]:
    out = []
    async with KubeEmulator() as primary_api, KubeEmulator() as canary_api:
        for name, api in (("primary", primary_api), ("canary", canary_api)):
            config = api.write_kubeconfig(tmp_path / f"{name}.kubeconfig", context=name)
            kube = await Kube.connect(kubeconfig=str(config), context=name, retry=FAST)
            out.append(Cluster(api, kube))
        try:
            yield out[0], out[1]
        finally:
            for cluster in out:
                await cluster.kube.close()


def service(name: str = "shop") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]},
    }


def make_router(
    clusters: tuple[Cluster, Cluster], *, mode: str = "annotations"
) -> ExternalDNSRouter:
    primary, canary = clusters
    return ExternalDNSRouter(
        primary=ClusterSide(primary.kube, entry_point="192.0.2.10", set_identifier="eu-1"),
        canary=ClusterSide(canary.kube, entry_point="192.0.2.20", set_identifier="eu-2"),
        namespace=NS,
        object_name="shop",
        dns_name="shop.example.com",
        mode=mode,  # type: ignore[arg-type]
    )


async def test_annotations_carry_each_clusters_weight_and_read_back(
    clusters: tuple[Cluster, Cluster],
) -> None:
    """set-identifier and aws-weight land on each cluster's own Service and read back as the split."""
    for cluster in clusters:
        cluster.api.put("", "v1", "services", service())
    router = make_router(clusters)
    for weight in (10, 25, 100, 0):
        assert await set_and_verify(router, weight) == weight
        primary = clusters[0].api.get("", "v1", "services", NS, "shop")["metadata"]["annotations"]
        canary = clusters[1].api.get("", "v1", "services", NS, "shop")["metadata"]["annotations"]
        assert primary[SET_IDENTIFIER_ANNOTATION] == "eu-1"
        assert canary[SET_IDENTIFIER_ANNOTATION] == "eu-2"
        assert (int(primary[WEIGHT_ANNOTATION]), int(canary[WEIGHT_ANNOTATION])) == (
            100 - weight,
            weight,
        )
        assert canary["external-dns.alpha.kubernetes.io/hostname"] == "shop.example.com"


async def test_dnsendpoint_is_created_then_patched_in_both_clusters(
    clusters: tuple[Cluster, Cluster],
) -> None:
    """DNSEndpoint mode owns one endpoint per cluster: its own target, set identifier and weight."""
    router = make_router(clusters, mode="dnsendpoint")
    await set_and_verify(router, 25)
    await set_and_verify(router, 50)
    for cluster, (target, ident, weight) in zip(
        clusters, (("192.0.2.10", "eu-1", "50"), ("192.0.2.20", "eu-2", "50")), strict=True
    ):
        obj = cluster.api.get("externaldns.k8s.io", "v1alpha1", "dnsendpoints", NS, "shop")
        (endpoint,) = obj["spec"]["endpoints"]
        assert endpoint["targets"] == [target] and endpoint["setIdentifier"] == ident
        assert endpoint["recordType"] == "A"
        assert endpoint["providerSpecific"] == [{"name": "aws/weight", "value": weight}]
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "canary"
        creates = cluster.api.recorded(verb="create", resource="dnsendpoints")
        assert len(creates) == 1  # the second weight patched it


async def test_a_hand_edited_set_identifier_is_reported_not_guessed(
    clusters: tuple[Cluster, Cluster],
) -> None:
    """A set identifier other than the configured one fails the read-back with both names."""
    for cluster in clusters:
        cluster.api.put("", "v1", "services", service())
    router = make_router(clusters)
    await router.set_weight(10)
    obj = clusters[1].api.get("", "v1", "services", NS, "shop")
    obj["metadata"]["annotations"][SET_IDENTIFIER_ANNOTATION] = "someone-else"
    clusters[1].api.put("", "v1", "services", obj)
    with pytest.raises(RouterRejected, match="'someone-else', expected 'eu-2'"):
        await router.get_weight()


async def test_missing_service_and_foreign_dnsendpoint_are_refused(
    clusters: tuple[Cluster, Cluster],
) -> None:
    """No Service to annotate, or a DNSEndpoint canary does not own: clear errors, nothing written."""
    with pytest.raises(RouterRejected, match="Service shop/shop not found"):
        await make_router(clusters).set_weight(10)
    clusters[0].api.put(
        "externaldns.k8s.io",
        "v1alpha1",
        "dnsendpoints",
        {"metadata": {"name": "shop", "namespace": NS}, "spec": {"endpoints": []}},
    )
    with pytest.raises(RouterRejected, match="not managed by canary"):
        await make_router(clusters, mode="dnsendpoint").set_weight(10)
    assert clusters[0].api.recorded(verb="patch", resource="dnsendpoints") == []


async def test_an_unreachable_cluster_is_router_unreachable(
    clusters: tuple[Cluster, Cluster],
) -> None:
    """A cluster whose API answers 503 makes the weight unreachable rather than half-applied silently."""
    for cluster in clusters:
        cluster.api.put("", "v1", "services", service())
    router = make_router(clusters)
    await router.set_weight(10)
    clusters[1].api.inject(503, times=10, verb="get")
    with pytest.raises(RouterUnreachable):
        await router.get_weight()


async def test_bad_arguments_name_what_is_wrong(clusters: tuple[Cluster, Cluster]) -> None:
    """Equal set identifiers and out-of-range weights are refused with the value."""
    side = ClusterSide(clusters[0].kube, entry_point="192.0.2.1", set_identifier="x")
    with pytest.raises(ValueError, match="set identifiers must differ"):
        ExternalDNSRouter(
            primary=side, canary=side, namespace=NS, object_name="a", dns_name="a.example.com"
        )
    with pytest.raises(ValueError, match=r"within 0\.\.100, got 101"):
        await make_router(clusters).set_weight(101)
    assert issubclass(RouterRejected, RouterError)


async def test_a_reachable_cluster_is_written_even_when_the_other_is_down(
    clusters: tuple[Cluster, Cluster],
) -> None:
    """With the primary's API down, failing over still sets the canary cluster's weight, then reports the primary's error."""
    for cluster in clusters:
        cluster.api.put("", "v1", "services", service())
    router = make_router(clusters)
    await router.set_weight(10)
    clusters[0].api.inject(503, times=100)
    with pytest.raises(RouterUnreachable):
        await router.set_weight(100)
    canary = clusters[1].api.get("", "v1", "services", NS, "shop")["metadata"]["annotations"]
    assert canary[WEIGHT_ANNOTATION] == "100"


async def test_both_records_in_the_canary_cluster_need_nothing_from_the_primary(
    clusters: tuple[Cluster, Cluster],
) -> None:
    """placement canary: one DNSEndpoint in the canary cluster holds both weighted records, so a failover works with the primary cluster down."""
    primary, canary = clusters
    router = ExternalDNSRouter(
        primary=ClusterSide(primary.kube, entry_point="192.0.2.10", set_identifier="eu-1"),
        canary=ClusterSide(canary.kube, entry_point="192.0.2.20", set_identifier="eu-2"),
        namespace=NS,
        object_name="shop",
        dns_name="shop.example.com",
        mode="dnsendpoint",
        placement="canary",
    )
    assert await set_and_verify(router, 10) == 10
    primary.api.inject(503, times=100)  # the primary cluster is down
    assert await set_and_verify(router, 100) == 100
    obj = canary.api.get("externaldns.k8s.io", "v1alpha1", "dnsendpoints", NS, "shop")
    weights = {
        e["setIdentifier"]: (e["targets"], e["providerSpecific"][0]["value"])
        for e in obj["spec"]["endpoints"]
    }
    assert weights == {"eu-1": (["192.0.2.10"], "0"), "eu-2": (["192.0.2.20"], "100")}
    assert primary.api.recorded(resource="dnsendpoints") == []
    with pytest.raises(ValueError, match="placement canary needs mode dnsendpoint"):
        ExternalDNSRouter(
            primary=router.primary,
            canary=router.canary,
            namespace=NS,
            object_name="shop",
            dns_name="shop.example.com",
            placement="canary",
        )


async def test_a_dnsendpoint_conflict_is_retried_once_after_a_re_read(
    clusters: tuple[Cluster, Cluster],
) -> None:
    """A 409 on the guarded DNSEndpoint patch (someone wrote in between): read again, write
    again. A second 409 in a row is reported as the router's error, not retried again."""
    router = make_router(clusters, mode="dnsendpoint")
    await set_and_verify(router, 25)  # creates both
    canary_api = clusters[1].api
    canary_api.inject(409, verb="patch", resource="dnsendpoints")
    assert await set_and_verify(router, 50) == 50
    patches = canary_api.recorded(verb="patch", resource="dnsendpoints")
    assert [r.status for r in patches] == [409, 200]
    canary_api.inject(409, times=2, verb="patch", resource="dnsendpoints")
    with pytest.raises(RouterRejected, match="HTTP 409"):
        await router.set_weight(75)
    assert len(canary_api.recorded(verb="patch", resource="dnsendpoints")) == 4
