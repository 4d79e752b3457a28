"""A real Kubernetes control plane on 127.0.0.1 for the tests: etcd, kube-apiserver (RBAC on),
kube-controller-manager, kube-scheduler and kwok's fake nodes, built from source by
scripts/control-plane into a cache outside the repo.

Why real: what the emulator knows of API semantics (server-side validation, RBAC, defaulting,
Deployment status as the controller-manager writes it, CRD schemas) is only what it copies.

Layout of one cluster's work directory (everything a test may want to read after a failure):

    pki/          CA, serving and client certificates, the service-account signing key
    etcd/         etcd's data
    logs/*.log    each process's stdout and stderr
    audit.log     the apiserver's audit log of the controller's ServiceAccount (AUDIT_POLICY)
    admin.kubeconfig

Every process is started with its binary itself (no shell, no shim), in its own session, and
stopped by PID: SIGTERM, then SIGKILL of its process group. Certificates come from the openssl
command line, so the tests need no extra Python package.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
VERSIONS_FILE = REPO / "scripts" / "control-plane.versions"
MANIFESTS = REPO / "manifests"
LOOPBACK = "127.0.0.1"

BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
    "helm",
)

# kwok manages only nodes with this annotation; pods bound to them become Running and Ready.
KWOK_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
FAKE_NODES = ("kwok-node-0", "kwok-node-1", "kwok-node-2")
# Room for the scale benchmark (benchmarks/scale.py: two Services per app, 2,000 apps).
SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"

# The identity of the controller (manifests/serviceaccount.yaml) as the apiserver names it.
CONTROLLER_USER = "system:serviceaccount:canary-system:canary"
# The apiserver's audit policy: every request of the controller's ServiceAccount at Metadata
# (which rule of manifests/rbac.yaml it used), with the request body for its writes to the
# traffic objects (which weights it wrote, in order); the CLI users the tests make in
# namespaces named e2e-* with their bodies too (what a manual command sends). Nothing else:
# the control plane's own components would fill the file.
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [
        {
            "level": "Request",
            "users": [CONTROLLER_USER],
            "verbs": ["create", "patch", "update"],
            "resources": [
                {"group": "networking.k8s.io", "resources": ["ingresses"]},
                {"group": "gateway.networking.k8s.io", "resources": ["httproutes"]},
            ],
        },
        {"level": "Metadata", "users": [CONTROLLER_USER]},
        {
            "level": "Request",
            "userGroups": ["system:serviceaccounts:e2e-commands"],
            "resources": [{"group": "apps", "resources": ["deployments"]}],
        },
        {"level": "None"},
    ],
}

# Waits, not measurements: generous, because a 2-core machine may be busy with other suites.
START_TIMEOUT_S = 180.0
STOP_GRACE_S = 15.0


class ControlPlaneUnavailable(RuntimeError):
    """The binaries (or openssl) are missing: the tests that need them cannot run."""


class ControlPlaneError(RuntimeError):
    """A component did not start or a kubectl call failed; the message has its log's tail."""


def pinned_versions() -> dict[str, str]:
    """KEY=VALUE pairs of scripts/control-plane.versions (the one place versions are pinned)."""
    versions: dict[str, str] = {}
    for line in VERSIONS_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            versions[key.strip()] = value.strip()
    return versions


def cache_dir() -> Path:
    """Where scripts/control-plane puts these versions (the same formula as the script)."""
    v = pinned_versions()
    root = Path(os.environ.get("CANARY_CACHE") or Path.home() / ".cache" / "canary")
    name = (
        f"k8s-{v['KUBERNETES_VERSION']}.etcd-{v['ETCD_VERSION']}.kwok-{v['KWOK_VERSION']}"
        f".helm-{v['HELM_VERSION']}.gwapi-{v['GATEWAY_API_VERSION']}"
    )
    return root / "control-plane" / name


@dataclass(frozen=True)
class Toolbox:
    """The built binaries and the files extracted beside them."""

    root: Path

    def bin(self, name: str) -> str:
        return str(self.root / "bin" / name)

    @property
    def gateway_api_crds(self) -> Path:
        return self.root / "gateway-api"

    @property
    def kwok_stages(self) -> Path:
        return self.root / "kwok-stages"


