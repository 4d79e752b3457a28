"""The demo's live progress: one plain line per tick, and a summary at the end.

Plain text, one line per tick, no cursor tricks: the same output reads well at a terminal
and in a CI log. Each line puts the weight asked of HAProxy next to the split the load
generator actually measured since that weight took, so a reader sees the router doing its
job, and then the counts the analysis saw and what it decided, with its reason.
"""

from __future__ import annotations

from analysis import Decision, Verdict
from canary.core.records import TickEntry
from canary.core.rollout import RecordTransition
from canary.demo.loadgen import SplitStats

__all__ = [
    "decisive_reason",
    "format_duration",
    "format_tick",
    "format_transition",
    "short",
]


def _rate(errors: float, requests: float) -> str:
    return f"{100 * errors / requests:5.2f}%" if requests > 0 else "    -"


def decisive_reason(verdict: Verdict) -> str:
    """The reason that explains the decision: a failing metric's, else one still undecided,
    shortened to its summary (the record keeps the whole text, test and e-values included)."""
    chosen = ""
    for wanted in (verdict.decision, Decision.CONTINUE):
        found = [m.reason for m in verdict.metrics.values() if m.decision is wanted and m.reason]
        if found:
            chosen = found[0]
            break
    if not chosen and verdict.reasons:
        chosen = verdict.reasons[0]
    return short(chosen)


def format_tick(tick: TickEntry, *, steps: int, split: SplitStats | None) -> str:
    """One progress line: time, step, weight set vs measured, per-arm counts, decision."""
    step = f"step {tick.step + 1}/{steps}" if tick.step < steps else "promote  "
    measured = "measured   -  "
    if split is not None and split.canary_share is not None:
        measured = f"measured {100 * split.canary_share:5.1f}% of {split.completed:>5}"
    arms = []
    for name, counts in (("primary", tick.primary), ("canary", tick.canary)):
        if counts is None:
            arms.append(f"{name} {'-':>6} req")
        else:
            arms.append(
                f"{name} {counts.requests:>6.0f} req {_rate(counts.errors, counts.requests)} err"
            )
    if tick.verdict is not None:
        decision = f"{tick.verdict.decision.value}: {decisive_reason(tick.verdict)}"
    elif tick.no_data_reason:
        decision = f"no data: {tick.no_data_reason}"
    else:
        decision = "-"
    return (
        f"{tick.elapsed_s:6.1f}s  {tick.phase:<11} {step}  weight {tick.weight_set:>3}% | "
        f"{measured} | {' | '.join(arms)} | {decision}"
    )


def short(reason: str) -> str:
    """A reason's summary, before the test's details (" — ..."), for one terminal line."""
    return reason.split(" — ")[0]


def format_transition(entry: RecordTransition, *, elapsed_s: float) -> str:
    """A state change, set apart from the tick lines."""
    return (
        f"{elapsed_s:6.1f}s  == {entry.from_phase} -> {entry.to_phase} "
        f"(weight {entry.weight}%): {short(entry.reason)}"
    )


def format_duration(seconds: float) -> str:
    """1m42s, 58.3s."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s"
