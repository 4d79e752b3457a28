"""The test control plane itself behaves like a real cluster: RBAC is enforced, Deployments roll
out (the controller-manager makes ReplicaSets, the scheduler binds pods to kwok's nodes, kwok makes
them Running and Ready), and the Gateway API CRDs are served."""

from __future__ import annotations

import json
from pathlib import Path

from support.control_plane import FAKE_NODES, ControlPlane, write_kubeconfig


def _deployment(name: str, namespace: str, replicas: int) -> str:
    return json.dumps(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {"containers": [{"name": "app", "image": "example.invalid/app:1"}]},
                },
            },
        }
    )


def test_fake_nodes_are_ready(cluster: ControlPlane) -> None:
    """kwok keeps every fake node Ready (lease heartbeats), so the scheduler can use them."""
    nodes = cluster.get_json("nodes")["items"]
    ready = {
        node["metadata"]["name"]
        for node in nodes
        for condition in node["status"].get("conditions", [])
        if condition["type"] == "Ready" and condition["status"] == "True"
    }
    assert ready == set(FAKE_NODES)


def test_fake_nodes_have_leases(cluster: ControlPlane) -> None:
    """kwok renews a Lease per node, as a kubelet does; without them the controller-manager
    marks the nodes NotReady after its grace period and taints them (pods stop scheduling)."""
    cluster.kubectl(
        "wait", "--for=create", "lease", *FAKE_NODES, "-n", "kube-node-lease", "--timeout=120s"
    )
    leases = cluster.get_json("leases", "-n", "kube-node-lease")["items"]
    renewed = {lease["metadata"]["name"] for lease in leases if lease["spec"].get("renewTime")}
    assert renewed >= set(FAKE_NODES)


def test_deployment_rolls_out_on_kwok_nodes(cluster: ControlPlane) -> None:
    """A Deployment gets a ReplicaSet and three Running, Ready pods; status.availableReplicas=3."""
    cluster.kubectl("create", "namespace", "rollout")
    cluster.kubectl("apply", "-f", "-", stdin=_deployment("web", "rollout", 3))
    cluster.kubectl("rollout", "status", "deployment/web", "-n", "rollout", "--timeout=180s")

    deployment = cluster.get_json("deployment", "web", "-n", "rollout")
    assert deployment["status"]["availableReplicas"] == 3
    assert deployment["status"]["updatedReplicas"] == 3
    replicasets = cluster.get_json("replicasets", "-n", "rollout", "-l", "app=web")["items"]
    assert len(replicasets) == 1
    pods = cluster.get_json("pods", "-n", "rollout", "-l", "app=web")["items"]
    assert len(pods) == 3
    for pod in pods:
        assert pod["spec"]["nodeName"] in FAKE_NODES
        assert pod["status"]["phase"] == "Running"
        conditions = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
        assert conditions.get("Ready") == "True"


def test_new_pod_template_replaces_the_replicaset(cluster: ControlPlane) -> None:
    """Changing the pod template makes a second ReplicaSet and moves all replicas to it."""
    cluster.kubectl("create", "namespace", "rollout-update")
    cluster.kubectl("apply", "-f", "-", stdin=_deployment("web", "rollout-update", 2))
    cluster.kubectl("rollout", "status", "deployment/web", "-n", "rollout-update", "--timeout=180s")
    cluster.kubectl(
        "set", "image", "deployment/web", "app=example.invalid/app:2", "-n", "rollout-update"
    )
    cluster.kubectl("rollout", "status", "deployment/web", "-n", "rollout-update", "--timeout=180s")

    replicasets = cluster.get_json("replicasets", "-n", "rollout-update", "-l", "app=web")["items"]
    by_image = {
        rs["spec"]["template"]["spec"]["containers"][0]["image"]: rs["status"].get(
            "readyReplicas", 0
        )
        for rs in replicasets
    }
    assert by_image == {"example.invalid/app:1": 0, "example.invalid/app:2": 2}


def test_rbac_is_enforced_for_a_service_account_without_bindings(
    cluster: ControlPlane, tmp_path: Path
) -> None:
    """A ServiceAccount with no bindings is refused (RBAC is on, not AlwaysAllow)."""
    cluster.kubectl("create", "namespace", "nobody")
    cluster.kubectl("create", "serviceaccount", "nobody", "-n", "nobody")
    token = cluster.kubectl("create", "token", "nobody", "-n", "nobody").stdout.strip()
    config = write_kubeconfig(
        tmp_path / "nobody.kubeconfig",
        server=cluster.server,
        ca_file=cluster.ca_file,
        user="nobody",
        token=token,
    )
    whoami = json.loads(cluster.kubectl("auth", "whoami", "-o", "json", kubeconfig=config).stdout)
    assert whoami["status"]["userInfo"]["username"] == "system:serviceaccount:nobody:nobody"
    denied = cluster.kubectl("get", "pods", "-n", "nobody", kubeconfig=config, check=False)
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr.lower()


def test_gateway_api_crds_are_established(cluster: ControlPlane) -> None:
    """The standard-channel Gateway API CRDs are installed and served (HTTPRoute v1)."""
    resources = cluster.kubectl(
        "api-resources", "--api-group=gateway.networking.k8s.io", "-o", "name"
    ).stdout.split()
    assert "httproutes.gateway.networking.k8s.io" in resources
    assert "gateways.gateway.networking.k8s.io" in resources