def find_toolbox() -> Toolbox:
    """The cached build for the pinned versions, or ControlPlaneUnavailable saying what to run."""
    root = cache_dir()
    missing = [name for name in BINARIES if not os.access(root / "bin" / name, os.X_OK)]
    if not (root / "gateway-api" / ".complete").is_file():
        missing.append("gateway-api CRDs")
    if not (root / "kwok-stages" / ".complete").is_file():
        missing.append("kwok stages")
    if missing:
        raise ControlPlaneUnavailable(
            f"control plane not built in {root} (missing: {', '.join(missing)}); "
            "run scripts/control-plane (scripts/setup --all does)"
        )
    if shutil.which("openssl") is None:
        raise ControlPlaneUnavailable("openssl not on PATH (it makes the cluster's certificates)")
    return Toolbox(root)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Process:
    """One component: started with its binary, stopped by PID."""

    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def failure(self, why: str) -> ControlPlaneError:
        return ControlPlaneError(
            f"{self.name} (pid {self.pid}) {why}\n--- last lines of {self.log_path} ---\n"
            f"{_tail(self.log_path)}"
        )

    def stop(self) -> None:
        popen = self.popen
        if popen is None:
            return
        try:
            if popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(popen.pid, signal.SIGTERM)
                try:
                    popen.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(popen.pid, signal.SIGKILL)
                    popen.wait()
        finally:
            # Anything the component left in its own process group goes too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(popen.pid, signal.SIGKILL)


def _wait_until(
    process: Process, what: str, probe: Any, timeout_s: float = START_TIMEOUT_S
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if not process.alive:
            raise process.failure(
                f"exited (status {process.popen and process.popen.poll()}) before {what}"
            )
        try:
            if probe():
                return
        except (OSError, http.client.HTTPException, ssl.SSLError):
            pass
        if time.monotonic() >= deadline:
            raise process.failure(f"not ready after {timeout_s:g}s waiting for {what}")
        time.sleep(0.2)


def _http_ok(port: int, path: str, *, context: ssl.SSLContext | None = None) -> bool:
    conn: http.client.HTTPConnection
    if context is None:
        conn = http.client.HTTPConnection(LOOPBACK, port, timeout=5)
    else:
        conn = http.client.HTTPSConnection(LOOPBACK, port, timeout=5, context=context)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status == 200
    finally:
        conn.close()


def run_tool(
    toolbox: Toolbox,
    tool: str,
    *args: str,
    home: Path,
    kubeconfig: Path | None = None,
    stdin: str | None = None,
    check: bool = True,
    cwd: Path | None = None,
    timeout_s: float = 300.0,
) -> subprocess.CompletedProcess[str]:
    """Run one of the built tools (kubectl, helm) with a private HOME; raise on failure."""
    home.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        # helm keeps its caches and config out of the real home directory.
        "HELM_CACHE_HOME": str(home / "helm-cache"),
        "HELM_CONFIG_HOME": str(home / "helm-config"),
        "HELM_DATA_HOME": str(home / "helm-data"),
    }
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    result = subprocess.run(
        [toolbox.bin(tool), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout_s,
        check=False,
    )
    if check and result.returncode != 0:
        raise ControlPlaneError(
            f"{tool} {' '.join(args)} exited {result.returncode}:\n{result.stderr.strip()}"
        )
    return result


# --- certificates ------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise ControlPlaneError(f"openssl {' '.join(args)} failed: {result.stderr.strip()}")


def _ec_key(pki: Path, name: str) -> None:
    _openssl(
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        f"{name}.key",
        cwd=pki,
    )


def _signed_cert(pki: Path, name: str, subject: str, extensions: str) -> None:
    _ec_key(pki, name)
    _openssl("req", "-new", "-key", f"{name}.key", "-subj", subject, "-out", f"{name}.csr", cwd=pki)
    (pki / f"{name}.ext").write_text(extensions)
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "30",
        "-extfile",
        f"{name}.ext",
        "-out",
        f"{name}.crt",
        cwd=pki,
    )


CLIENT_EXT = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n"


def make_pki(pki: Path) -> None:
    """A CA, the apiserver's serving certificate, client certificates and the SA signing key."""
    pki.mkdir(parents=True, exist_ok=True)
    _ec_key(pki, "ca")
    _openssl(
        "req",
        "-x509",
        "-new",
        "-key",
        "ca.key",
        "-subj",
        "/CN=canary-test-ca",
        "-days",
        "30",
        "-out",
        "ca.crt",
        cwd=pki,
    )
    _signed_cert(
        pki,
        "apiserver",
        "/CN=kube-apiserver",
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,"
        "DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n",
    )
    # Client identities: the username is the CN, the groups are the Os.
    _signed_cert(pki, "admin", "/O=system:masters/CN=canary-test-admin", CLIENT_EXT)
    _signed_cert(pki, "controller-manager", "/CN=system:kube-controller-manager", CLIENT_EXT)
    _signed_cert(pki, "scheduler", "/CN=system:kube-scheduler", CLIENT_EXT)
    # The service-account token signing key (the apiserver signs, the controller-manager too).
    _ec_key(pki, "service-account")
    _openssl(
        "pkey", "-in", "service-account.key", "-pubout", "-out", "service-account.pub", cwd=pki
    )


