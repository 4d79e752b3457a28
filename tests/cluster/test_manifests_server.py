"""manifests/ and its examples against a real kube-apiserver: server-side validation, defaulting,
Pod Security admission (the controller's namespace enforces `restricted`) and the Gateway API
CRD schema, none of which the emulator knows."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.control_plane import MANIFESTS, ControlPlane, ControlPlaneError

EXAMPLES = sorted((MANIFESTS / "examples").glob("*.yaml"))


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _ensure_namespaces(cluster: ControlPlane, path: Path) -> None:
    """Create for real the Namespaces a file declares: a dry run cannot create the namespace
    its other objects go into."""
    for doc in _documents(path):
        if doc["kind"] == "Namespace":
            cluster.kubectl("apply", "-f", "-", stdin=json.dumps(doc))


def test_manifests_pass_server_side_dry_run(cluster: ControlPlane) -> None:
    """`kubectl apply --dry-run=server -k manifests/` is accepted, object by object."""
    _ensure_namespaces(cluster, MANIFESTS / "namespace.yaml")
    result = cluster.kubectl("apply", "--dry-run=server", "-k", str(MANIFESTS))
    lines = result.stdout.splitlines()
    expected = {
        "namespace/canary-system",
        "serviceaccount/canary",
        "clusterrole.rbac.authorization.k8s.io/canary",
        "clusterrolebinding.rbac.authorization.k8s.io/canary",
        "role.rbac.authorization.k8s.io/canary",
        "rolebinding.rbac.authorization.k8s.io/canary",
        "deployment.apps/canary",
        "networkpolicy.networking.k8s.io/canary",
        "service/canary-metrics",
    }
    assert {line.split()[0] for line in lines} == expected
    assert all(line.endswith("(server dry run)") for line in lines)


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_passes_server_side_dry_run(cluster: ControlPlane, example: Path) -> None:
    """Each example app (Deployment, Ingress or HTTPRoute) is valid for the real server."""
    _ensure_namespaces(cluster, example)
    result = cluster.kubectl("apply", "--dry-run=server", "-f", str(example))
    kinds = {doc["kind"].lower() for doc in _documents(example)}
    applied = {line.split()[0].split("/")[0].split(".")[0] for line in result.stdout.splitlines()}
    assert applied == kinds


def test_manifests_deployment_rolls_out_under_restricted_pod_security(
    cluster: ControlPlane,
) -> None:
    """Applied for real, the controller's Deployment gets two Ready pods: its pod template
    passes the `restricted` Pod Security level that its namespace enforces."""
    cluster.kubectl("apply", "-k", str(MANIFESTS))
    cluster.kubectl(
        "rollout", "status", "deployment/canary", "-n", "canary-system", "--timeout=180s"
    )
    deployment = cluster.get_json("deployment", "canary", "-n", "canary-system")
    assert deployment["status"]["availableReplicas"] == 2
    namespace = cluster.get_json("namespace", "canary-system")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_restricted_namespace_refuses_a_privileged_pod(cluster: ControlPlane) -> None:
    """The check above can fail: the same namespace refuses a pod that runs as root."""
    _ensure_namespaces(cluster, MANIFESTS / "namespace.yaml")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "root", "namespace": "canary-system"},
        "spec": {"containers": [{"name": "c", "image": "example.invalid/c:1"}]},
    }
    result = cluster.kubectl(
        "apply", "--dry-run=server", "-f", "-", stdin=json.dumps(pod), check=False
    )
    assert result.returncode != 0
    assert "violates PodSecurity" in result.stderr


def _httproute_with_weights(*weights: int) -> dict[str, Any]:
    route = next(
        doc
        for doc in _documents(MANIFESTS / "examples" / "app-gateway-api.yaml")
        if doc["kind"] == "HTTPRoute"
    )
    route = copy.deepcopy(route)
    refs = route["spec"]["rules"][0]["backendRefs"]
    for ref, weight in zip(refs, weights, strict=True):
        ref["weight"] = weight
    return route


def test_httproute_weights_within_the_schema_are_accepted(cluster: ControlPlane) -> None:
    """The weights the controller writes (0..100 split) pass the real CRD schema."""
    _ensure_namespaces(cluster, MANIFESTS / "examples" / "app-gateway-api.yaml")
    route = _httproute_with_weights(75, 25)
    cluster.kubectl("apply", "--dry-run=server", "-f", "-", stdin=json.dumps(route))


@pytest.mark.parametrize("weight", [-1, 1_000_001])
def test_httproute_with_an_out_of_range_weight_is_rejected(
    cluster: ControlPlane, weight: int
) -> None:
    """The Gateway API CRD schema rejects a backendRef weight below 0 or above 1,000,000."""
    _ensure_namespaces(cluster, MANIFESTS / "examples" / "app-gateway-api.yaml")
    route = _httproute_with_weights(100, weight)
    with pytest.raises(ControlPlaneError) as refused:
        cluster.kubectl("apply", "--dry-run=server", "-f", "-", stdin=json.dumps(route))
    message = str(refused.value)
    assert "spec.rules[0].backendRefs[1].weight" in message
    assert "Invalid value" in message
