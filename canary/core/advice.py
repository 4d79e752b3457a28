"""The planner's advice during a rollout: how long a good canary needs to pass this step. Pure.

A step that ends at `max_step_s` before the analysis could show a good canary safe rolls it
back by its deadline, not by evidence; at low traffic that is the likely end, and the user
should hear it at the start, with what would help (generated load), not after 15 minutes.

Two estimates, both from analysis.planner (pass_advice's wording is what users read):

* **assumed**, at the start of the rollout, from the traffic the caller expects
  (`expected_rps` at the entry point, the primary's error rate) and the first step's weight;
* **observed**, once the analysis has counts worth planning from (a minute of them, or
  earlier once each arm has `min_samples` requests and every latency threshold is frozen),
  from the rates seen so far (plan_from_counts: traffic, split, the primary's error rate, the
  slow share above each latency threshold).

Generated load (`canary loadtest`, driven by a rollout webhook) is what helps a low-traffic
step, so the advice speaks of it in both directions: when none is configured and the step
does not fit, it says what a round rate of generated load at the entry point would do ("with
20 req/s of generated load at the entry point (canary loadtest): 4.0 min"); when a load test
is configured (`generated_rps`, sent at the entry point or to the canary alone), the assumed
estimate includes it and says what the step would need without it. Observed counts already
hold the generated load; the advice says so, and warns when far less traffic arrives than
the load test alone should send.

After the first observed estimate the runner re-checks every `recheck_s` and tells users again
only when the estimate changes materially (`material`): the verdict flips between fitting the
step and not, or the time to pass moves by more than `factor`. Once the analysis has passed
there is nothing left to advise (a pass is sticky: later steps only wait for min_step_s).

Nothing here awaits or does I/O; the runner (canary.runner.runner) runs these in a thread and
says what they return: a log line, a note in the record, a field of the status, and in
Kubernetes an Event (Warning when the step may not pass in time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, TypedDict

from pydantic import BaseModel, Field

from analysis import AnalysisConfig, Snapshot, pass_advice, plan, plan_from_counts
from analysis.planner import PassAdvice, observed_slow_rates

__all__ = [
    "FIRST_AFTER_S",
    "Advice",
    "LoadAt",
    "assumed_advice",
    "material",
    "observed_advice",
    "observed_due",
]

FIRST_AFTER_S = 60.0  # analysis seconds before the first estimate from observed rates...
EARLY_AFTER_S = 10.0  # ...or from this on, once the counts replace every guess (observed_due)
RECHECK_S = 60.0  # then a fresh estimate at most this often, said only if it changed
FACTOR = 2.0  # "changed materially": the time to pass moved by more than this factor
_NO_DEADLINE_BUDGET_S = 7 * 86400.0  # max_step_s None: no step deadline to compare with
_ARRIVING = 0.5  # observed traffic below this share of the configured load: it is not arriving

LoadAt = Literal["entry", "canary"]  # where generated load is sent: split like real traffic, or not


# The primary's error rate the estimate at the start assumes when none is configured.
ASSUMED_ERROR_RATE = 0.01


class RunnerTraffic(TypedDict):
    """RolloutRunner's planner arguments (runner_traffic)."""

    expected_rps: float | None
    expected_error_rate: float
    generated_rps: float | None
    generated_at: LoadAt


def runner_traffic(
    expected_rps: float | None,
    generated: tuple[float, LoadAt] | None,
    *,
    expected_error_rate: float = ASSUMED_ERROR_RATE,
) -> RunnerTraffic:
    """RolloutRunner's planner arguments: the traffic expected at the entry point, and the
    generated load of a load test (its rate, and where it is sent)."""
    return {
        "expected_rps": expected_rps,
        "expected_error_rate": expected_error_rate,
        "generated_rps": generated[0] if generated else None,
        "generated_at": generated[1] if generated else "entry",
    }


