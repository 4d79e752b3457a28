"""The controller's metrics: labels from the rollout's name, per-metric gauges, the README table."""

from __future__ import annotations

import io
import json
import logging
import math
import re
import sys
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from test_runner import make_runner

from analysis import Analyzer, ArmCounts, Snapshot
from canary.core.logs import configure_logging
from canary.runner import Controller
from canary.runner.telemetry import Telemetry

README = Path(__file__).resolve().parents[2] / "README.md"


def test_namespace_and_name_come_from_the_rollout() -> None:
    telemetry = Telemetry(mode="kubernetes")
    telemetry.weight.labels("shop/app").set(10)
    telemetry.weight.labels("checkout").set(25)
    registry = telemetry.registry
    shop = {"rollout": "shop/app", "namespace": "shop", "name": "app"}
    static = {"rollout": "checkout", "namespace": "", "name": "checkout"}
    assert registry.get_sample_value("canary_rollout_weight_percent", shop) == 10
    assert registry.get_sample_value("canary_rollout_weight_percent", static) == 25
    assert 'canary_info{mode="kubernetes",version="' in generate_latest(registry).decode()


def test_per_metric_gauges_hold_the_verdicts_numbers() -> None:
    """Before data: NaN estimate and bounds; then the verdict's numbers, metric by metric."""
    telemetry = Telemetry()
    analyzer = Analyzer()
    telemetry.analysis("app", None)  # no verdict (no data): nothing is set
    first = analyzer.observe(
        Snapshot(elapsed_s=1, primary=ArmCounts(requests=0), canary=ArmCounts(requests=0))
    )
    telemetry.analysis("app", first)
    labels = {"rollout": "app", "namespace": "", "name": "app", "metric": "errors"}
    get = telemetry.registry.get_sample_value
    assert math.isnan(get("canary_analysis_metric_estimate", labels) or 0.0)
    verdict = analyzer.observe(
        Snapshot(
            elapsed_s=60,
            primary=ArmCounts(requests=90_000, errors=900),
            canary=ArmCounts(requests=10_000, errors=101),
        )
    )
    telemetry.analysis("app", verdict)
    result = verdict.metrics["errors"]
    assert get("canary_analysis_metric_estimate", labels) == result.estimate
    assert get("canary_analysis_metric_lower_bound", labels) == result.lower
    assert get("canary_analysis_metric_upper_bound", labels) == result.upper
    assert get("canary_analysis_metric_e_value_fail", labels) == result.e_value_fail
    assert get("canary_analysis_metric_e_value_pass", labels) == result.e_value_pass
    assert get("canary_analysis_metric_e_value_pass_threshold", labels) == 1 / result.pass_alpha
    decisions = {
        d: get("canary_analysis_metric_decision", {**labels, "decision": d})
        for d in ("pass", "fail", "continue")
    }
    assert decisions == {d: 1.0 if d == result.decision.value else 0.0 for d in decisions}


def test_the_readme_table_lists_every_metric_and_its_labels() -> None:
    """Every metric the controller exports is in the README's table with exactly its labels,
    and the table lists nothing else."""
    text = README.read_text(encoding="utf-8")
    table = text.split("<!-- metrics table:", 1)[1].split("\n\n", 1)[0]
    documented = {}
    for row in re.findall(r"^\| `(canary_\w+)` \| (\w+) \| ([^|]*) \|", table, re.M):
        name, kind, labels = row
        documented[name] = (kind, tuple(re.findall(r"`(\w+)`", labels)))
    exported = {
        metric.name + ("_total" if metric.type == "counter" else ""): metric.type
        for metric in Telemetry().registry.collect()
    }
    assert {name: kind for name, (kind, _) in documented.items()} == exported
    label_sets = _label_names()
    for name, (_, labels) in documented.items():
        assert set(labels) == label_sets[name], name


