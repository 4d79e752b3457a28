"""Value types of the analysis contract.

These names are public and stable: benchmarks, the controller, the records and the reports
all depend on them (see DESIGN.md, "The analysis contract"). Everything here is immutable
and validated on construction, so a bad number is caught where it enters, with the name of
the field, and never deep inside a test statistic.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["ArmCounts", "Decision", "MetricResult", "Snapshot", "Verdict", "trusted"]


class Decision(StrEnum):
    CONTINUE = "continue"
    PASS = "pass"
    FAIL = "fail"


def _check_count(name: str, value: float) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got a bool")
    if math.isnan(value):
        raise ValueError(f"{name} is NaN")
    if math.isinf(value):
        raise ValueError(f"{name} is infinite")
    if value < 0:
        raise ValueError(f"{name} is negative ({value})")
    return float(value)


class ArmCounts(BaseModel):
    """Cumulative counters of one arm since the analysis began.

    Counts are floats because Prometheus' `increase()` extrapolates and returns
    non-integers; the tests treat them as counts all the same.

    `latency_buckets` must be cumulative (non-decreasing in le). The `+Inf` bucket may differ
    from `requests` (the histogram and the counter are scraped at different instants): latency
    metrics then use the histogram's own total, the +Inf bucket (see analysis/latency.py).
    """

    # NaN and infinities written as json.dumps writes them (records: canary.core.records)
    model_config = ConfigDict(frozen=True, ser_json_inf_nan="constants")

    requests: float
    errors: float = 0.0
    # Prometheus cumulative `le` buckets: upper bound in seconds -> requests at or below it.
    latency_buckets: dict[float, float] = Field(default_factory=dict)

    @field_validator("requests", "errors", mode="before")
    @classmethod
    def _finite_non_negative(cls, value: Any, info: Any) -> float:
        if not isinstance(value, int | float):
            raise ValueError(f"{info.field_name} must be a number, got {type(value).__name__}")
        return _check_count(info.field_name, value)

    @field_validator("latency_buckets", mode="before")
    @classmethod
    def _buckets(cls, value: Any) -> dict[float, float]:
        if not isinstance(value, dict):
            raise ValueError("latency_buckets must be a mapping of le -> count")
        out: dict[float, float] = {}
        for le, count in value.items():
            bound = float(le)
            if math.isnan(bound) or bound < 0:
                raise ValueError(f"latency_buckets has an invalid bound le={le!r}")
            if not isinstance(count, int | float):
                raise ValueError(f"latency_buckets[le={le}] must be a number")
            out[bound] = _check_count(f"latency_buckets[le={le}]", count)
        ordered = dict(sorted(out.items()))
        # Cumulative buckets never decrease with le; a histogram that does is not one.
        prev_le, prev_count = None, 0.0
        for le, count in ordered.items():
            if count < prev_count:
                raise ValueError(
                    f"latency_buckets are not cumulative: le={le} has {count} < "
                    f"{prev_count} at le={prev_le}"
                )
            prev_le, prev_count = le, count
        return ordered

    @model_validator(mode="after")
    def _consistent(self) -> ArmCounts:
        if self.errors > self.requests:
            raise ValueError(f"errors ({self.errors}) > requests ({self.requests})")
        return self


class Snapshot(BaseModel):
    """What both arms have counted since the analysis began, at `elapsed_s` seconds."""

    # NaN and infinities written as json.dumps writes them (records: canary.core.records)
    model_config = ConfigDict(frozen=True, ser_json_inf_nan="constants")

    elapsed_s: float
    primary: ArmCounts
    canary: ArmCounts

    @field_validator("elapsed_s", mode="before")
    @classmethod
    def _elapsed(cls, value: Any) -> float:
        if not isinstance(value, int | float):
            raise ValueError("elapsed_s must be a number")
        return _check_count("elapsed_s", value)


class MetricResult(BaseModel):
    """One metric's state after an observation: the numbers a report needs.

    `estimate`, `lower` and `upper` are on the ratio scale canary/primary (1.0 means equal),
    except where `scale` says otherwise. `lower` and `upper` are one-sided anytime-valid bounds,
    each at the metric's `alpha`: every ratio <= `lower` is rejected by the fail test's mixture
    (so a FAIL comes with lower >= fail_ratio), every ratio >= `upper` by its mirror image.
    None until there is data to bound anything (`upper` is also None while the ratio is
    unbounded above, e.g. no primary events yet). E-values are capped at 1e300 so that a
    record stays valid JSON.
    """

    # NaN and infinities written as json.dumps writes them (records: canary.core.records)
    model_config = ConfigDict(frozen=True, ser_json_inf_nan="constants")

    name: str  # e.g. "errors", "latency_p50", "latency_p99"
    decision: Decision
    critical: bool
    test: str  # the test used, readable: "conditional Poisson mixture SPRT"
    scale: str = "ratio"  # what estimate/lower/upper measure
    estimate: float | None = None
    lower: float | None = None
    upper: float | None = None
    # Pass needs evidence that the ratio is below 1 + tolerance (or the absolute excess of the
    # canary's rate below abs_tolerance); fail needs evidence that it is above fail_ratio.
    tolerance: float
    alpha: float  # this metric's share of the analysis alpha (the fail test's level)
    fail_ratio: float = 1.0
    abs_tolerance: float = 0.0
    pass_alpha: float = 0.05  # the pass test's level
    e_value_fail: float = 1.0  # evidence for a regression; fail at >= 1/alpha
    e_value_pass: float = 1.0  # evidence for "within tolerance" (ratio route, running max)
    samples_primary: float = 0.0  # the units the test counts (requests, or events)
    samples_canary: float = 0.0
    events_primary: float = 0.0  # errors, or requests slower than the threshold
    events_canary: float = 0.0
    threshold_s: float | None = None  # latency metrics: the bucket bound compared
    reason: str = ""
    extra: dict[str, float] = Field(default_factory=dict)


class Verdict(BaseModel):
    """The analysis' answer to one observation."""

    # NaN and infinities written as json.dumps writes them (records: canary.core.records)
    model_config = ConfigDict(frozen=True, ser_json_inf_nan="constants")

    decision: Decision
    reasons: list[str]  # one readable line per metric, plus notes (e.g. counter resets)
    metrics: dict[str, MetricResult]
    elapsed_s: float
    notes: list[str] = Field(default_factory=list)


_M = TypeVar("_M", bound=BaseModel)


def trusted(cls: type[_M], values: dict[str, Any]) -> _M:
    """`cls.model_construct(**values)` for values that name every field, in declaration order.

    What model_construct leaves behind (the fields in __dict__, all of them set, no extra, no
    private state), without its per-field loop over aliases and defaults: observe() builds
    four models per call, and model_construct was its largest single cost. Only for values
    this package computed itself (nothing is validated); tests/analysis checks that the result
    equals model_construct's.
    """
    model = cls.__new__(cls)
    object.__setattr__(model, "__dict__", values)
    object.__setattr__(model, "__pydantic_fields_set__", set(values))
    object.__setattr__(model, "__pydantic_extra__", None)
    object.__setattr__(model, "__pydantic_private__", None)
    return model


def _check_trusted(*models: type[BaseModel]) -> None:
    """trusted() skips what these models do not use; refuse to load if one starts to."""
    for model in models:
        if (
            model.model_config.get("extra") == "allow"
            or model.__pydantic_post_init__
            or model.__private_attributes__
            or any(f.alias or f.validation_alias for f in model.model_fields.values())
        ):
            raise TypeError(f"trusted() cannot build {model.__name__}: use model_construct")


_check_trusted(MetricResult, Verdict)
