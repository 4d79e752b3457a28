"""Static target configs: the example validates, and every error names the file and the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from analysis import AnalysisConfig
from canary.core.rollout import RolloutSpec
from canary.static.config import ConfigError, TargetConfig, load_config, parse_config

EXAMPLE = """\
name: checkout
router:
  kind: haproxy
  socket: run/admin.sock
  backend: checkout
  primary_server: primary
  canary_server: canary
metrics:
  kind: prometheus
  url: http://127.0.0.1:9090/
  queries:
    selector: 'job="checkout"'
steps: [5, 10, 25, 50]
min_step_s: 60
max_step_s: 900
no_data_deadline_s: 120
tick_s: 10
analysis:
  alpha: 0.01
  errors: {tolerance: 0.3}
record_dir: records
"""


def write(tmp_path: Path, text: str, name: str = "rollout.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def example(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(EXAMPLE)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = data
        for key in parents:
            node = node[key]
        if value is ...:
            del node[leaf]
        else:
            node[leaf] = value
    return data


def test_example_validates_and_resolves_paths(tmp_path: Path) -> None:
    """The documented example loads; relative paths are taken from the file's directory."""
    config = load_config(write(tmp_path, EXAMPLE))
    assert config.name == "checkout"
    assert config.router.socket == tmp_path / "run/admin.sock"
    assert config.record_dir == tmp_path / "records"
    assert config.metrics.url == "http://127.0.0.1:9090"
    assert config.metrics.queries.selector == 'job="checkout"'
    assert config.rollout_spec() == RolloutSpec(
        steps=(5, 10, 25, 50),
        min_step_s=60,
        max_step_s=900,
        no_data_deadline_s=120,
        promotion="shift",
    )
    analysis = config.analysis_config()
    assert isinstance(analysis, AnalysisConfig)
    assert analysis.errors.tolerance == 0.3


def test_module_docstring_example_validates(tmp_path: Path) -> None:
    """The example in canary/config.py's docstring is a valid config."""
    import canary.static.config

    doc = canary.static.config.__doc__ or ""
    text = doc.split("Example::", 1)[1]
    lines = [line[4:] for line in text.splitlines() if line.startswith("    ")]
    assert isinstance(load_config(write(tmp_path, "\n".join(lines))), TargetConfig)


def test_defaults_fill_in_a_minimal_config() -> None:
    """Only name, router and metrics are required; steps default to 5, 10, 25, 50."""
    config = parse_config(
        {
            "name": "app",
            "router": {"kind": "haproxy", "socket": "/s", "backend": "app"},
            "metrics": {"kind": "prometheus", "url": "http://p:9090"},
        }
    )
    assert config.steps == (5, 10, 25, 50)
    assert config.tick_s == 10
    assert config.router.primary_server == "primary" and config.router.canary_server == "canary"