def write_kubeconfig(
    path: Path,
    *,
    server: str,
    ca_file: Path,
    user: str,
    client_cert: Path | None = None,
    client_key: Path | None = None,
    token: str | None = None,
    namespace: str | None = None,
) -> Path:
    """A one-context kubeconfig (JSON, which every YAML reader takes)."""
    credentials: dict[str, str] = {}
    if client_cert is not None and client_key is not None:
        credentials = {"client-certificate": str(client_cert), "client-key": str(client_key)}
    if token is not None:
        credentials["token"] = token
    context: dict[str, str] = {"cluster": "test", "user": user}
    if namespace is not None:
        context["namespace"] = namespace
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "test", "cluster": {"server": server, "certificate-authority": str(ca_file)}}
        ],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": "test", "context": context}],
        "current-context": "test",
    }
    path.write_text(json.dumps(config, indent=2) + "\n")
    path.chmod(0o600)
    return path


# --- the cluster ---------------------------------------------------------------------------------


@dataclass
class ControlPlane:
    """One running cluster. Use `start_control_plane()`, which stops it afterwards."""

    toolbox: Toolbox
    workdir: Path
    # Extra kube-apiserver flags (after ours, so they win): e.g. --watch-cache=false.
    apiserver_args: tuple[str, ...] = ()
    # etcd and kube-apiserver only: no controllers, scheduler, nodes or CRDs. For tests of
    # the API's own semantics that need flags of their own, in a few seconds.
    api_only: bool = False
    processes: list[Process] = field(default_factory=list)
    apiserver_port: int = 0
    etcd_port: int = 0

    @property
    def pki(self) -> Path:
        return self.workdir / "pki"

    @property
    def server(self) -> str:
        return f"https://{LOOPBACK}:{self.apiserver_port}"

    @property
    def etcd_url(self) -> str:
        """etcd's client URL (plain HTTP on loopback; its v3 JSON gateway is under /v3/)."""
        return f"http://{LOOPBACK}:{self.etcd_port}"

    @property
    def ca_file(self) -> Path:
        return self.pki / "ca.crt"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    @property
    def audit_log(self) -> Path:
        return self.workdir / "audit.log"

    def audit_events(self) -> list[dict[str, Any]]:
        """The audit log's events so far (AUDIT_POLICY): one per request at ResponseComplete,
        and a long-running one (a watch) also at ResponseStarted, while it is open.

        In "blocking" mode the apiserver writes each event before it answers, so a request
        whose answer a test has seen is in the file."""
        events = []
        with contextlib.suppress(FileNotFoundError), self.audit_log.open() as lines:
            for line in lines:
                if not line.endswith("\n"):
                    break  # a line being written
                events.append(json.loads(line))
        return events

    # running commands

    def run(
        self,
        tool: str,
        *args: str,
        kubeconfig: Path | None = None,
        stdin: str | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl or helm against this cluster (admin unless `kubeconfig` says otherwise)."""
        return run_tool(
            self.toolbox,
            tool,
            *args,
            home=self.workdir / "home",
            kubeconfig=kubeconfig or self.admin_kubeconfig,
            stdin=stdin,
            check=check,
        )

    def kubectl(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.run("kubectl", *args, **kwargs)

    def helm(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.run("helm", *args, **kwargs)

    def get_json(self, *args: str, kubeconfig: Path | None = None) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json", kubeconfig=kubeconfig).stdout)

    # starting

    def _start(self, name: str, argv: Sequence[str]) -> Process:
        process = Process(name, [str(a) for a in argv], self.workdir / "logs" / f"{name}.log")
        self.processes.append(process)
        process.start()
        return process

    def start(self) -> None:
        (self.workdir / "home").mkdir(parents=True, exist_ok=True)
        make_pki(self.pki)
        pki = self.pki
        admin_tls = ssl.create_default_context(cafile=str(self.ca_file))
        admin_tls.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        # The components' own serving certificates are self-signed: their probes only check
        # that the process answers.
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE

        self.etcd_port = etcd_port = free_port()
        etcd_peer_port = free_port()
        etcd = self._start(
            "etcd",
            [
                self.toolbox.bin("etcd"),
                "--name=test",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls=http://{LOOPBACK}:{etcd_port}",
                f"--advertise-client-urls=http://{LOOPBACK}:{etcd_port}",
                f"--listen-peer-urls=http://{LOOPBACK}:{etcd_peer_port}",
                f"--initial-advertise-peer-urls=http://{LOOPBACK}:{etcd_peer_port}",
                f"--initial-cluster=test=http://{LOOPBACK}:{etcd_peer_port}",
                # A throwaway cluster: durability buys nothing, fsync costs the other suites.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        _wait_until(etcd, "GET /health", lambda: _http_ok(etcd_port, "/health"))

        self.apiserver_port = free_port()
        audit_policy = self.workdir / "audit-policy.json"
        audit_policy.write_text(json.dumps(AUDIT_POLICY, indent=2) + "\n")
        apiserver = self._start(
            "kube-apiserver",
            [
                self.toolbox.bin("kube-apiserver"),
                f"--etcd-servers=http://{LOOPBACK}:{etcd_port}",
                f"--bind-address={LOOPBACK}",
                f"--advertise-address={LOOPBACK}",
                f"--secure-port={self.apiserver_port}",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={self.ca_file}",
                "--authorization-mode=Node,RBAC",
                f"--service-account-key-file={pki / 'service-account.pub'}",
                f"--service-account-signing-key-file={pki / 'service-account.key'}",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                f"--audit-policy-file={audit_policy}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json",
                "--audit-log-mode=blocking",
                # The `kubernetes` Service's endpoints may not be a loopback address.
                "--endpoint-reconciler-type=none",
                "--profiling=false",
                *self.apiserver_args,
            ],
        )
        write_kubeconfig(
            self.admin_kubeconfig,
            server=self.server,
            ca_file=self.ca_file,
            user="admin",
            client_cert=pki / "admin.crt",
            client_key=pki / "admin.key",
        )
        _wait_until(
            apiserver,
            "GET /readyz",
            lambda: _http_ok(self.apiserver_port, "/readyz", context=admin_tls),
        )
        if self.api_only:
            return

        def component_kubeconfig(name: str) -> Path:
            return write_kubeconfig(
                self.workdir / f"{name}.kubeconfig",
                server=self.server,
                ca_file=self.ca_file,
                user=name,
                client_cert=pki / f"{name}.crt",
                client_key=pki / f"{name}.key",
            )

        kcm_config = component_kubeconfig("controller-manager")
        kcm_port = free_port()
        kcm = self._start(
            "kube-controller-manager",
            [
                self.toolbox.bin("kube-controller-manager"),
                f"--kubeconfig={kcm_config}",
                f"--authentication-kubeconfig={kcm_config}",
                f"--authorization-kubeconfig={kcm_config}",
                f"--bind-address={LOOPBACK}",
                f"--secure-port={kcm_port}",
                f"--cert-dir={self.workdir / 'kcm-certs'}",
                "--leader-elect=false",
                # Each controller acts as its own ServiceAccount, as in a real cluster.
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki / 'service-account.key'}",
                f"--root-ca-file={self.ca_file}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--profiling=false",
            ],
        )
        scheduler_config = component_kubeconfig("scheduler")
        scheduler_port = free_port()
        scheduler = self._start(
            "kube-scheduler",
            [
                self.toolbox.bin("kube-scheduler"),
                f"--kubeconfig={scheduler_config}",
                f"--authentication-kubeconfig={scheduler_config}",
                f"--authorization-kubeconfig={scheduler_config}",
                f"--bind-address={LOOPBACK}",
                f"--secure-port={scheduler_port}",
                "--leader-elect=false",
                "--profiling=false",
            ],
        )
        kwok_config = self.workdir / "kwok.yaml"
        kwok_config.write_text(self._kwok_stages())
        kwok_port = free_port()
        kwok = self._start(
            "kwok",
            [
                self.toolbox.bin("kwok"),
                f"--config={kwok_config}",
                f"--kubeconfig={self.admin_kubeconfig}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=" + "=".join(KWOK_NODE_ANNOTATION),
                f"--server-address={LOOPBACK}:{kwok_port}",
                f"--node-ip={LOOPBACK}",
                "--cidr=10.244.0.0/16",
                # Node Leases renewed like a kubelet: nodes stay Ready without status heartbeats.
                "--node-lease-duration-seconds=40",
            ],
        )
        _wait_until(kcm, "GET /healthz", lambda: _http_ok(kcm_port, "/healthz", context=insecure))
        _wait_until(
            scheduler,
            "GET /healthz",
            lambda: _http_ok(scheduler_port, "/healthz", context=insecure),
        )
        _wait_until(kwok, "GET /healthz", lambda: _http_ok(kwok_port, "/healthz"))

        self.kubectl("apply", "-f", "-", stdin=json.dumps(self._fake_nodes()))
        self.kubectl("wait", "--for=condition=Ready", "node", "--all", "--timeout=180s")
        # The Gateway API CRDs are large: server-side apply keeps them out of an annotation.
        self.kubectl("apply", "--server-side", "-f", str(self.toolbox.gateway_api_crds))
        self.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=180s")
        # Pods can only be created once the ServiceAccount controller made `default`.
        self._wait_for(
            "the default ServiceAccount",
            lambda: (
                self.kubectl(
                    "get", "serviceaccount", "default", "-n", "default", check=False
                ).returncode
                == 0
            ),
        )

    def _wait_for(self, what: str, probe: Any) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not probe():
            for process in self.processes:
                if not process.alive:
                    raise process.failure(f"exited while waiting for {what}")
            if time.monotonic() >= deadline:
                raise ControlPlaneError(f"not ready after {START_TIMEOUT_S:g}s: {what}")
            time.sleep(0.5)

    def _kwok_stages(self) -> str:
        """The Stage documents scripts/control-plane extracted (kustomizations left out)."""
        documents = []
        for path in sorted(self.toolbox.kwok_stages.glob("*.yaml")):
            text = path.read_text()
            if "kind: Stage" in text:
                documents.append(text.strip())
        if not documents:
            raise ControlPlaneError(f"no kwok Stage documents in {self.toolbox.kwok_stages}")
        return "\n---\n".join(documents) + "\n"

    def _fake_nodes(self) -> dict[str, Any]:
        key, value = KWOK_NODE_ANNOTATION
        return {
            "apiVersion": "v1",
            "kind": "List",
            "items": [
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": name,
                        "annotations": {key: value},
                        "labels": {
                            "kubernetes.io/hostname": name,
                            "kubernetes.io/os": "linux",
                            "kubernetes.io/arch": "amd64",
                            "type": "kwok",
                        },
                    },
                    "status": {
                        "allocatable": {"cpu": "32", "memory": "256Gi", "pods": "5000"},
                        "capacity": {"cpu": "32", "memory": "256Gi", "pods": "5000"},
                    },
                }
                for name in FAKE_NODES
            ],
        }

    def stop(self) -> None:
        errors = []
        for process in reversed(self.processes):
            try:
                process.stop()
            except Exception as exc:  # keep stopping the others
                errors.append(f"{process.name}: {exc}")
        if errors:
            raise ControlPlaneError("could not stop: " + "; ".join(errors))

    # the controller's identity

    def service_account_kubeconfig(
        self,
        path: Path,
        *,
        namespace: str = "canary-system",
        name: str = "canary",
        duration: str = "24h",
    ) -> Path:
        """A kubeconfig that acts as the controller's ServiceAccount from manifests/.

        Applies manifests/namespace.yaml, serviceaccount.yaml and rbac.yaml (the identity and
        its permissions, not the Deployment), asks the TokenRequest API for a token, and
        writes a kubeconfig with it: whatever runs with it has exactly manifests/rbac.yaml.
        """
        self.kubectl(
            "apply",
            "-f",
            str(MANIFESTS / "namespace.yaml"),
            "-f",
            str(MANIFESTS / "serviceaccount.yaml"),
            "-f",
            str(MANIFESTS / "rbac.yaml"),
        )
        token = self.kubectl(
            "create", "token", name, "-n", namespace, f"--duration={duration}"
        ).stdout.strip()
        if not token:
            raise ControlPlaneError(f"TokenRequest for {namespace}/{name} returned no token")
        return write_kubeconfig(
            path,
            server=self.server,
            ca_file=self.ca_file,
            user=f"system:serviceaccount:{namespace}:{name}",
            token=token,
            namespace=namespace,
        )


@contextlib.contextmanager
def start_control_plane(
    workdir: Path,
    toolbox: Toolbox | None = None,
    *,
    apiserver_args: Sequence[str] = (),
    api_only: bool = False,
) -> Iterator[ControlPlane]:
    """Start a cluster in `workdir` and stop every process by PID afterwards, even on failure.

    `apiserver_args` are extra kube-apiserver flags; `api_only` starts etcd and the apiserver
    alone (see ControlPlane)."""
    cluster = ControlPlane(
        toolbox or find_toolbox(),
        workdir,
        apiserver_args=tuple(apiserver_args),
        api_only=api_only,
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
