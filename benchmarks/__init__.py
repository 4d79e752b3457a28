"""Benchmark of the analysis engine against threshold and Mann-Whitney deciders and Wald's limit.

Not a test: `python -m benchmarks.run` regenerates benchmarks/RESULTS.md. The simulator
(`simulate`) produces the traffic, `contenders` holds the reference deciders and the SPRT
limit, and `run` drives every decider over the same seeded streams.
"""
