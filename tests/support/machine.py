"""Driving the pure rollout machine in a test as the runner would, with a router that always
works: every SetWeight is answered as verified, every Promote as done."""

from __future__ import annotations

from canary.core.rollout import (
    Action,
    Event,
    Promote,
    PromoteDone,
    RolloutSpec,
    RolloutStatus,
    SetWeight,
    WeightVerified,
    step,
)


def run(
    spec: RolloutSpec, status: RolloutStatus, events: list[tuple[float, Event]]
) -> tuple[RolloutStatus, list[Action]]:
    """Feed events in order, answering every SetWeight as a router that always works."""
    actions: list[Action] = []
    for now, event in events:
        queue: list[Event] = [event]
        while queue:
            out = step(spec, status, queue.pop(0), now)
            status = out.status
            actions.extend(out.actions)
            for action in out.actions:
                if isinstance(action, SetWeight):
                    queue.append(WeightVerified(action.weight))
                elif isinstance(action, Promote):
                    queue.append(PromoteDone(ok=True))
    return status, actions
