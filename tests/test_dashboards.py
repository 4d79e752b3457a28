"""The Grafana dashboard and the alert rules (charts/canary/dashboards, charts/canary/rules).

Every PromQL expression in them is read out and each metric name it uses is checked against
the names the controller's registry (canary.runner.telemetry.Telemetry) exports, so a typo or
a renamed metric fails here. `promtool check rules` (shipped next to the prometheus binary)
checks the rules file. The slow test runs a real `canary run` (real HAProxy, real Prometheus
scraping both a test exporter and the controller's /metrics), then evaluates every dashboard
and rule query through Prometheus' HTTP API: each must parse, and the core panels must
return series.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.parse
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
from canary.runner.telemetry import Telemetry

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "charts" / "canary" / "dashboards" / "canary.json"
RULES = ROOT / "charts" / "canary" / "rules" / "canary.rules.yaml"

# Panels that must return series while a rollout with real analysis is running.
CORE_PANELS = {
    "Rollouts by phase",
    "Phase per rollout",
    "Canary weight: set versus read back",
    "Step",
    "Analysis: canary/primary ratio with its bounds",
    "Metric decision at the last look",
    "Metric decision over time",
    "E-values against their thresholds",
    "Decisions",
    "Decisions and transitions in the range",
    "Record and status write errors",
    "Leader",
    "Controllers",
}

# Series Prometheus makes itself, not the controller.
PROMETHEUS_OWN = {"up"}

_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "inf", "nan", "atan2",
    # aggregation operators: `sum by (x) (...)` puts a keyword between the name and its (
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}  # fmt: skip


def exported_names() -> set[str]:
    """Every series name the controller's registry can expose (counters as _total, histograms
    as _bucket/_count/_sum), read from the registry itself."""
    names: set[str] = set()
    for family in Telemetry().registry.collect():
        if family.type == "counter":
            names |= {f"{family.name}_total", f"{family.name}_created"}
        elif family.type == "histogram":
            names |= {f"{family.name}{s}" for s in ("_bucket", "_count", "_sum", "_created")}
        else:
            names.add(family.name)
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions,
    keywords, label names (inside {} or the lists after by/on/...), or in strings/ranges."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", "{}", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "[]", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", text)
    text = re.sub(r"\$\w+", "", text)  # Grafana variables
    found = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in _KEYWORDS:
            continue
        found.add(word)
    return found


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) for every target, and the template variables' label_values."""
    queries = [
        (panel["title"], target["expr"])
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
    ]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", variable["definition"])
            assert inner, variable["definition"]
            queries.append((f"${variable['name']}", inner.group(1)))
    return queries


def rule_queries() -> list[tuple[str, str]]:
    rules = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [
        (rule.get("alert") or rule["record"], rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
    ]


def test_metric_names_are_read_from_promql() -> None:
    assert metric_names(
        'sum by (rollout, kind) (increase(canary_errors_total{kind=~"a|b", name=~"$name"}'
        "[$__rate_interval])) / on (rollout) group_left (x) up or vector(0)"
    ) == {"canary_errors_total", "up"}
    assert metric_names("canary_rollout_step < +Inf and canary_info offset 5m") == {
        "canary_rollout_step",
        "canary_info",
    }


def test_every_query_uses_only_exported_metrics() -> None:
    """A misspelt or renamed metric in the dashboard or the rules fails here."""
    known = exported_names() | PROMETHEUS_OWN
    assert "canary_analysis_decisions_total" in known  # the registry was read
    unknown = {
        (where, name)
        for where, expr in dashboard_queries() + rule_queries()
        for name in metric_names(expr)
        if name not in known
    }
    assert not unknown, f"not exported by the controller: {sorted(unknown)}"
    used = {name for _, expr in dashboard_queries() for name in metric_names(expr)}
    # every per-rollout series the controller exports is on the dashboard
    assert exported_names() - used <= {n for n in exported_names() if n.endswith("_created")} | {
        "canary_rollout_duration_seconds_sum"
    }


def test_dashboard_shape() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 39
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "name"):
        assert variables[name]["definition"].startswith("label_values(")
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            if "canary_rollout" in target["expr"] or "canary_analysis" in target["expr"]:
                if "duration" not in target["expr"]:
                    assert "$namespace" in target["expr"] and "$name" in target["expr"], target
    assert CORE_PANELS <= {panel["title"] for panel in board["panels"]}


def test_promtool_checks_the_rules(prometheus_binary: str) -> None:
    promtool = Path(prometheus_binary).resolve().with_name("promtool")
    done = subprocess.run(
        [str(promtool), "check", "rules", str(RULES)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rule_queries())} rules found" in done.stdout


# ---- with a real Prometheus scraping a real `canary run` ----------------------------------


def _grafana_to_promql(expr: str) -> str:
    """Grafana's variables as it would expand them with "All" selected."""
    return (
        expr.replace("$namespace", ".*")
        .replace("$name", ".*")
        .replace("$__rate_interval", "10s")
        .replace("$__range", "2m")
    )


