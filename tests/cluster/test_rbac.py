"""The controller's ServiceAccount (manifests/) has exactly the permissions of
manifests/rbac.yaml on the real server: each granted (group, resource, verb) is allowed where it
should be, and nothing else is, asked with the ServiceAccount's own TokenRequest token."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.control_plane import MANIFESTS, ControlPlane

NAMESPACE = "canary-system"
# Any other namespace: the ClusterRole applies there, the Role does not.
APP_NAMESPACE = "shop"
STANDARD_VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
# What every authenticated user may do (system:basic-user and friends), not ours to grant.
EVERYONE = {
    ("authorization.k8s.io", "selfsubjectaccessreviews", "create"),
    ("authorization.k8s.io", "selfsubjectrulesreviews", "create"),
    ("authentication.k8s.io", "selfsubjectreviews", "create"),
}

Triple = tuple[str, str, str]


def _rules(kind: str) -> set[Triple]:
    docs = [d for d in yaml.safe_load_all((MANIFESTS / "rbac.yaml").read_text()) if d]
    role = next(d for d in docs if d["kind"] == kind)
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


CLUSTER_WIDE = _rules("ClusterRole")
IN_OWN_NAMESPACE = _rules("Role")


def _resource(group: str, resource: str) -> str:
    return f"{resource}.{group}" if group else resource


def _can_i(
    cluster: ControlPlane, kubeconfig: Path, verb: str, group: str, resource: str, namespace: str
) -> bool:
    """A SelfSubjectAccessReview with the given credentials: the server's own answer, with no
    client-side resource discovery (the externaldns.k8s.io CRD is not installed here)."""
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {
            "resourceAttributes": {
                "group": group,
                "resource": resource,
                "verb": verb,
                "namespace": namespace,
            }
        },
    }
    result = cluster.kubectl(
        "create",
        "--validate=false",
        "-f",
        "-",
        "-o",
        "json",
        stdin=json.dumps(review),
        kubeconfig=kubeconfig,
    )
    status: dict[str, Any] = json.loads(result.stdout)["status"]
    return bool(status.get("allowed"))


@pytest.mark.parametrize("triple", sorted(CLUSTER_WIDE), ids="/".join)
def test_cluster_role_rule_is_allowed_in_any_namespace(
    cluster: ControlPlane, controller_kubeconfig: Path, triple: Triple
) -> None:
    """Each ClusterRole rule works for the ServiceAccount in an app's namespace."""
    group, resource, verb = triple
    cluster.kubectl("create", "namespace", APP_NAMESPACE, check=False)
    assert _can_i(cluster, controller_kubeconfig, verb, group, resource, APP_NAMESPACE)


@pytest.mark.parametrize("triple", sorted(IN_OWN_NAMESPACE), ids="/".join)
def test_role_rule_is_allowed_only_in_the_controllers_namespace(
    cluster: ControlPlane, controller_kubeconfig: Path, triple: Triple
) -> None:
    """Each Role rule (Lease, state ConfigMaps) works in canary-system and nowhere else."""
    group, resource, verb = triple
    cluster.kubectl("create", "namespace", APP_NAMESPACE, check=False)
    assert _can_i(cluster, controller_kubeconfig, verb, group, resource, NAMESPACE)
    assert not _can_i(cluster, controller_kubeconfig, verb, group, resource, APP_NAMESPACE)


def test_verbs_not_granted_are_refused(cluster: ControlPlane, controller_kubeconfig: Path) -> None:
    """For every resource the controller touches, the standard verbs it was not given are
    refused (e.g. no delete on Deployments, no list on Services)."""
    granted = CLUSTER_WIDE | IN_OWN_NAMESPACE
    allowed_anyway = []
    for group, resource in sorted({(g, r) for g, r, _ in granted}):
        for verb in STANDARD_VERBS:
            if (group, resource, verb) in granted:
                continue
            if _can_i(cluster, controller_kubeconfig, verb, group, resource, NAMESPACE):
                allowed_anyway.append(f"{verb} {_resource(group, resource)}")
    assert allowed_anyway == []


def _rules_review(cluster: ControlPlane, kubeconfig: Path, namespace: str) -> set[Triple]:
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectRulesReview",
        "spec": {"namespace": namespace},
    }
    result = cluster.kubectl(
        "create",
        "--validate=false",
        "-f",
        "-",
        "-o",
        "json",
        stdin=json.dumps(review),
        kubeconfig=kubeconfig,
    )
    status: dict[str, Any] = json.loads(result.stdout)["status"]
    assert not status.get("incomplete"), status
    return {
        (group, resource, verb)
        for rule in status["resourceRules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_the_server_grants_exactly_rbac_yaml(
    cluster: ControlPlane, controller_kubeconfig: Path
) -> None:
    """The server's own account of the ServiceAccount's rules (SelfSubjectRulesReview) is
    manifests/rbac.yaml, no more, no less: in its namespace ClusterRole + Role, elsewhere
    the ClusterRole alone."""
    cluster.kubectl("create", "namespace", APP_NAMESPACE, check=False)
    own = _rules_review(cluster, controller_kubeconfig, NAMESPACE) - EVERYONE
    elsewhere = _rules_review(cluster, controller_kubeconfig, APP_NAMESPACE) - EVERYONE
    assert own == CLUSTER_WIDE | IN_OWN_NAMESPACE
    assert elsewhere == CLUSTER_WIDE


def test_the_kubeconfig_authenticates_as_the_service_account(
    cluster: ControlPlane, controller_kubeconfig: Path
) -> None:
    """The helper's kubeconfig carries a TokenRequest token that the apiserver maps to the
    controller's ServiceAccount (not to an admin, which would make every check above moot)."""
    result = cluster.kubectl("auth", "whoami", "-o", "json", kubeconfig=controller_kubeconfig)
    user = json.loads(result.stdout)["status"]["userInfo"]
    assert user["username"] == f"system:serviceaccount:{NAMESPACE}:canary"
    assert "system:masters" not in user["groups"]
    assert "system:serviceaccounts" in user["groups"]
