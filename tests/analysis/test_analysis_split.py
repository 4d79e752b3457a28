"""analysis.split: whether a step's traffic split follows the weight, judged against the step
before. Simulated with seeded binomial splits; the error-rate bound is checked over repeated
looks (a look every 10 s of a 10-minute step), as the controller looks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analysis.split import SPLIT_ALPHA, split_evidence


def test_a_split_that_did_not_move_with_the_weight_is_shown_to_contradict_it() -> None:
    """20% of requests at 20% and again at 50% (a dropped write): contradicted, and said so
    with both shares and what 50/20 of the first would be."""
    evidence = split_evidence((2_000, 8_000), 20, (2_000, 8_000), 50)
    assert evidence.verdict == "contradicts"
    text = evidence.describe()
    assert text.startswith("the traffic split did not follow the weight: ")
    assert (
        "20% of requests at 50%" in text and "20% at 20%" in text and "50/20 of that is 50%" in text
    )


def test_shares_lowered_by_traffic_the_router_does_not_split_still_follow() -> None:
    """The primary's pods also serve half the traffic directly: the canary has 10% at 20%
    and 25% at 50%, and that follows (the ratio of the shares is the weights')."""
    evidence = split_evidence((1_000, 9_000), 20, (2_500, 7_500), 50)
    assert evidence.verdict == "follows"


def test_a_split_far_past_the_weight_is_shown_to_contradict_it() -> None:
    """1% at 5%, then 60% at 10% (the router sends most traffic to the canary): overshot."""
    evidence = split_evidence((100, 9_900), 5, (6_000, 4_000), 10)
    assert evidence.verdict == "contradicts"
    assert evidence.headline() == "the traffic split overshot the weight"


def test_low_traffic_says_nothing() -> None:
    """A few hundred requests a step cannot tell 20% from 50% with anytime-valid bounds at
    this level: unknown, never contradicted (so low traffic never holds a rollout)."""
    evidence = split_evidence((40, 160), 20, (40, 160), 50)
    assert evidence.verdict == "unknown"
    assert "cannot be told" in evidence.describe()


@pytest.mark.parametrize(
    ("before", "weight_before", "now", "weight_now", "named"),
    [
        ((1, 9), 0, (1, 9), 50, "1..99"),
        ((1, 9), 20, (1, 9), 20, "the second higher"),
        ((1, 9), 50, (1, 9), 20, "the second higher"),
        ((1, 9), 20, (1, 9), 100, "1..99"),
        ((-1, 9), 20, (1, 9), 50, ">= 0"),
        ((1, math.nan), 20, (1, 9), 50, "finite"),
    ],
)
def test_bad_input_is_refused_by_name(
    before: tuple[float, float],
    weight_before: int,
    now: tuple[float, float],
    weight_now: int,
    named: str,
) -> None:
    with pytest.raises(ValueError, match=named):
        split_evidence(before, weight_before, now, weight_now)


def _looks(
    rng: np.random.Generator,
    share_before: float,
    share_now: float,
    per_look: int,
    looks: int,
    weights: tuple[int, int],
) -> list[str]:
    before_n = per_look * looks
    before_c = float(rng.binomial(before_n, share_before))
    c = n = 0.0
    verdicts = []
    for _ in range(looks):
        c += float(rng.binomial(per_look, share_now))
        n += per_look
        evidence = split_evidence(
            (before_c, before_n - before_c), weights[0], (c, n - c), weights[1]
        )
        verdicts.append(evidence.verdict)
    return verdicts


def test_a_router_that_splits_as_weighted_is_almost_never_called_contradicted() -> None:
    """400 steps of 60 looks, 200 requests a look, shares at half the weights (traffic the
    router does not split): contradicted in at most a few of them, however often looked at
    (the bound is about 2 * SPLIT_ALPHA a step)."""
    rng = np.random.default_rng(20261204)
    steps = [(5, 10), (10, 25), (25, 50), (50, 75)]
    contradicted = 0
    runs = 400
    for run in range(runs):
        w0, w1 = steps[run % len(steps)]
        verdicts = _looks(rng, w0 / 200, w1 / 200, 200, 60, (w0, w1))
        contradicted += "contradicts" in verdicts
        # the evidence for the right split arrives within the step
        assert verdicts[-1] in ("follows", "unknown")
    assert contradicted <= max(2, math.ceil(runs * 2 * SPLIT_ALPHA * 3))


def test_a_dropped_write_is_found_at_the_first_look_at_200_requests_a_second() -> None:
    """Weight 20% then 50%, the router still at 20%, 2,000 requests a look every 10 s after a
    first step of six looks: the contradiction is shown at the first look, in every run of 50."""
    rng = np.random.default_rng(7)
    for _ in range(50):
        before = float(rng.binomial(12_000, 0.2))
        now = float(rng.binomial(2_000, 0.2))
        verdict = split_evidence((before, 12_000 - before), 20, (now, 2_000 - now), 50).verdict
        assert verdict == "contradicts"


def test_at_20_requests_a_second_a_dropped_write_is_found_within_the_step() -> None:
    """The same at a tenth of the traffic: shown within 10 minutes of looks in 48 of 50 runs
    (it takes longer: the bounds hold their level however often they are looked at)."""
    rng = np.random.default_rng(7)
    found = sum(_looks(rng, 0.2, 0.2, 200, 60, (20, 50))[-1] == "contradicts" for _ in range(50))
    assert found >= 48
