"""Fixtures for the tests on a real control plane (tests/support/control_plane.py).

One cluster for the whole session: starting etcd, kube-apiserver, the controller-manager,
the scheduler and kwok costs far more than any test here. Tests keep to their own namespaces
(or names) so that they do not see each other.

Without the binaries (scripts/control-plane not run) the tests are skipped with the command
to run; under CI (CI set) they fail instead, because a skipped real-server test proves nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.control_plane import (
    ControlPlane,
    ControlPlaneUnavailable,
    Toolbox,
    find_toolbox,
    start_control_plane,
)

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The first test here also starts the cluster (within its timeout): give these tests
    more than the suite's default, which a busy 2-core machine could exceed."""
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.timeout(900))


@pytest.fixture(scope="session")
def toolbox() -> Toolbox:
    try:
        return find_toolbox()
    except ControlPlaneUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def cluster(toolbox: Toolbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A running control plane with kwok nodes and the Gateway API CRDs; admin kubeconfig."""
    with start_control_plane(tmp_path_factory.mktemp("cluster"), toolbox) as running:
        yield running


@pytest.fixture(scope="session")
def controller_kubeconfig(cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kubeconfig with a TokenRequest token of the controller's ServiceAccount (manifests/)."""
    return cluster.service_account_kubeconfig(tmp_path_factory.mktemp("controller") / "kubeconfig")
