"""`canary status` against the emulated API server through the real client: the kubeconfig
context's namespace by default, -A, -o json|yaml parsed back, --wait's exit statuses while
another actor (here the test, as the controller would) moves the status annotation on, and
--watch in a pseudo-terminal ended by SIGTERM.

`main()` runs in a thread (it calls asyncio.run) while the emulator serves on the test's loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import select
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.kube import deployment
from support.kube_emulator import KubeEmulator

from canary.cli.kubernetes import context_namespace
from canary.cli.main import main
from canary.core.rollout import RolloutStatus
from canary.kubernetes.operator import KubeState

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENTS = ("apps", "v1", "deployments")


def _annotated(name: str, namespace: str, rollout: RolloutStatus | None) -> dict[str, Any]:
    state = KubeState(rollout=rollout, rollout_id=f"{namespace}/{name}@1")
    return deployment(
        name,
        namespace,
        **{
            "canary.dev/enabled": "true",
            "canary.dev/steps": "10,50",
            "canary.dev/status": state.to_json(),
        },
    )


def _progressing(**changes: Any) -> RolloutStatus:
    values: dict[str, Any] = dict(
        stage="Progressing",
        revision="b",
        step=1,
        weight=50,
        step_started_at=time.time() - 75,
        last_decision="continue",
        message="analysing",
        advice="time to pass at 50%: about 2 min",
    )
    values.update(changes)
    return RolloutStatus(**values)


def _kubeconfig(api: KubeEmulator, path: Path, namespace: str | None) -> Path:
    api.write_kubeconfig(path)
    if namespace is not None:
        config = yaml.safe_load(path.read_text())
        config["contexts"][0]["context"]["namespace"] = namespace
        path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("CANARY_SERVER", "KUBERNETES_SERVICE_HOST", "KUBECONFIG", "CANARY_KC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "200")


async def _canary(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """main(argv) in a thread; --kubeconfig $CANARY_KC when the test set one."""
    extra = ["--kubeconfig", os.environ["CANARY_KC"]] if os.environ.get("CANARY_KC") else []
    code = await asyncio.to_thread(main, [*argv, *extra])
    out, err = capsys.readouterr()
    return code, out, err


async def test_the_namespace_is_the_kubeconfig_contexts_and_A_lists_every_one(
    api: KubeEmulator,
    tmp_path: Path,
    env: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No -n: the current context's namespace (as kubectl), default without one; -A all."""
    api.put(*DEPLOYMENTS, _annotated("app", "shop", _progressing()))
    api.put(*DEPLOYMENTS, _annotated("web", "default", _progressing(step=0, weight=10)))
    with_ns = _kubeconfig(api, tmp_path / "kc-shop", "shop")
    without = _kubeconfig(api, tmp_path / "kc-plain", None)
    assert context_namespace(str(with_ns), None) == "shop"
    assert context_namespace(None, None, {"KUBECONFIG": f"/missing:{with_ns}"}) == "shop"
    assert context_namespace(str(without), None) is None

    # (kubernetes_asyncio reads $KUBECONFIG once, at import: in-process runs give --kubeconfig)
    code, out, _ = await _canary(capsys, "status", "--kubeconfig", str(with_ns))
    assert code == 0 and "shop/app" in out and "default/web" not in out, out
    code, out, _ = await _canary(capsys, "status", "--kubeconfig", str(without))
    assert code == 0 and "default/web" in out and "shop/app" not in out, out
    code, out, _ = await _canary(capsys, "status", "--kubeconfig", str(without), "-A")
    assert code == 0 and "default/web" in out and "shop/app" in out, out
    # -n still wins over the context
    code, out, _ = await _canary(capsys, "status", "--kubeconfig", str(with_ns), "-n", "default")
    assert code == 0 and "default/web" in out and "shop/app" not in out, out


