"""Analyzer.replay and Analyzer.carry: a resumed rollout rebuilds its evidence with one or
the other, so an analyzer that replayed some looks, or took up the state another one carried,
must then judge exactly as one that observed every look."""

from __future__ import annotations

import copy
import json
import math
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analysis import AnalysisConfig, Analyzer, ArmCounts, MetricConfig, Snapshot, Verdict

BOUNDS = (0.05, 0.1, 0.5)

# One interval of one arm: requests, error share, three slow-split shares, and whether the
# arm's counters restart (went back to this interval's counts alone).
arm_step = st.tuples(
    st.integers(0, 400),
    st.floats(0, 1),
    st.floats(0, 1),
    st.floats(0, 1),
    st.floats(0, 1),
    st.sampled_from([False] * 12 + [True]),
)
Step = tuple[int, float, float, float, float, bool]


def _grow(cum: list[float], s: Step) -> list[float]:
    n, fe, f1, f2, f3, reset = s
    e = math.floor(n * fe)
    cuts = sorted((math.floor(n * f1), math.floor(n * f2), math.floor(n * f3)))
    base = [0.0] * 5 if reset else cum
    return [base[0] + n, base[1] + e, base[2] + cuts[0], base[3] + cuts[1], base[4] + cuts[2]]


def _arm(cum: list[float]) -> ArmCounts:
    n, e, b1, b2, b3 = cum
    return ArmCounts(
        requests=n, errors=e, latency_buckets={0.05: b1, 0.1: b2, 0.5: b3, math.inf: n}
    )


def _snapshots(steps: list[tuple[Step, Step]]) -> list[Snapshot]:
    p, c = [0.0] * 5, [0.0] * 5
    out = []
    for t, (sp, sc) in enumerate(steps, start=1):
        p, c = _grow(p, sp), _grow(c, sc)
        out.append(Snapshot(elapsed_s=10.0 * t, primary=_arm(p), canary=_arm(c)))
    return out


def _same(a: Verdict, b: Verdict) -> bool:
    # JSON text: exact floats (repr), and NaN equal to NaN
    return a.model_dump_json() == b.model_dump_json()


def _check(config: AnalysisConfig, snapshots: list[Snapshot], cut: int) -> None:
    full = Analyzer(config)
    expected = [full.observe(s) for s in snapshots]
    replayed = Analyzer(config)
    for s in snapshots[:cut]:
        replayed.replay(s)
    for i, s in enumerate(snapshots[cut:], start=cut):
        got = replayed.observe(s)
        assert _same(got, expected[i]), f"look {i} after replaying {cut}"


def _carried(analyzer: Analyzer) -> dict[str, Any]:
    """What Analyzer.carry gives, through JSON text as a record's head keeps it."""
    state: dict[str, Any] = json.loads(json.dumps(analyzer.carry()))
    return state


def _check_carried(config: AnalysisConfig, snapshots: list[Snapshot], cut: int) -> None:
    full = Analyzer(config)
    expected = [full.observe(s) for s in snapshots]
    before = Analyzer(config)
    for i, s in enumerate(snapshots[:cut]):
        # both ways a look is taken: observed (a verdict built) or replayed (judged only)
        before.observe(s) if i % 3 else before.replay(s)
    after = Analyzer(config)
    after.carry_on(_carried(before))
    for i, s in enumerate(snapshots[cut:], start=cut):
        got, went_on = after.observe(s), before.observe(s)
        assert _same(got, expected[i]), f"look {i} after carrying on from {cut}"
        assert _same(went_on, expected[i])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(arm_step, arm_step), min_size=1, max_size=40),
    st.integers(0, 40),
    st.sampled_from([AnalysisConfig(), AnalysisConfig(min_samples=10)]),
)
def test_replayed_then_observed_equals_observed_throughout(
    steps: list[tuple[Step, Step]], cut: int, config: AnalysisConfig
) -> None:
    """Any counts (resets, idle intervals, more events than one arm can bear): replaying the
    first looks and observing the rest gives every verdict that observing all of them gave."""
    snapshots = _snapshots(steps)
    _check(config, snapshots, min(cut, len(snapshots)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(arm_step, arm_step), min_size=1, max_size=40),
    st.integers(0, 40),
    st.sampled_from([AnalysisConfig(), AnalysisConfig(min_samples=10)]),
)
def test_carried_on_equals_observed_throughout(
    steps: list[tuple[Step, Step]], cut: int, config: AnalysisConfig
) -> None:
    """Any counts: an analyzer that takes up the state another one carried after some looks
    gives every later verdict that observing all of them gave."""
    snapshots = _snapshots(steps)
    _check_carried(config, snapshots, min(cut, len(snapshots)))