class ExpectedTraffic(BaseModel):
    """A config's keys for the planner's estimate at a rollout's start (a static target's
    and a two-cluster service's): the traffic assumed at the entry point (HAProxy, or the
    service's DNS name) and the primary's error rate, to say at once how long a good canary
    needs to pass the first step (null: the first estimate comes after a minute of observed
    traffic); and a load test that a rollout hook runs (`canary loadtest`), the requests/s it
    adds and where (entry: split like real traffic; canary: the canary alone). Across two
    clusters a load generator's connections stick to one cluster's address rather than
    following the DNS weights: send it to the canary cluster with `at: canary`.

    No model_config here: the configs' own (extra keys refused, frozen) must stay in force,
    and a base's config listed later would override it."""

    expected_rps: float | None = Field(default=None, gt=0, le=1e7, allow_inf_nan=False)
    expected_error_rate: float = Field(default=ASSUMED_ERROR_RATE, ge=0, lt=1, allow_inf_nan=False)
    generated_rps: float | None = Field(default=None, gt=0, le=1e5, allow_inf_nan=False)
    generated_at: LoadAt = "entry"

    def runner_traffic(self, from_gates: tuple[float, LoadAt] | None) -> RunnerTraffic:
        """RolloutRunner's planner arguments. `from_gates`: the load the rollout hooks ask
        for (canary.notify.gates.load_from_gates); an explicit generated_rps overrides it."""
        generated = from_gates
        if self.generated_rps is not None:
            generated = (self.generated_rps, self.generated_at)
        return runner_traffic(
            self.expected_rps, generated, expected_error_rate=self.expected_error_rate
        )


@dataclass(frozen=True, slots=True)
class Advice:
    """One estimate of the time a good canary needs to pass, and what users are told."""

    source: Literal["assumed", "observed"]
    weight: int  # the canary percent it was made for
    elapsed_s: float  # analysis seconds of counts behind it (0 for assumed rates)
    canary_rps: float
    primary_rps: float
    base_error_rate: float  # the primary's error rate it assumed or observed
    expected_pass_s: float | None  # mean; None: may never pass at this traffic
    likely_pass_s: float | None  # 95% of good canaries pass by then
    expected_fail_s: float | None  # time to catch a doubling of errors
    budget_s: float | None  # max_step_s; None: no deadline
    fits: bool
    extra_canary_rps: float | None  # generated load on the canary that would make it fit
    extra_entry_rps: float | None  # or at the entry point (split like real traffic)
    message: str
    # A configured load test (canary loadtest): its rate, where it is sent, and (assumed
    # advice) the time to pass without it. None: no load test configured.
    generated_rps: float | None = None
    generated_at: LoadAt = "entry"
    without_load_pass_s: float | None = None
    # With no load test configured and a step that does not fit: a round rate of generated
    # load at the entry point that fits, and the time to pass with it.
    suggested_load_rps: float | None = None
    suggested_load_pass_s: float | None = None

    @property
    def level(self) -> Literal["info", "warning"]:
        return "info" if self.fits else "warning"

    def plan(self) -> dict[str, float | None]:
        """The numbers for the record (StartEntry.plan, the advice note's plan)."""
        return {
            "expected_pass_s": self.expected_pass_s,
            "likely_pass_s": self.likely_pass_s,
            "expected_fail_s": self.expected_fail_s,
            "canary_rps": self.canary_rps,
            "primary_rps": self.primary_rps,
            "base_error_rate": self.base_error_rate,
            "elapsed_s": self.elapsed_s,
            "budget_s": self.budget_s,
            "fits": 1.0 if self.fits else 0.0,
            "extra_canary_rps": self.extra_canary_rps,
            "extra_entry_rps": self.extra_entry_rps,
            "generated_rps": self.generated_rps,
            "suggested_load_rps": self.suggested_load_rps,
            "suggested_load_pass_s": self.suggested_load_pass_s,
        }


def _duration(seconds: float | None) -> str:
    """As the planner words times (its messages and ours read alike)."""
    if seconds is None or not math.isfinite(seconds):
        return "never"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _with_load(rate_rps: float, share: float, load_rps: float, at: LoadAt) -> tuple[float, float]:
    """Traffic and canary share once `load_rps` of generated load is added `at` a place."""
    if at == "entry":
        return rate_rps + load_rps, share
    total = rate_rps + load_rps
    return total, (rate_rps * share + load_rps) / total


def _round_up(value: float) -> float:
    """The next round number (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8 x 10^k) at or above `value`:
    a rate people can type, at most 25% above what is needed."""
    if value <= 0:
        return 1.0
    scale = 10.0 ** math.floor(math.log10(value))
    for step in (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0):
        if step * scale >= value * (1 - 1e-9):
            return step * scale
    return 10.0 * scale  # pragma: no cover - the loop always returns


def _likely_pass_s(
    rate_rps: float,
    share: float,
    error_rate: float,
    slow_rates: dict[str, float] | None,
    config: AnalysisConfig,
) -> float | None:
    return plan(
        rate_rps=rate_rps,
        canary_weight=share,
        baseline_error_rate=error_rate,
        slow_rates=slow_rates,
        config=config,
    ).likely_pass_s


