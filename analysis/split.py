"""Whether a step's traffic split follows its weight, judged against the step before's.

A check against a router that says it moved traffic but did not (a write acknowledged and
dropped, an ingress controller that stopped applying its annotations), which a read-back of
the router's own answer cannot see.

The canary's share of requests at one step is compared with its share at the step before,
not with the weight itself: traffic that reaches the primary's pods without passing the router
(in-cluster callers, health checks) lowers the canary's share at every step by the same
factor, so the share is proportional to the weight, and the ratio of two steps' shares is the
ratio of their weights whatever that traffic is. With anytime-valid bounds on both shares
(analysis.counts' Krichevsky-Trofimov confidence sequences, so looking every tick costs no
error rate), the split:
- *contradicts* the weights when the share is shown to have moved less than halfway toward
  what they say (on a log scale: below the square root of their ratio) or more than twice as
  far (above its square);
- *follows* them when it is shown to have moved at least halfway (what `hold` needs before a
  step may pass: positive evidence, as a pass is);
- is *unknown* while the bounds are too wide to tell: never a contradiction, so low traffic
  never holds a step on contradiction alone.
The margins also cover requests that are not independent draws (keep-alive connections,
sticky sessions) within reason.

Traffic the router does not split that goes to the *canary* alone (a load tester calling it
directly) breaks the proportionality and can make a good router look like one that did not
move: that is why the controller's default only warns (canary.core.rollout, `traffic_check`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

from analysis.counts import rate_lower, rate_upper

__all__ = ["SPLIT_ALPHA", "SplitEvidence", "split_evidence"]

# Each share's bound is held at this level: the chance that a router which split as weighted
# is ever called contradicted, however long the step and however often we look, is at most
# about 2 * SPLIT_ALPHA (for independent requests).
SPLIT_ALPHA = 1e-3


@dataclass(frozen=True, slots=True)
class SplitEvidence:
    """Two steps' canary shares (estimate, lower, upper, requests counted) and what they say."""

    weight_before: int
    share_before: tuple[float, float, float]
    requests_before: float
    weight_now: int
    share_now: tuple[float, float, float]
    requests_now: float
    verdict: Literal["follows", "contradicts", "unknown"]

    def describe(self) -> str:
        """One line for a status message, an Event and the record."""
        return f"{self.headline()}: {self.detail()}"

    def headline(self) -> str:
        if self.verdict == "contradicts":
            low, _ = _margins(self.expected_ratio)
            under = self.share_now[2] < low * self.share_before[1]
            return f"the traffic split {'did not follow' if under else 'overshot'} the weight"
        if self.verdict == "follows":
            return "the traffic split follows the weight"
        return "the traffic split cannot be told from the weight yet"

    def detail(self) -> str:
        now, before = self.share_now, self.share_before
        return (
            f"the canary had {_pct(now[0])} of requests at {self.weight_now}% "
            f"({_pct(now[1])}..{_pct(now[2])}, {self.requests_now:.0f} requests) against "
            f"{_pct(before[0])} at {self.weight_before}% ({_pct(before[1])}..{_pct(before[2])}, "
            f"{self.requests_before:.0f} requests); {self.weight_now}/{self.weight_before} "
            f"of that is {_pct(min(1.0, before[0] * self.expected_ratio))}"
        )

    @property
    def expected_ratio(self) -> float:
        return self.weight_now / self.weight_before


def _margins(ratio: float) -> tuple[float, float]:
    """The shares' ratio that contradicts weights in `ratio` (> 1): below the first or above
    the second (halfway, and twice as far, on a log scale)."""
    return math.sqrt(ratio), ratio * ratio


def _pct(share: float) -> str:
    return f"{100 * share:.3g}%"


@functools.lru_cache(maxsize=4096)
def _share_before(canary: float, primary: float, alpha: float) -> tuple[float, float, float]:
    """_share of a step that ended: the same every tick of the step after it (one entry a
    rollout; half of a look's ~60 us)."""
    return _share(canary, primary, alpha)


def _share(canary: float, primary: float, alpha: float) -> tuple[float, float, float]:
    n = canary + primary
    if n <= 0:
        return (math.nan, 0.0, 1.0)
    return (canary / n, rate_lower(canary, n, alpha), rate_upper(canary, n, alpha))


def split_evidence(
    before: tuple[float, float],
    weight_before: int,
    now: tuple[float, float],
    weight_now: int,
    *,
    alpha: float = SPLIT_ALPHA,
) -> SplitEvidence:
    """`before` and `now`: (canary, primary) requests counted at each step, at weights of
    `weight_before` and `weight_now` percent (1..99, the second higher: steps only go up)."""
    if not (0 < weight_before < weight_now < 100):
        raise ValueError(
            f"weights must be percentages in 1..99, the second higher, got {weight_before} "
            f"and {weight_now}"
        )
    if min(*before, *now) < 0 or not all(math.isfinite(x) for x in (*before, *now)):
        raise ValueError(f"request counts must be finite and >= 0, got {before} and {now}")
    b, c = _share_before(*before, alpha), _share(*now, alpha)
    ratio = weight_now / weight_before
    low, high = _margins(ratio)
    # the shares' ratio now / before is within (c lower / b upper, c upper / b lower)
    verdict: Literal["follows", "contradicts", "unknown"] = "unknown"
    if c[2] < low * b[1] or c[1] > high * b[2]:
        verdict = "contradicts"
    elif low * b[2] <= c[1]:
        # shown to have moved at least halfway: what a pass needs (an overshoot is only
        # ever shown, never ruled out: a share cannot grow past 1)
        verdict = "follows"
    return SplitEvidence(
        weight_before=weight_before,
        share_before=b,
        requests_before=sum(before),
        weight_now=weight_now,
        share_now=c,
        requests_now=sum(now),
        verdict=verdict,
    )
