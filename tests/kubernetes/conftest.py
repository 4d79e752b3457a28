"""Fixtures for the Kubernetes tests: an emulated API server and the real client on it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.kube import FAST_RETRY
from support.kube_emulator import KubeEmulator

from canary.kubernetes.client import Kube


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
