"""`canary kubernetes --shards 2` end to end on the real control plane: replicas of the
controller's ServiceAccount (RBAC enforced, manifests/), each with its own token, split the
rollouts of four namespaces by their shard, one Lease per shard in canary-system.

    replica-a starts alone and takes both shard Leases; replica-b asks for one and a hands it
    over, so each acts on its shard's two namespaces only; replica-c joins and takes nothing
    (everyone is at its fair share). replica-a is killed (-9) mid-rollout: its shard moves to
    another replica about the Lease duration after (6s here, long enough for the count from
    the previous read: canary.kubernetes.shards) and its rollouts resume from their status
    annotations: one start in each record, weights 0, 30, 50, 70, 100, 0 in order, and
    never two replicas writing about one app in alternation. SIGTERM releases the Leases.

Who wrote what comes from the apiserver's audit log (each replica's token has its own
credential id). Metrics come from a real Prometheus scraping demo-service processes that a
small load thread keeps busy (both arms, whatever the weights: the subject here is who acts,
not the traffic split, which tests/cluster/test_operator_on_cluster.py covers).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from itertools import groupby
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import yaml
from support.control_plane import (
    CONTROLLER_USER,
    LOOPBACK,
    MANIFESTS,
    REPO,
    ControlPlane,
    free_port,
)

from canary.core.records import EndEntry, NoteEntry, StartEntry
from canary.demo.procs import HttpReady, ManagedProcess, find_binary
from canary.demo.stack import service_process
from canary.kubernetes.operator import KubeState
from canary.kubernetes.record_store import unpack_record
from canary.kubernetes.shards import shard_lease_name, shard_of
from canary.kubernetes.spec import ANNOTATION_STATUS

SHARDS = 2
RECORDS_NS = "canary-system"
PREFIX = "e2e-shard"
LEASE_DURATION_S = 6
NEW_IMAGE = "ghcr.io/example/shop:1.5.0"
NEWER_IMAGE = "ghcr.io/example/shop:1.6.0"
WAIT_S = 300.0  # waits, not measurements: the machine may be busy


def _namespaces() -> dict[int, tuple[str, str]]:
    """Two namespaces per shard, the first names that hash there. Not `e2e-*`: their record
    ConfigMaps would count as test_operator_on_cluster's, which reads all `canary-record-e2e-*`
    (the cluster is shared by the session)."""
    found: dict[int, list[str]] = {i: [] for i in range(SHARDS)}
    for n in range(100):
        name = f"sharded-{n}"
        bucket = found[shard_of(name, "app", SHARDS)]
        if len(bucket) < 2:
            bucket.append(name)
    return {i: (names[0], names[1]) for i, names in found.items()}


BY_SHARD = _namespaces()
NAMESPACES = tuple(ns for pair in BY_SHARD.values() for ns in pair)

ANNOTATIONS = {
    "canary.dev/enabled": "true",
    "canary.dev/router": "ingress-nginx",
    "canary.dev/ingress": "app",
    "canary.dev/steps": "30,50,70",
    # Slow enough for a kill in the middle: the analysis passes in seconds here.
    "canary.dev/min-step-duration": "15s",
    "canary.dev/max-step-duration": "240s",
    "canary.dev/no-data-deadline": "90s",
    "canary.dev/analysis.error-tolerance": "5",
    "canary.dev/metrics": "custom",
    "canary.dev/metrics.requests": 'http_requests_total{namespace="{namespace}",service="{arm}"}',
    "canary.dev/metrics.errors": (
        'http_requests_total{namespace="{namespace}",service="{arm}",code=~"5.."}'
    ),
}


def app_objects(namespace: str) -> list[dict[str, Any]]:
    out = []
    for doc in yaml.safe_load_all((MANIFESTS / "examples" / "app-ingress-nginx.yaml").read_text()):
        if not doc or doc["kind"] == "Namespace":
            continue
        doc["metadata"]["namespace"] = namespace
        if doc["kind"] == "Deployment":
            doc["metadata"]["annotations"] = dict(ANNOTATIONS)
            doc["spec"]["replicas"] = 2
        out.append(doc)
    return out


def _prometheus_config(primary: int, canary: int) -> str:
    groups = [
        f'      - targets: ["{LOOPBACK}:{port}"]\n'
        f'        labels: {{namespace: "{namespace}", service: "{service}"}}\n'
        for namespace in NAMESPACES
        for service, port in (("app-primary", primary), ("app-canary", canary))
    ]
    return (
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: apps\n    scrape_interval: 1s\n"
        "    scrape_timeout: 1s\n    static_configs:\n" + "".join(groups)
    )


class Load:
    """About 40 requests/s to each exporter, in a thread, until stopped."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            for url in self.urls:
                try:
                    with urllib.request.urlopen(url, timeout=5) as response:
                        response.read()
                except OSError:
                    pass  # the demo service's 500s are the errors the analysis counts
            self.stop.wait(0.025)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


