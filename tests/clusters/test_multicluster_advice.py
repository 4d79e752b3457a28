"""Two-cluster rollouts and the planner: a service's expected traffic gives the time-to-pass
estimate at a rollout's start, as a static target's does.

The wiring is the whole two-cluster controller of test_multicluster_failover (emulated
clusters, real PowerDNS). Its Prometheus does not answer, so the only estimate a rollout can
have is the one made from the configured traffic, before any count is seen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support.pdns import API_KEY, PdnsServer, pdns
from test_multicluster_failover import deployment, running, wait_for, weight_is
from test_multicluster_notify import _topology

from canary.clusters.topology import parse_topology
from canary.core.records import StartEntry, read_record

__all__ = ["pdns"]


@pytest.fixture(autouse=True)
def _api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDNS_API_KEY", API_KEY)


@pytest.mark.parametrize(
    "service",
    [
        {},
        {"expected_rps": 200, "expected_error_rate": 0.02},
        {  # with a load test that a rollout hook drives, counted as the static mode counts it
            "expected_rps": 200,
            "webhooks": [
                {
                    "type": "rollout",
                    "url": "http://127.0.0.1:9/loadtest",
                    "metadata": {"rps": "50", "at": "canary"},
                }
            ],
        },
    ],
    ids=["no expected traffic", "expected traffic", "and a load test"],
)
async def test_a_cross_cluster_rollout_starts_with_the_estimate_from_expected_traffic(
    pdns: PdnsServer, tmp_path: Path, service: dict[str, object]
) -> None:
    """The service's `expected_rps` (requests/s at its DNS name) and the primary's error rate
    go to the rollout, whose record starts with the planner's estimate for the first step
    (50% of the traffic on the canary cluster); without them the start says nothing and
    the estimate waits for counts."""
    async with running(pdns, tmp_path, name="planned", service=service) as env:
        await wait_for(lambda: weight_is(env, 10), 10, "the steady 10%")
        env.canary_api.put("apps", "v1", "deployments", deployment("shop:2"))
        rollouts = env.service.rollouts

        async def started() -> bool:
            runner = rollouts.runner
            return (
                runner is not None
                and runner.record_path.exists()
                and any(isinstance(e, StartEntry) for e in read_record(runner.record_path))
            )

        await wait_for(started, 10, "the rollout's start entry")
        start = next(
            e for e in read_record(rollouts.runner.record_path) if isinstance(e, StartEntry)
        )
    if not service:
        assert start.plan == {}
        return
    plan = start.plan
    assert plan["elapsed_s"] == 0.0 and plan["expected_pass_s"] is not None
    load = 50.0 if "webhooks" in service else 0.0  # sent to the canary alone
    assert plan["canary_rps"] == pytest.approx(0.5 * 200 + load)  # 50% of 200 req/s
    assert plan["base_error_rate"] == pytest.approx(service.get("expected_error_rate", 0.01))
    assert plan["generated_rps"] == (load or None)


def test_a_services_expected_traffic_is_checked_by_name() -> None:
    """Nonsense in a service's planner keys is refused, naming the key."""

    def topology(**keys: object) -> dict[str, Any]:
        raw = _topology([])
        raw["services"][0].update(keys)
        return raw

    parsed = parse_topology(topology(expected_rps=250))
    assert parsed.services[0].runner_traffic(None) == {
        "expected_rps": 250.0,
        "expected_error_rate": 0.01,
        "generated_rps": None,
        "generated_at": "entry",
    }
    hook = (5.0, "canary")  # the load a rollout hook asks for
    assert parsed.services[0].runner_traffic(hook)["generated_rps"] == 5.0
    explicit = parse_topology(topology(generated_rps=20, generated_at="entry")).services[0]
    assert explicit.runner_traffic(hook)["generated_rps"] == 20.0  # the config's wins
    assert explicit.runner_traffic(hook)["generated_at"] == "entry"
    for key, bad in (
        ("expected_rps", 0),
        ("expected_rps", "fast"),
        ("expected_error_rate", 1.5),
        ("generated_rps", -1),
        ("generated_at", "moon"),
    ):
        # the key's own check, not an unknown key's refusal
        with pytest.raises(ValueError, match=rf"services\[0\]\.{key}: Input should"):
            parse_topology(topology(**{key: bad}))
