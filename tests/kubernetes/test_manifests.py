"""manifests/: they parse, the RBAC grants exactly what canary.kubernetes.client calls, the controller
Deployment is hardened, and the examples' annotations are valid."""

from __future__ import annotations

import json
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.kube import deployment
from support.kube_emulator import KubeEmulator

from canary.kubernetes.client import (
    API_CALLS,
    OPERATOR_CALLS,
    OWN_NAMESPACE_RESOURCES,
    TWO_CLUSTER_CALLS,
    ApiCall,
    Kube,
    LeaderElector,
    ObjectRef,
)
from canary.kubernetes.spec import parse_annotations

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"
NAMESPACE = "canary-system"


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def docs(kind: str, *files: str) -> list[dict[str, Any]]:
    paths = [MANIFESTS / f for f in files] if files else sorted(MANIFESTS.rglob("*.yaml"))
    return [d for p in paths for d in load(p) if d.get("kind") == kind]


def grants(role: dict[str, Any]) -> set[ApiCall]:
    found: set[ApiCall] = set()
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    found.add(ApiCall(group, resource, verb))
    return found


@pytest.mark.parametrize(
    "path", sorted(MANIFESTS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(MANIFESTS))
)
def test_manifest_parses(path: Path) -> None:
    """Every manifest is YAML whose documents have apiVersion, kind and metadata.name."""
    documents = load(path)
    assert documents
    for doc in documents:
        assert doc.get("apiVersion") and doc.get("kind"), doc
        if doc["kind"] != "Kustomization":
            assert doc["metadata"]["name"]


def test_kustomization_lists_the_base() -> None:
    """`kubectl apply -k manifests/` applies every top-level manifest."""
    (kustomization,) = load(MANIFESTS / "kustomization.yaml")
    listed = set(kustomization["resources"])
    present = {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_rbac_is_exactly_the_calls_the_code_makes() -> None:
    """ClusterRole + Role grant OPERATOR_CALLS (API_CALLS but the DNSEndpoints only
    `canary clusters` writes) and nothing more; no wildcards; the Lease and ConfigMaps only
    in the controller's namespace."""
    cluster_roles = docs("ClusterRole", "rbac.yaml")
    roles = docs("Role", "rbac.yaml")
    cluster = set().union(*(grants(r) for r in cluster_roles))
    namespaced = set().union(*(grants(r) for r in roles))
    assert cluster | namespaced == set(OPERATOR_CALLS)
    assert not (cluster | namespaced) & TWO_CLUSTER_CALLS
    assert not any("*" in (c.group, c.resource, c.verb) for c in cluster | namespaced)
    assert {c.resource for c in namespaced} == set(OWN_NAMESPACE_RESOURCES)
    assert not {c.resource for c in cluster} & OWN_NAMESPACE_RESOURCES
    assert all(r["metadata"]["namespace"] == NAMESPACE for r in roles)
    (account,) = docs("ServiceAccount", "serviceaccount.yaml")
    for binding in docs("ClusterRoleBinding") + docs("RoleBinding"):
        kind = binding["roleRef"]["kind"]
        assert binding["roleRef"]["name"] in {
            r["metadata"]["name"] for r in docs(kind, "rbac.yaml")
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}
        ]


