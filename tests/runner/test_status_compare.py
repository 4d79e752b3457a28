"""runner.same_but_volatile against what it stands for: the two statuses with their volatile
fields put back to their defaults, compared as models (issue 13: the copies were ~1% of the
controller's CPU at 1,000 rollouts)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from canary.core.rollout import RolloutStatus, Transition
from canary.runner.runner import _VOLATILE_DEFAULTS, same_but_volatile

# a value or two per field, each a change a status can go through
CHANGES: dict[str, list[Any]] = {
    "stage": ["Progressing", "Promoting"],
    "revision": ["abc", "def"],
    "step": [1, 2],
    "weight": [10, 50],
    "weight_verified": [False],
    "match": [True],
    "started_at": [1.0, 2.0],
    "analysis_started_at": [1.5],
    "step_started_at": [3.0],
    "last_data_at": [4.0, 5.0],
    "router_failing_since": [6.0],
    "paused_at": [7.0],
    "paused_by": ["someone"],
    "promoted": [True],
    "outcome": ["promoted"],
    "last_decision": ["continue", "pass"],
    "reason": ["why"],
    "message": ["waiting", "holding"],
    "advice": ["~5 min"],
    "gates_open": [("confirm-rollout",)],
    "gate_failures": [1],
    "gate_answers": [{"pre-rollout": "ok"}],
    "history": [(Transition(at=1, from_phase="a", to_phase="b", step=0, weight=0, reason="r"),)],
}


def test_every_field_has_a_change() -> None:
    assert set(CHANGES) == set(RolloutStatus.model_fields)


STATUS = st.fixed_dictionaries(
    {}, optional={name: st.sampled_from(values) for name, values in CHANGES.items()}
).map(lambda fields: RolloutStatus(**fields))


@settings(max_examples=400, deadline=None)
@given(STATUS, STATUS)
def test_it_says_what_the_copies_compared_say(a: RolloutStatus, b: RolloutStatus) -> None:
    copies_equal = a.model_copy(update=_VOLATILE_DEFAULTS) == b.model_copy(
        update=_VOLATILE_DEFAULTS
    )
    assert same_but_volatile(a, b) is copies_equal
    assert same_but_volatile(a, a)


def test_a_volatile_change_alone_is_the_same_and_any_other_is_not() -> None:
    base = RolloutStatus(stage="Progressing", revision="abc", weight=10)
    for name, values in CHANGES.items():
        changed = base.model_copy(update={name: values[-1]})
        assert same_but_volatile(base, changed) is (name in _VOLATILE_DEFAULTS), name


def test_a_value_the_two_share_is_the_same_even_when_it_is_not_equal_to_itself() -> None:
    """A NaN read from a hand-edited status annotation, carried from the saved status into the
    next: the models' == says equal (identity first), so no save every tick."""
    saved = RolloutStatus.model_validate_json('{"stage": "Progressing", "paused_at": NaN}')
    status = saved.model_copy(update={"message": "held"})
    assert saved.model_copy(update=_VOLATILE_DEFAULTS) == status.model_copy(
        update=_VOLATILE_DEFAULTS
    )
    assert same_but_volatile(saved, status)
