"""The annotation schema: good annotations parse; each bad one is named with its rule."""

from __future__ import annotations

import pytest

from analysis import AnalysisConfig
from canary.kubernetes.spec import (
    ANNOTATION_STATUS,
    ANNOTATIONS,
    PREFIX,
    CanarySpec,
    SpecError,
    Webhook,
    dump_problems,
    markdown_table,
    parse_annotations,
    parse_duration,
)
from canary.notify.webhooks import WebhookConfig

BASE = {
    "canary.dev/enabled": "true",
    "canary.dev/router": "ingress-nginx",
    "canary.dev/ingress": "app",
}


def test_no_annotations_means_not_enabled() -> None:
    """A Deployment without canary annotations is simply not opted in."""
    assert parse_annotations(None) == CanarySpec()
    assert parse_annotations({"deployment.kubernetes.io/revision": "3"}).enabled is False


def test_full_spec_parses() -> None:
    """Every kind of annotation lands in the right field, with units converted."""
    spec = parse_annotations(
        {
            "canary.dev/enabled": "true",
            "canary.dev/steps": "5, 20,50%",
            "canary.dev/min-step-duration": "1m30s",
            "canary.dev/max-step-duration": "none",
            "canary.dev/no-data-deadline": "5m",
            "canary.dev/analysis.alpha": "0.01",
            "canary.dev/analysis.error-tolerance": "20%",
            "canary.dev/analysis.latency-tolerance": "0.1",
            "canary.dev/analysis.critical": "errors",
            "canary.dev/analysis.quantiles": "p50, 0.999",
            "canary.dev/router": "gateway-api",
            "canary.dev/httproute": "app-route",
            "canary.dev/port": "8080",
            "canary.dev/metrics": "custom",
            "canary.dev/metrics.requests": 'x_total{namespace="{namespace}",svc="{arm}"}',
            "canary.dev/metrics.errors": 'x_total{namespace="{namespace}",svc="{arm}",code=~"5.."}',
            "canary.dev/metrics.latency-buckets": 'x_seconds_bucket{svc="{arm}"}',
            "canary.dev/webhook.post-rollout": "http://chat.shop/hook",
            ANNOTATION_STATUS: '{"stage":"Progressing"}',  # the controller's, not input
            "kubectl.kubernetes.io/last-applied-configuration": "{}",
        }
    )
    assert spec.enabled and spec.steps == (5, 20, 50)
    assert (spec.min_step_s, spec.max_step_s, spec.no_data_deadline_s) == (90.0, None, 300.0)
    assert spec.analysis.overrides() == {
        "alpha": 0.01,
        "error_tolerance": 0.2,
        "latency_tolerance": 0.1,
        "quantiles": (0.5, 0.999),
        "critical": ("errors",),
    }
    config = spec.analysis.analysis_config()
    assert config.alpha == 0.01 and config.quantiles == (0.5, 0.999)
    assert (config.errors.tolerance, config.errors.critical) == (0.2, True)
    assert (config.latency.tolerance, config.latency.critical) == (0.1, False)
    assert spec.router is not None
    assert (spec.router.kind, spec.router.target, spec.router.port) == (
        "gateway-api",
        "app-route",
        8080,
    )
    assert spec.metrics.preset == "custom"
    queries = spec.metrics.prom_queries(
        namespace="shop", primary_service="app-primary", canary_service="app-canary"
    )
    assert queries.render(queries.requests, queries.canary_arm) == (
        'x_total{namespace="shop",svc="app-canary"}'
    )
    assert queries.latency_buckets == 'x_seconds_bucket{svc="{arm}"}'
    assert [(w.type, w.url) for w in spec.webhooks] == [("post-rollout", "http://chat.shop/hook")]
    rollout = spec.rollout_spec()
    assert (rollout.steps, rollout.min_step_s, rollout.max_step_s) == ((5, 20, 50), 90.0, None)
    assert rollout.promotion == "copy"