async def test_api_calls_table_matches_the_requests_made(api: KubeEmulator, kube: Kube) -> None:
    """Calling every adapter method makes exactly the API_CALLS requests, as the API server
    sees them: the table (and so the RBAC) is derived from what the code does."""
    api.put("apps", "v1", "deployments", deployment("app", "shop"))
    dep = await kube.get_deployment("shop", "app")
    await kube.list_deployments()
    await kube.list_deployments("shop")
    async with aclosing(kube.watch_deployments("shop", timeout_s=5)) as stream:
        await anext(stream)  # the list
        await kube.patch_deployment("shop", "app", {"metadata": {"labels": {"x": "y"}}})
        await anext(stream)  # the watch
    await kube.create_deployment("shop", deployment("app-primary", "shop"))
    hpa = {
        "metadata": {"name": "app"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "app"},
            "maxReplicas": 3,
        },
    }
    created_hpa = await kube.create_hpa("shop", hpa)
    await kube.get_hpa("shop", "app")
    await kube.list_hpas()
    async with aclosing(kube.watch_hpas("shop", timeout_s=5)) as hpas:
        await anext(hpas)  # the list
        await kube.patch_hpa("shop", "app", {"spec": {"maxReplicas": 4}})
        await anext(hpas)  # the watch
    await kube.delete_hpa("shop", "app", uid=created_hpa["metadata"].get("uid"))
    await kube.scale_deployment("shop", "app", 0)
    await kube.create_service(
        "shop",
        {
            "metadata": {
                "name": "app-canary",
                "labels": {"app.kubernetes.io/managed-by": "canary"},  # the watch selects it
            },
            "spec": {"ports": [{"port": 80}]},
        },
    )
    await kube.get_service("shop", "app-canary")
    async with aclosing(
        kube.watch_services(
            "shop", timeout_s=5, label_selector="app.kubernetes.io/managed-by=canary"
        )
    ) as services:
        await anext(services)  # the list
        await kube.patch_service("shop", "app-canary", {"spec": {"selector": {"app": "app"}}})
        await anext(services)  # the watch
    ingress = {"metadata": {"name": "app"}, "spec": {"rules": []}}
    await kube.create_ingress("shop", ingress)
    await kube.get_ingress("shop", "app")
    await kube.patch_ingress("shop", "app", {"metadata": {"labels": {"a": "b"}}})
    await kube.list_ingresses()
    async with aclosing(kube.watch_ingresses("shop", timeout_s=5)) as ingresses:
        await anext(ingresses)  # the list
        await kube.patch_ingress("shop", "app", {"metadata": {"labels": {"a": "c"}}})
        await anext(ingresses)  # the watch
    api.put(
        "gateway.networking.k8s.io",
        "v1",
        "httproutes",
        {"metadata": {"name": "app", "namespace": "shop"}, "spec": {"rules": []}},
    )
    await kube.get_httproute("shop", "app")
    await kube.patch_httproute("shop", "app", {"metadata": {"labels": {"a": "b"}}})
    await kube.list_httproutes()
    async with aclosing(kube.watch_httproutes("shop", timeout_s=5)) as routes:
        await anext(routes)  # the list
        await kube.patch_httproute("shop", "app", {"metadata": {"labels": {"a": "c"}}})
        await anext(routes)  # the watch
    endpoint = {"metadata": {"name": "app"}, "spec": {"endpoints": []}}
    await kube.create_dnsendpoint("shop", endpoint)
    await kube.get_dnsendpoint("shop", "app")
    await kube.patch_dnsendpoint("shop", "app", {"metadata": {"labels": {"a": "b"}}})
    created = await kube.put_configmap(NAMESPACE, "state", {"a": "1"})
    await kube.put_configmap(
        NAMESPACE, "state", {"a": "2"}, resource_version=created["metadata"]["resourceVersion"]
    )
    await kube.get_configmap(NAMESPACE, "state")
    await kube.patch_configmap(NAMESPACE, "state", {"b": "1"})
    await kube.emit_event(ObjectRef.deployment(dep), type="Normal", reason="Test", message="m")
    elector = LeaderElector(
        kube,
        namespace=NAMESPACE,
        name="lease",
        identity="me",
        lease_duration_s=2,
        renew_deadline_s=1,
        retry_period_s=0.5,
    )
    assert await elector.try_acquire_or_renew()  # create
    assert await elector.try_acquire_or_renew()  # get + update
    api.add_user("caller-token", "alice")
    review = await kube.review_token("caller-token")
    attributes = {"verb": "patch", "group": "apps", "resource": "deployments"}
    await kube.review_access(review["status"]["user"], attributes)

    seen = {ApiCall(r.group, r.resource, r.verb) for r in api.requests}
    assert seen == set(API_CALLS)


