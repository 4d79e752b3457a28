"""The image built from the repo's Dockerfile (scripts/image: buildah on a debootstrap base)
runs `canary` from its root filesystem, as the image's non-root user, against the real cluster
with the controller's ServiceAccount token."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.control_plane import LOOPBACK, ControlPlane, free_port, write_kubeconfig

IMAGE_DIR = Path(os.environ.get("CANARY_CACHE") or Path.home() / ".cache" / "canary") / "image"
ROOTFS = IMAGE_DIR / "rootfs"


@pytest.fixture(scope="module")
def image() -> dict[str, Any]:
    """The unpacked image's OCI config; skipped when scripts/image has not run here."""
    if not (ROOTFS / ".image-config.json").is_file():
        why = f"no image root filesystem in {ROOTFS}; run scripts/image (root, buildah)"
        if os.environ.get("CI"):
            pytest.fail(why)  # .ci/run builds it: its absence there is a failure
        pytest.skip(why)
    if os.geteuid() != 0:
        pytest.skip("running from the image's root filesystem needs chroot, so root")
    config: dict[str, Any] = json.loads((ROOTFS / ".image-config.json").read_text())
    return config


def _chroot_argv(image: dict[str, Any], *args: str) -> list[str]:
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    return [chroot, f"--userspec={image['User']}", str(ROOTFS), *image["Entrypoint"], *args]


def _image_env(image: dict[str, Any]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in image.get("Env", []))


def test_image_runs_as_non_root_with_canary_as_entrypoint(image: dict[str, Any]) -> None:
    """The image's user is the uid manifests/ expects, its entrypoint `canary`; no dev tools."""
    assert image["User"] == "65532:65532"
    assert image["Entrypoint"] == ["canary"]
    site = list((ROOTFS / "opt" / "canary" / "lib").glob("python3*/site-packages"))
    assert len(site) == 1
    installed = {p.name.split("-")[0].lower() for p in site[0].glob("*.dist-info")}
    assert {"canary", "aiohttp", "kubernetes_asyncio", "numpy", "scipy"} <= installed
    assert not installed & {"pytest", "mypy", "ruff", "hypothesis", "pip"}


def test_canary_help_runs_from_the_image(image: dict[str, Any]) -> None:
    """`canary --help` from the image's root filesystem, as its user, lists the commands."""
    result = subprocess.run(
        _chroot_argv(image, "--help"),
        capture_output=True,
        text=True,
        env=_image_env(image),
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "kubernetes" in result.stdout


@contextlib.contextmanager
def _running(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def test_canary_kubernetes_from_the_image_takes_the_lease(
    image: dict[str, Any], cluster: ControlPlane, controller_kubeconfig: Path, tmp_path: Path
) -> None:
    """`canary kubernetes` from the image, with the ServiceAccount's token, becomes ready and
    takes its leader-election Lease on the real apiserver (RBAC enforced)."""
    token = json.loads(controller_kubeconfig.read_text())["users"][0]["user"]["token"]
    inside = Path("/tmp") / f"canary-test-{uuid.uuid4().hex[:8]}"
    host_dir = ROOTFS / inside.relative_to("/")
    host_dir.mkdir(parents=True)
    try:
        shutil.copy(cluster.ca_file, host_dir / "ca.crt")
        write_kubeconfig(
            host_dir / "kubeconfig",
            server=cluster.server,
            ca_file=inside / "ca.crt",
            user="canary",
            token=token,
        )
        os.chown(host_dir, 65532, 65532)
        for path in host_dir.iterdir():
            os.chown(path, 65532, 65532)
        cluster.kubectl("create", "namespace", "image-test", check=False)
        port = free_port()
        lease = f"image-{inside.name[-8:]}"
        argv = _chroot_argv(
            image,
            "kubernetes",
            f"--kubeconfig={inside / 'kubeconfig'}",
            "--namespace=image-test",
            "--leader-elect",
            f"--lease-name={lease}",
            "--lease-namespace=canary-system",
            "--identity=from-the-image",
            f"--listen={LOOPBACK}:{port}",
            f"--prometheus-url=http://{LOOPBACK}:9",
            "--record-namespace=canary-system",
        )
        with _running(argv, _image_env(image), tmp_path / "canary.log") as process:
            deadline = time.monotonic() + 120
            holder = None
            while holder != "from-the-image":
                assert process.poll() is None, (tmp_path / "canary.log").read_text()[-3000:]
                assert time.monotonic() < deadline, (tmp_path / "canary.log").read_text()[-3000:]
                got = cluster.kubectl(
                    "get", "lease", lease, "-n", "canary-system", "-o", "json", check=False
                )
                if got.returncode == 0:
                    holder = json.loads(got.stdout)["spec"].get("holderIdentity")
                time.sleep(0.5)
            conn = http.client.HTTPConnection(LOOPBACK, port, timeout=5)
            conn.request("GET", "/healthz")
            assert conn.getresponse().status == 200
            conn.close()
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)