@pytest.mark.parametrize(
    ("annotations", "key", "rule"),
    [
        ({"canary.dev/steps": "10,5"}, "steps", "must be strictly increasing, got 10,5"),
        ({"canary.dev/steps": "10,10"}, "steps", "must be strictly increasing"),
        ({"canary.dev/steps": "0,10"}, "steps", "within 1..99"),
        ({"canary.dev/steps": "10,100"}, "steps", "within 1..99 (100 is the promotion)"),
        ({"canary.dev/steps": "ten"}, "steps", "whole percentages, got 'ten'"),
        ({"canary.dev/steps": ""}, "steps", "at least one"),
        ({"canary.dev/enabled": "yes please"}, "enabled", '"true" or "false"'),
        ({"canary.dev/min-step-duration": "soon"}, "min-step-duration", "duration like 90s"),
        ({"canary.dev/max-step-duration": "0s"}, "max-step-duration", "must be positive"),
        (
            {"canary.dev/min-step-duration": "10m", "canary.dev/max-step-duration": "5m"},
            "max-step-duration",
            "must be at least min-step-duration (600s)",
        ),
        ({"canary.dev/min-step-duration": "1h"}, "min-step-duration", "at least min-step"),
        ({"canary.dev/no-data-deadline": "0"}, "no-data-deadline", "must be positive"),
        ({"canary.dev/analysis.alpha": "0.7"}, "analysis.alpha", "within (0, 0.5)"),
        ({"canary.dev/analysis.alpha": "low"}, "analysis.alpha", "must be a number"),
        ({"canary.dev/analysis.error-tolerance": "0"}, "analysis.error-tolerance", "above 0"),
        ({"canary.dev/analysis.quantiles": "p50,p100"}, "analysis.quantiles", "within (0, 1)"),
        ({"canary.dev/analysis.quantiles": "median"}, "analysis.quantiles", "like p50,p99"),
        ({"canary.dev/analysis.critical": " "}, "analysis.critical", "at least one metric"),
        (
            {"canary.dev/analysis.critical": "errors,cpu"},
            "analysis.critical",
            "unknown metric 'cpu'",
        ),
        ({"canary.dev/router": "istio"}, "router", "one of ingress-nginx, gateway-api"),
        ({"canary.dev/router": "ingress-nginx"}, "ingress", "is required with"),
        ({"canary.dev/router": "gateway-api"}, "httproute", "is required with"),
        (
            {"canary.dev/router": "gateway-api", "canary.dev/ingress": "app"},
            "ingress",
            "does not apply to canary.dev/router: gateway-api",
        ),
        (
            {"canary.dev/ingress": "app", "canary.dev/httproute": "app"},
            "ingress",
            "either canary.dev/ingress or canary.dev/httproute",
        ),
        ({"canary.dev/ingress": "App_1"}, "ingress", "Kubernetes object name"),
        ({"canary.dev/port": "99999"}, "port", "1..65535"),
        ({"canary.dev/metrics": "datadog"}, "metrics", "one of ingress-nginx, envoy"),
        ({"canary.dev/metrics": "custom"}, "metrics.requests", "is required with"),
        ({"canary.dev/metrics.errors": 'up{x="{arm}"}'}, "metrics.errors", "only applies to"),
        (
            {
                "canary.dev/metrics": "custom",
                "canary.dev/metrics.requests": 'sum(rate(x{s="{arm}"}[1m]))',
                "canary.dev/metrics.errors": 'y{s="{arm}"}',
            },
            "metrics.requests",
            "must be a series selector",
        ),
        (
            {
                "canary.dev/metrics": "custom",
                "canary.dev/metrics.requests": "x_total",
                "canary.dev/metrics.errors": 'y{s="{arm}"}',
            },
            "metrics.requests",
            "must contain {arm}",
        ),
        ({"canary.dev/metrics.histogram": "9lives"}, "metrics.histogram", "Prometheus metric name"),
        ({"canary.dev/webhook.rollback": "ftp://x"}, "webhook.rollback", "http:// or https:// URL"),
        ({"canary.dev/step": "10"}, "step", "unknown annotation; did you mean canary.dev/steps?"),
        ({"canary.dev/webhook.later": "http://x"}, "webhook.later", "unknown annotation"),
        (
            {"canary.dev/webhook.rollback.format": "slack"},
            "webhook.rollback.format",
            "is now Flagger's rollback gate (polled; a 2xx rolls back): for notifications of "
            "rollbacks use canary.dev/webhook.rolled-back",
        ),
        (
            {"canary.dev/webhook.rollback": "https://hooks.slack.com/services/T0/B0/x"},
            "webhook.rollback",
            "is a chat service's webhook (hooks.slack.com): a gate needs a receiver",
        ),
        (
            {"canary.dev/webhook.pre-rollout.retries": "2"},
            "webhook.pre-rollout.retries",
            "no canary.dev/webhook.pre-rollout to apply it to",
        ),
        (
            {"canary.dev/webhook.rollout": "http://x", "canary.dev/webhook.rollout.metadata": "[]"},
            "webhook.rollout.metadata",
            "must be an object of strings, got list",
        ),
        (
            {"canary.dev/webhook.rollout": "http://x", "canary.dev/webhook.rollout.retries": "11"},
            "webhook.rollout.retries",
            "must be a whole number 0..10",
        ),
        (
            {"canary.dev/webhook.failure-threshold": "0"},
            "webhook.failure-threshold",
            "must be a whole number 1..100",
        ),
    ],
)
def test_bad_annotation_names_key_and_rule(
    annotations: dict[str, str], key: str, rule: str
) -> None:
    """Each bad annotation raises SpecError whose text is '<key>: <rule>'."""
    merged = (
        {**BASE, **annotations}
        if key not in ("router", "ingress", "httproute")
        else {
            "canary.dev/enabled": "true",
            **annotations,
        }
    )
    with pytest.raises(SpecError) as caught:
        parse_annotations(merged)
    full_key = PREFIX + key
    assert full_key in caught.value.problems, caught.value.problems
    assert rule in caught.value.problems[full_key]
    assert f"{full_key}: " in str(caught.value)