def _query(prometheus: str, expr: str) -> tuple[int, dict[str, Any]]:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _traffic(port: int, stop: threading.Event) -> None:
    """2,000 requests/s per arm at the exporter, 1% errors on both."""
    calls = [("dash-p", 200, 198), ("dash-p", 500, 2), ("dash-c", 200, 198), ("dash-c", 500, 2)]
    while not stop.wait(0.1):
        for version, code, n in calls:
            url = f"http://127.0.0.1:{port}/inc?version={version}&code={code}&n={n}&seconds=0.02"
            with urllib.request.urlopen(url, timeout=5) as response:
                response.read()


@pytest.mark.slow
def test_every_query_runs_on_a_real_prometheus_scraping_canary(
    procs: ProcessPool, workdir: Path, sockdir: Path, haproxy_binary: str, prometheus_binary: str
) -> None:
    exporter_port, controller_port = free_port(), free_port()
    procs.support_server("exporter", exporter_port)
    primary_port, canary_port = free_port(), free_port()
    procs.support_server("name", primary_port, "primary")
    procs.support_server("name", canary_port, "canary")
    haproxy = HAProxyConfig(
        frontend_port=free_port(),
        primary_addr=f"127.0.0.1:{primary_port}",
        canary_addr=f"127.0.0.1:{canary_port}",
        socket_path=sockdir / "admin.sock",
        state_file=workdir / "server-state",
    )
    procs.start(HAProxyProcess(haproxy, workdir=workdir, binary=haproxy_binary))
    prometheus = PrometheusProcess(
        [f"127.0.0.1:{exporter_port}", f"127.0.0.1:{controller_port}"],
        workdir=workdir / "prometheus",
        scrape_interval_s=1.0,
        binary=prometheus_binary,
    )
    procs.start(prometheus)
    stop = threading.Event()
    traffic = threading.Thread(target=_traffic, args=(exporter_port, stop), daemon=True)
    traffic.start()
    try:
        _check_queries(procs, workdir, haproxy, prometheus, controller_port)
    finally:
        stop.set()
        traffic.join(timeout=10)


def _check_queries(
    procs: ProcessPool,
    workdir: Path,
    haproxy: HAProxyConfig,
    prometheus: PrometheusProcess,
    controller_port: int,
) -> None:
    config = workdir / "rollout.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "app",
                "router": {"kind": "haproxy", "socket": str(haproxy.socket_path), "backend": "app"},
                "metrics": {
                    "kind": "prometheus",
                    "url": prometheus.url,
                    "queries": {"primary_arm": "dash-p", "canary_arm": "dash-c"},
                },
                # steps long enough that the rollout is still running when the queries run
                "steps": [5, 10, 20, 50],
                "min_step_s": 4,
                "max_step_s": 120,
                "tick_s": 0.5,
                "no_data_deadline_s": 60,
                "record_dir": "records",
            }
        )
    )
    procs.start(
        ManagedProcess(
            [
                sys.executable,
                "-m",
                "canary",
                "run",
                "--config",
                str(config),
                "--listen",
                f"127.0.0.1:{controller_port}",
            ],
            log_path=workdir / "canary-run.log",
            ready=HttpReady(f"http://127.0.0.1:{controller_port}/readyz"),
            name="canary-run",
        )
    )

    def scraped(expr: str) -> bool:
        status, body = _query(prometheus.url, expr)
        return status == 200 and bool(body["data"]["result"])

    deadline = time.monotonic() + 40
    # a step change and a verdict with per-metric numbers, both seen by Prometheus
    wanted = ["canary_rollout_step > 0", "canary_analysis_metric_estimate{metric='errors'} > 0"]
    while not all(scraped(e) for e in wanted):
        assert time.monotonic() < deadline, (workdir / "canary-run.log").read_text()[-3000:]
        time.sleep(0.5)
    time.sleep(2)  # a few more scrapes for the rate windows

    empty, failed = [], []
    for where, expr in dashboard_queries() + rule_queries():
        status, body = _query(prometheus.url, _grafana_to_promql(expr))
        if status != 200:
            failed.append((where, expr, status, body.get("error")))
        elif where in CORE_PANELS and not body["data"]["result"]:
            empty.append((where, expr))
    assert not failed, failed
    assert not empty, f"core panels without series: {empty}"
    # the variables list the rollout, as Grafana asks for label_values (the label API)
    for label, value in (("name", "app"), ("namespace", "")):
        url = f"{prometheus.url}/api/v1/label/{label}/values?" + urllib.parse.urlencode(
            {"match[]": "canary_rollout_phase"}
        )
        with urllib.request.urlopen(url, timeout=10) as response:
            values = json.loads(response.read())["data"]
        assert values == ([value] if value else []), (label, values)
    # the phase panel shows it Progressing
    _, body = _query(prometheus.url, 'sum by (phase) (canary_rollout_phase{name=~".*"}) > 0')
    assert {r["metric"]["phase"] for r in body["data"]["result"]} == {"Progressing"}