@dataclass
class Replica:
    """One `python -m canary kubernetes --shards 2`, started with sys.executable, stopped by
    PID."""

    name: str
    kubeconfig: Path
    prometheus_url: str
    log: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Replica:
        argv = [
            sys.executable,
            "-m",
            "canary",
            "kubernetes",
            f"--kubeconfig={self.kubeconfig}",
            "--all-namespaces",
            f"--shards={SHARDS}",
            f"--lease-name={PREFIX}",
            f"--lease-namespace={RECORDS_NS}",
            f"--lease-duration={LEASE_DURATION_S}",
            f"--identity={self.name}",
            f"--listen={LOOPBACK}:{self.port}",
            f"--prometheus-url={self.prometheus_url}",
            f"--record-namespace={RECORDS_NS}",
            "--tick=1",
            "--public-reads",
            "--log-format=text",
        ]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)},
                start_new_session=True,
            )
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> int | None:
        process = self.process
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        os.kill(process.pid, signal.SIGTERM)
        try:
            return process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return None

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def http(self, path: str) -> tuple[int, str]:
        try:
            url = f"http://{LOOPBACK}:{self.port}{path}"
            with urllib.request.urlopen(url, timeout=10) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()
        except OSError:
            return 0, ""

    def rollouts(self) -> set[str]:
        code, body = self.http("/rollouts")
        assert code == 200, (code, body)
        data = json.loads(body)
        items = data["rollouts"] if isinstance(data, dict) else data
        # The session's cluster is shared: apps other modules left behind are rollouts too.
        return {str(item["namespace"]) for item in items} & set(NAMESPACES)

    def shard_held(self) -> dict[int, float]:
        code, body = self.http("/metrics")
        assert code == 200
        out = {}
        for line in body.splitlines():
            if line.startswith("canary_shard_held{"):
                labels, value = line.rsplit(" ", 1)
                out[int(labels.split('shard="')[1].split('"')[0])] = float(value)
        return out

    @property
    def credential(self) -> str:
        """The token's JTI, as the audit log names it."""
        token = json.loads(self.kubeconfig.read_text())["users"][0]["user"]["token"]
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return f"JTI={claims['jti']}"