def test_every_problem_is_reported_at_once() -> None:
    """Several bad annotations are all named, so one fix-up round suffices."""
    with pytest.raises(SpecError) as caught:
        parse_annotations({**BASE, "canary.dev/steps": "9,3", "canary.dev/port": "x"})
    assert set(caught.value.problems) == {"canary.dev/steps", "canary.dev/port"}
    assert dump_problems(caught.value).startswith('{"canary.dev/port":')


@pytest.mark.parametrize(
    ("preset", "canary_requests"),
    [
        (
            "app-histogram",
            'http_request_duration_seconds_count{namespace="shop",service="app-canary"}',
        ),
        (
            "ingress-nginx",
            'nginx_ingress_controller_requests{namespace="shop",service="app-canary"}',
        ),
        ("envoy", 'envoy_cluster_upstream_rq_xx{envoy_cluster_name=~".*shop.*app-canary.*"}'),
    ],
)
def test_metric_presets_become_provider_queries(preset: str, canary_requests: str) -> None:
    """Each preset yields valid PromQueries whose arms are the two Services."""
    spec = parse_annotations({**BASE, "canary.dev/metrics": preset})
    queries = spec.metrics.prom_queries(
        namespace="shop", primary_service="app-primary", canary_service="app-canary"
    )
    assert queries.render(queries.requests, queries.canary_arm) == canary_requests
    primary_errors = queries.render(queries.errors, queries.primary_arm)
    assert "app-primary" in primary_errors and "5" in primary_errors
    assert (queries.latency_buckets is None) == (preset == "envoy")


@pytest.mark.parametrize(
    "metrics",
    [
        {"canary.dev/metrics": "envoy"},
        {
            "canary.dev/metrics": "custom",
            "canary.dev/metrics.requests": 'http_requests_total{service="{arm}"}',
            "canary.dev/metrics.errors": 'http_requests_total{service="{arm}",code=~"5.."}',
        },
    ],
    ids=["envoy", "custom-without-latency-buckets"],
)
def test_metrics_without_latency_leave_latency_out_of_the_analysis(
    metrics: dict[str, str],
) -> None:
    """With no latency histogram to read, the analysis has no latency metrics, so a good
    canary can pass on errors; with them it never could (no data is never a pass), and
    every rollout with the envoy preset would have ended at max-step-duration."""
    from analysis import Analyzer, ArmCounts, Decision, Snapshot

    spec = parse_annotations({**BASE, **metrics})
    config = spec.analysis_config()
    assert config.quantiles == ()
    same = ArmCounts(requests=200_000, errors=2_000, latency_buckets={})
    snapshot = Snapshot(elapsed_s=600.0, primary=same, canary=same)
    assert Analyzer(config).observe(snapshot).decision == Decision.PASS
    assert Analyzer(spec.analysis.analysis_config()).observe(snapshot).decision != Decision.PASS
    # With latency metrics the default quantiles stay.
    assert parse_annotations(BASE).analysis_config().quantiles == AnalysisConfig().quantiles


def test_quantiles_without_latency_metrics_are_refused() -> None:
    """Quantiles asked of metrics with no latency histogram are a spec error naming the key."""
    with pytest.raises(SpecError) as caught:
        parse_annotations(
            {**BASE, "canary.dev/metrics": "envoy", "canary.dev/analysis.quantiles": "p50"}
        )
    assert "canary.dev/analysis.quantiles" in caught.value.problems
    assert (
        "envoy has no latency histogram" in caught.value.problems["canary.dev/analysis.quantiles"]
    )


def test_no_analysis_annotations_mean_the_analysis_defaults() -> None:
    """Without analysis annotations the analysis runs with its own production defaults."""
    assert parse_annotations(BASE).analysis.analysis_config() == AnalysisConfig()


