"""The README's example config (examples/rollout.yaml) loads, and says the truth about defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from analysis import AnalysisConfig
from canary.core.rollout import RolloutSpec
from canary.metrics.prometheus import PromQueries
from canary.static.config import ConfigError, load_config, parse_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "rollout.yaml"
# Keys the example sets to something other than the default, as its comments say.
NOT_DEFAULTS = {"name", "router", "metrics", "webhooks", "primary_version", "canary_version"}


def test_example_config_loads_with_the_documented_values() -> None:
    """canary's own loader accepts the example and reads what the README shows."""
    config = load_config(EXAMPLE)
    assert config.name == "checkout"
    assert config.router.socket == Path("/run/haproxy/admin.sock")
    assert config.router.backend == "checkout"
    assert config.router.state_file == Path("/var/lib/haproxy/server-state")
    assert config.metrics.url == "http://127.0.0.1:9090"
    assert config.metrics.queries.selector == 'job="checkout"'
    assert config.record_dir == EXAMPLE.parent / "records"  # relative to the file
    (hook,) = config.notifications
    assert [(g.type, g.retries, g.metadata.get("rps")) for g in config.gates] == [
        ("confirm-promotion", 2, None),
        ("rollout", 0, "50"),
    ]
    assert hook.events == {"promoted", "rolled_back", "manual"}
    assert hook.report_base_url == "https://canary.example.internal"


def test_example_values_said_to_be_defaults_are_the_defaults() -> None:
    """Every value the example presents as a default equals the model's default."""
    config = load_config(EXAMPLE)
    assert config.analysis_config() == AnalysisConfig()
    gates = ("confirm-promotion", "rollout")  # the example's (webhooks: is not a default)
    assert config.rollout_spec() == RolloutSpec(promotion="shift", gates=gates)
    assert config.metrics.queries == PromQueries(selector='job="checkout"')
    assert config.tick_s == 10
    minimal = parse_config(
        {k: v for k, v in yaml.safe_load(EXAMPLE.read_text()).items() if k in NOT_DEFAULTS}
    )
    assert minimal.rollout_spec() == config.rollout_spec()
    assert minimal.tick_s == config.tick_s
    assert minimal.analysis_config() == config.analysis_config()
    assert minimal.record_dir == Path("records")


def test_example_with_a_typo_is_an_error_naming_the_key() -> None:
    """A misspelt key in a copy of the example is refused, and the message names it."""
    data = yaml.safe_load(EXAMPLE.read_text())
    data["min_setp_s"] = data.pop("min_step_s")
    with pytest.raises(ConfigError, match=r"rollout\.yaml: min_setp_s: unknown key"):
        parse_config(data, source="rollout.yaml")
