"""The `canary` command: argument parsing, config errors, and `canary run` against real HAProxy.

The end-to-end test starts `python -m canary run` as a real process (with sys.executable)
in front of a real HAProxy, drives it with `canary pause|resume|status` through its HTTP
server, then sends SIGTERM and checks that the weight stayed and the record is whole.
Prometheus is deliberately absent there (a closed port): the controller must hold at the
first step on "no data" rather than crash or move.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console
from support.pool import ProcessPool

from canary.cli.common import (
    EXIT_BAD_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_STOPPED,
    EXIT_UNKNOWN,
    parse_listen,
)
from canary.cli.main import _user, build_parser, main
from canary.core.records import EndEntry, ManualEntry, NoteEntry, StartEntry, TickEntry, read_record
from canary.demo.procs import HAProxyConfig, HAProxyProcess, HttpReady, ManagedProcess, free_port


def test_parser_knows_every_subcommand() -> None:
    """run, the manual commands, status, demo and the report, kubernetes and clusters
    subcommands are all registered."""
    parser = build_parser()
    for argv in (
        ["run", "--config", "a.yaml", "--config", "b.yaml", "--listen", "127.0.0.1:0"],
        ["promote", "app", "--server", "http://127.0.0.1:1", "--reason", "ok"],
        ["abort", "app", "-n", "shop", "--context", "prod"],
        ["status"],
        ["validate", "a.yaml"],
        ["report", "app", "--format", "md"],
        ["kubernetes", "-A", "--leader-elect"],
        ["clusters", "--topology", "t.yaml"],
        ["failover", "--to", "standby", "--service", "app"],
        ["failback", "--reason", "ok"],
    ):
        args = parser.parse_args(argv)
        assert args.command == argv[0] and callable(args.func)
    args = parser.parse_args(["run", "--config", "a.yaml", "--config", "b.yaml"])
    assert args.config == ["a.yaml", "b.yaml"] and args.listen == "127.0.0.1:9310"


def test_run_needs_a_config(capsys: pytest.CaptureFixture[str]) -> None:
    """`canary run` without --config is a usage error (exit 2) naming the flag."""
    with pytest.raises(SystemExit) as info:
        main(["run"])
    assert info.value.code == 2
    assert "--config" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("localhost", "--listen must be HOST:PORT"),
        ("127.0.0.1:http", "--listen port must be a number, got 'http'"),
        ("127.0.0.1:70000", "--listen port must be within 0..65535, got 70000"),
    ],
)
def test_bad_listen_addresses_are_named(text: str, message: str) -> None:
    """Bad --listen values raise errors saying what is wrong."""
    with pytest.raises(ValueError) as info:
        parse_listen(text)
    assert message in str(info.value)


def test_listen_accepts_ipv6_brackets() -> None:
    """[::1]:9310 parses to the bare address and the port."""
    assert parse_listen("[::1]:9310") == ("::1", 9310)


def test_bad_config_exits_2_and_names_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config with a bad step exits 2 with the file and field in the message, before any I/O."""
    config = tmp_path / "rollout.yaml"
    config.write_text(
        "name: app\nrouter: {kind: haproxy, socket: /nope, backend: app}\n"
        "metrics: {kind: prometheus, url: 'http://127.0.0.1:1'}\nsteps: [10, 5]\n"
    )
    assert main(["run", "--config", str(config)]) == EXIT_BAD_CONFIG
    err = capsys.readouterr().err
    assert f"{config}: steps[1]: must be greater than 10, got 5" in err


def test_validate_prints_effective_settings_or_names_every_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`canary validate` prints a good file's settings with defaults filled in, and exits 2
    naming the file and field of a bad one."""
    good = tmp_path / "good.yaml"
    good.write_text(
        "name: app\nrouter: {kind: haproxy, socket: /s, backend: app}\n"
        "metrics: {kind: prometheus, url: 'http://127.0.0.1:1'}\n"
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text() + "tick_s: -1\n")
    assert main(["validate", str(good)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["steps"] == [5, 10, 25, 50] and shown["analysis"]["alpha"] == 0.01
    assert main(["validate", str(good), str(bad)]) == EXIT_BAD_CONFIG
    assert f"{bad}: tick_s: Input should be greater than 0" in capsys.readouterr().err


def test_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A config path that does not exist exits 2 and names the path."""
    assert main(["run", "--config", str(tmp_path / "gone.yaml")]) == EXIT_BAD_CONFIG
    assert "gone.yaml: cannot read" in capsys.readouterr().err


