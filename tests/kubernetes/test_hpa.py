"""The pure parts of HPA mirroring: which Deployment an HPA scales, and the mirror's spec.
(The mirroring itself runs against the real control plane: tests/cluster/test_hpa_on_cluster.py.)"""

from __future__ import annotations

from typing import Any

from canary.kubernetes.workload import MANAGED_BY, hpa_target, primary_hpa


def _hpa(kind: str = "Deployment", name: str = "app", **meta: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "app", **meta},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": kind, "name": name},
            "minReplicas": 2,
            "maxReplicas": 6,
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 60}},
        },
    }


def test_hpa_target_is_the_deployment_it_scales() -> None:
    """An HPA on a Deployment names it; on another kind, or our own mirror, none."""
    assert hpa_target(_hpa()) == "app"
    assert hpa_target(_hpa(kind="StatefulSet")) is None
    assert hpa_target(_hpa(labels=dict(MANAGED_BY))) is None
    assert hpa_target({"spec": {}}) is None


def test_the_mirror_is_the_apps_spec_aimed_at_app_primary() -> None:
    """The mirror keeps every setting of the app's HPA but the target; the app's is untouched."""
    app = _hpa()
    mirror = primary_hpa(app, "app-primary")
    assert mirror["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "app-primary",
    }
    assert {k: v for k, v in mirror.items() if k != "scaleTargetRef"} == {
        k: v for k, v in app["spec"].items() if k != "scaleTargetRef"
    }
    assert app["spec"]["scaleTargetRef"]["name"] == "app"
