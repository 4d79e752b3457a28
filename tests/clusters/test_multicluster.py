"""Cross-cluster rollouts: the parts that need no cluster.

The end-to-end rollouts (promote, roll back and revert, resume after a restart) run on two
real control planes in tests/cluster/test_multicluster_on_clusters.py; failover and the CLI
are in test_multicluster_failover.py.
"""

from __future__ import annotations

from pathlib import Path

from support.pool import ProcessPool

from canary.clusters.multicluster import build_router, merge_replace, template_revision
from canary.clusters.topology import parse_topology
from canary.demo.procs import HAProxyConfig, HAProxyProcess, free_port
from canary.routers.base import set_and_verify

PRIMARY_IP, CANARY_IP = "127.0.0.10", "127.0.0.20"


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
