"""`canary run` with credentials in the Prometheus URL: they reach nothing that is shown.

A real `python -m canary run` process (debug logging) reads a real Prometheus through
`http://prom-user:s3cret@127.0.0.1:PORT` (Prometheus ignores the basic auth) and sets weights
on a real HAProxy. While counts flow, and again after Prometheus is stopped (so every tick's
"no data" reason names the URL), the secret must appear in none of: the record file,
`/rollouts`, the HTML, JSON and Markdown reports over HTTP, `canary report`, and the
process' stderr and log.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.pool import ProcessPool

from canary.demo.procs import (
    HAProxyConfig,
    HAProxyProcess,
    HttpReady,
    ManagedProcess,
    PrometheusProcess,
    free_port,
)
from canary.notify.webhooks import report_id

SECRET = "s3cret"
USER = "prom-user"


TOKEN = "no-secrets-test-token-0123456789"


def _get(url: str) -> str:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return str(response.read().decode())


def _wait_for(predicate: Any, what: str, *, attempts: int = 600) -> Any:
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


@pytest.mark.slow
def test_prometheus_credentials_reach_no_record_page_or_log(
    procs: ProcessPool,
    workdir: Path,
    sockdir: Path,
    haproxy_binary: str,
    prometheus_binary: str,
) -> None:
    """With `user:password@` in the Prometheus URL, the password shows nowhere: not in the
    record, /rollouts, any report format, `canary report`, nor the process' output, while
    counts flow and while Prometheus is down."""
    exporter_port = free_port()
    procs.support_server("exporter", exporter_port)
    for version, code in (("sec-p", 200), ("sec-p", 500), ("sec-c", 200), ("sec-c", 500)):
        _get(f"http://127.0.0.1:{exporter_port}/inc?version={version}&code={code}&n=5&seconds=0.02")
    prometheus = procs.start(
        PrometheusProcess(
            [f"127.0.0.1:{exporter_port}"],
            workdir=workdir / "prometheus",
            scrape_interval_s=0.5,
            binary=prometheus_binary,
        )
    )
    haproxy = _haproxy(procs, workdir, sockdir, haproxy_binary)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = workdir / "rollout.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "app",
                "router": {"kind": "haproxy", "socket": str(haproxy.socket_path), "backend": "app"},
                "metrics": {
                    "kind": "prometheus",
                    "url": prometheus.url.replace("http://", f"http://{USER}:{SECRET}@"),
                    "timeout_s": 0.5,
                    "queries": {"primary_arm": "sec-p", "canary_arm": "sec-c"},
                },
                "steps": [5, 50],
                "min_step_s": 600,
                "max_step_s": 1200,
                "tick_s": 0.2,
                "no_data_deadline_s": 600,
                "record_dir": "records",
                "canary_version": "v2",
            }
        )
    )
    token_file = workdir / "canary.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    controller = procs.start(
        ManagedProcess(
            [
                sys.executable,
                "-m",
                "canary",
                "--log-level",
                "debug",
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
    records = workdir / "records"

    def record_text() -> str:
        return "".join(p.read_text(encoding="utf-8") for p in records.glob("app-*.jsonl"))

    # counts flow through the URL with credentials: ticks with a verdict
    _wait_for(lambda: '"verdict":{' in record_text(), "a tick with counts")
    assert '"url":"http://***@127.0.0.1:' in record_text()  # the start entry's config
    prometheus.stop_sync()  # now every tick's reason names the URL
    _wait_for(lambda: "prometheus unreachable at http://***@" in record_text(), "no data")

    def rollouts_holding() -> str | None:
        text = _get(f"{url}/rollouts")
        return text if "unreachable" in text else None

    state = _wait_for(rollouts_holding, "/rollouts saying why it holds")
    shown = [state, _get(f"{url}/rollouts/app")]
    rollout = json.loads(shown[1])["rollout"]
    for fmt in ("html", "json", "md"):
        shown.append(_get(f"{url}/reports/{report_id(rollout)}?format={fmt}"))
    assert "http://***@127.0.0.1:" in shown[2]  # the HTML's settings in force
    assert "prometheus unreachable at http://***@" in shown[2]
    report = subprocess.run(
        [sys.executable, "-m", "canary", "report", "app", "--format", "md", "-o", "-"],
        cwd=workdir,
        env={"CANARY_RECORD_DIR": str(records), "PATH": "/usr/bin:/bin", **_pythonpath()},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert report.returncode == 0, report.stderr
    shown += [report.stdout, report.stderr]
    controller.stop_sync()
    shown += [record_text(), controller.log_path.read_text(encoding="utf-8")]
    assert "DEBUG" in shown[-1]  # the log was verbose, and still clean
    for text in shown:
        assert SECRET not in text and USER not in text


def _pythonpath() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k in ("PYTHONPATH", "HOME", "VIRTUAL_ENV")}
