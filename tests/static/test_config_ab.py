"""A/B keys of static target configs: accepted together, each conflict named by its key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from canary.routers.base import Match
from canary.static.config import ConfigError, load_config, parse_config

BASE: dict[str, Any] = {
    "name": "checkout",
    "router": {"kind": "haproxy", "socket": "run/admin.sock", "backend": "checkout"},
    "metrics": {"kind": "prometheus", "url": "http://127.0.0.1:9090"},
}
AB_ROUTER = {**BASE["router"], "ab_map": "checkout-ab.map"}


def test_ab_config_parses_into_an_ab_rollout(tmp_path: Path) -> None:
    """match_header + ab_duration_s + router.ab_map: A/B mode, the map made absolute."""
    config = parse_config(
        {**BASE, "router": AB_ROUTER, "match_header": "X-Canary=always", "ab_duration_s": 120},
        base=tmp_path,
    )
    assert config.match == Match("header", "X-Canary", "always")
    assert config.router.ab_map == tmp_path / "checkout-ab.map"
    assert config.rollout_spec().ab_duration_s == 120


@pytest.mark.parametrize(
    ("extra", "where", "words"),
    [
        ({"match_header": "X-Canary=always"}, "match_header", "ab_duration_s"),
        ({"ab_duration_s": 60, "router": AB_ROUTER}, "ab_duration_s", "match_header or"),
        (
            {"match_header": "X-Canary=always", "ab_duration_s": 60, "steps": [10, 20]},
            "steps",
            "replaces the weight steps",
        ),
        ({"match_header": "X-Canary=always", "ab_duration_s": 60}, "router.ab_map", "map file"),
        ({"router": AB_ROUTER}, "router.ab_map", "only used in A/B mode"),
        ({"match_header": "X-Canary"}, "match_header", "Name=value"),
        ({"match_cookie": "bad cookie"}, "match_cookie", "token"),
        (
            {"match_header": "X-A=1", "match_cookie": "c", "ab_duration_s": 1},
            "match_header and match_cookie",
            "not both",
        ),
        ({"ab_duration_s": -1}, "ab_duration_s", "greater than or equal"),
    ],
)
def test_bad_ab_keys_are_named(extra: dict[str, Any], where: str, words: str) -> None:
    """Every inconsistent or malformed A/B key is an error naming the key."""
    with pytest.raises(ConfigError) as caught:
        parse_config({**BASE, **extra}, source="rollout.yaml")
    assert str(caught.value).startswith(f"rollout.yaml: {where}"), str(caught.value)
    assert words in str(caught.value), str(caught.value)


ROOT = Path(__file__).resolve().parents[2]
AB_EXAMPLE = ROOT / "examples" / "rollout-ab.yaml"


def test_ab_example_loads_and_the_readme_shows_it_and_its_haproxy_rule() -> None:
    """examples/rollout-ab.yaml is a valid A/B config, the README quotes it whole, and the
    `use-server` line in both is exactly the one canary's HAProxy router expects."""
    from canary.routers.haproxy import ab_rule

    config = load_config(AB_EXAMPLE)
    assert config.match == Match("header", "X-Canary", "always")
    assert config.rollout_spec().ab_duration_s == 300
    assert config.router.ab_map is not None
    rule = ab_rule(config.match, config.router.ab_map, config.router.canary_server)
    text = AB_EXAMPLE.read_text()
    readme = (ROOT / "README.md").read_text()
    assert f"```yaml\n{text}```" in readme
    assert rule in text and f"    {rule}\n" in readme


def test_demo_haproxy_config_carries_the_ab_rule(tmp_path: Path) -> None:
    """The HAProxy config canary's own processes render (tests, demo) includes the backend's
    map rule when an A/B match is configured, and not otherwise."""
    from canary.demo.procs import HAProxyConfig, render_haproxy_config

    common = {
        "frontend_port": 8080,
        "primary_addr": "127.0.0.1:8001",
        "canary_addr": "127.0.0.1:8002",
        "socket_path": tmp_path / "a.sock",
        "state_file": tmp_path / "state",
    }
    plain = render_haproxy_config(HAProxyConfig(**common))  # type: ignore[arg-type]
    assert "use-server" not in plain
    cookie = Match.cookie("canary")
    ab = render_haproxy_config(
        HAProxyConfig(**common, ab_match=cookie, ab_map=tmp_path / "ab.map")  # type: ignore[arg-type]
    )
    assert f"use-server canary if {{ req.cook(canary),map_str({tmp_path / 'ab.map'})" in ab


def test_router_affinity_is_cookie_or_nothing() -> None:
    """`router.affinity: cookie` is accepted (with or without A/B); anything else is named."""
    config = parse_config({**BASE, "router": {**BASE["router"], "affinity": "cookie"}})
    assert config.router.affinity == "cookie"
    with pytest.raises(
        ConfigError, match=r"rollout\.yaml: router\.affinity: Input should be 'cookie'"
    ):
        parse_config(
            {**BASE, "router": {**BASE["router"], "affinity": "ip"}}, source="rollout.yaml"
        )