def test_controller_deployment_is_hardened() -> None:
    """Two replicas with leader election, probes, requests, non-root, read-only root."""
    (dep,) = docs("Deployment", "deployment.yaml")
    assert dep["metadata"]["namespace"] == NAMESPACE
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "canary"
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert "--leader-elect" in container["args"]
    # The args are the real CLI's: `canary kubernetes` parses them as written.
    from canary.cli.main import build_parser

    env = {"POD_NAMESPACE": NAMESPACE}
    args = build_parser().parse_args(
        [a.replace("$(POD_NAMESPACE)", env["POD_NAMESPACE"]) for a in container["args"]]
    )
    assert args.command == "kubernetes" and args.leader_elect
    assert args.lease_namespace == args.record_namespace == NAMESPACE
    assert args.prometheus_url.startswith("http")
    assert args.log_format == "json"  # one JSON object per log line, for log pipelines
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    names = {e["name"] for e in container["env"]}
    assert {"POD_NAME", "POD_NAMESPACE"} <= names
    # The metrics Service and the ServiceMonitor select these pods by the same port name.
    (service,) = docs("Service", "service.yaml")
    assert service["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]
    (monitor,) = docs("ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


@pytest.mark.parametrize("name", ["app-ingress-nginx.yaml", "app-gateway-api.yaml"])
def test_example_apps_are_valid_and_consistent(name: str) -> None:
    """The example's annotations parse, and they name an Ingress / HTTPRoute in the same file
    that routes to the app-primary Service."""
    documents = load(MANIFESTS / "examples" / name)
    (app,) = [d for d in documents if d["kind"] == "Deployment"]
    spec = parse_annotations(app["metadata"]["annotations"])
    assert spec.enabled and spec.router is not None
    kind = {"ingress-nginx": "Ingress", "gateway-api": "HTTPRoute"}[spec.router.kind]
    (target,) = [d for d in documents if d["kind"] == kind]
    assert target["metadata"]["name"] == spec.router.target
    assert target["metadata"]["namespace"] == app["metadata"]["namespace"]
    text = yaml.safe_dump(target)
    assert "app-primary" in text


def test_network_policy_opens_the_port_and_the_few_ways_out() -> None:
    """The NetworkPolicy selects the controller pods; lets the cluster reach port http (probes
    and /metrics open, the rest behind bearer tokens); lets the controller reach DNS, the API
    server, Prometheus and webhooks, never link-local addresses for webhooks. Only the leader
    is Ready, so the controller is replaced all at once (Recreate) and has no PDB."""
    (policy,) = docs("NetworkPolicy", "networkpolicy.yaml")
    (dep,) = docs("Deployment", "deployment.yaml")
    assert policy["metadata"]["namespace"] == NAMESPACE
    assert policy["spec"]["podSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    port = container["ports"][0]["containerPort"]
    assert [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]] == [port]
    egress = {
        (p["protocol"], p["port"]) for rule in policy["spec"]["egress"] for p in rule["ports"]
    }
    assert {("UDP", 53), ("TCP", 53), ("TCP", 443), ("TCP", 6443), ("TCP", 9090)} <= egress
    blocks = [
        peer["ipBlock"]
        for rule in policy["spec"]["egress"]
        for peer in rule.get("to", [])
        if "ipBlock" in peer
    ]
    assert blocks and all("169.254.0.0/16" in block["except"] for block in blocks)
    assert dep["spec"]["strategy"]["type"] == "Recreate"
    assert not docs("PodDisruptionBudget")


def test_loadtest_manifest_runs_the_real_cli_without_permissions() -> None:
    """optional/loadtest.yaml: `canary loadtest` with args the real CLI parses, listening on
    the port its Service targets, hardened, with no token mounted and no RBAC at all; the
    controller's NetworkPolicy lets rollout hooks reach that port."""
    from canary.cli.main import build_parser

    path = "optional/loadtest.yaml"
    (account,) = docs("ServiceAccount", path)
    (dep,) = docs("Deployment", path)
    (service,) = docs("Service", path)
    assert account["automountServiceAccountToken"] is False
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"] == "canary-loadtest"
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    args = build_parser().parse_args(container["args"])
    assert args.func.__module__ == "canary.cli.loadtest"
    assert args.listen == f"0.0.0.0:{container['ports'][0]['containerPort']}"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert service["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]
    for kind in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"):
        for doc in docs(kind):
            assert "loadtest" not in json.dumps(doc), doc["metadata"]["name"]
    (policy,) = docs("NetworkPolicy", "networkpolicy.yaml")
    assert any(
        peer.get("podSelector", {}).get("matchLabels") == dep["spec"]["selector"]["matchLabels"]
        and [p["port"] for p in rule["ports"]] == [container["ports"][0]["containerPort"]]
        for rule in policy["spec"]["egress"]
        for peer in rule.get("to", [])
    )
