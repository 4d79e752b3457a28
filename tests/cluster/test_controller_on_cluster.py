"""`canary kubernetes`, run as the controller's ServiceAccount from manifests/ (RBAC enforced),
on the real control plane: it takes over an annotated app (app-primary with pods made Ready by
kwok, both Services, the canary Ingress) and starts a rollout when the pod template changes.

Prometheus is deliberately unreachable here, so the rollout stays at its first step ("no data"
is never a pass); the rollouts with real metrics are in test_operator_on_cluster.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.control_plane import LOOPBACK, MANIFESTS, REPO, ControlPlane, free_port

NAMESPACE = "controller-smoke"
WAIT_S = 180.0


def _example_in(namespace: str) -> list[dict[str, Any]]:
    """manifests/examples/app-ingress-nginx.yaml, moved into `namespace`."""
    docs = yaml.safe_load_all((MANIFESTS / "examples" / "app-ingress-nginx.yaml").read_text())
    moved = []
    for doc in docs:
        if doc and doc["kind"] != "Namespace":
            doc["metadata"]["namespace"] = namespace
            moved.append(doc)
    return moved


@pytest.fixture
def controller(
    cluster: ControlPlane, controller_kubeconfig: Path, tmp_path: Path
) -> Iterator[Path]:
    """The controller as a process (sys.executable -m canary), stopped by PID; yields its log."""
    log = tmp_path / "canary.log"
    argv = [
        sys.executable,
        "-m",
        "canary",
        "kubernetes",
        f"--kubeconfig={controller_kubeconfig}",
        f"--namespace={NAMESPACE}",
        "--leader-elect",
        "--lease-name=smoke-leader",
        "--lease-namespace=canary-system",
        "--identity=smoke",
        f"--listen={LOOPBACK}:{free_port()}",
        f"--prometheus-url=http://{LOOPBACK}:9",
        "--record-namespace=canary-system",
        "--tick=1",
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
    try:
        yield log
    finally:
        # Another test's controller may watch every namespace: leave it no app to pick up.
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _wait(what: str, probe: Callable[[], bool], log: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while not probe():
        if time.monotonic() > deadline:
            pytest.fail(f"not seen: {what}\n--- controller log ---\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


def _get(cluster: ControlPlane, *args: str) -> Any:
    result = cluster.kubectl("get", *args, "-n", NAMESPACE, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def test_controller_takes_over_an_app_and_starts_a_rollout(
    cluster: ControlPlane, controller: Path
) -> None:
    """With only manifests/rbac.yaml's permissions, the controller initializes the example
    app (app-primary available, Services, canary Ingress at weight 0) and, on a new pod
    template, moves the canary Ingress to the first step's 5%."""
    cluster.kubectl("create", "namespace", NAMESPACE)
    cluster.kubectl(
        "apply",
        "-f",
        "-",
        stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": _example_in(NAMESPACE)}),
    )

    def primary_available() -> bool:
        primary = _get(cluster, "deployment", "app-primary")
        return bool(primary) and primary["status"].get("availableReplicas") == 3

    _wait("app-primary with 3 available replicas", primary_available, controller)
    assert _get(cluster, "service", "app-primary") is not None
    assert _get(cluster, "service", "app-canary") is not None

    cluster.kubectl(
        "set", "image", "deployment/app", "app=ghcr.io/example/shop:1.5.0", "-n", NAMESPACE
    )

    def canary_weight() -> str | None:
        ingress = _get(cluster, "ingress", "app-canary")
        if not ingress:
            return None
        weight: str | None = (
            ingress["metadata"]
            .get("annotations", {})
            .get("nginx.ingress.kubernetes.io/canary-weight")
        )
        return weight

    _wait("the canary Ingress at 5%", lambda: canary_weight() == "5", controller)
    status = json.loads(
        _get(cluster, "deployment", "app")["metadata"]["annotations"]["canary.dev/status"]
    )
    assert status, "the rollout state is persisted in the canary.dev/status annotation"
    text = controller.read_text().lower()
    assert "forbidden" not in text and " 403" not in text, text[-4000:]
