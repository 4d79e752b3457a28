"""Analysis settings: one validated, frozen object, so a bad setting fails where it is written.

Why two alphas. A canary analysis can be wrong in two ways, and they cost differently:

* a false *rollback* (`alpha`, default 1%) throws away a good release. This is the guarantee
  the controller advertises, so it is split across the critical metrics (Bonferroni, by
  `alpha_share`) and the whole analysis' false-rollback probability is <= `alpha`, at any
  cadence and however often `observe` is called.
* a false *pass* (`pass_alpha`, default 5%) promotes a canary that is beyond tolerance on some
  metric. A pass needs *every* metric to pass, so a bad metric must itself pass falsely for
  the analysis to pass falsely (an intersection-union test): each metric may use all of
  `pass_alpha`, no split is needed.

Why a fail ratio and a separate tolerance. The fail test asks "is the canary worse than the
primary at all?" (ratio > `fail_ratio`, default 1.0), which is what Wald's SPRT and Netflix'
count test ask and what makes detection fast. The pass test asks "is the canary within
tolerance?" (ratio < 1 + `tolerance`, or an absolute excess below `abs_tolerance`). Between the
two lies an indifference zone where either answer is acceptable; whichever evidence arrives
first decides.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["AnalysisConfig", "MetricConfig"]


class MetricConfig(BaseModel):
    """Tolerances of one metric. Rates are per request (errors) or per sample (slow requests)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    # Pass when canary/primary < 1 + tolerance (anytime-valid bound).
    tolerance: float = Field(default=0.5, gt=0.0, le=100.0)
    # ... or when canary rate - primary rate < abs_tolerance: rare events (errors near 0%, the
    # slowest 1%) never give enough events to bound a ratio, but do bound an absolute excess.
    abs_tolerance: float = Field(default=0.005, ge=0.0, lt=1.0)
    # Fail when canary/primary > fail_ratio with probability of error <= the metric's alpha.
    fail_ratio: float = Field(default=1.0, ge=1.0, le=100.0)
    critical: bool = True

    @model_validator(mode="after")
    def _zone(self) -> MetricConfig:
        if self.fail_ratio >= 1.0 + self.tolerance:
            raise ValueError(
                f"fail_ratio ({self.fail_ratio}) must be below 1 + tolerance "
                f"({1.0 + self.tolerance}): otherwise a canary could pass and fail at once"
            )
        return self


def _default_errors() -> MetricConfig:
    # Pass only below 1.5x the primary's error rate: a 50% rise in errors is a regression an
    # SRE rolls back, so it must never be inside the tolerance. The absolute route (an excess
    # surely below 0.2 points) serves rare errors, where no ratio can be bounded; at 0.2 points
    # a 1% -> 1.5% canary stays well outside it. Cost: an A/A canary needs more evidence to pass
    # (benchmarks/RESULTS.md, "Choosing the error tolerance"; planner.pass_advice() says how
    # long at a given traffic). The fail test still fires on any increase.
    return MetricConfig(tolerance=0.5, abs_tolerance=0.002)


def _default_latency() -> MetricConfig:
    return MetricConfig(tolerance=0.5, abs_tolerance=0.01)


class AnalysisConfig(BaseModel):
    """Everything the Analyzer needs; the defaults are the production settings."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    # False-rollback bound of the whole analysis.
    alpha: float = Field(default=0.01, gt=0.0, lt=0.5)
    # False-pass bound of any one metric beyond tolerance (see the module docstring).
    pass_alpha: float = Field(default=0.05, gt=0.0, lt=0.5)
    # A pass needs at least this many requests on each arm.
    min_samples: float = Field(default=200.0, ge=1.0)
    # Latency quantiles compared; each becomes a metric "latency_p50", "latency_p99", ...
    quantiles: tuple[float, ...] = (0.5, 0.99)
    errors: MetricConfig = Field(default_factory=_default_errors)
    latency: MetricConfig = Field(default_factory=_default_latency)
    # Per-quantile overrides, keyed by metric name ("latency_p99").
    latency_overrides: dict[str, MetricConfig] = Field(default_factory=dict)
    # Share of alpha per metric kind, before normalising over the critical metrics. Errors
    # get most: their regressions are the costly ones and the fail test's speed depends on
    # log(1/alpha_metric), while latency regressions bring many slow events and are caught in
    # seconds even at a twentieth of alpha each. Latency metrics share the rest equally.
    errors_alpha_share: float = Field(default=0.9, gt=0.0, lt=1.0)
    # The primary needs this many requests beyond the quantile before a latency threshold is
    # frozen (e.g. 10 / (1 - 0.99) = 1000 requests for p99), so the bound is a stable choice.
    threshold_min_tail: float = Field(default=10.0, ge=1.0)

    @field_validator("quantiles", mode="before")
    @classmethod
    def _quantiles(cls, value: object) -> tuple[float, ...]:
        if not isinstance(value, list | tuple):
            raise ValueError("quantiles must be a list of numbers in (0, 1)")
        out: list[float] = []
        for q in value:
            if isinstance(q, bool) or not isinstance(q, int | float):
                raise ValueError(f"quantiles: {q!r} is not a number")
            if not 0.0 < q < 1.0:  # NaN fails too; no float() of a huge int
                raise ValueError(f"quantiles: {q!r} is not in (0, 1)")
            out.append(float(q))
        if len(set(out)) != len(out):
            raise ValueError(f"quantiles: duplicates in {out}")
        return tuple(sorted(out))

    @model_validator(mode="after")
    def _overrides(self) -> AnalysisConfig:
        names = set(self.latency_metric_names())
        for key in self.latency_overrides:
            if key not in names:
                raise ValueError(
                    f"latency_overrides: unknown metric {key!r} (metrics: {sorted(names)})"
                )
        if not any(m.critical for _, m in self.metric_configs()):
            raise ValueError("no critical metric: at least one metric must be able to fail")
        return self

    def latency_metric_names(self) -> list[str]:
        return [latency_name(q) for q in self.quantiles]

    def metric_configs(self) -> list[tuple[str, MetricConfig]]:
        """(name, settings) of every metric, errors first."""
        out = [("errors", self.errors)]
        for name in self.latency_metric_names():
            out.append((name, self.latency_overrides.get(name, self.latency)))
        return out

    def metric_alphas(self) -> dict[str, float]:
        """Each critical metric's share of alpha; they sum to alpha (Bonferroni).

        A non-critical metric cannot fail the analysis, so it needs no share; it is still
        tested at `alpha` for the report.
        """
        configs = self.metric_configs()
        weights: dict[str, float] = {}
        n_latency = sum(1 for name, m in configs if m.critical and name != "errors")
        for name, m in configs:
            if not m.critical:
                continue
            if name == "errors":
                weights[name] = self.errors_alpha_share if n_latency else 1.0
            else:
                share = 1.0 - self.errors_alpha_share if self.errors.critical else 1.0
                weights[name] = share / n_latency
        total = sum(weights.values())
        return {
            name: (self.alpha * weights[name] / total if name in weights else self.alpha)
            for name, _ in configs
        }


def latency_name(q: float) -> str:
    """ "latency_p99" for 0.99, "latency_p99_9" for 0.999, "latency_p50" for 0.5."""
    pct = f"{q * 100:.6g}".replace(".", "_")
    return f"latency_p{pct}"