def test_failover_active_follows_each_services_state() -> None:
    """Two clusters: canary_failover_active{service} is read from the failover state at each
    scrape (1 while failed over to the standby)."""
    from types import SimpleNamespace

    from prometheus_client import generate_latest

    from canary.clusters.multicluster import MultiClusterController
    from canary.core.failover import Mode

    failover = SimpleNamespace(state=SimpleNamespace(mode=Mode.PRIMARY))
    service = SimpleNamespace(name="web", failover=failover)
    controller = MultiClusterController([service])  # type: ignore[list-item]
    scrape = lambda: generate_latest(controller.telemetry.registry).decode()  # noqa: E731
    assert 'canary_failover_active{service="web"} 0.0' in scrape()
    assert "canary_leader 1.0" in scrape()  # no leader election in this mode
    failover.state.mode = Mode.STANDBY
    assert 'canary_failover_active{service="web"} 1.0' in scrape()


def _label_names() -> dict[str, set[str]]:
    """Each metric's label names, as a filled-in registry shows them."""
    telemetry = Telemetry()
    from canary.core.rollout import RolloutStatus

    telemetry.show("shop/app", RolloutStatus())
    telemetry.weight_read.labels("shop/app").set(0)
    telemetry.decisions.labels("shop/app", "pass").inc()
    telemetry.errors.labels("shop/app", "router").inc()
    analyzer = Analyzer()
    verdict = analyzer.observe(
        Snapshot(elapsed_s=1, primary=ArmCounts(requests=10), canary=ArmCounts(requests=1))
    )
    telemetry.analysis("shop/app", verdict)
    telemetry.duration.labels("promoted").observe(1.0)
    telemetry.failover_active.labels("app").set(0)
    telemetry.shard_held.labels("0").set(1)
    found: dict[str, set[str]] = {}
    for metric in telemetry.registry.collect():
        name = metric.name + ("_total" if metric.type == "counter" else "")
        for sample in metric.samples:
            found.setdefault(name, set()).update(set(sample.labels) - {"le"})
    return found


async def test_a_deployments_rollout_has_its_namespace_in_logs_and_metrics(tmp_path: Path) -> None:
    """A runner named and labelled as the operator makes it (`shop/app`, namespace shop,
    Deployment app): its JSON log lines say rollout app, namespace shop, and the phase at
    each line; its metrics have namespace="shop", name="app"."""
    runner, _, _ = make_runner(tmp_path)
    runner.name = "shop/app"
    runner.labels = {"namespace": "shop", "deployment": "app"}
    controller = Controller([runner])
    out = io.StringIO()
    root, hook = logging.getLogger(), sys.excepthook
    level = root.level
    configure_logging("info", "json", stream=out)
    try:
        await controller.run()
    finally:
        sys.excepthook = hook
        logging.captureWarnings(False)
        for handler in [h for h in root.handlers if type(h).__name__ == "_Handler"]:
            root.removeHandler(handler)
        root.setLevel(level)
        configure_logging("info", "text")
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    moves = [e for e in events if e["logger"] == "canary.runner" and " -> " in e["message"]]
    assert moves and all(e["rollout"] == "app" and e["namespace"] == "shop" for e in moves)
    assert [e["phase"] for e in moves][-2:] == ["Promoting", "Succeeded"]
    assert moves[-1]["decision"] == "pass" and moves[-1]["rollout_id"].startswith("shop/app")
    labels = {"rollout": "shop/app", "namespace": "shop", "name": "app"}
    get = controller.telemetry.registry.get_sample_value
    assert get("canary_rollout_phase", {**labels, "phase": "Succeeded"}) == 1.0
    assert get("canary_analysis_metric_e_value_pass", {**labels, "metric": "errors"}) is not None


GOLDEN = Path(__file__).resolve().parent / "data" / "telemetry_exposition.txt"


