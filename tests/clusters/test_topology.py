"""The two-cluster topology file: the example validates, and bad values name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from canary.clusters.topology import PowerDNSRouterConfig, load_topology, parse_topology
from canary.core.failover import FailoverPolicy
from canary.static.config import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "two-clusters.yaml"


def minimal() -> dict[str, Any]:
    return {
        "clusters": {
            "primary": {
                "name": "a",
                "entry_point": "127.0.0.10",
                "prometheus": {"url": "http://127.0.0.1:9090", "selector": 'cluster="a"'},
            },
            "canary": {
                "name": "b",
                "entry_point": "127.0.0.20",
                "prometheus": {"url": "http://127.0.0.1:9090", "selector": 'cluster="b"'},
            },
        },
        "services": [
            {
                "name": "shop",
                "dns_name": "shop.example.test",
                "deployment": "shop",
                "router": {
                    "kind": "powerdns",
                    "api_url": "http://127.0.0.1:8081",
                    "zone": "example.test",
                },
            }
        ],
    }


def test_the_example_validates_with_its_commented_values() -> None:
    """examples/two-clusters.yaml loads; its paths resolve next to it; policies are as written."""
    topology = load_topology(EXAMPLE)
    shop = topology.service("shop")
    assert isinstance(shop.router, PowerDNSRouterConfig) and shop.router.ttl == 5
    assert shop.failover == FailoverPolicy(
        failures_to_failover=3, healthy_s_to_failback=600, auto_failback=False
    )
    assert topology.state_dir == EXAMPLE.parent / "state"
    assert topology.state_namespace == "canary-system"
    assert topology.service("search").router.kind == "external-dns"
    assert shop.rollout_spec().promotion == "copy"


def test_minimal_file_gets_defaults() -> None:
    """Only clusters and one service are needed; defaults fill the rest."""
    topology = parse_topology(minimal())
    shop = topology.services[0]
    assert shop.dns_name == "shop.example.test." and shop.steady_canary_percent == 10
    assert shop.failover.auto_failback is False


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("services", 0, "router", "zone"), "other.test", "is not inside router.zone"),
        (("services", 0, "router", "kind"), "route66", "services[0].router.kind: must be one of"),
        (("services", 0, "steps"), [5, 50], "steps[0] (5) must be above steady_canary_percent"),
        (("services", 0, "failover", "failures_to_failover"), 0, "failures_to_failover"),
        (("services", 0, "failover", "colour"), "red", "services[0].failover.colour: unknown key"),
        (("clusters", "canary", "entry_point"), "127.0.0.10", "different entry points"),
        (("clusters", "canary", "prometheus", "selector"), 'cluster="a"', "cannot be told apart"),
        (("clusters", "primary", "entry_point"), "not an address!", "clusters.primary.entry_point"),
        (
            ("services", 0, "health", "path"),
            "healthz",
            "services[0].health.path: must start with '/'",
        ),
        (("services", 0, "router", "api_key_env"), "A-B", "must be an environment variable name"),
        (
            ("services", 0, "router"),
            {"kind": "external-dns", "placement": "canary"},
            "placement: canary needs mode: dnsendpoint",
        ),
    ],
)
def test_bad_values_are_errors_naming_the_field(
    path: tuple[Any, ...], value: object, message: str
) -> None:
    """Each bad value gives a ConfigError whose text names the field and the rule."""
    data = minimal()
    target: Any = data
    for key in path[:-1]:
        target = target.setdefault(key, {}) if isinstance(target, dict) else target[key]
    target[path[-1]] = value
    with pytest.raises(ConfigError, match=r"^topology: ") as info:
        parse_topology(data)
    assert message in str(info.value)


def test_duplicate_services_and_unreadable_files(tmp_path: Path) -> None:
    """Two services with one name, an empty file and broken YAML each name the file."""
    data = minimal()
    data["services"].append(dict(data["services"][0]))
    with pytest.raises(ConfigError, match=r"services\[1\]\.name: 'shop' is used twice"):
        parse_topology(data)
    empty = tmp_path / "t.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"t\.yaml: the file is empty"):
        load_topology(empty)
    empty.write_text("clusters: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_topology(empty)
    empty.write_text(yaml.safe_dump(minimal()))
    assert load_topology(empty).services[0].name == "shop"


def test_api_key_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The PowerDNS key is read from the named variable; a missing one is an error naming it."""
    router = parse_topology(minimal()).services[0].router
    assert isinstance(router, PowerDNSRouterConfig)
    monkeypatch.delenv("PDNS_API_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"\$PDNS_API_KEY is not set"):
        router.api_key()
    monkeypatch.setenv("PDNS_API_KEY", "k")
    assert router.api_key() == "k"


def test_the_readme_topology_snippet_validates() -> None:
    """The topology shown in the README's "Two clusters and failover" section is a valid file."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Two clusters and failover", 1)[1]
    snippet = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    topology = parse_topology(yaml.safe_load(snippet), source="README")
    assert topology.service("shop").failover.failures_to_failover == 3


def test_no_latency_histogram_means_no_latency_metrics() -> None:
    """With metrics.latency_buckets null the analysis has no latency metrics (they would
    never have data, so a good canary could never pass); quantiles asked anyway are an
    error naming the field."""
    data = minimal()
    data["services"][0]["metrics"] = {"latency_buckets": None}
    (service,) = parse_topology(data).services
    assert service.analysis_config().quantiles == ()
    assert parse_topology(minimal()).services[0].analysis_config().quantiles == (0.5, 0.99)
    data["services"][0]["analysis"] = {"quantiles": [0.5]}
    with pytest.raises(ConfigError, match=r"analysis\.quantiles needs latency metrics"):
        parse_topology(data)