@dataclass
class Shards:
    cluster: ControlPlane
    workdir: Path
    prometheus_url: str
    replicas: dict[str, Replica] = field(default_factory=dict)

    def start(self, name: str) -> Replica:
        kubeconfig = self.cluster.service_account_kubeconfig(self.workdir / f"{name}.kubeconfig")
        replica = Replica(name, kubeconfig, self.prometheus_url, self.workdir / f"{name}.log")
        self.replicas[name] = replica
        return replica.start()

    def logs(self) -> str:
        return "\n".join(f"--- {n} ---\n{r.text()[-3000:]}" for n, r in self.replicas.items())

    def wait(self, what: str, probe: Callable[[], Any], timeout_s: float = WAIT_S) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            value = probe()
            if value:
                return value
            if time.monotonic() > deadline:
                pytest.fail(f"not seen within {timeout_s:g}s: {what}\n{self.logs()}")
            time.sleep(0.3)

    def get(self, namespace: str, *what: str) -> Any:
        result = self.cluster.kubectl("get", *what, "-n", namespace, "-o", "json", check=False)
        return json.loads(result.stdout) if result.returncode == 0 else None

    def lease(self, shard: int) -> dict[str, Any]:
        return self.get(RECORDS_NS, "lease", shard_lease_name(PREFIX, shard, SHARDS)) or {}

    def holders(self) -> list[str]:
        return [
            str(self.lease(i).get("spec", {}).get("holderIdentity") or "") for i in range(SHARDS)
        ]

    def state(self, namespace: str) -> KubeState | None:
        app = self.get(namespace, "deployment", "app")
        if app is None:
            return None
        return KubeState.from_annotation(
            (app["metadata"].get("annotations") or {}).get(ANNOTATION_STATUS)
        )

    def writes(self, namespace: str) -> list[dict[str, Any]]:
        """The replicas' successful writes about the app in `namespace` (and its record), in
        order, from the audit log."""
        record = f"canary-record-{namespace}-"
        mine = {r.credential for r in self.replicas.values()}
        out = []
        for e in self.cluster.audit_events():
            ref = e.get("objectRef") or {}
            if not (
                e["stage"] == "ResponseComplete"
                and e["user"]["username"] == CONTROLLER_USER
                and _credential(e) in mine
                and e["verb"] in ("create", "patch", "update")
                and e["responseStatus"]["code"] < 300
            ):
                continue
            if ref.get("namespace") == namespace or (
                ref.get("namespace") == RECORDS_NS and str(ref.get("name", "")).startswith(record)
            ):
                out.append(e)
        return out

    def lease_writes(self, replica: Replica) -> list[dict[str, Any]]:
        return [
            e
            for e in self.cluster.audit_events()
            if e["stage"] == "ResponseComplete"
            and _credential(e) == replica.credential
            and (e.get("objectRef") or {}).get("resource") == "leases"
            and e["verb"] in ("create", "update")
            and e["responseStatus"]["code"] < 300
        ]


def _credential(event: dict[str, Any]) -> str:
    return str(
        event["user"].get("extra", {}).get("authentication.kubernetes.io/credential-id", ["?"])[0]
    )


def _weights(writes: list[dict[str, Any]]) -> list[int]:
    out = []
    for e in writes:
        if (e.get("objectRef") or {}).get("resource") != "ingresses":
            continue
        annotations = (e.get("requestObject") or {}).get("metadata", {}).get("annotations") or {}
        value = annotations.get("nginx.ingress.kubernetes.io/canary-weight")
        if value is not None:
            out.append(int(value))
    return out