def _scenario(telemetry: Telemetry) -> None:
    """Two rollouts (a Deployment's and a static one), shown, analysed before and after data,
    with decisions and errors: every per-rollout family gets series."""
    from canary.core.rollout import RolloutStatus

    analyzer = Analyzer()
    empty = analyzer.observe(
        Snapshot(elapsed_s=1, primary=ArmCounts(requests=0), canary=ArmCounts(requests=0))
    )
    telemetry.show("shop/app", RolloutStatus(stage="Progressing", weight=30, step=1))
    telemetry.show("checkout", RolloutStatus())
    telemetry.analysis("checkout", empty)
    telemetry.decisions.labels("checkout", "no_data").inc()
    verdict = analyzer.observe(
        Snapshot(
            elapsed_s=60,
            primary=ArmCounts(requests=90_000, errors=900),
            canary=ArmCounts(requests=10_000, errors=101),
        )
    )
    telemetry.analysis("shop/app", verdict)
    telemetry.weight_read.labels("shop/app").set(30)
    telemetry.decisions.labels("shop/app", "continue").inc()
    telemetry.decisions.labels("shop/app", "continue").inc(2)
    telemetry.errors.labels("shop/app", "router").inc()
    telemetry.errors.labels("checkout", "status").inc()
    telemetry.show("shop/app", RolloutStatus(stage="RollingBack", weight=0, step=1))


def _exposition(telemetry: Telemetry) -> str:
    """/metrics' text without the _created times (when the test ran) and the version."""
    text = telemetry.exposition().decode()  # what /metrics serves
    text = re.sub(r"^(canary_\w+_created(?:\{.*\})?) \S+$", r"\1 T", text, flags=re.M)
    return re.sub(r'version="[^"]*"', 'version="V"', text)


def test_the_exposition_is_the_one_prometheus_client_children_gave() -> None:
    """The per-rollout families are rendered from plain arrays (issue 13); /metrics has the
    same lines as when each series was a prometheus_client child (the golden file was written
    by the Gauge/Counter version of canary/runner/telemetry.py, commit e6b60f9): families in
    the same order, names, HELP, TYPE, labels, values, counters' _total and _created. Only the
    order of the series within a family may differ (now rollout by rollout, before by first
    use of each series), which Prometheus ignores."""
    telemetry = Telemetry(mode="kubernetes")
    _scenario(telemetry)
    now, golden = _exposition(telemetry), GOLDEN.read_text(encoding="utf-8")
    # the families from here on came later: the batcher's timings (canary.metrics.batched),
    # then the garbage collector's (canary.runtime)
    now = now[: now.index("# HELP canary_metrics_query_seconds")]
    assert _families(now) == _families(golden)
    assert now.count("\n") == golden.count("\n") > 150


@pytest.mark.parametrize("created", [True, False])
def test_the_fast_exposition_is_generate_latests_text_exactly(
    created: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/metrics renders the per-rollout families from their arrays (_Store.render), not
    through generate_latest: the text is byte for byte the one generate_latest gives for the
    same registry, with label values that need escaping, every kind of float, a forgotten
    rollout, and with or without the counters' _created series."""
    from prometheus_client import disable_created_metrics, enable_created_metrics

    from canary.core.rollout import RolloutStatus

    # The collections' figures held still: once a test in this process has called watch_gc()
    # (test_runtime_gc), a collection between the two renders changed them (a flaky failure).
    monkeypatch.setattr("canary.runner.telemetry.gc_seconds", lambda: (0.5, 0.25, 1e-06))
    monkeypatch.setattr("canary.runner.telemetry.gc_collections", lambda: (12, 3, 1))
    if not created:
        disable_created_metrics()
    try:
        telemetry = Telemetry(mode="kubernetes")
        _scenario(telemetry)
        odd = ['we"ird\\name\nx/ap"p', "ünï/cødé", "gone/app", "a/b"]
        for i, name in enumerate(odd):
            telemetry.show(name, RolloutStatus(stage="Progressing", weight=5 * i, step=i))
            telemetry.decisions.labels(name, 'no "data"\\').inc(1e-7 * (i + 1))
            telemetry.errors.labels(name, "router").inc(123456789.0 * (i + 1))
        values = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e22, 1234567.5, -2.5e-300, 7.0]
        for i, value in enumerate(values):
            telemetry.weight_read.labels(odd[i % len(odd)]).set(value)
            telemetry.step.labels(odd[(i + 1) % len(odd)]).set(value)
        telemetry.forget("gone/app")
        telemetry.shard_held.labels("3").set(1.0)
        telemetry.tick_seconds.observe(0.2)
        assert telemetry.exposition() == generate_latest(telemetry.registry)
        assert b'rollout="we\\"ird\\\\name\\nx/ap\\"p"' in telemetry.exposition()
        assert (b"_created{" in telemetry.exposition()) is created
        assert b'canary_gc_collections_total{generation="0"} 12.0' in telemetry.exposition()
    finally:
        enable_created_metrics()


