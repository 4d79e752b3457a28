"""`Kube.connect` as in a pod, on the real server: KUBERNETES_SERVICE_HOST/PORT, the service
account's token and CA read from the files kubernetes_asyncio knows (pointed at a tmp dir), no
kubeconfig; then a read, a Lease written and read back, and a watch, with the lean client
(canary/kubernetes/_lean_client.py)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import yaml
from kubernetes_asyncio.config import incluster_config
from support.control_plane import LOOPBACK, ControlPlane

from canary.kubernetes.client import Kube, NotFound, Relist, RetryPolicy

NAMESPACE = "canary-system"  # the Role grants Leases here


@pytest.fixture
def in_a_pod(
    cluster: ControlPlane,
    controller_kubeconfig: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The environment and files a pod of the controller's ServiceAccount would have."""
    config = yaml.safe_load(controller_kubeconfig.read_text())
    token = tmp_path / "token"
    token.write_text(config["users"][0]["user"]["token"])
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(cluster.ca_file))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", LOOPBACK)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(cluster.apiserver_port))
    monkeypatch.delenv("KUBECONFIG", raising=False)


@pytest.mark.usefixtures("in_a_pod")
async def test_in_cluster_connect_reads_writes_and_watches(cluster: ControlPlane) -> None:
    async with await Kube.connect(retry=RetryPolicy(attempts=1)) as kube:
        assert kube._api.configuration.host == cluster.server
        # 404, not 401/403: authenticated as the ServiceAccount, and authorized.
        with pytest.raises(NotFound):
            await kube.get_lease(NAMESPACE, "no-such-lease")
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "incluster-probe"},
            "spec": {"holderIdentity": "incluster-test", "leaseDurationSeconds": 15},
        }
        await kube.create_lease(NAMESPACE, body)
        lease = await kube.get_lease(NAMESPACE, "incluster-probe")
        assert lease["spec"]["holderIdentity"] == "incluster-test"

        stream = kube.watch_deployments(NAMESPACE, timeout_s=5)
        async with contextlib.aclosing(stream):
            first = await anext(stream)
        assert isinstance(first, Relist) and first.resource_version
