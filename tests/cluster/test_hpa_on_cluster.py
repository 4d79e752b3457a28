"""HPA mirroring, the canary's size and fast rollbacks, end to end on the real control plane:
`python -m canary kubernetes` as the controller's ServiceAccount (RBAC of manifests/ enforced),
watching one namespace of its own, kwok making pods Ready, and the real kube-controller-manager
running the Deployment and HorizontalPodAutoscaler controllers. There is no metrics server, so
the HPA controller never scales on CPU; it does hold a target within minReplicas..maxReplicas,
which is how app-primary gets to 5 replicas here. What is verified is our objects.

No Prometheus either (the URL given answers nothing): no rollout here passes by analysis.
Promotions are manual (`canary.dev/command` promote), and an analysed rollout is recognised by
what it does first: the canary scaled up and the canary Ingress at the first step's weight.

One namespace, seven Deployments, all at once (a rollout here costs seconds of waiting for
kube-controller-manager and kwok, and in sequence they would add up):

    web     an HPA on it: mirrored, updated, app-primary held at 5 by it, a promotion that
            does not shrink app-primary, then the HPA deleted and the mirror with it
    sized   canary.dev/canary-replicas: "3"
    pct     canary.dev/canary-replicas: "25%" of a 6-replica primary: 2
    fast    canary.dev/fast-rollback-window: 1h; promote B, revert to A: straight to primary
    slow    canary.dev/fast-rollback-window: 1s; promote B, revert to A after it: analysed
    other   canary.dev/fast-rollback-window: 1h; promote B, then C (not a revert): analysed
    foreign an HPA on it, and an HPA `foreign-primary` that is someone else's: left alone
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.control_plane import (
    CONTROLLER_USER,
    LOOPBACK,
    REPO,
    ControlPlane,
    free_port,
)

from canary.core.records import EndEntry, NoteEntry, StartEntry, TickEntry
from canary.kubernetes.operator import KubeState, template_hash
from canary.kubernetes.record_store import RECORD_LABEL, unpack_record
from canary.kubernetes.spec import ANNOTATION_COMMAND, ANNOTATION_STATUS
from canary.reports import build_report, render_markdown

NS = "hpa-e2e"
RECORDS_NS = "canary-system"
OLD_IMAGE = "ghcr.io/example/shop:1.4.0"
NEW_IMAGE = "ghcr.io/example/shop:1.5.0"
WAIT_S = 300.0  # a wait, not a measurement: generous for a busy 2-core machine
HPA_VERBS = ("get", "list", "watch", "create", "patch", "delete")


def deployment(name: str, replicas: int, **annotations: str) -> dict[str, Any]:
    notes = {
        "canary.dev/enabled": "true",
        "canary.dev/router": "ingress-nginx",
        "canary.dev/ingress": name,
        "canary.dev/steps": "30,60",
        # Held at the first step until promoted by hand (there are no metrics to pass).
        "canary.dev/min-step-duration": "20m",
        "canary.dev/max-step-duration": "40m",
        "canary.dev/no-data-deadline": "30m",
        **{f"canary.dev/{key.replace('_', '-')}": value for key, value in annotations.items()},
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS, "annotations": notes},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "containers": [
                        {
                            "name": "app",
                            "image": OLD_IMAGE,
                            "ports": [{"name": "http", "containerPort": 8080}],
                        }
                    ]
                },
            },
        },
    }


def ingress(name: str) -> dict[str, Any]:
    backend = {"service": {"name": f"{name}-primary", "port": {"number": 80}}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "ingressClassName": "nginx",
            "rules": [
                {
                    "host": f"{name}.example.com",
                    "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": backend}]},
                }
            ],
        },
    }


def hpa(name: str, target: str, *, min_replicas: int, max_replicas: int) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
            "minReplicas": min_replicas,
            "maxReplicas": max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": 70},
                    },
                }
            ],
        },
    }


APPS = {
    "web": deployment("web", 2),
    "sized": deployment("sized", 2, canary_replicas="3"),
    "pct": deployment("pct", 6, canary_replicas="25%"),
    "fast": deployment("fast", 2, fast_rollback_window="1h"),
    "slow": deployment("slow", 2, fast_rollback_window="1s"),
    "other": deployment("other", 2, fast_rollback_window="1h"),
    "foreign": deployment("foreign", 2),
}
NEWER_IMAGE = "ghcr.io/example/shop:1.6.0"


@dataclass
class Setup:
    cluster: ControlPlane
    kubeconfig: Path
    log: Path
    process: subprocess.Popen[bytes]

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def setup(cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """The apps (web with its HPA) in their namespace, then one controller replica for that
    namespace alone, started with sys.executable and stopped by its PID."""
    workdir = tmp_path_factory.mktemp("hpa-e2e")
    kubeconfig = cluster.service_account_kubeconfig(workdir / "controller.kubeconfig")
    cluster.kubectl("create", "namespace", NS)
    items = [*APPS.values(), *(ingress(name) for name in APPS)]
    items.append(hpa("web", "web", min_replicas=2, max_replicas=6))
    items.append(hpa("foreign", "foreign", min_replicas=2, max_replicas=4))
    # Not ours (no managed-by label), aimed elsewhere: the mirror must not take it over.
    items.append(hpa("foreign-primary", "somebody-else", min_replicas=1, max_replicas=3))
    cluster.kubectl(
        "apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
    )
    log = workdir / "controller.log"
    argv = [
        sys.executable,
        "-m",
        "canary",
        "kubernetes",
        f"--kubeconfig={kubeconfig}",
        f"--namespace={NS}",
        f"--listen={LOOPBACK}:{free_port()}",
        # Nothing listens there: no metrics, so nothing passes by itself.
        f"--prometheus-url=http://{LOOPBACK}:{free_port()}",
        f"--record-namespace={RECORDS_NS}",
        "--tick=1",
    ]
    with log.open("ab") as out:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            start_new_session=True,
        )
    try:
        yield Setup(cluster, kubeconfig, log, process)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()


# ---- reading and writing the cluster -----------------------------------------------------


def wait(what: str, probe: Callable[[], Any], setup: Setup, timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if setup.process.poll() is not None:
            pytest.fail(f"the controller exited while waiting for {what}\n{setup.logs()}")
        if time.monotonic() > deadline:
            pytest.fail(f"not seen within {timeout_s:g}s: {what}\n{setup.logs()}")
        time.sleep(0.5)


def get(cluster: ControlPlane, *what: str, namespace: str = NS) -> Any:
    result = cluster.kubectl("get", *what, "-n", namespace, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def state(cluster: ControlPlane, name: str) -> KubeState | None:
    app = get(cluster, "deployment", name)
    if app is None:
        return None
    return KubeState.from_annotation(
        (app["metadata"].get("annotations") or {}).get(ANNOTATION_STATUS)
    )


def image_of(deployment: dict[str, Any]) -> str:
    return str(deployment["spec"]["template"]["spec"]["containers"][0]["image"])


def set_image(cluster: ControlPlane, name: str, image: str) -> str:
    """Give the app `image`; its new template hash."""
    cluster.kubectl("set", "image", f"deployment/{name}", f"app={image}", "-n", NS)
    return template_hash(get(cluster, "deployment", name))


def at_first_step(cluster: ControlPlane, name: str, revision: str) -> KubeState | None:
    st = state(cluster, name)
    ok = (
        st is not None
        and st.rollout is not None
        and st.rollout.revision == revision
        and st.rollout.active
        and st.rollout.weight == 30
        and st.rollout.weight_verified
    )
    return st if ok else None


def canary_weight(cluster: ControlPlane, name: str) -> int:
    canary = get(cluster, "ingress", f"{name}-canary")
    notes = (canary or {}).get("metadata", {}).get("annotations") or {}
    return int(notes.get("nginx.ingress.kubernetes.io/canary-weight", "0"))


def promote_by_hand(setup: Setup, name: str, revision: str) -> KubeState:
    """Send `promote` through the command annotation; wait until app-primary runs it."""
    command = {"id": f"promote-{name}-{revision}", "command": "promote", "who": "test"}
    setup.cluster.kubectl(
        "annotate",
        "deployment",
        name,
        f"{ANNOTATION_COMMAND}={json.dumps(command)}",
        "--overwrite",
        "-n",
        NS,
    )

    def promoted() -> KubeState | None:
        st = state(setup.cluster, name)
        if st is None or st.rollout is None or st.rollout.revision != revision:
            return None
        return st if st.rollout.done and st.primary_revision == revision else None

    st: KubeState = wait(f"{name} promoted", promoted, setup)
    assert st.rollout is not None and st.rollout.outcome == "promoted", st.rollout
    return st


def rolled_out(cluster: ControlPlane, name: str, image: str) -> dict[str, Any] | None:
    """The Deployment has `image` and every replica updated and available (kwok)."""
    obj = get(cluster, "deployment", name)
    if obj is None or image_of(obj) != image:
        return None
    status, replicas = obj.get("status") or {}, obj["spec"]["replicas"]
    done = (
        status.get("observedGeneration") == obj["metadata"]["generation"]
        and status.get("updatedReplicas") == replicas
        and status.get("availableReplicas") == replicas
        and status.get("replicas") == replicas
    )
    return obj if done else None


def record(cluster: ControlPlane, st: KubeState) -> list[Any]:
    """The record's head and chunks, as `kubectl get configmap -l canary.io/record=` dumps it."""
    namespace, _, name = st.record.partition("/")
    return unpack_record(
        get(cluster, "configmaps", "-l", f"{RECORD_LABEL}={name}", namespace=namespace)
    )