async def test_output_json_and_yaml_are_the_full_objects(
    api: KubeEmulator,
    tmp_path: Path,
    env: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """-o json and -o yaml parse back to the same objects, keys sorted; -o wide adds columns."""
    api.put(*DEPLOYMENTS, _annotated("app", "shop", _progressing()))
    api.put(*DEPLOYMENTS, _annotated("web", "default", None))
    monkeypatch.setenv("CANARY_KC", str(_kubeconfig(api, tmp_path / "kc", None)))
    code, out, _ = await _canary(capsys, "status", "-A", "-o", "json")
    assert code == 0
    data = json.loads(out)
    assert list(data) == ["rollouts"]
    by_name = {(r["namespace"], r["name"]): r for r in data["rollouts"]}
    assert set(by_name) == {("shop", "app"), ("default", "web")}
    app = by_name[("shop", "app")]
    assert list(app) == sorted(app)
    assert app["status"]["rollout"]["stage"] == "Progressing"
    assert app["status"]["rollout"]["weight"] == 50
    assert app["status"]["rollout_id"] == "shop/app@1"
    assert by_name[("default", "web")]["status"] == {"rollout_id": "default/web@1"}

    code, out, _ = await _canary(capsys, "status", "-A", "-o", "yaml")
    assert code == 0 and yaml.safe_load(out) == data
    first = yaml.safe_load(out)["rollouts"][0]
    assert list(first) == sorted(first) == ["name", "namespace", "spec_error", "status"]

    code, out, _ = await _canary(capsys, "status", "-n", "shop", "-o", "wide")
    assert code == 0
    header, row = out.splitlines()[:2]
    assert header.split()[-4:] == ["METRICS", "ROLLOUT", "RECORD", "MESSAGE"]
    assert row.split()[:7] == ["shop/app", "Progressing", "2/2", "50%", "/", "50%", "continue"]
    assert "1m15s" in row and "shop/app@1" in row and row.rstrip().endswith("analysing")


@pytest.mark.parametrize(
    ("goal", "end", "code"),
    [
        ("promoted", dict(stage="Succeeded", outcome="promoted", weight=0), 0),
        ("promoted", dict(stage="Failed", outcome="rolled_back", weight=0), 1),
        ("promoted", dict(stage="Failed", outcome="aborted", weight=0), 1),
        ("done", dict(stage="Failed", outcome="rolled_back", weight=0), 0),
        ("done", dict(stage="Succeeded", outcome="promoted", weight=0), 0),
    ],
)
async def test_wait_exits_by_how_the_rollout_ends(
    api: KubeEmulator,
    tmp_path: Path,
    env: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    goal: str,
    end: dict[str, Any],
    code: int,
) -> None:
    """--wait polls while the rollout progresses and exits when it ends: 0 reached, 1 not."""
    api.put(*DEPLOYMENTS, _annotated("app", "shop", _progressing()))
    monkeypatch.setenv("CANARY_KC", str(_kubeconfig(api, tmp_path / "kc", "shop")))
    waiting = asyncio.create_task(
        _canary(capsys, "status", "app", "--wait", goal, "--timeout", "30s", "--interval", "0.1")
    )
    await asyncio.sleep(0.5)
    assert not waiting.done()  # still progressing
    api.put(*DEPLOYMENTS, _annotated("app", "shop", _progressing(**end)))
    got, out, _ = await asyncio.wait_for(waiting, 10)
    assert got == code, out
    assert out.splitlines()[0].startswith("shop/app: Progressing step 2/2")
    assert out.splitlines()[-1].startswith(f"shop/app: {end['outcome']}")


async def test_wait_times_out_with_3_and_bad_usage_is_2(
    api: KubeEmulator,
    tmp_path: Path,
    env: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    api.put(*DEPLOYMENTS, _annotated("app", "shop", _progressing()))
    monkeypatch.setenv("CANARY_KC", str(_kubeconfig(api, tmp_path / "kc", "shop")))
    started = time.monotonic()
    code, out, _ = await _canary(
        capsys, "status", "app", "--wait", "promoted", "--timeout", "1s", "--interval", "0.2"
    )
    assert code == 3 and "timed out waiting for promoted" in out
    assert 0.9 < time.monotonic() - started < 5
    code, _, err = await _canary(capsys, "status", "--wait", "done")
    assert code == 2 and "--wait needs a rollout NAME" in err
    code, _, err = await _canary(capsys, "status", "app", "--wait", "done", "--timeout", "soon")
    assert code == 2 and "--timeout must be a duration" in err
    code, _, err = await _canary(capsys, "status", "nope", "--wait", "done")
    assert code == 4 and "no Deployment shop/nope" in err


def _read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                seen += os.read(fd, 65536)
            except OSError:
                break
    return seen


async def test_watch_in_a_terminal_redraws_and_sigterm_exits_0(
    api: KubeEmulator, tmp_path: Path
) -> None:
    """`canary status -w` on a pseudo-terminal: a frame, a redrawn one after a change, then
    exit 0 on SIGTERM."""
    api.put(*DEPLOYMENTS, _annotated("app", "shop", _progressing()))
    kubeconfig = _kubeconfig(api, tmp_path / "kc", "shop")
    env = {k: v for k, v in os.environ.items() if k not in ("CANARY_SERVER", "KUBERNETES_SERVICE_HOST")}  # fmt: skip
    env.update(
        KUBECONFIG=str(kubeconfig), HOME=str(tmp_path), PYTHONPATH=str(ROOT), TERM="xterm",
        COLUMNS="120", LINES="40",
    )  # fmt: skip
    master, slave = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "canary", "status", "-w", "--interval", "0.2",
        cwd=ROOT, env=env, stdin=slave, stdout=slave, stderr=slave,
    )  # fmt: skip
    os.close(slave)
    try:
        first = await asyncio.to_thread(_read_until, master, b"time to pass at 50%", 20)
        assert b"shop/app" in first and b"2/2" in first and b"Progressing" in first, first
        assert b"\x1b[" in first  # drawn for a terminal (cursor moves, colours)
        api.put(*DEPLOYMENTS, _annotated("app", "shop", _progressing(stage="Promoting")))
        later = await asyncio.to_thread(_read_until, master, b"Promoting", 20)
        assert b"Promoting" in later, later
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        os.close(master)


def test_help_documents_the_exit_statuses(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["status", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "1 with --wait: the rollout ended otherwise (rolled back or aborted)" in out
    assert "with --wait the --timeout passed" in out
