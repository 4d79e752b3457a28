"""Fuzzing, CI-sized: the generators of benchmarks/fuzz_inputs.py with a few dozen inputs per
target (the benchmark runs 10,000 each). Any exception other than the documented error, or a
known-bad input that parses, fails the test at once."""

from __future__ import annotations

import pytest

from benchmarks.fuzz_inputs import TARGETS, run_target


@pytest.mark.parametrize("target", TARGETS)
def test_fuzzed_inputs_give_only_the_documented_error(target: str) -> None:
    """Mutated annotations, configs, topologies and records are parsed or refused with the
    target's documented error (SpecError, ConfigError, RecordError), never a traceback, and
    no known-bad input is accepted."""
    tally = run_target(target, 40, strict=True, measure=False)
    assert tally.tried >= 40
    assert tally.problem() is None