def _traffic(seed: int, canary_errors: float, canary_slow: float, ticks: int) -> list[Snapshot]:
    """Poisson-ish A/B traffic at 20 and 2 req/s over 10 s ticks."""
    rng = random.Random(seed)
    p, c = [0.0] * 5, [0.0] * 5
    out = []
    for t in range(1, ticks + 1):
        for cum, rate, err, slow in ((p, 200, 0.03, 1.0), (c, 20, canary_errors, canary_slow)):
            n = rng.randint(rate // 2, rate * 3 // 2)
            e = sum(rng.random() < err for _ in range(n))
            fast = [sum(rng.random() < share / slow for _ in range(n)) for share in (0.5, 0.9)]
            cum[0] += n
            cum[1] += e
            cum[2] += min(fast[0], n)
            cum[3] += min(max(fast[0], fast[1]), n)
            cum[4] += n
        out.append(Snapshot(elapsed_s=10.0 * t, primary=_arm(p), canary=_arm(c)))
    return out


@pytest.mark.parametrize(
    ("canary_errors", "canary_slow", "outcome"),
    [(0.03, 1.0, "pass"), (0.12, 1.0, "fail"), (0.03, 1.6, "fail")],
)
def test_replay_keeps_a_reached_pass_or_fail(
    canary_errors: float, canary_slow: float, outcome: str
) -> None:
    """Realistic traffic that passes (A/A) or fails (errors, latency): wherever the replay
    stops, before, at or after the decision, the looks that follow are judged the same."""
    snapshots = _traffic(7, canary_errors, canary_slow, 120)
    verdicts = [v.decision.value for v in map(Analyzer().observe, snapshots)]
    assert outcome in verdicts  # the sequence does reach it
    first = verdicts.index(outcome)
    for cut in sorted({0, 1, first - 1, first, first + 1, len(snapshots) - 1}):
        _check(AnalysisConfig(), snapshots, max(cut, 0))
        _check_carried(AnalysisConfig(), snapshots, max(cut, 0))


def _refused(state: dict[str, Any], config: AnalysisConfig | None = None) -> str:
    analyzer = Analyzer(config)
    before = json.dumps(analyzer.carry())
    with pytest.raises(ValueError) as caught:
        analyzer.carry_on(state)
    assert json.dumps(analyzer.carry()) == before  # refused whole: nothing taken
    return str(caught.value)


def test_a_carried_state_is_refused_whole_with_what_is_wrong() -> None:
    """Another analysis' settings, another version, and each kind of damage are refused
    with a reason that names it, and the analyzer is left as it was."""
    analyzer = Analyzer()
    for s in _traffic(3, 0.03, 1.0, 40):
        analyzer.observe(s)
    good = _carried(analyzer)
    Analyzer().carry_on(copy.deepcopy(good))  # the undamaged state is taken

    other = AnalysisConfig(errors=MetricConfig(tolerance=0.5))
    assert "other settings" in _refused(copy.deepcopy(good), other)

    def damaged(path: list[Any], value: Any) -> dict[str, Any]:
        state = copy.deepcopy(good)
        node = state
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return state

    cases: list[tuple[list[Any], Any, str]] = [
        (["v"], 2, "version"),
        (["skipped"], -1, "skipped"),
        (["skipped"], True, "skipped"),
        (["passed"], ["nonsense"], "passed"),
        (["last"], [1.0, [5.0, 9.0, []], [1.0, 0.0, []]], "errors (9.0) > requests"),
        (["last", 1, 2], [[0.1, 5.0], [0.5, 1.0]], "not cumulative"),
        (["errors", "loglik"], "AAAA", "loglik holds 3 bytes"),
        (["errors", "loglik"], "not base64!", "not base64"),
        (["errors", "totals"], [1.0, math.nan, 0.0, 0.0], "totals is not finite"),
        (["errors", "prev"], [1.0, 2.0], "prev is not 4 numbers"),
        (["errors", "pass_seen"], 1, "pass_seen"),
        (["errors", "judged"], [0.0, 1.0], "judged is not six values"),
        (["latency"], {}, "latency does not hold"),
        (["latency", "latency_p50", "threshold_s"], -1.0, "threshold"),
        (["latency", "latency_p99", "count", "e_pass"], math.inf, "e_pass is not finite"),
    ]
    for path, value, expected in cases:
        assert expected in _refused(damaged(path, value)), (path, value)