def test_duplicate_targets_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two config files for one target name are refused."""
    text = (
        "name: app\nrouter: {kind: haproxy, socket: /nope, backend: app}\n"
        "metrics: {kind: prometheus, url: 'http://127.0.0.1:1'}\n"
    )
    (tmp_path / "a.yaml").write_text(text)
    (tmp_path / "b.yaml").write_text(text)
    code = main(["run", "--config", str(tmp_path / "a.yaml"), "--config", str(tmp_path / "b.yaml")])
    assert code == EXIT_BAD_CONFIG
    assert "two config files name the target 'app'" in capsys.readouterr().err


def test_manual_command_without_a_server_says_where_it_looked(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A command for a controller that is not running exits 3 and names the URL tried."""
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["pause", "app", "--server", url]) == EXIT_STOPPED
    assert f"cannot reach the controller at {url}" in capsys.readouterr().err


def test_cluster_flags_go_to_the_cluster_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    """--namespace/--context route a manual command to canary.cli.kubernetes.manual_command(args)
    and `canary status` to its status(args)."""
    import canary.cli.kubernetes

    calls: list[tuple[str, str | None, str | None]] = []

    def manual_command(args: argparse.Namespace) -> int:
        calls.append((args.command, args.name, args.namespace))
        return 0

    def status(args: argparse.Namespace) -> int:
        calls.append((args.command, args.name, args.context))
        return 4

    monkeypatch.setattr(canary.cli.kubernetes, "manual_command", manual_command)
    monkeypatch.setattr(canary.cli.kubernetes, "status", status)
    assert main(["pause", "app", "-n", "shop"]) == 0
    assert main(["status", "--context", "prod"]) == 4  # the cluster's exit status, passed on
    assert calls == [("pause", "app", "shop"), ("status", None, "prod")]


