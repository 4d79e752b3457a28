"""The pure rollout machine in A/B mode: one phase with the match on, then promote or roll back."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from analysis import Decision
from canary.core.rollout import (
    Emit,
    Finish,
    Promote,
    PromoteDone,
    RolloutSpec,
    RolloutStatus,
    SetWeight,
    Tick,
    WeightFailed,
    WeightVerified,
    step,
)

AB = RolloutSpec(ab_duration_s=60, min_step_s=30, max_step_s=300, no_data_deadline_s=60)
AB_COPY = AB.model_copy(update={"promotion": "copy"})
PASS = Tick(Decision.PASS, "ok", weight_read=0, match_read=True)
FAIL = Tick(Decision.FAIL, "errors 3x primary", weight_read=0, match_read=True)


def started(spec: RolloutSpec = AB) -> RolloutStatus:
    out = step(spec, RolloutStatus(revision="r1"), Tick(None), 0.0)
    assert SetWeight(0, match=True) in out.actions
    assert out.status.weight == 0 and out.status.match and not out.status.weight_verified
    return step(spec, out.status, WeightVerified(0, match=True), 1.0).status


def test_start_sets_weight_zero_with_the_match() -> None:
    """An A/B rollout starts with the canary at 0% and the match on; the step timer starts
    when both are read back, not when only the weight is."""
    status = started()
    assert status.step_started_at == 1.0 and status.weight_verified
    before = step(AB, RolloutStatus(revision="r1"), Tick(None), 0.0).status
    stale = step(AB, before, WeightVerified(0, match=False), 1.0).status
    assert stale.step_started_at is None and not stale.weight_verified


def test_pass_before_the_duration_holds_then_promotes_without_weight_steps() -> None:
    """A pass before ab_duration_s holds; after it the rollout promotes at once (no steps),
    turning the match off with the weight at 100%."""
    status = started()
    held = step(AB, status, PASS, 30.0)
    assert held.status.stage == "Progressing" and not held.actions
    assert "A/B match" in held.status.message
    out = step(AB, held.status, PASS, 61.0)
    assert out.status.stage == "Promoting"
    assert SetWeight(100, match=False) in out.actions
    out = step(AB, out.status, WeightVerified(100), 62.0)
    assert Promote("r1") in out.actions
    out = step(AB, out.status, PromoteDone(ok=True), 63.0)
    assert out.status.stage == "Succeeded" and not out.status.match


def test_copy_promotion_ends_with_weight_zero_and_no_match() -> None:
    """Kubernetes (copy): after the template is copied the route goes back to 0%, match off."""
    status = started(AB_COPY)
    out = step(AB_COPY, status, PASS, 61.0)
    out = step(AB_COPY, out.status, WeightVerified(100), 62.0)
    out = step(AB_COPY, out.status, PromoteDone(ok=True), 63.0)
    assert SetWeight(0, match=False) in out.actions
    out = step(AB_COPY, out.status, WeightVerified(0), 64.0)
    assert out.status.stage == "Succeeded"


def test_fail_rolls_back_and_removes_the_match() -> None:
    """A fail rolls back: weight 0 with the match off, finished once read back."""
    out = step(AB, started(), FAIL, 10.0)
    assert out.status.stage == "RollingBack" and not out.status.match
    assert SetWeight(0, match=False) in out.actions
    out = step(AB, out.status, WeightVerified(0, match=False), 11.0)
    assert out.status.stage == "Failed"
    assert any(isinstance(a, Finish) and a.outcome == "rolled_back" for a in out.actions)


def test_a_match_read_back_off_is_set_again_and_holds_the_analysis() -> None:
    """A router that lost the match (reloaded without its map) is failing: the match is
    asserted again and a pass does not promote until it reads back on."""
    status = started()
    lost = Tick(Decision.PASS, "ok", weight_read=0, match_read=False)
    out = step(AB, status, lost, 70.0)
    assert out.status.stage == "Progressing"
    assert SetWeight(0, match=True) in out.actions
    assert any(isinstance(a, Emit) and "A/B match off" in a.message for a in out.actions)
    assert out.status.router_failing_since == 70.0
    back = step(AB, out.status, PASS, 71.0)
    assert back.status.stage == "Promoting"


def test_a_failed_match_write_is_a_weight_failure() -> None:
    """WeightFailed for the match is reported like a weight that did not take."""
    before = step(AB, RolloutStatus(revision="r1"), Tick(None), 0.0).status
    out = step(AB, before, WeightFailed(0, "map not found", match=True), 1.0)
    assert "0% and the A/B match" in out.status.message
    assert out.status.router_failing_since == 1.0


def test_no_data_deadline_still_rolls_back() -> None:
    """No data in A/B mode holds, then rolls back at the deadline ("no data" never passes)."""
    status = started()
    out = step(AB, status, Tick(None, "no requests matched", weight_read=0, match_read=True), 61.0)
    assert out.status.stage == "RollingBack"


@pytest.mark.parametrize("bad", [-1, float("inf"), 8 * 86400])
def test_ab_duration_is_bounded(bad: float) -> None:
    """ab_duration_s is finite, not negative, at most a week."""
    with pytest.raises(ValidationError, match="ab_duration_s"):
        RolloutSpec(ab_duration_s=bad)
