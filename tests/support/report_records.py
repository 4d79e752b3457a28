"""Realistic analysis records for the report tests: a rollout simulated tick by tick.

Counts are drawn with a fixed seed (Poisson traffic, binomial errors, multinomial latency
buckets from a log-normal), accumulated like Prometheus counters, and judged by the real
`analysis.Analyzer`; the record entries are the real `canary.core.records` models, written with
`dump_entry` and read back as JSON, exactly what `canary report` reads from disk.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from analysis import AnalysisConfig, Analyzer, ArmCounts, Snapshot, plan
from canary.core.records import (
    EndEntry,
    FailoverEntry,
    ManualEntry,
    NoteEntry,
    StartEntry,
    TickEntry,
    TransitionEntry,
    dump_entry,
)

BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, math.inf)
T0 = 1_790_000_000.0


@dataclass(frozen=True)
class Scenario:
    seed: int
    canary_error_rate: float
    primary_error_rate: float = 0.01
    canary_latency_median_s: float = 0.04
    primary_latency_median_s: float = 0.04
    rps: float = 400.0
    tick_s: float = 5.0
    ticks_per_step: int = 6
    steps: tuple[int, ...] = (10, 25, 50)
    max_ticks: int = 200
    manual_pause_at_tick: int | None = None
    failover_at_tick: int | None = None
    truncate_after_tick: int | None = None  # drop the end: a controller that stopped


def _bucket_probabilities(median_s: float, sigma: float = 0.6) -> np.ndarray:
    cdf = [
        1.0 if math.isinf(b) else 0.5 * (1 + math.erf(math.log(b / median_s) / (sigma * 2**0.5)))
        for b in BUCKETS
    ]
    return np.diff([0.0, *cdf])


def _draw(
    rng: np.random.Generator, n: int, error_rate: float, probabilities: np.ndarray
) -> tuple[int, int, np.ndarray]:
    errors = int(rng.binomial(n, error_rate))
    counts = rng.multinomial(n, probabilities)
    return n, errors, counts


def simulate(scenario: Scenario) -> list[dict[str, Any]]:
    """Entries (JSON objects, as read from disk) of one simulated rollout."""
    rng = np.random.default_rng(scenario.seed)
    analyzer = Analyzer(AnalysisConfig())
    rollout = f"demo/app@{scenario.seed:06x}"
    # the planner's estimate at the first step, as the controller records it
    estimate = plan(
        rate_rps=scenario.rps,
        canary_weight=scenario.steps[0] / 100,
        baseline_error_rate=scenario.primary_error_rate,
    )
    entries: list[Any] = [
        StartEntry(
            at=T0,
            rollout=rollout,
            target="demo/app",
            primary_version="v1.4.2",
            canary_version="v1.5.0",
            steps=list(scenario.steps),
            config={"tick_s": scenario.tick_s, "seed": scenario.seed},
            plan={
                "expected_fail_s": estimate.expected_fail_s,
                "expected_pass_s": estimate.expected_pass_s,
            },
        )
    ]
    p_probs = _bucket_probabilities(scenario.primary_latency_median_s)
    c_probs = _bucket_probabilities(scenario.canary_latency_median_s)
    totals = {
        "primary": [0, 0, np.zeros(len(BUCKETS), dtype=np.int64)],
        "canary": [0, 0, np.zeros(len(BUCKETS), dtype=np.int64)],
    }
    step = 0
    in_step = 0
    phase = "progressing"
    outcome: str | None = None
    reason = ""
    now = T0
    for tick in range(1, scenario.max_ticks + 1):
        now = T0 + tick * scenario.tick_s
        weight = scenario.steps[step]
        n = int(rng.poisson(scenario.rps * scenario.tick_s))
        n_canary = int(rng.binomial(n, weight / 100))
        for arm, count, rate, probs in (
            ("primary", n - n_canary, scenario.primary_error_rate, p_probs),
            ("canary", n_canary, scenario.canary_error_rate, c_probs),
        ):
            requests, errors, buckets = _draw(rng, count, rate, probs)
            totals[arm][0] += requests  # type: ignore[operator]
            totals[arm][1] += errors  # type: ignore[operator]
            totals[arm][2] = totals[arm][2] + buckets  # type: ignore[operator]

        def arm_counts(arm: str) -> ArmCounts:
            requests, errors, buckets = totals[arm]
            cumulative = np.cumsum(buckets)  # type: ignore[arg-type]
            return ArmCounts(
                requests=float(requests),  # type: ignore[arg-type]
                errors=float(errors),  # type: ignore[arg-type]
                latency_buckets={b: float(c) for b, c in zip(BUCKETS, cumulative, strict=True)},
            )

        elapsed = tick * scenario.tick_s
        primary, canary = arm_counts("primary"), arm_counts("canary")
        verdict = analyzer.observe(Snapshot(elapsed_s=elapsed, primary=primary, canary=canary))
        entries.append(
            TickEntry(
                at=now,
                rollout=rollout,
                elapsed_s=elapsed,
                phase=phase,
                step=step,
                weight_set=weight,
                weight_read=weight,
                primary=primary,
                canary=canary,
                verdict=verdict,
                observed_canary_share=n_canary / n if n else None,
            )
        )
        if scenario.truncate_after_tick is not None and tick >= scenario.truncate_after_tick:
            break
        if scenario.manual_pause_at_tick == tick:
            entries.append(
                ManualEntry(
                    at=now + 0.5,
                    rollout=rollout,
                    command="pause",
                    who="alice",
                    reason="checking a dashboard",
                )
            )
            entries.append(
                ManualEntry(at=now + 1.0, rollout=rollout, command="resume", who="alice")
            )
        if scenario.failover_at_tick == tick:
            entries.append(
                FailoverEntry(
                    at=now + 0.5,
                    rollout=rollout,
                    direction="to-standby",
                    who="controller",
                    reason="primary cluster: 3 failed probes",
                )
            )
            entries.append(
                NoteEntry(
                    at=now + 0.6,
                    rollout=rollout,
                    level="warning",
                    message="primary cluster unhealthy during the analysis",
                )
            )
        if verdict.decision == "fail":
            outcome, reason = "rolled_back", "analysis failed: " + verdict.reasons[0]
            entries.append(
                TransitionEntry(
                    at=now + 0.1,
                    rollout=rollout,
                    from_phase=phase,
                    to_phase="rolled_back",
                    step=step,
                    weight=0,
                    reason=reason,
                )
            )
            break
        in_step += 1
        # canary/core/rollout.py's rule: a step advances once its minimum time has passed and the
        # latest verdict is pass; a fail rolls back at any time.
        advance = verdict.decision == "pass" and in_step >= scenario.ticks_per_step
        if advance and step == len(scenario.steps) - 1:
            outcome, reason = "promoted", "analysis passed at the last step"
            entries.append(
                TransitionEntry(
                    at=now + 0.1,
                    rollout=rollout,
                    from_phase=phase,
                    to_phase="promoted",
                    step=step,
                    weight=100,
                    reason=reason,
                )
            )
            break
        if advance:
            step += 1
            in_step = 0
            entries.append(
                TransitionEntry(
                    at=now + 0.1,
                    rollout=rollout,
                    from_phase=phase,
                    to_phase=phase,
                    step=step,
                    weight=scenario.steps[step],
                    reason=f"step {step}: {scenario.steps[step]}% after "
                    f"{scenario.ticks_per_step} ticks and a pass",
                )
            )
    if outcome is not None and scenario.truncate_after_tick is None:
        entries.append(
            EndEntry(
                at=now + 0.2,
                rollout=rollout,
                outcome=outcome,
                reason=reason,  # type: ignore[arg-type]
                duration_s=now + 0.2 - T0,
            )
        )
    return [json.loads(dump_entry(entry)) for entry in entries]


_URL_ATTR = re.compile(
    r"""\b(?:src|href|xlink:href|action|poster|data)\s*=\s*["']?([^"'\s>]*)""", re.I
)


def external_references(page: str) -> list[str]:
    """Everything in a page that could make the browser fetch something."""
    found = re.findall(r"https?://[^\s\"'<>)]*", page)
    found += re.findall(r"(?<![:\w])//[\w.-]+\.[a-z]{2,}", page)  # protocol-relative URLs
    found += re.findall(r"url\(\s*['\"]?(?!data:|#)[^)]*\)", page)
    found += re.findall(r"@import[^;]*;", page)
    found += [v for v in _URL_ATTR.findall(page) if v and not v.startswith(("#", "data:"))]
    found += re.findall(r"<script[^>]*>", page)
    return found