def test_cluster_flags_with_an_unusable_kubeconfig(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Cluster flags never fall back to the static server: a kubeconfig that cannot be loaded
    gives a one-line error (exit 3), not a traceback."""
    missing = tmp_path / "no-such-kubeconfig"
    assert main(["abort", "app", "--kubeconfig", str(missing)]) == EXIT_STOPPED
    err = capsys.readouterr().err
    assert err.startswith("canary abort: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "cannot reach the controller" not in err


def test_cluster_command_answers_are_the_exit_statuses() -> None:
    """A cluster command's answer (canary.kubernetes.commands) is passed on as the exit status
    the manual commands document: 0 accepted, 1 refused, 3 no answer, 4 no such Deployment."""
    from canary.kubernetes import commands

    answers = (commands.ACCEPTED, commands.REFUSED, commands.NO_ANSWER, commands.UNKNOWN)
    assert answers == (EXIT_OK, EXIT_FAILED, EXIT_STOPPED, EXIT_UNKNOWN)


def test_python_dash_m_canary_runs_the_cli(tmp_path: Path) -> None:
    """`python -m canary` is the same CLI (it prints usage and exits 2 without a command)."""
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "canary"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2 and "usage: canary" in done.stderr


# ---- canary run, end to end with a real HAProxy ----------------------------------------------


def _get(url: str, token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(
        urllib.request.Request(url, headers=headers), timeout=5
    ) as response:
        return json.loads(response.read())


def _wait_for(predicate: Any, what: str, *, attempts: int = 300) -> Any:
    for _ in range(attempts):
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"never saw {what}")


def _haproxy(procs: ProcessPool, workdir: Path, sockdir: Path, binary: str) -> HAProxyConfig:
    primary_port, canary_port = free_port(), free_port()
    procs.support_server("name", primary_port, "primary")
    procs.support_server("name", canary_port, "canary")
    config = HAProxyConfig(
        frontend_port=free_port(),
        primary_addr=f"127.0.0.1:{primary_port}",
        canary_addr=f"127.0.0.1:{canary_port}",
        socket_path=sockdir / "admin.sock",
        state_file=workdir / "server-state",
    )
    procs.start(HAProxyProcess(config, workdir=workdir, binary=binary))
    return config


def _haproxy_weights(config: HAProxyConfig) -> dict[str, int]:
    import asyncio

    from canary.routers.haproxy import HAProxyRouter

    router = HAProxyRouter(config.socket_path, "app", "primary", "canary")
    return {"canary": asyncio.run(router.get_weight())}


@pytest.mark.slow
def test_run_serves_commands_and_stops_cleanly_on_sigterm(
    procs: ProcessPool,
    workdir: Path,
    sockdir: Path,
    haproxy_binary: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`canary run` sets 5% on a real HAProxy, holds without metrics, obeys pause/resume over
    HTTP, and on SIGTERM exits 3 leaving 5% in place and a whole record ending in a note."""
    haproxy = _haproxy(procs, workdir, sockdir, haproxy_binary)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = workdir / "rollout.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "app",
                "router": {
                    "kind": "haproxy",
                    "socket": str(haproxy.socket_path),
                    "backend": "app",
                    "state_file": str(haproxy.state_file),
                },
                # nothing listens there: every tick is "no data"
                "metrics": {
                    "kind": "prometheus",
                    "url": f"http://127.0.0.1:{free_port()}",
                    "timeout_s": 0.5,
                },
                "steps": [5, 20],
                "min_step_s": 1,
                "tick_s": 0.2,
                "no_data_deadline_s": 600,
                "record_dir": "records",
                "canary_version": "v2",
            }
        )
    )
    from canary.server.auth import create_token_file

    token_file = workdir / "canary.token"
    token = create_token_file(token_file)
    controller = procs.start(
        ManagedProcess(
            [
                sys.executable,
                "-m",
                "canary",
                "run",
                "--config",
                str(config),
                "--listen",
                f"127.0.0.1:{port}",
                "--token-file",
                str(token_file),
            ],
            log_path=workdir / "canary-run.log",
            ready=HttpReady(f"{url}/readyz"),
            name="canary-run",
        )
    )

    def first_step_verified() -> dict[str, Any] | None:
        state: dict[str, Any] = _get(f"{url}/rollouts/app", token)
        return state if state.get("weight_verified") and "weight_read" in state else None

    state = _wait_for(first_step_verified, "the first step verified and a tick")
    assert state["phase"] == "Progressing" and state["weight"] == 5 and state["weight_read"] == 5
    assert _haproxy_weights(haproxy) == {"canary": 5}

    assert (
        main(
            [
                "pause",
                "app",
                "--server",
                url,
                "--token-file",
                str(token_file),
                "--who",
                "alice",
                "--reason",
                "lunch",
            ]
        )
        == 0
    )
    assert "pause accepted; now Paused" in capsys.readouterr().out
    assert (
        main(["pause", "app", "--server", url, "--token-file", str(token_file)]) == 1
    )  # refused: already paused
    assert "already paused by alice" in capsys.readouterr().err
    # Without the server's token: refused (401), and the error says where a token was sought.
    missing = workdir / "no.token"
    assert main(["promote", "app", "--server", url, "--token-file", str(missing)]) == 2
    assert f"cannot read the token file {missing}" in capsys.readouterr().err
    assert main(["status", "--server", url, "--token-file", str(token_file)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^app +Paused +1/2 +5% / 5% ", out, re.M), out
    assert (
        main(["resume", "app", "--server", url, "--token-file", str(token_file), "--who", "alice"])
        == 0
    )
    assert main(["promote", "nope", "--server", url, "--token-file", str(token_file)]) == 4
    assert "no rollout named 'nope'" in capsys.readouterr().err

    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    labels = 'name="app",namespace=""'
    assert f'canary_rollout_phase{{{labels},phase="Progressing",rollout="app"}} 1.0' in metrics
    assert (
        f'canary_analysis_decisions_total{{decision="no_data",{labels},rollout="app"}}' in metrics
    )

    # canary.reports.pages' routes are plugged into the same server, behind the same token
    index = _get(f"{url}/reports/?format=json", token)
    assert [r["target"] for r in index["reports"]] == ["app"]

    code = controller.stop_sync()  # SIGTERM by PID, then wait
    assert code == EXIT_STOPPED, controller.log_tail()
    assert _haproxy_weights(haproxy) == {"canary": 5}  # weights stay where they were
    records = list((workdir / "records").glob("app-*.jsonl"))
    assert len(records) == 1
    entries = read_record(records[0])  # every line parses: nothing torn
    assert isinstance(entries[0], StartEntry) and entries[0].canary_version == "v2"
    ticks = [e for e in entries if isinstance(e, TickEntry)]
    assert ticks and all(t.no_data_reason and t.weight_set == 5 for t in ticks)
    manual = [(e.command, e.who, e.reason) for e in entries if isinstance(e, ManualEntry)]
    assert manual == [
        ("pause", "alice", "lunch"),
        ("pause", _user(), "refused"),
        ("resume", "alice", ""),
    ]
    assert not any(isinstance(e, EndEntry) for e in entries)
    last = entries[-1]
    assert isinstance(last, NoteEntry) and "controller stopped" in last.message

    # Started again, it resumes the same rollout in the same record at the same step.
    again = procs.start(
        ManagedProcess(
            controller.argv,
            log_path=workdir / "canary-run-2.log",
            ready=HttpReady(f"{url}/readyz"),
            name="canary-run-2",
        )
    )
    state = _wait_for(first_step_verified, "the resumed rollout ticking")
    assert state["record"] == str(records[0]) and state["step"] == 0 and state["weight"] == 5
    assert again.stop_sync() == EXIT_STOPPED, again.log_tail()
    assert list((workdir / "records").glob("app-*.jsonl")) == records
    entries = read_record(records[0])
    assert sum(isinstance(e, StartEntry) for e in entries) == 1
    notes = [e.message for e in entries if isinstance(e, NoteEntry)]
    assert any(n.startswith("resumed during Progressing at step 0 (5% wanted)") for n in notes)
    assert _haproxy_weights(haproxy) == {"canary": 5}


# ---- canary run to the end: real HAProxy, real Prometheus, real analysis -----------------------


@pytest.fixture(scope="module")
def prometheus_env(
    module_procs: ProcessPool, tmp_path_factory: pytest.TempPathFactory, prometheus_binary: str
) -> tuple[str, int]:
    """A Prometheus scraping a test exporter every second: (its URL, the exporter's port)."""
    from canary.demo.procs import PrometheusProcess

    exporter_port = free_port()
    module_procs.support_server("exporter", exporter_port)
    prometheus = PrometheusProcess(
        [f"127.0.0.1:{exporter_port}"],
        workdir=tmp_path_factory.mktemp("prometheus"),
        scrape_interval_s=1.0,
        binary=prometheus_binary,
    )
    module_procs.start(prometheus)
    return prometheus.url, exporter_port


class Traffic:
    """Counts requests at the exporter from a thread: 2000/s per arm, fixed error shares."""

    def __init__(self, port: int, primary: str, canary: str, canary_errors: int) -> None:
        import threading

        self.calls = [
            (primary, 200, 198),
            (primary, 500, 2),
            (canary, 200, 200 - canary_errors),
            (canary, 500, canary_errors),
        ]
        self.port = port
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            for version, code, n in self.calls:
                if n:
                    url = f"http://127.0.0.1:{self.port}/inc?version={version}&code={code}&n={n}&seconds=0.02"
                    with urllib.request.urlopen(url, timeout=5) as response:
                        response.read()

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "canary_errors", "exit_code", "weight", "outcome"),
    [("healthy", 2, 0, 100, "promoted"), ("broken", 40, 1, 0, "rolled_back")],
)
def test_run_promotes_a_good_canary_and_rolls_back_a_bad_one(
    procs: ProcessPool,
    workdir: Path,
    sockdir: Path,
    haproxy_binary: str,
    prometheus_env: tuple[str, int],
    case: str,
    canary_errors: int,
    exit_code: int,
    weight: int,
    outcome: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`canary run --config` ends on its own: exit 0 with 100% on the canary for a healthy
    one, exit 1 with 0% for one with 10x the errors; the record ends with that outcome.
    `canary status app --wait promoted` exits with the same status meanwhile."""
    import subprocess

    prometheus_url, exporter_port = prometheus_env
    haproxy = _haproxy(procs, workdir, sockdir, haproxy_binary)
    config = workdir / "rollout.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "app",
                "router": {"kind": "haproxy", "socket": str(haproxy.socket_path), "backend": "app"},
                "metrics": {
                    "kind": "prometheus",
                    "url": prometheus_url,
                    "queries": {"primary_arm": f"{case}-p", "canary_arm": f"{case}-c"},
                },
                "steps": [10, 50],
                "min_step_s": 1,
                "max_step_s": 60,
                "tick_s": 0.5,
                "no_data_deadline_s": 30,
                "record_dir": "records",
            }
        )
    )
    port = free_port()
    token_file = workdir / "records" / "canary.token"
    command = [sys.executable, "-m", "canary", "run", "--config", str(config)]
    command += ["--listen", f"127.0.0.1:{port}", "--linger", "5"]
    with (
        Traffic(exporter_port, f"{case}-p", f"{case}-c", canary_errors),
        subprocess.Popen(command, stderr=subprocess.PIPE, text=True) as running,
    ):
        _wait_for(lambda: token_file.exists() or None, "the token file")
        # Meanwhile `canary status app --wait promoted` follows it: 0 promoted, 1 rolled back
        # (`--linger` keeps the final state served after the rollout ends).
        server = ["--server", f"http://127.0.0.1:{port}", "--token-file", str(token_file)]
        wait = ["--wait", "promoted", "--timeout", "2m", "--interval", "0.3"]
        waited = main(["status", "app", *wait, *server])
        assert waited == exit_code
        assert capsys.readouterr().out.splitlines()[-1].startswith(f"app: {outcome}")
        _, stderr = running.communicate(timeout=120)
        done = subprocess.CompletedProcess(command, running.returncode, "", stderr)
    assert done.returncode == exit_code, done.stderr[-3000:]
    assert f"canary: app: {outcome}:" in done.stderr
    assert _haproxy_weights(haproxy) == {"canary": weight}
    (record,) = (workdir / "records").glob("app-*.jsonl")
    entries = read_record(record)
    end = entries[-1]
    assert isinstance(end, EndEntry) and end.outcome == outcome
    judged = [e for e in entries if isinstance(e, TickEntry) and e.verdict is not None]
    assert judged and judged[-1].canary is not None and judged[-1].canary.requests > 0
    if outcome == "rolled_back":
        assert "errors" in end.reason


@pytest.mark.slow
def test_run_logs_json_lines_and_exports_per_metric_analysis(
    procs: ProcessPool,
    workdir: Path,
    sockdir: Path,
    haproxy_binary: str,
    prometheus_env: tuple[str, int],
) -> None:
    """`canary run --log-format json` on a real rollout: every stderr line is one JSON
    object (timestamp, level, logger, message), the runner's lines name the rollout, its
    phase and decision, and no secret (Prometheus credentials, a webhook token) appears.
    Meanwhile /metrics shows canary_info and each metric's estimate, bounds and e-values
    with the rollout, namespace and name labels."""
    import re
    import subprocess
    import threading

    prometheus_url, exporter_port = prometheus_env
    haproxy = _haproxy(procs, workdir, sockdir, haproxy_binary)
    port = free_port()
    config = workdir / "rollout.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "app",
                "router": {"kind": "haproxy", "socket": str(haproxy.socket_path), "backend": "app"},
                "metrics": {
                    "kind": "prometheus",
                    # Prometheus ignores the credentials; the log must not show them
                    "url": prometheus_url.replace("http://", "http://alice:s3cret-pw@"),
                    "queries": {"primary_arm": "json-p", "canary_arm": "json-c"},
                },
                "steps": [10, 50],
                "min_step_s": 1,
                "max_step_s": 60,
                "tick_s": 0.5,
                "no_data_deadline_s": 30,
                "record_dir": "records",
                # refused (loopback, not allowed): its failure is logged, redacted
                "webhooks": [{"url": "http://127.0.0.1:9/hook?token=wh-s3cret", "format": "json"}],
            }
        )
    )
    command = [sys.executable, "-m", "canary", "run", "--config", str(config)]
    command += ["--listen", f"127.0.0.1:{port}", "--log-format", "json"]
    scraped: list[str] = []
    estimate = re.compile(
        r'^canary_analysis_metric_estimate\{metric="errors",name="app",namespace="",'
        r'rollout="app"\} ([0-9.e+-]+)$',
        re.M,
    )

    def scrape(done: threading.Event) -> None:
        while not done.wait(0.2):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    body = r.read().decode()
            except OSError:
                continue
            if estimate.search(body):
                scraped.append(body)

    done = threading.Event()
    scraper = threading.Thread(target=scrape, args=(done,), daemon=True)
    with Traffic(exporter_port, "json-p", "json-c", 2):
        scraper.start()
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=120, check=False, cwd=workdir
            )
        finally:
            done.set()
            scraper.join(timeout=10)
    assert result.returncode == EXIT_OK, result.stderr[-3000:]

    lines = result.stderr.splitlines()
    events = [json.loads(line) for line in lines]  # every line, or this raises
    assert all(isinstance(e, dict) for e in events) and len(events) > 5
    for event in events:
        assert {"timestamp", "level", "logger", "message"} <= set(event), event
    assert "s3cret" not in result.stderr and "wh-s3cret" not in result.stderr
    assert any(e["message"].startswith("serving on http://127.0.0.1:") for e in events)
    transitions = [e for e in events if e["logger"] == "canary.runner" and " -> " in e["message"]]
    assert transitions, events
    for event in transitions:
        assert event["rollout"] == "app" and event["phase"] in (
            "Progressing",
            "Promoting",
            "Succeeded",
        )
        assert "namespace" not in event  # a static target has none
    assert any(e.get("decision") == "pass" for e in transitions)
    webhook = [e for e in events if e["logger"] == "canary.notify.webhooks"]
    assert webhook and webhook[0]["level"] == "warning" and webhook[0]["rollout"] == "app"
    assert "loopback" in webhook[0]["message"]
    assert events[-2]["message"].startswith("app: promoted: ")  # then the record's path
    assert events[-2]["outcome"] == "promoted"

    assert scraped, "the per-metric gauges never appeared on /metrics"
    body = scraped[-1]
    assert re.search(r'^canary_info\{mode="static",version="[^"]+"\} 1\.0$', body, re.M)
    assert 0 < float(estimate.findall(body)[-1]) < 10
    labels = 'metric="errors",name="app",namespace="",rollout="app"'
    for name in (
        "canary_analysis_metric_lower_bound",
        "canary_analysis_metric_upper_bound",
        "canary_analysis_metric_e_value_fail",
        "canary_analysis_metric_e_value_pass",
    ):
        assert f"{name}{{{labels}}} " in body, name
    assert f"canary_analysis_metric_e_value_fail_threshold{{{labels}}} " in body
    assert re.search(
        r'^canary_analysis_metric_decision\{decision="(pass|continue)",metric="errors",'
        r'name="app",namespace="",rollout="app"\} 1\.0$',
        body,
        re.M,
    )
    assert 'canary_rollout_weight_percent{name="app",namespace="",rollout="app"}' in body


def test_status_shows_the_planners_advice_while_a_rollout_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`canary status` prints the status' advice under a running rollout (server and
    cluster), and not under one that is over."""
    import canary.cli.main as cli
    from canary.cli.kubernetes import _row
    from canary.cli.status import render_list
    from canary.core.rollout import RolloutStatus
    from canary.kubernetes.operator import KubeState

    advice = "time to pass at 5% (observed over 60 s: 4 req/s, 1% errors on the primary): ..."
    state = {
        "name": "app",
        "phase": "Progressing",
        "step": 0,
        "steps": [5, 50],
        "weight": 5,
        "weight_verified": True,
        "last_decision": "continue",
        "message": "m",
        "advice": advice,
    }
    done = {**state, "name": "old", "phase": "Succeeded"}
    monkeypatch.setattr(cli, "_request", lambda *a: (200, {"rollouts": [state, done]}))
    assert main(["status", "--server", "http://127.0.0.1:1"]) == 0
    lines = [line.rstrip() for line in capsys.readouterr().out.splitlines()]
    assert lines[0].split() == [
        "NAME",
        "PHASE",
        "STEP",
        "WEIGHT",
        "SET/READ",
        "DECISION",
        "AT",
        "STEP",
    ]
    assert lines[1].split()[:3] == ["app", "Progressing", "1/2"]
    assert lines[2].split()[:2] == ["old", "Succeeded"]
    assert lines[3:] == [f"app: {advice}"]  # under the table, and not for the one that is over

    kube = KubeState(
        rollout=RolloutStatus(stage="Progressing", revision="b", weight=5, advice=advice)
    )
    obj = {
        "metadata": {
            "namespace": "shop",
            "name": "app",
            "annotations": {"canary.dev/status": kube.to_json()},
        }
    }
    console = Console(record=True, width=200)
    console.print(render_list([_row(obj)]))
    assert console.export_text().splitlines()[-1] == f"shop/app: {advice}"
