"""charts/canary: lint-clean, equal to manifests/ by default, its values doing what they say,
valid for the real apiserver and installable on the test cluster with pods made Ready by kwok."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.control_plane import MANIFESTS, REPO, ControlPlane, Toolbox, run_tool

CHART = REPO / "charts" / "canary"

Key = tuple[str, str, str, str]


def _objects(text: str) -> dict[Key, dict[str, Any]]:
    objects: dict[Key, dict[str, Any]] = {}
    for doc in yaml.safe_load_all(text):
        if not doc:
            continue
        meta = doc["metadata"]
        key = (doc["apiVersion"], doc["kind"], meta.get("namespace", ""), meta["name"])
        assert key not in objects, f"{key} rendered twice"
        objects[key] = doc
    return objects


def _render(toolbox: Toolbox, home: Path, *args: str, release: str = "canary") -> dict[Key, Any]:
    result = run_tool(
        toolbox,
        "helm",
        "template",
        release,
        str(CHART),
        "--namespace",
        "canary-system",
        *args,
        home=home,
    )
    return _objects(result.stdout)


def _kustomize(toolbox: Toolbox, home: Path) -> dict[Key, Any]:
    return _objects(run_tool(toolbox, "kubectl", "kustomize", str(MANIFESTS), home=home).stdout)


def _args(objects: dict[Key, Any]) -> list[str]:
    deployment = next(o for k, o in objects.items() if k[1] == "Deployment")
    args: list[str] = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    return args


@pytest.mark.parametrize(
    "values",
    [
        [],
        ["--set", "serviceMonitor.enabled=true", "--set", "watchNamespace=shop"],
        ["--set", "replicas=1", "--set", "leaderElection.enabled=false"],
        ["--set", "prometheusRule.enabled=true", "--set", "grafanaDashboard.enabled=true"],
        ["--set", "loadtest.enabled=true"],
    ],
    ids=[
        "defaults",
        "servicemonitor-and-one-namespace",
        "one-replica",
        "rules-and-dashboard",
        "loadtest",
    ],
)
def test_helm_lint_is_clean(toolbox: Toolbox, tmp_path: Path, values: list[str]) -> None:
    """`helm lint --strict` finds nothing, with the defaults and with the options switched."""
    result = run_tool(
        toolbox, "helm", "lint", "--strict", str(CHART), *values, home=tmp_path, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout


def test_chart_defaults_equal_manifests(toolbox: Toolbox, tmp_path: Path) -> None:
    """Release `canary` in canary-system renders exactly manifests/ (kustomize's output), the
    Namespace included when namespace.create is on."""
    assert _render(toolbox, tmp_path, "--set", "namespace.create=true") == _kustomize(
        toolbox, tmp_path
    )


def test_chart_leaves_the_namespace_to_helm_by_default(toolbox: Toolbox, tmp_path: Path) -> None:
    """Without namespace.create, the chart is manifests/ less its Namespace (for
    `helm install --create-namespace` or a namespace made beforehand)."""
    expected = {k: v for k, v in _kustomize(toolbox, tmp_path).items() if k[1] != "Namespace"}
    assert _render(toolbox, tmp_path) == expected


def test_servicemonitor_value_renders_the_optional_manifest(
    toolbox: Toolbox, tmp_path: Path
) -> None:
    """serviceMonitor.enabled adds manifests/optional/servicemonitor.yaml, nothing else."""
    rendered = _render(toolbox, tmp_path, "--set", "serviceMonitor.enabled=true")
    optional = _objects((MANIFESTS / "optional" / "servicemonitor.yaml").read_text())
    assert {k: v for k, v in rendered.items() if k[1] == "ServiceMonitor"} == optional
    assert {k: v for k, v in rendered.items() if k[1] != "ServiceMonitor"} == _render(
        toolbox, tmp_path
    )


def test_loadtest_value_renders_the_optional_manifest(toolbox: Toolbox, tmp_path: Path) -> None:
    """loadtest.enabled adds manifests/optional/loadtest.yaml (ServiceAccount, Deployment,
    Service), nothing else; allowHosts and allowCidrs become its flags."""
    defaults = _render(toolbox, tmp_path)
    rendered = _render(toolbox, tmp_path, "--set", "loadtest.enabled=true")
    optional = _objects((MANIFESTS / "optional" / "loadtest.yaml").read_text())
    assert {k: v for k, v in rendered.items() if k not in defaults} == optional
    assert {k: v for k, v in rendered.items() if k in defaults} == defaults
    widened = _render(
        toolbox,
        tmp_path,
        "--set",
        "loadtest.enabled=true",
        "--set",
        "loadtest.allowHosts={*.shop.internal}",
        "--set",
        "loadtest.allowCidrs={10.96.0.0/12}",
    )
    key = ("apps/v1", "Deployment", "canary-system", "canary-loadtest")
    args = widened[key]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--allow-host=*.shop.internal" in args and "--allow-cidr=10.96.0.0/12" in args


def test_rule_and_dashboard_values_render_the_files_as_they_are(
    toolbox: Toolbox, tmp_path: Path
) -> None:
    """prometheusRule.enabled adds a PrometheusRule holding rules/canary.rules.yaml's groups;
    grafanaDashboard.enabled a ConfigMap with dashboards/canary.json and the sidecar's label;
    nothing else changes."""
    rendered = _render(
        toolbox,
        tmp_path,
        "--set",
        "prometheusRule.enabled=true",
        "--set",
        "prometheusRule.labels.release=kps",
        "--set",
        "grafanaDashboard.enabled=true",
        "--set",
        "grafanaDashboard.namespace=monitoring",
    )
    rule = rendered.pop(("monitoring.coreos.com/v1", "PrometheusRule", "canary-system", "canary"))
    assert rule["spec"] == yaml.safe_load((CHART / "rules" / "canary.rules.yaml").read_text())
    assert rule["metadata"]["labels"]["release"] == "kps"
    board = rendered.pop(("v1", "ConfigMap", "monitoring", "canary-dashboard"))
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(board["data"]["canary.json"]) == json.loads(
        (CHART / "dashboards" / "canary.json").read_text()
    )
    assert rendered == _render(toolbox, tmp_path)


def test_image_and_prometheus_values(toolbox: Toolbox, tmp_path: Path) -> None:
    """image.* and prometheusUrl reach the container."""
    rendered = _render(
        toolbox,
        tmp_path,
        "--set",
        "image.repository=registry.example/ops/canary",
        "--set",
        "image.tag=0.2.0",
        "--set",
        "image.pullPolicy=Always",
        "--set",
        "prometheusUrl=http://prom.monitoring:9090",
    )
    deployment = next(o for k, o in rendered.items() if k[1] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example/ops/canary:0.2.0"
    assert container["imagePullPolicy"] == "Always"
    assert "--prometheus-url=http://prom.monitoring:9090" in container["args"]


def test_watch_namespace_narrows_the_app_permissions_to_a_role(
    toolbox: Toolbox, tmp_path: Path
) -> None:
    """watchNamespace passes --namespace and turns the ClusterRole into a Role there, with the
    same rules on apps; only the token and access reviews, which are cluster-scoped, stay in
    a ClusterRole of their own."""
    defaults = _render(toolbox, tmp_path)
    rendered = _render(toolbox, tmp_path, "--set", "watchNamespace=shop")
    assert "--namespace=shop" in _args(rendered)
    cluster_wide = [k for k in rendered if k[1] in ("ClusterRole", "ClusterRoleBinding")]
    assert [k[3] for k in cluster_wide] == ["canary-reviews", "canary-reviews"]
    reviews = rendered[("rbac.authorization.k8s.io/v1", "ClusterRole", "", "canary-reviews")]
    assert {r["resources"][0] for r in reviews["rules"]} == {"tokenreviews", "subjectaccessreviews"}
    cluster_role = next(o for k, o in defaults.items() if k[1] == "ClusterRole")
    role = rendered[("rbac.authorization.k8s.io/v1", "Role", "shop", "canary-apps")]
    assert role["rules"] + reviews["rules"] == cluster_role["rules"]
    binding = rendered[("rbac.authorization.k8s.io/v1", "RoleBinding", "shop", "canary-apps")]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "canary", "namespace": "canary-system"}
    ]


def test_replicas_need_leader_election(toolbox: Toolbox, tmp_path: Path) -> None:
    """Two replicas without leader election are refused; one replica without it runs without
    --leader-elect and without a PodDisruptionBudget."""
    refused = run_tool(
        toolbox,
        "helm",
        "template",
        "canary",
        str(CHART),
        "--set",
        "leaderElection.enabled=false",
        home=tmp_path,
        check=False,
    )
    assert refused.returncode != 0
    assert "replicas > 1 needs leaderElection.enabled" in refused.stderr
    single = _render(
        toolbox, tmp_path, "--set", "replicas=1", "--set", "leaderElection.enabled=false"
    )
    assert not any(a.startswith("--lease") or a == "--leader-elect" for a in _args(single))
    assert not [k for k in single if k[1] == "PodDisruptionBudget"]


def test_shards_value_replaces_leader_election(toolbox: Toolbox, tmp_path: Path) -> None:
    """shards=N passes --shards N with the shard Leases' prefix and no --leader-elect (the
    args parse as the real CLI's), lets replicas > 1 go without leader election, and
    leaseDuration reaches the container only when it is not the default."""
    from canary.cli.main import build_parser

    rendered = _render(
        toolbox,
        tmp_path,
        "--set",
        "shards=4",
        "--set",
        "replicas=3",
        "--set",
        "leaderElection.enabled=false",
        "--set",
        "leaseDuration=6",
    )
    args = _args(rendered)
    assert "--leader-elect" not in args
    assert {"--shards=4", "--lease-name=canary-shard", "--lease-duration=6"} <= set(args)
    deployment = next(o for k, o in rendered.items() if k[1] == "Deployment")
    assert deployment["spec"]["replicas"] == 3
    parsed = build_parser().parse_args([a.replace("$(POD_NAMESPACE)", "ns") for a in args])
    assert (parsed.shards, parsed.leader_elect, parsed.lease_duration) == (4, False, 6)
    assert not any(a.startswith("--lease-duration") for a in _args(_render(toolbox, tmp_path)))


def _prepare_namespace(cluster: ControlPlane, namespace: str) -> None:
    cluster.kubectl("create", "namespace", namespace)
    cluster.kubectl(
        "label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted"
    )


def test_chart_passes_server_side_dry_run(cluster: ControlPlane, tmp_path: Path) -> None:
    """Every object the chart renders (ServiceMonitor aside: no Prometheus Operator CRD here),
    the optional load tester included, is accepted by the real apiserver."""
    _prepare_namespace(cluster, "canary-dry")
    rendered = cluster.helm(
        "template", "canary-dry", str(CHART), "--namespace", "canary-dry",
        "--set", "loadtest.enabled=true",
    ).stdout  # fmt: skip
    result = cluster.kubectl("apply", "--dry-run=server", "-f", "-", stdin=rendered)
    applied = result.stdout.splitlines()
    assert len(applied) == len(_objects(rendered))
    assert all(line.endswith("(server dry run)") for line in applied)


def test_chart_installs_and_rolls_out(cluster: ControlPlane) -> None:
    """`helm install --wait` succeeds on the test cluster: the controller's Deployment has two
    Ready pods (kwok) under the `restricted` Pod Security level, and its RBAC is in place."""
    _prepare_namespace(cluster, "canary-helm")
    cluster.helm(
        "install",
        "canary-helm",
        str(CHART),
        "--namespace",
        "canary-helm",
        "--wait",
        "--timeout",
        "5m",
    )
    status = json.loads(
        cluster.helm("status", "canary-helm", "-n", "canary-helm", "-o", "json").stdout
    )
    assert status["info"]["status"] == "deployed"
    deployment = cluster.get_json("deployment", "canary-helm", "-n", "canary-helm")
    assert deployment["status"]["availableReplicas"] == 2
    can = cluster.kubectl(
        "auth",
        "can-i",
        "patch",
        "httproutes.gateway.networking.k8s.io",
        "-n",
        "shop",
        "--as=system:serviceaccount:canary-helm:canary-helm",
    )
    assert can.stdout.strip() == "yes"