def events(cluster: ControlPlane, name: str) -> list[dict[str, Any]]:
    items = get(cluster, "events")["items"]
    return [e for e in items if e["involvedObject"]["name"] == name]


def initialized(cluster: ControlPlane, name: str) -> bool:
    st = state(cluster, name)
    return st is not None and bool(st.primary_revision)


# ---- tests -------------------------------------------------------------------------------


def test_the_apps_hpa_is_mirrored_and_promotion_does_not_shrink_production(setup: Setup) -> None:
    """web's HPA (min 2, max 6) is mirrored to an HPA `web-primary` aimed at web-primary,
    owned by web and labelled ours; raised to min 5 / max 8 the mirror follows, and the HPA
    controller holds web-primary at 5. With the app's HPA lowered back to min 2, a new
    template rolls out (the canary at the HPA's minReplicas, 2, then scaled to 3 by the HPA
    when its minimum is raised) and is promoted: web-primary keeps its 5 replicas, now of the
    new template. Deleting the app's HPA deletes the mirror."""
    cluster = setup.cluster
    wait("web initialized", lambda: initialized(cluster, "web"), setup)

    def mirror(min_replicas: int, max_replicas: int) -> dict[str, Any] | None:
        obj = get(cluster, "hpa", "web-primary")
        if obj is None:
            return None
        spec = obj["spec"]
        ok = (spec["minReplicas"], spec["maxReplicas"]) == (min_replicas, max_replicas)
        return obj if ok else None

    made = wait("the web-primary HPA", lambda: mirror(2, 6), setup)
    assert made["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "web-primary",
    }
    app = get(cluster, "deployment", "web")
    assert [(o["kind"], o["name"], o["uid"]) for o in made["metadata"]["ownerReferences"]] == [
        ("Deployment", "web", app["metadata"]["uid"])
    ]
    assert made["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "canary"
    assert made["spec"]["metrics"] == get(cluster, "hpa", "web")["spec"]["metrics"]

    patch = {"spec": {"minReplicas": 5, "maxReplicas": 8}}
    cluster.kubectl("patch", "hpa", "web", "-n", NS, "--type=merge", "-p", json.dumps(patch))
    wait("the mirror at min 5, max 8", lambda: mirror(5, 8), setup)
    wait(
        "the HPA controller to hold web-primary at 5",
        lambda: (d := get(cluster, "deployment", "web-primary")) and d["spec"]["replicas"] == 5,
        setup,
    )
    patch = {"spec": {"minReplicas": 2}}
    cluster.kubectl("patch", "hpa", "web", "-n", NS, "--type=merge", "-p", json.dumps(patch))
    wait("the mirror at min 2, max 8", lambda: mirror(2, 8), setup)

    revision = set_image(cluster, "web", NEW_IMAGE)
    wait("web's rollout at its first step", lambda: at_first_step(cluster, "web", revision), setup)
    assert get(cluster, "deployment", "web")["spec"]["replicas"] == 2  # the HPA's minReplicas
    # During the rollout the canary is the app's HPA's: raised to min 3, the HPA controller
    # scales it (and the mirror follows, which leaves web-primary's 5 as it is).
    patch = {"spec": {"minReplicas": 3}}
    cluster.kubectl("patch", "hpa", "web", "-n", NS, "--type=merge", "-p", json.dumps(patch))
    wait(
        "the HPA controller to scale the canary to 3",
        lambda: get(cluster, "deployment", "web")["spec"]["replicas"] == 3,
        setup,
    )
    wait("the mirror at min 3, max 8", lambda: mirror(3, 8), setup)
    assert at_first_step(cluster, "web", revision)
    promote_by_hand(setup, "web", revision)
    primary = wait(
        "web-primary rolled out with the new template",
        lambda: rolled_out(cluster, "web-primary", NEW_IMAGE),
        setup,
    )
    assert primary["spec"]["replicas"] >= 5, primary["spec"]
    assert primary["status"]["availableReplicas"] >= 5, primary["status"]
    assert {e["reason"] for e in events(cluster, "web")} >= {"HPAMirrored", "Promoted"}

    cluster.kubectl("delete", "hpa", "web", "-n", NS)
    wait("the mirror deleted", lambda: get(cluster, "hpa", "web-primary") is None, setup)
    assert get(cluster, "deployment", "web-primary")["spec"]["replicas"] >= 5


def test_canary_replicas_as_a_count_and_as_a_percentage(setup: Setup) -> None:
    """`canary.dev/canary-replicas: "3"` gives the canary 3 replicas (the app had 2);
    `"25%"` of a 6-replica app-primary gives ceil(1.5) = 2. Both back to 0 when the primary
    serves alone (before the rollout)."""
    cluster = setup.cluster
    for name, wanted in (("sized", 3), ("pct", 2)):
        wait(f"{name} initialized", lambda n=name: initialized(cluster, n), setup)  # type: ignore[misc]
        assert get(cluster, "deployment", name)["spec"]["replicas"] == 0
        revision = set_image(cluster, name, NEW_IMAGE)
        wait(
            f"{name}'s rollout at its first step",
            lambda n=name, r=revision: at_first_step(cluster, n, r),  # type: ignore[misc]
            setup,
        )
        assert get(cluster, "deployment", name)["spec"]["replicas"] == wanted, name
        wait(
            f"{name}'s canary pods Ready",
            lambda n=name: rolled_out(cluster, n, NEW_IMAGE),  # type: ignore[misc]
            setup,
        )
    assert get(cluster, "deployment", "pct-primary")["spec"]["replicas"] == 6


def _promote_b(setup: Setup, name: str) -> tuple[str, str, KubeState]:
    """Roll B out to its first step and promote it by hand: (A's hash, B's, the state)."""
    cluster = setup.cluster
    wait(f"{name} initialized", lambda: initialized(cluster, name), setup)
    first = template_hash(get(cluster, "deployment", name))
    second = set_image(cluster, name, NEW_IMAGE)
    wait(f"{name}'s rollout of B", lambda: at_first_step(cluster, name, second), setup)
    promoted = promote_by_hand(setup, name, second)
    assert promoted.previous_revision == first and promoted.promoted_at > 0
    wait(f"{name}-primary on B", lambda: rolled_out(cluster, f"{name}-primary", NEW_IMAGE), setup)
    return first, second, promoted


def test_a_revert_within_the_window_skips_the_analysis(setup: Setup) -> None:
    """With a 1h window, reverting to the template promoted before the current one goes
    straight to app-primary: no canary pods, no canary weight, a record of three entries
    that says why (no tick), a FastRollback Event, and the status shows a promoted rollout
    whose reason says so."""
    cluster = setup.cluster
    first, second, _ = _promote_b(setup, "fast")
    assert canary_weight(cluster, "fast") == 0
    reverted = set_image(cluster, "fast", OLD_IMAGE)
    assert reverted == first

    def fast_done() -> KubeState | None:
        st = state(cluster, "fast")
        ok = st is not None and st.rollout is not None and st.primary_revision == first
        return st if ok else None

    st = wait("the fast rollback", fast_done, setup)
    assert st.rollout is not None and st.rollout.outcome == "promoted"
    assert st.rollout.reason.startswith(f"fast rollback: template equals revision {first}")
    assert "within window 1h0m0s" in st.rollout.reason and "analysis skipped" in st.rollout.reason
    assert st.previous_revision == ""  # no fast path back to the reverted version
    wait("fast-primary on A", lambda: rolled_out(cluster, "fast-primary", OLD_IMAGE), setup)
    assert get(cluster, "deployment", "fast")["spec"]["replicas"] == 0
    assert canary_weight(cluster, "fast") == 0

    entries = record(cluster, st)
    assert [type(e) for e in entries] == [StartEntry, NoteEntry, EndEntry], entries
    assert not any(isinstance(e, TickEntry) for e in entries)
    start, note, end = entries
    assert (start.primary_version, start.canary_version) == (second, first)
    assert "analysis skipped" in note.message and end.outcome == "promoted"
    report = render_markdown(
        build_report([e.model_dump(mode="json", by_alias=True) for e in entries])
    )
    assert "promoted" in report and "analysis skipped" in report, report
    fast = [e for e in events(cluster, "fast") if e["reason"] == "FastRollback"]
    assert fast and fast[0]["type"] == "Normal" and "analysis skipped" in fast[0]["message"]


def test_a_revert_after_the_window_is_analysed(setup: Setup) -> None:
    """With a 1s window, the same revert a few seconds after the promotion is a new
    analysed rollout: the canary scaled up and the canary Ingress at the first step."""
    cluster = setup.cluster
    first, _, promoted = _promote_b(setup, "slow")
    time.sleep(2.0)  # past the 1s window (the window is measured from the promotion)
    assert set_image(cluster, "slow", OLD_IMAGE) == first
    st = wait("an analysed rollout of A", lambda: at_first_step(cluster, "slow", first), setup)
    assert st.rollout is not None and "fast rollback" not in st.rollout.reason
    assert st.rollout_id != promoted.rollout_id
    assert canary_weight(cluster, "slow") == 30
    assert get(cluster, "deployment", "slow")["spec"]["replicas"] == 2
    assert not [e for e in events(cluster, "slow") if e["reason"] == "FastRollback"]


def test_every_hpa_rule_is_used_and_none_is_refused(setup: Setup) -> None:
    """The apiserver's audit log shows that this controller (its own token) used each HPA
    verb that manifests/rbac.yaml grants, and was refused nothing: the rules are needed."""
    token = json.loads(setup.kubeconfig.read_text())["users"][0]["user"]["token"]
    payload = token.split(".")[1]
    jti = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"]
    seen, refused = set(), set()
    for event in setup.cluster.audit_events():
        extra = event["user"].get("extra", {})
        if event["stage"] == "RequestReceived":
            continue
        if event["user"]["username"] != CONTROLLER_USER or extra.get(
            "authentication.kubernetes.io/credential-id"
        ) != [f"JTI={jti}"]:
            continue
        ref = event.get("objectRef") or {}
        triple = (ref.get("apiGroup", ""), ref.get("resource", ""), event["verb"])
        if (event.get("annotations") or {}).get("authorization.k8s.io/decision") == "allow":
            seen.add(triple)
        else:
            refused.add(triple)
    wanted = {("autoscaling", "horizontalpodautoscalers", verb) for verb in HPA_VERBS}
    assert wanted <= seen, sorted(wanted - seen)
    assert refused == set(), sorted(refused)
    text = setup.log.read_text(errors="replace").lower()
    assert "forbidden" not in text and " 403" not in text, text[-4000:]


def test_a_different_template_within_the_window_is_analysed(setup: Setup) -> None:
    """Within the window, a template that is not the one promoted before the current one
    (C after A -> B) is a normal analysed rollout."""
    cluster = setup.cluster
    first, second, _ = _promote_b(setup, "other")
    third = set_image(cluster, "other", NEWER_IMAGE)
    assert third not in (first, second)
    st = wait("an analysed rollout of C", lambda: at_first_step(cluster, "other", third), setup)
    assert st.rollout is not None and "fast rollback" not in st.rollout.reason
    assert st.previous_revision == first  # a revert to A would still be fast
    assert canary_weight(cluster, "other") == 30
    assert not [e for e in events(cluster, "other") if e["reason"] == "FastRollback"]


def test_an_hpa_of_our_mirrors_name_that_is_not_ours_is_left_alone(setup: Setup) -> None:
    """An HPA `foreign-primary` that canary did not make is neither patched nor deleted: a
    Warning Event names it, and the app is set up all the same."""
    cluster = setup.cluster
    wait("foreign initialized", lambda: initialized(cluster, "foreign"), setup)
    warning = wait(
        "an HPAMirrorFailed Event",
        lambda: [e for e in events(cluster, "foreign") if e["reason"] == "HPAMirrorFailed"],
        setup,
    )[0]
    assert warning["type"] == "Warning" and "not ours" in warning["message"], warning
    theirs = get(cluster, "hpa", "foreign-primary")
    assert theirs["spec"]["scaleTargetRef"]["name"] == "somebody-else"
    assert (theirs["spec"]["minReplicas"], theirs["spec"]["maxReplicas"]) == (1, 3)
    assert "ownerReferences" not in theirs["metadata"]