def _suggest_load(
    advice: PassAdvice,
    *,
    rate_rps: float,
    share: float,
    error_rate: float,
    slow_rates: dict[str, float] | None,
    config: AnalysisConfig,
) -> tuple[float, float | None] | None:
    """A round entry-point rate of generated load that makes the step fit, and its time."""
    if advice.fits or advice.extra_entry_rps is None:
        return None
    load = _round_up(advice.extra_entry_rps)
    return load, _likely_pass_s(rate_rps + load, share, error_rate, slow_rates, config)


def _advise(
    *,
    source: Literal["assumed", "observed"],
    rate_rps: float,
    canary_share: float,
    error_rate: float,
    slow_rates: dict[str, float] | None,
    weight: int,
    elapsed_s: float,
    budget_s: float | None,
    config: AnalysisConfig,
    origin: str,
    generated_rps: float | None = None,
    generated_at: LoadAt = "entry",
    without_load_pass_s: float | None = None,
    load_note: str = "",
) -> Advice:
    budget = _NO_DEADLINE_BUDGET_S if budget_s is None else budget_s
    advice = pass_advice(
        rate_rps=rate_rps,
        canary_weight=canary_share,
        baseline_error_rate=error_rate,
        budget_s=budget,
        slow_rates=slow_rates,
        config=config,
    )
    estimate = plan(
        rate_rps=rate_rps,
        canary_weight=canary_share,
        baseline_error_rate=error_rate,
        slow_rates=slow_rates,
        config=config,
    )
    message = advice.message
    if budget_s is None:
        # pass_advice compares with a budget; without a deadline only the time is news.
        message = message.split(": fits the ", 1)[0].split(": longer than the ", 1)[0]
        message += " (no max_step_s: the step waits for it)"
    suggestion = None
    if generated_rps is None and budget_s is not None:
        suggestion = _suggest_load(
            advice,
            rate_rps=rate_rps,
            share=canary_share,
            error_rate=error_rate,
            slow_rates=slow_rates,
            config=config,
        )
    extra = load_note
    if suggestion is not None:
        load, load_pass_s = suggestion
        extra = (
            f" With {load:.3g} req/s of generated load at the entry point (canary loadtest): "
            f"{_duration(load_pass_s)}.{load_note}"
        )
    if extra:
        message = (message if message.endswith(".") else message + ".") + extra
    return Advice(
        source=source,
        weight=weight,
        elapsed_s=elapsed_s,
        canary_rps=advice.canary_rps,
        primary_rps=advice.primary_rps,
        base_error_rate=error_rate,
        expected_pass_s=advice.expected_pass_s,
        likely_pass_s=advice.likely_pass_s,
        expected_fail_s=estimate.expected_fail_s,
        budget_s=budget_s,
        fits=advice.fits or budget_s is None,
        extra_canary_rps=advice.extra_canary_rps,
        extra_entry_rps=advice.extra_entry_rps,
        message=f"time to pass at {weight}% ({origin}): {message}",
        generated_rps=generated_rps,
        generated_at=generated_at,
        without_load_pass_s=without_load_pass_s,
        suggested_load_rps=suggestion[0] if suggestion else None,
        suggested_load_pass_s=suggestion[1] if suggestion else None,
    )


def assumed_advice(
    *,
    expected_rps: float,
    expected_error_rate: float,
    weight: int,
    budget_s: float | None,
    config: AnalysisConfig,
    generated_rps: float | None = None,
    generated_at: LoadAt = "entry",
) -> Advice:
    """The estimate at the start, from the traffic the caller expects, plus the generated
    load of a configured load test (`generated_rps`, sent `generated_at` the entry point or
    the canary). Raises ValueError for rates the planner cannot use (a weight of 0 or 100, a
    rate that is not positive)."""
    share = weight / 100.0
    origin = (
        f"assumed {expected_rps:.3g} req/s at the entry point, "
        f"{100 * expected_error_rate:.3g}% errors"
    )
    if generated_rps is None:
        return _advise(
            source="assumed",
            rate_rps=expected_rps,
            canary_share=share,
            error_rate=expected_error_rate,
            slow_rates=None,
            weight=weight,
            elapsed_s=0.0,
            budget_s=budget_s,
            config=config,
            origin=origin,
        )
    if not (math.isfinite(generated_rps) and generated_rps > 0):
        raise ValueError(f"generated_rps: {generated_rps!r} is not a positive rate")
    rate, loaded_share = _with_load(expected_rps, share, generated_rps, generated_at)
    without = _likely_pass_s(expected_rps, share, expected_error_rate, None, config)
    where = "at the entry point" if generated_at == "entry" else "on the canary"
    return _advise(
        source="assumed",
        rate_rps=rate,
        canary_share=loaded_share,
        error_rate=expected_error_rate,
        slow_rates=None,
        weight=weight,
        elapsed_s=0.0,
        budget_s=budget_s,
        config=config,
        origin=f"{origin}, and {generated_rps:.3g} req/s generated {where} by canary loadtest",
        generated_rps=generated_rps,
        generated_at=generated_at,
        without_load_pass_s=without,
        load_note=f" Without the generated load: {_duration(without)}.",
    )