def test_enabled_needs_a_router() -> None:
    """Opting in without saying how to split traffic is an error on canary.dev/router."""
    with pytest.raises(SpecError, match=r"canary\.dev/router: is required"):
        parse_annotations({"canary.dev/enabled": "true"})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90.0), ("90s", 90.0), ("5m", 300.0), ("1h30m", 5400.0), ("1m30s", 90.0), ("0.5s", 0.5)],
)
def test_durations(text: str, seconds: float) -> None:
    """Go-style durations and plain seconds are accepted."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5x", "m", "-5", "1s1h", "inf"])
def test_bad_durations(text: str) -> None:
    """Anything else is refused with the expected form in the message."""
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_table_defaults_are_the_model_defaults() -> None:
    """The documented defaults parse to exactly what the model uses when a key is absent."""
    defaults = CanarySpec().model_dump()
    # a gate's options (`webhook.<gate>.timeout`, ...) default to the Webhook model's
    defaults["webhook_options"] = Webhook(type="rollout", url="http://x").model_dump()
    # a notification's (`webhook.<notification>.timeout`, ...) to the operator's WebhookConfig
    notifying = {"webhook_options": WebhookConfig(url="http://x").model_dump()}
    for annotation in ANNOTATIONS:
        if not annotation.default or annotation.default.startswith("("):
            continue
        node = notifying if "<notification>" in annotation.key else defaults
        *parents, leaf = annotation.field.split(".")
        for part in parents:
            node = node[part]
        if annotation.field == "router.port":
            continue  # the router block exists only once a router is chosen
        assert annotation.parse(annotation.default) == node[leaf], annotation.key
    table = markdown_table()
    assert all(f"`{a.key}`" in table for a in ANNOTATIONS)


def test_defaults_agree_with_the_rollout_machine() -> None:
    """An annotated Deployment with no tuning moves like a static target with no tuning."""
    from canary.core.rollout import RolloutSpec

    default = RolloutSpec()
    got = CanarySpec().rollout_spec()
    assert (got.steps, got.min_step_s, got.max_step_s, got.no_data_deadline_s) == (
        default.steps,
        default.min_step_s,
        default.max_step_s,
        default.no_data_deadline_s,
    )


def test_expected_rps_feeds_the_planner_or_waits_for_traffic() -> None:
    """`canary.dev/expected-rps` is a positive request rate (the planner's estimate at the
    start); absent or `none`, the first estimate waits for observed traffic."""
    assert parse_annotations(BASE).expected_rps is None
    assert parse_annotations({**BASE, "canary.dev/expected-rps": "none"}).expected_rps is None
    assert parse_annotations({**BASE, "canary.dev/expected-rps": "250"}).expected_rps == 250.0
    for bad in ("0", "-3", "fast", "inf", "nan"):
        with pytest.raises(SpecError) as caught:
            parse_annotations({**BASE, "canary.dev/expected-rps": bad})
        assert "requests per second" in caught.value.problems["canary.dev/expected-rps"]


@pytest.mark.parametrize(
    ("text", "primary", "replicas"),
    [("2", 10, 2), ("1", 0, 1), ("25%", 6, 2), ("25%", 4, 1), ("50%", 5, 3), ("1%", 1, 1)],
)
def test_canary_replicas_count_or_percentage_rounded_up(
    text: str, primary: int, replicas: int
) -> None:
    """`canary.dev/canary-replicas` is a count, or a percentage of app-primary's replicas
    rounded up and at least 1."""
    size = parse_annotations({**BASE, "canary.dev/canary-replicas": text}).canary_replicas
    assert size is not None and size.of(primary) == replicas
    assert parse_annotations(BASE).canary_replicas is None


@pytest.mark.parametrize("text", ["0", "-1", "1.5", "x", "%", "0%", "101%", "nan%", "5000"])
def test_bad_canary_replicas_name_the_key(text: str) -> None:
    """A count below 1, a fraction, a percentage outside (0, 100] or no number at all is
    refused, naming the key."""
    with pytest.raises(SpecError) as caught:
        parse_annotations({**BASE, "canary.dev/canary-replicas": text})
    assert list(caught.value.problems) == ["canary.dev/canary-replicas"]
    assert repr(text) in caught.value.problems["canary.dev/canary-replicas"]


def test_fast_rollback_window_is_off_unless_given() -> None:
    """`canary.dev/fast-rollback-window` is off by default (0), a duration when given, and
    a bad one is named with its key."""
    assert parse_annotations(BASE).fast_rollback_window_s == 0
    window = {**BASE, "canary.dev/fast-rollback-window": "1h30m"}
    assert parse_annotations(window).fast_rollback_window_s == 5400
    assert parse_annotations({**window, "canary.dev/fast-rollback-window": "off"}) == (
        parse_annotations(BASE)
    )
    with pytest.raises(SpecError) as caught:
        parse_annotations({**BASE, "canary.dev/fast-rollback-window": "soon"})
    assert list(caught.value.problems) == ["canary.dev/fast-rollback-window"]
