"""canary/kubernetes/_lean_client.py: the controller loads the client it uses, not the ~850
generated modules behind `import kubernetes_asyncio.client` (~38 MiB per controller, issue 13),
and any name asked for still gives the real class.

Imports are checked in fresh interpreters: this one may have imported anything already.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from canary.kubernetes.client import Kube

ROOT = Path(__file__).resolve().parents[2]
# A model and an API the controller never touches: neither may be loaded.
UNUSED = (
    "kubernetes_asyncio.client.models.v1_deployment",
    "kubernetes_asyncio.client.api.batch_v1_api",
)
# The lean client loads ~35 kubernetes_asyncio modules; the whole one, over 850.
MAX_MODULES = 100


def _python(code: str, *, path: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys([str(path), str(ROOT)]))}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


def _loads_little(module: str, then: str = "") -> subprocess.CompletedProcess[str]:
    return _python(f"""
        import contextlib, io, sys
        import {module}
        {then}
        loaded = [m for m in sys.modules if m.split(".")[0] == "kubernetes_asyncio"]
        assert not set({UNUSED!r}) & set(loaded), sorted(set({UNUSED!r}) & set(loaded))
        assert len(loaded) < {MAX_MODULES}, len(loaded)
        print(len(loaded))
    """)


# `canary kubernetes --help` builds every subcommand's parser, and so imports the operator.
CLI_HELP = (
    "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit): "
    "canary.cli.main.main(['kubernetes', '--help'])"
)


@pytest.mark.parametrize(
    ("module", "then"),
    [
        ("canary.kubernetes.client", ""),
        ("canary.kubernetes.operator", ""),
        ("canary.cli.main", ""),
        ("canary.cli.main", CLI_HELP),
    ],
)
def test_the_controller_loads_only_the_client_it_uses(module: str, then: str) -> None:
    result = _loads_little(module, then)
    assert result.returncode == 0, result.stderr[-2000:]
    if module != "canary.cli.main" or then:  # main alone defers the client altogether
        assert int(result.stdout) > 20, "the client was not loaded at all"


def test_the_operator_loads_the_apis_it_calls() -> None:
    """Not vacuous: the lean client is there, with the APIs Kube builds, and nothing else."""
    result = _python("""
        import sys
        import canary.kubernetes.operator
        apis = sorted(m.rpartition(".")[2] for m in sys.modules
                      if m.startswith("kubernetes_asyncio.client.api."))
        print(" ".join(apis))
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [
        "apps_v1_api", "authentication_v1_api", "authorization_v1_api", "autoscaling_v2_api",
        "coordination_v1_api", "core_v1_api", "custom_objects_api", "networking_v1_api",
    ]  # fmt: skip


def test_the_import_check_can_fail() -> None:
    result = _loads_little("kubernetes_asyncio.client")
    assert result.returncode != 0 and "AssertionError" in result.stderr


def test_any_name_still_gives_the_real_class() -> None:
    """Models and APIs load on first use, by name, from the client package or its own;
    `ApiClient.deserialize` (models looked up by name) works; unknown names stay unknown."""
    result = _python("""
        import asyncio, importlib, sys
        import canary.kubernetes.client
        import kubernetes_asyncio.client as client
        from kubernetes_asyncio.client import V1Deployment
        from kubernetes_asyncio.client.api import BatchV1Api
        from kubernetes_asyncio.client.models import V1Lease

        assert client.__spec__.origin is None  # the lean package, not the generated one
        assert client.__version__ == importlib.import_module("kubernetes_asyncio").__version__
        real = importlib.import_module("kubernetes_asyncio.client.models.v1_deployment")
        assert V1Deployment is real.V1Deployment is client.models.V1Deployment
        assert BatchV1Api is client.BatchV1Api
        assert BatchV1Api.__module__ == "kubernetes_asyncio.client.api.batch_v1_api"
        assert V1Lease(spec={"holderIdentity": "a"}).spec == {"holderIdentity": "a"}
        assert "V1Pod" in client.__all__ and "V1Pod" in dir(client.models)
        assert "kubernetes_asyncio.client.models.v1_pod" not in sys.modules
        assert not hasattr(client, "V1NoSuchThing")
        from kubernetes_asyncio.client import rest  # a submodule, not a generated name
        assert rest.__name__ == "kubernetes_asyncio.client.rest"

        class Answer:
            data = '{"metadata": {"name": "x"}, "spec": {"holderIdentity": "h"}}'

        async def decode():
            async with client.ApiClient() as api:
                return api.deserialize(Answer(), "V1Lease")

        lease = asyncio.run(decode())
        assert type(lease) is V1Lease and lease.spec.holder_identity == "h", lease
        print("ok")
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"


def test_a_client_imported_whole_is_used_as_it_is() -> None:
    result = _python("""
        import sys
        import kubernetes_asyncio.client
        whole = sys.modules["kubernetes_asyncio.client"]
        import canary.kubernetes.client as ours
        assert ours.k8s is whole and whole.__spec__.origin.endswith("__init__.py")
        assert "kubernetes_asyncio.client.models.v1_deployment" in sys.modules
        print("ok")
    """)
    assert result.returncode == 0, result.stderr[-2000:]


def test_an_unknown_layout_fails_loudly(tmp_path: Path) -> None:
    """A kubernetes_asyncio whose client no longer declares an API the controller uses fails
    at import with LeanClientError, naming the API, not later as a half-loaded client."""
    client = tmp_path / "kubernetes_asyncio" / "client"
    for package in (client / "api", client / "models"):
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("")
    (tmp_path / "kubernetes_asyncio" / "__init__.py").write_text("")
    (client / "__init__.py").write_text(
        "from kubernetes_asyncio.client.api_client import ApiClient\n"
        "from kubernetes_asyncio.client.configuration import Configuration\n"
        "from kubernetes_asyncio.client.exceptions import ApiException\n"
    )
    (client / "api_client.py").write_text("class ApiClient: pass\n")
    (client / "configuration.py").write_text("class Configuration: pass\n")
    (client / "exceptions.py").write_text("class ApiException(Exception): pass\n")
    result = _python("import canary.kubernetes.client", path=tmp_path)
    assert result.returncode != 0
    assert "LeanClientError: kubernetes_asyncio.client.AppsV1Api does not load" in result.stderr

    (client / "models" / "__init__.py").unlink()
    (client / "models").rmdir()
    result = _python("import canary.kubernetes.client", path=tmp_path)
    assert "LeanClientError: kubernetes_asyncio.client.models: no " in result.stderr


async def test_in_cluster_connect_builds_a_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a pod (KUBERNETES_SERVICE_HOST set, no kubeconfig given), `Kube.connect` reads the
    service account's token and CA from the files the library knows and targets the Service."""
    from kubernetes_asyncio.config import incluster_config

    certifi = pytest.importorskip("certifi")  # any real PEM bundle serves as the CA file
    token = tmp_path / "token"
    token.write_text("sa-token")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", certifi.where())
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    async with await Kube.connect() as kube:
        configuration = kube._api.configuration
        assert configuration.host == "https://10.96.0.1:443"
        assert configuration.ssl_ca_cert == certifi.where()
        assert configuration.api_key["BearerToken"] == "Bearer sa-token"
