"""Where `canary status|promote|abort|pause|resume` go: a `canary run` server or a cluster.

The rule is kubectl's: explicit flags first, then $KUBECONFIG, ~/.kube/config or a pod's
service account, else the static server. The decision is a table over environments (HOME is a
temporary directory, so the machine's own ~/.kube never counts); one run goes to the emulator
through the real client with only $KUBECONFIG set.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.kube import deployment
from support.kube_emulator import KubeEmulator

from canary.cli.common import target_mode
from canary.cli.main import build_parser, main
from canary.demo.procs import free_port
from canary.kubernetes.spec import ANNOTATION_COMMAND

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENTS = ("apps", "v1", "deployments")


@pytest.mark.parametrize(
    ("argv", "env", "kube_config_file", "mode", "why"),
    [
        (["status"], {}, False, "server", "no kubeconfig was found"),
        (["status"], {}, True, "cluster", "/.kube/config exists"),
        (["status"], {"KUBECONFIG": "/k"}, False, "cluster", "$KUBECONFIG is set"),
        (["status"], {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, False, "cluster", "in a pod"),
        (["status"], {"CANARY_SERVER": "http://h:1"}, True, "server", "$CANARY_SERVER is set"),
        (["status", "--server", "http://h:1"], {"KUBECONFIG": "/k"}, True, "server", "--server"),
        (["pause", "app", "-n", "shop"], {}, False, "cluster", "-n was given"),
        (
            ["abort", "app", "--context", "prod"],
            {"CANARY_SERVER": "x"},
            False,
            "cluster",
            "--context",
        ),
        (["status", "--kubeconfig", "/k"], {}, False, "cluster", "--kubeconfig was given"),
    ],
)
def test_the_target_follows_kubectls_defaults(
    tmp_path: Path,
    argv: list[str],
    env: dict[str, str],
    kube_config_file: bool,
    mode: str,
    why: str,
) -> None:
    """Flags decide first; with none, $CANARY_SERVER, $KUBECONFIG, ~/.kube/config and a pod pick, else the static server."""
    if kube_config_file:
        (tmp_path / ".kube").mkdir()
        (tmp_path / ".kube" / "config").write_text("{}")
    args = build_parser().parse_args(argv)
    got_mode, got_why, by_default = target_mode(args, environ={"HOME": str(tmp_path), **env})
    assert got_mode == mode and why in got_why, got_why
    assert by_default == (not any(a.startswith("-") for a in argv[1:]))


def test_server_and_cluster_flags_together_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """--server with -n names both and exits 2 instead of silently picking one."""
    assert main(["status", "--server", "http://127.0.0.1:1", "-n", "shop"]) == 2
    err = capsys.readouterr().err
    assert "--server and -n name different targets" in err


def test_a_cluster_chosen_by_default_says_why_when_it_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing $KUBECONFIG file fails with the loader's error plus why a cluster was tried and how to pick a server."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("CANARY_SERVER", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert main(["status", "app"]) == 3
    err = capsys.readouterr().err
    assert "a cluster was tried because $KUBECONFIG is set" in err
    assert "give --server URL" in err


def test_a_server_chosen_by_default_says_why_when_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With no kubeconfig anywhere, an unreachable default server's error says no kubeconfig was found and how to pick a cluster."""
    import canary.cli.common

    for name in ("KUBECONFIG", "CANARY_SERVER", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(canary.cli.common, "DEFAULT_LISTEN", f"127.0.0.1:{free_port()}")
    assert main(["pause", "app"]) == 3
    err = capsys.readouterr().err
    assert "cannot reach the controller at http://127.0.0.1:" in err
    assert "tried because no kubeconfig was found" in err
    assert "for a cluster give --kubeconfig, --context or -n" in err


def test_help_states_the_rule(capsys: pytest.CaptureFixture[str]) -> None:
    """`canary status --help` says which target is used when no flag is given."""
    with pytest.raises(SystemExit):
        main(["status", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "a cluster when $KUBECONFIG is set, ~/.kube/config exists or in a pod" in out


async def test_with_only_kubeconfig_set_the_commands_go_to_the_cluster(
    api: KubeEmulator, tmp_path: Path
) -> None:
    """No flags, $KUBECONFIG set: `canary status` reads and `canary pause` writes the emulated cluster's Deployment."""
    api.put(*DEPLOYMENTS, deployment(**{"canary.dev/enabled": "true"}))
    kubeconfig = api.write_kubeconfig(tmp_path / "kc")
    env = {
        k: v for k, v in os.environ.items() if k not in ("CANARY_SERVER", "KUBERNETES_SERVICE_HOST")
    }
    env.update(
        KUBECONFIG=str(kubeconfig), HOME=str(tmp_path), PYTHONPATH=str(ROOT), CANARY_WAIT="0.5"
    )

    async def canary(*argv: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "canary",
            *argv,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        return int(proc.returncode or 0), out.decode()

    code, out = await canary("status", "app")
    assert code == 0 and re.search(r"^default/app +not initialized yet", out, re.M), out
    code, out = await canary("pause", "app", "--who", "carol", "--reason", "look")
    # nothing runs the controller here: the command is written, then no answer (exit 3)
    assert code == 3 and "has not answered" in out, out
    stored = api.objects[("apps", "v1", "deployments", "default", "app")]
    request = json.loads(stored["metadata"]["annotations"][ANNOTATION_COMMAND])
    assert (request["command"], request["who"], request["reason"]) == ("pause", "carol", "look")