def _families(text: str) -> list[tuple[str, list[str]]]:
    """Each family's HELP and TYPE lines, then its sample lines sorted."""
    out: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("# HELP"):
            out.append((line, []))
        else:
            out[-1][1].append(line)
    return [(head, sorted(lines)) for head, lines in out]


def test_forget_removes_one_rollouts_series_and_they_stay_bounded() -> None:
    """forget() drops every series of that rollout and only those; rollouts that come and go
    (1,000 here, as in a day of Deployments) leave nothing behind."""
    from canary.core.rollout import RolloutStatus

    def series(telemetry: Telemetry) -> dict[str, int]:
        count: dict[str, int] = {}
        for family in telemetry.registry.collect():
            for sample in family.samples:
                if "rollout" in sample.labels:
                    count[sample.labels["rollout"]] = count.get(sample.labels["rollout"], 0) + 1
        return count

    telemetry = Telemetry(mode="kubernetes")
    _scenario(telemetry)
    before = series(telemetry)
    assert before["shop/app"] > 30 and before["checkout"] > 30
    telemetry.forget("shop/app")
    assert series(telemetry) == {"checkout": before["checkout"]}
    assert "shop/app" not in generate_latest(telemetry.registry).decode()
    telemetry.forget("shop/app")  # twice, or a rollout never shown: nothing to do
    telemetry.forget("never/seen")

    analyzer = Analyzer()
    verdict = analyzer.observe(
        Snapshot(elapsed_s=60, primary=ArmCounts(requests=900), canary=ArmCounts(requests=100))
    )
    for cycle in range(1000):
        name = f"team{cycle % 7}/app{cycle}"
        telemetry.show(name, RolloutStatus(stage="Progressing", weight=10))
        telemetry.analysis(name, verdict)
        telemetry.decisions.labels(name, "continue").inc()
        telemetry.errors.labels(name, "metrics").inc()
        if cycle % 100 == 0:
            assert series(telemetry)[name] > 20
        telemetry.forget(name)
    assert series(telemetry) == {"checkout": before["checkout"]}
    assert telemetry.rollouts() == 1


def test_a_series_exists_from_labels_on_as_a_child_did() -> None:
    """`.labels()` alone makes the series (0), as prometheus_client's children; counters only
    go up; a label count that does not fit is refused."""
    import pytest

    telemetry = Telemetry()
    telemetry.errors.labels("app", "router")
    telemetry.weight.labels("app")
    get = telemetry.registry.get_sample_value
    labels = {"rollout": "app", "namespace": "", "name": "app"}
    assert get("canary_errors_total", {**labels, "kind": "router"}) == 0.0
    assert get("canary_errors_created", {**labels, "kind": "router"}) is not None
    assert get("canary_rollout_weight_percent", labels) == 0.0
    assert get("canary_rollout_step", labels) is None  # never touched: no series
    with pytest.raises(ValueError):
        telemetry.errors.labels("app", "router").inc(-1)
    with pytest.raises(ValueError):
        telemetry.errors.labels("app")