def _wall(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


@pytest.fixture(scope="module")
def shards(cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shards]:
    workdir = tmp_path_factory.mktemp("shards-e2e")
    started: list[ManagedProcess] = []
    shared: Shards | None = None
    try:
        ports = {"primary": free_port(), "canary": free_port()}
        for arm, port in ports.items():
            process = service_process(
                arm,
                port=port,
                log_path=workdir / f"{arm}.log",
                error_rate=0.05,
                latency_ms=2,
                seed=7,
                name=arm,
                cwd=REPO,
            )
            started.append(process.start_sync())
        config = workdir / "prometheus.yml"
        config.write_text(_prometheus_config(ports["primary"], ports["canary"]))
        prom_port = free_port()
        prometheus = ManagedProcess(
            [
                find_binary("prometheus", fallbacks=("/usr/bin/prometheus",)),
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address={LOOPBACK}:{prom_port}",
                "--log.level=warn",
            ],
            log_path=workdir / "prometheus.log",
            ready=HttpReady(f"http://{LOOPBACK}:{prom_port}/-/ready"),
            ready_timeout=60,
            name="prometheus",
        )
        started.append(prometheus.start_sync())
        urls = [f"http://{LOOPBACK}:{port}/" for port in ports.values()]
        with Load(urls):
            shared = Shards(cluster, workdir, f"http://{LOOPBACK}:{prom_port}")
            yield shared
    finally:
        for replica in shared.replicas.values() if shared is not None else ():
            replica.stop()
        for process in reversed(started):
            process.stop_sync()


def test_two_replicas_split_the_shards_survive_a_kill_and_a_third_takes_nothing(
    shards: Shards,
) -> None:
    """The whole story of the module docstring, in order (each part needs the one before)."""
    a = shards.start("replica-a")
    shards.wait("replica-a to hold both shards", lambda: shards.holders() == ["replica-a"] * 2)
    b = shards.start("replica-b")
    split = shards.wait(
        "one shard each",
        lambda: (h := shards.holders()) and sorted(h) == ["replica-a", "replica-b"] and h,
    )
    shard_of_a = split.index("replica-a")
    shard_of_b = split.index("replica-b")
    assert "asked replica-a for it" in b.text(), b.text()[-3000:]
    assert "released it (asked by replica-b)" in a.text(), a.text()[-3000:]

    # Only now the apps: each is initialized by its shard's holder alone.
    for namespace in NAMESPACES:
        shards.cluster.kubectl("create", "namespace", namespace)
        shards.cluster.kubectl(
            "apply",
            "-f",
            "-",
            stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": app_objects(namespace)}),
        )
    for namespace in NAMESPACES:
        shards.wait(
            f"{namespace}/app initialized",
            lambda ns=namespace: (s := shards.state(ns)) is not None and s.primary_revision,  # type: ignore[misc]
        )
        shards.cluster.kubectl(
            "set", "image", "deployment/app", f"app={NEW_IMAGE}", "-n", namespace
        )
    assert a.rollouts() == set(BY_SHARD[shard_of_a])
    assert b.rollouts() == set(BY_SHARD[shard_of_b])
    assert a.shard_held() == {shard_of_a: 1.0, shard_of_b: 0.0}
    assert b.shard_held() == {shard_of_b: 1.0}

    # A third replica takes nothing that is held, and asks for nothing.
    c = shards.start("replica-c")
    shards.wait("replica-c serving", lambda: c.http("/healthz")[0] == 200)
    time.sleep(LEASE_DURATION_S * 1.5)
    assert shards.holders() == split
    assert shards.lease_writes(c) == []
    assert c.rollouts() == set() and c.http("/readyz")[0] == 503

    # replica-a killed mid-rollout: its shard moves, its rollouts resume.
    before = {}
    for namespace in BY_SHARD[shard_of_a]:
        before[namespace] = shards.wait(
            f"{namespace} past its first step",
            lambda ns=namespace: (  # type: ignore[misc]
                (s := shards.state(ns))
                and s.rollout
                and s.rollout.step >= 1
                and s.rollout.weight_verified
                and not s.rollout.done
                and s
            ),
        )
    assert shards.holders()[shard_of_a] == "replica-a"
    killed_at = time.time()
    a.kill()
    taken = shards.wait(
        "replica-a's shard taken over",
        lambda: (
            (lease := shards.lease(shard_of_a))
            and lease["spec"].get("holderIdentity") not in ("", "replica-a")
            and lease
        ),
    )
    moved_after = _wall(taken["spec"]["acquireTime"]) - killed_at
    # Taken once the Lease was seen unchanged for its duration: at most that after the last
    # renewal (counted from the survivor's previous read: 6 - 4 - SAFETY_S leaves 1 s for
    # F - P, a look being 0.8 s), plus slack for a busy machine (a slow look counts from F).
    assert moved_after <= LEASE_DURATION_S + 3.0, moved_after

    carried_on = 0  # moved rollouts that counted on from the state their record carried
    analysis_carried = 0  # ... and whose analysis carried on from the head alone
    for namespace in NAMESPACES:
        st = shards.wait(
            f"{namespace} promoted",
            lambda ns=namespace: (  # type: ignore[misc]
                (s := shards.state(ns)) and s.rollout and s.rollout.done and s
            ),
        )
        assert st.rollout is not None and st.rollout.outcome == "promoted", st.rollout
        if namespace in before:
            assert st.rollout_id == before[namespace].rollout_id
        namespace_, _, name = st.record.partition("/")
        entries = unpack_record(shards.get(namespace_, "configmap", name))
        assert sum(isinstance(e, StartEntry) for e in entries) == 1, namespace
        assert isinstance(entries[-1], EndEntry) and entries[-1].outcome == "promoted"
        writes = shards.writes(namespace)
        assert _weights(writes) == [0, 30, 50, 70, 100, 0], (namespace, _weights(writes))
        # One actor at a time: each replica's writes are one unbroken run.
        runs = [key for key, _ in groupby(_credential(e) for e in writes)]
        assert len(runs) == len(set(runs)), (namespace, runs)
        first = runs[0]
        holder = a if namespace in BY_SHARD[shard_of_a] else b
        assert first == holder.credential, (namespace, runs)
        notes = [e.message for e in entries if isinstance(e, NoteEntry)]
        if namespace in before:
            assert len(runs) >= 2 and a.credential not in runs[1:], runs
            resumed = [
                n for n in notes if n.startswith(("resumed by replica-b", "resumed by replica-c"))
            ]
            assert resumed, notes
            carried_on += sum("counts carried on from the state saved" in n for n in resumed)
            analysis_carried += sum(
                "the analysis carried on from the state saved with the record" in n for n in resumed
            )
        else:
            # b's shard stays b's unless c asked for it after the kill (then c resumes it).
            assert set(runs) <= {b.credential, c.credential}, runs

    # Each saves its counting state with its record's writes, unless a read is applying to
    # its series just then (a few ms a second here): one of two is all that is sure.
    assert carried_on >= 1, shards.logs()[-4000:]
    # The analysis state is saved with every write of the record: a resume takes it up
    # from the head alone unless the status and the record were saved at different looks.
    assert analysis_carried >= 1, shards.logs()[-4000:]

    # The survivors looked at the moved apps' Services in their cache of the Services canary
    # manages (listed and watched by label), not with two GETs a resume as before.
    survivors = {b.credential, c.credential}
    services = [
        e
        for e in shards.cluster.audit_events()
        if e["stage"] == "ResponseComplete"
        and (e.get("objectRef") or {}).get("resource") == "services"
        and _credential(e) in survivors
    ]
    watched = [e for e in services if e["verb"] in ("list", "watch")]
    assert watched and all(
        "labelSelector=app.kubernetes.io/managed-by=canary" in unquote(e["requestURI"])
        for e in watched
    ), [e["requestURI"] for e in watched]
    gets_after = [
        e
        for e in services
        if e["verb"] == "get"
        and _wall(e["requestReceivedTimestamp"]) > killed_at
        and (e.get("objectRef") or {}).get("namespace") in BY_SHARD[shard_of_a]
    ]
    # (not 0 for sure: a read between two watch streams GETs, as it should)
    assert len(gets_after) < 2 * len(BY_SHARD[shard_of_a]), gets_after

    codes = {r.name: r.stop() for r in (b, c)}
    assert codes == {"replica-b": 0, "replica-c": 0}, shards.logs()
    assert shards.holders() == ["", ""]
    text = "\n".join(r.text() for r in shards.replicas.values()).lower()
    assert "forbidden" not in text and " 403" not in text, text[-4000:]


def test_a_paused_holder_writes_nothing_once_its_shard_is_taken(shards: Shards) -> None:
    """Fencing on the real API server: replica-d is frozen (SIGSTOP) mid-rollout, as a long
    GC pause or a stalled node would, for longer than the Lease duration; another replica
    takes its shard and resumes the rollouts. Thawed (SIGCONT), d finds its hold lapsed (its
    renew deadline passed on the monotonic clock) and stops its rollouts: after the new
    holder's first write, none of d's writes comes before d has taken a shard again through
    its Lease (a hand-over among the three may give it one). Every rollout still ends
    promoted with one start in its record and its weights in order."""
    d = shards.start("replica-d")
    shards.wait("replica-d to hold both shards", lambda: shards.holders() == ["replica-d"] * 2)
    e = shards.start("replica-e")
    split = shards.wait(
        "one shard each",
        lambda: (h := shards.holders()) and sorted(h) == ["replica-d", "replica-e"] and h,
    )
    f = shards.start("replica-f")
    shards.wait("replica-f serving", lambda: f.http("/healthz")[0] == 200)
    shard_of_d = split.index("replica-d")
    previous = {}
    for namespace in NAMESPACES:
        st = shards.state(namespace)
        assert st is not None and st.rollout is not None and st.rollout.done
        previous[namespace] = st.rollout_id
        shards.cluster.kubectl(
            "set", "image", "deployment/app", f"app={NEWER_IMAGE}", "-n", namespace
        )
    for namespace in BY_SHARD[shard_of_d]:
        shards.wait(
            f"{namespace} past its first step",
            lambda ns=namespace: (  # type: ignore[misc]
                (s := shards.state(ns))
                and s.rollout_id != previous[ns]
                and s.rollout
                and s.rollout.step >= 1
                and s.rollout.weight_verified
                and not s.rollout.done
            ),
        )
    assert d.process is not None
    os.kill(d.process.pid, signal.SIGSTOP)
    try:
        taken = shards.wait(
            "replica-d's shard taken over",
            lambda: (holder := shards.holders()[shard_of_d]) not in ("", "replica-d") and holder,
        )
        successor = shards.replicas[taken]
        shards.wait(
            "the new holder writing about d's rollouts",
            lambda: any(
                _credential(w) == successor.credential
                for ns in BY_SHARD[shard_of_d]
                for w in shards.writes(ns)
            ),
        )
    finally:
        os.kill(d.process.pid, signal.SIGCONT)
    thawed = time.time()
    cut = min(
        _wall(w["stageTimestamp"])
        for ns in BY_SHARD[shard_of_d]
        for w in shards.writes(ns)
        if _credential(w) == successor.credential
    )
    lost = f"lost {shard_lease_name(PREFIX, shard_of_d, SHARDS)}: stopping its rollouts"
    shards.wait("d to notice its lapsed hold", lambda: lost in d.text())
    assert cut < thawed

    def taken_again() -> float | None:
        """When d took a shard again after the thaw, if it did (its log's local time)."""
        acquired = [
            datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            for line in d.text().splitlines()
            if ": replica-d acquired it (" in line
        ]
        return min((at for at in acquired if at > thawed), default=None)

    for namespace in NAMESPACES:
        st = shards.wait(
            f"{namespace} promoted again",
            lambda ns=namespace: (  # type: ignore[misc]
                (s := shards.state(ns))
                and s.rollout_id != previous[ns]
                and s.rollout
                and s.rollout.done
                and s
            ),
        )
        assert st.rollout is not None and st.rollout.outcome == "promoted", st.rollout
        namespace_, _, name = st.record.partition("/")
        entries = unpack_record(shards.get(namespace_, "configmap", name))
        assert sum(isinstance(x, StartEntry) for x in entries) == 1, namespace
        writes = shards.writes(namespace)
        # The first rollout's weights (the test above), then this one's, never backwards.
        assert _weights(writes) == [0, 30, 50, 70, 100, 0, 30, 50, 70, 100, 0], namespace
        this = [w for w in writes if _credential(w) in {d.credential, e.credential, f.credential}]
        if namespace in BY_SHARD[shard_of_d]:
            assert _credential(this[0]) == d.credential
        # Fenced: after the new holder's first write, d writes only once it has taken a
        # shard again (it may: a hand-over leaves a Lease free for whoever looks first).
        late = [_wall(w["stageTimestamp"]) for w in this if _credential(w) == d.credential]
        late = [at for at in late if at > cut]
        again = taken_again()
        assert all(again is not None and at > again for at in late), (namespace, late, again)
    codes = {r.name: r.stop() for r in (d, e, f)}
    assert codes == {"replica-d": 0, "replica-e": 0, "replica-f": 0}, shards.logs()
    assert shards.holders() == ["", ""]