def test_no_latency_histogram_means_no_latency_metrics() -> None:
    """With metrics.queries.latency_buckets null the analysis has no latency metrics (they
    would never have data, so a good canary could never pass); quantiles asked anyway are an
    error naming the field."""
    data: dict[str, Any] = {
        "name": "app",
        "router": {"kind": "haproxy", "socket": "/s", "backend": "app"},
        "metrics": {
            "kind": "prometheus",
            "url": "http://p:9090",
            "queries": {"latency_buckets": None},
        },
    }
    assert parse_config(data).analysis_config().quantiles == ()
    data["analysis"] = {"quantiles": [0.5]}
    with pytest.raises(ConfigError, match=r"analysis\.quantiles needs latency metrics"):
        parse_config(data)
    del data["metrics"]["queries"]
    assert parse_config(data).analysis_config().quantiles == (0.5,)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (example(steps=[5, 30, 20]), "steps[2]: must be greater than 30, got 20"),
        (example(steps=[5, 100]), "steps[1]: must be within 1..99"),
        (example(steps="5,10"), "steps: must be a list of percentages"),
        (example(min_setp_s=4), "min_setp_s: unknown key (typo?)"),
        (example(router__sockett="x"), "router.sockett: unknown key (typo?)"),
        (example(router__kind="nginx"), "router.kind: must be one of 'haproxy', got 'nginx'"),
        (example(router__socket=...), "router.socket: required key is missing"),
        (example(metrics__kind=...), "metrics.kind: required key is missing"),
        (example(router__canary_server="primary"), "primary_server and canary_server must differ"),
        (
            example(router__backend="my app"),
            "router.backend: must be a non-empty name without spaces",
        ),
        (
            example(metrics__url="localhost:9090"),
            "metrics.url: must start with http:// or https://",
        ),
        (example(metrics__queries__requests="rate(x[5m])"), "metrics.queries.requests"),
        (example(name="Checkout"), "name: must be 1-63 lowercase letters"),
        (example(name=...), "name: required key is missing"),
        (example(tick_s=0), "tick_s: Input should be greater than 0"),
        (
            example(min_step_s=100, max_step_s=50),
            "max_step_s (50) must be at least min_step_s (100)",
        ),
        (example(analysis__alpha=0.9), "analysis.alpha"),
        (example(analysis__errors={"tolerance": 0.3, "tolerence": 1}), "analysis.errors.tolerence"),
    ],
    ids=[
        "steps-not-increasing",
        "step-100",
        "steps-not-a-list",
        "typo-top-level",
        "typo-nested",
        "unknown-router-kind",
        "missing-socket",
        "missing-metrics-kind",
        "same-servers",
        "space-in-backend",
        "url-without-scheme",
        "query-with-function",
        "uppercase-name",
        "missing-name",
        "zero-tick",
        "max-below-min",
        "analysis-alpha",
        "analysis-typo",
    ],
)
def test_errors_name_the_file_and_field(tmp_path: Path, data: dict[str, Any], message: str) -> None:
    """Each bad setting is reported with the file and the field path (and the rule)."""
    path = write(tmp_path, yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert message in text
    assert text.startswith(f"{path}: ")


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    """Several mistakes give one line each, not just the first."""
    path = write(tmp_path, yaml.safe_dump(example(steps=[10, 5], tick_s=-1, colour="red")))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = str(info.value).splitlines()
    assert len(lines) == 3
    assert all(line.startswith(f"{path}: ") for line in lines)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the file is empty"),
        ("- a\n- b\n", "the top level must be a mapping of settings, got list"),
        ("name: [unclosed\n", "not valid YAML (line 2, column 1)"),
    ],
    ids=["empty", "list", "broken-yaml"],
)
def test_unusable_files_are_explained(tmp_path: Path, text: str, message: str) -> None:
    """Empty, non-mapping and unparsable files each get a clear error naming the file."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(str(path)) and message in str(info.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    """A config path that does not exist says so with the path."""
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    """Absolute socket and record paths are used as written."""
    path = write(
        tmp_path, yaml.safe_dump(example(router__socket="/run/h.sock", record_dir="/var/rec"))
    )
    config = load_config(path)
    assert config.router.socket == Path("/run/h.sock") and config.record_dir == Path("/var/rec")


def test_expected_traffic_reaches_the_runners_planner(tmp_path: Path) -> None:
    """`expected_rps` (and the primary's error rate) go to the runner, whose first advice is
    made from them; without them the runner waits for observed traffic; nonsense is refused."""
    from canary.static.targets import build_runner

    config = parse_config(example(expected_rps=250, expected_error_rate=0.002), base=tmp_path)
    runner = build_runner(config, stamp="t")
    assert (runner.expected_rps, runner.expected_error_rate) == (250.0, 0.002)
    assert runner.analysis == config.analysis_config()
    assert build_runner(parse_config(example(), base=tmp_path), stamp="t").expected_rps is None
    for bad in (0, -1, "fast", float("inf")):
        with pytest.raises(ConfigError, match="expected_rps"):
            parse_config(example(expected_rps=bad))
    with pytest.raises(ConfigError, match="expected_error_rate"):
        parse_config(example(expected_error_rate=1.5))


@pytest.mark.parametrize(
    ("hook", "message"),
    [
        (
            {"type": "confirm-promotoin", "url": "https://gate.example/"},
            "webhooks[0].type: must be one of confirm-rollout, pre-rollout, rollout",
        ),
        ({"type": "rollout", "url": "ftp://x"}, "webhooks[0].url: url must be an absolute"),
        (
            {"type": "rollout", "url": "https://gate.example/", "metadata": {"rps": 50}},
            "webhooks[0].metadata: 'rps': values must be strings",
        ),
        (
            {"type": "rollout", "url": "https://gate.example/", "metadata": {"rps": "lots"}},
            "webhooks[0].metadata: rps: 'lots' is not a number",
        ),
        (
            {"type": "rollout", "url": "https://g.example/", "metadata": {"rps": "5", "at": "x"}},
            "webhooks[0].metadata: at: must be entry (through the router) or canary",
        ),
        (
            {"type": "rollout", "url": "https://gate.example/", "retires": 1},
            "webhooks[0].retires: unknown key",
        ),
        (
            {"type": "rollback", "url": "https://hooks.slack.com/services/T/B/x"},
            "webhooks[0].url: url is a chat service's webhook (hooks.slack.com)",
        ),
    ],
)
def test_gate_webhooks_are_checked_and_named(hook: dict[str, object], message: str) -> None:
    """A `webhooks:` entry with a `type:` is a gate; its errors name the entry and key."""
    data = {
        "name": "app",
        "router": {"kind": "haproxy", "socket": "/run/h.sock", "backend": "app"},
        "metrics": {"kind": "prometheus", "url": "http://127.0.0.1:9090"},
        "webhooks": [hook],
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(data, source="rollout.yaml")
    assert f"rollout.yaml: {message}" in str(caught.value)


def test_gate_webhooks_become_the_rollout_specs_gates() -> None:
    """Gates (with a type) and notifications (without) are told apart; the spec lists the
    gate kinds and the failure threshold."""
    config = parse_config(
        {
            "name": "app",
            "router": {"kind": "haproxy", "socket": "/run/h.sock", "backend": "app"},
            "metrics": {"kind": "prometheus", "url": "http://127.0.0.1:9090"},
            "webhooks": [
                {"url": "https://chat.example/hook"},
                {"type": "pre-rollout", "url": "https://gate.example/pre", "retries": 2},
            ],
            "gate_failure_threshold": 2,
        }
    )
    assert [h.url for h in config.notifications] == ["https://chat.example/hook"]
    assert [(g.type, g.retries) for g in config.gates] == [("pre-rollout", 2)]
    spec = config.rollout_spec()
    assert (spec.gates, spec.gate_failure_threshold) == (("pre-rollout",), 2)


def test_a_configured_load_test_reaches_the_runners_planner(tmp_path: Path) -> None:
    """`generated_rps` and `generated_at` (a rollout hook's canary loadtest) go to the runner,
    whose advice counts them; none by default; nonsense is refused naming the key."""
    from canary.static.targets import build_runner

    config = parse_config(example(generated_rps=40, generated_at="canary"), base=tmp_path)
    runner = build_runner(config, stamp="t")
    assert (runner.generated_rps, runner.generated_at) == (40.0, "canary")
    default = build_runner(parse_config(example(), base=tmp_path), stamp="t")
    assert (default.generated_rps, default.generated_at) == (None, "entry")
    for bad in (0, -5, "lots", float("nan")):
        with pytest.raises(ConfigError, match="generated_rps"):
            parse_config(example(generated_rps=bad))
    with pytest.raises(ConfigError, match="generated_at"):
        parse_config(example(generated_at="sideways"))


def test_a_rollout_hooks_load_test_reaches_the_planner_unless_overridden(tmp_path: Path) -> None:
    """A `rollout` hook whose metadata names `rps` (and `at`) is a load test: the runner's
    advice counts it without `generated_rps`; rates of several hooks add up; an explicit
    `generated_rps` overrides them; hooks of other kinds (or without `rps`) add nothing."""
    from canary.static.targets import build_runner

    def hook(kind: str = "rollout", **metadata: str) -> dict[str, object]:
        return {"type": kind, "url": "https://loadtest.example/", "metadata": metadata}

    def load(**changes: object) -> tuple[float | None, str]:
        runner = build_runner(parse_config(example(**changes), base=tmp_path), stamp="t")
        return runner.generated_rps, runner.generated_at

    assert load(webhooks=[hook(url="http://app/", rps="50", duration="30s")]) == (50.0, "entry")
    assert load(webhooks=[hook(rps="20", at="canary"), hook(rps="5", at="canary")]) == (
        25.0,
        "canary",
    )
    assert load(webhooks=[hook(rps="20", at="canary"), hook(rps="5")]) == (25.0, "entry")
    assert load(webhooks=[hook(rps="50")], generated_rps=10) == (10.0, "entry")
    assert load(webhooks=[hook("pre-rollout", rps="50"), hook(cmd="hey")]) == (None, "entry")