def observed_advice(
    snapshot: Snapshot,
    *,
    weight: int,
    budget_s: float | None,
    config: AnalysisConfig,
    generated_rps: float | None = None,
    generated_at: LoadAt = "entry",
) -> Advice:
    """The estimate from the counts the analysis was given; they hold a configured load
    test's requests already (`generated_rps` only changes what is said). Raises ValueError
    while an arm has served nothing (no split to plan from)."""
    observed = plan_from_counts(snapshot, config=config)
    total = observed.canary_rps + observed.primary_rps
    load_note = ""
    if generated_rps is not None:
        arrived = total if generated_at == "entry" else observed.canary_rps
        where = "at the entry point" if generated_at == "entry" else "on the canary"
        if arrived < _ARRIVING * generated_rps:
            load_note = (
                f" The load test should add {generated_rps:.3g} req/s {where}, but only "
                f"{arrived:.3g} req/s arrive: check canary loadtest and the rollout hook."
            )
        else:
            load_note = f" (Includes {generated_rps:.3g} req/s generated {where}.)"
    return _advise(
        source="observed",
        rate_rps=total,
        canary_share=observed.canary_rps / total,
        error_rate=observed.base_error_rate,
        slow_rates=dict(observed.slow_rates),
        weight=weight,
        elapsed_s=snapshot.elapsed_s,
        budget_s=budget_s,
        config=config,
        origin=(
            f"observed over {snapshot.elapsed_s:.0f} s: {total:.3g} req/s, "
            f"{100 * observed.base_error_rate:.2g}% errors on the primary"
        ),
        generated_rps=generated_rps,
        generated_at=generated_at,
        load_note=load_note,
    )


def observed_due(
    last_checked_s: float | None,
    snapshot: Snapshot,
    *,
    config: AnalysisConfig,
    first_after_s: float = FIRST_AFTER_S,
    early_after_s: float = EARLY_AFTER_S,
    recheck_s: float = RECHECK_S,
) -> bool:
    """Whether to estimate from the observed rates now. `last_checked_s`: the analysis
    seconds of the previous observed estimate (None: there was none yet).

    The first one comes after `first_after_s`, or earlier (from `early_after_s` on) once the
    counts can already stand in for every guess: `min_samples` requests on each arm and every
    latency threshold frozen, so the slow shares are observed too (on busy services that is
    seconds, and a pass may come before a minute is up)."""
    p, c = snapshot.primary, snapshot.canary
    elapsed = snapshot.elapsed_s
    if p.requests <= 0 or c.requests <= 0 or elapsed <= 0:
        return False
    if last_checked_s is not None:
        return elapsed - last_checked_s >= recheck_s
    if elapsed >= first_after_s:
        return True
    return (
        elapsed >= early_after_s
        and min(p.requests, c.requests) >= config.min_samples
        and len(observed_slow_rates(snapshot, config)) == len(config.quantiles)
    )


def _moved(old: float | None, new: float | None, factor: float) -> bool:
    if old is None or new is None:
        return (old is None) != (new is None)
    if old <= 0 or new <= 0 or not (math.isfinite(old) and math.isfinite(new)):
        return old != new
    return max(old / new, new / old) > factor


def material(previous: Advice | None, new: Advice, *, factor: float = FACTOR) -> bool:
    """Whether `new` is worth telling users after `previous`: the first estimate, the first
    from observed rates, another weight, a flip between fitting the step and not, or a time
    to pass that moved by more than `factor`."""
    if previous is None or previous.source != new.source or previous.weight != new.weight:
        return True
    if previous.fits != new.fits:
        return True
    return _moved(previous.likely_pass_s, new.likely_pass_s, factor)
