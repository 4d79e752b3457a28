"""Fixtures for the Kubernetes tests: an emulated API server and the real client on it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from canary.kube import Kube, RetryPolicy
from kube.emulator import KubeEmulator

# Short backoff: the tests exercise retries, not patience.
FAST_RETRY = RetryPolicy(attempts=4, initial_delay_s=0.01, max_delay_s=0.05)


@pytest.fixture
async def api() -> AsyncIterator[KubeEmulator]:
    async with KubeEmulator() as emulator:
        yield emulator


@pytest.fixture
async def kube(api: KubeEmulator, tmp_path: Path) -> AsyncIterator[Kube]:
    config = api.write_kubeconfig(tmp_path / "kubeconfig", token="token-a", context="test")
    client = await Kube.connect(kubeconfig=str(config), context="test", retry=FAST_RETRY)
    try:
        yield client
    finally:
        await client.close()


def deployment(name: str = "app", namespace: str = "default", **annotations: str) -> dict[str, Any]:
    """A minimal valid apps/v1 Deployment."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "annotations": dict(annotations)},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": name, "image": f"example/{name}:1"}]},
            },
        },
    }
