"""The batcher's counting of one group's answers, per series (issue 13): CPU per series of
`_apply_answers` in the steady state, and optionally against another commit's batcher on the
same answers, paired run by run.

A real Prometheus scrapes the metrics_batch exporter (--rollouts simulated rollouts, 90 series
each, every --scrape-s) for --history-s; a PrometheusBatcher registers them all and reads two
batches; the second batch's answers (one per metric family, as Prometheus wrote them) are
kept. Then, with no server involved, the answers are counted --runs times into registrations
that have counted them before, each run with the series' cursors put back (so every sample is
new again, as in a batch): process CPU per run, garbage collector off (as in the batcher).

With `--against REV`, canary/metrics/batched.py at REV (git show) is loaded beside this
tree's, each counts into its own registrations, the two alternate run by run (so the
machine's drift falls on both), and the paired ratio's median is printed (this tree / REV).
The counts of both are checked equal after the runs.

    PYTHONPATH=. python -m benchmarks.apply_cost [--rollouts 200] [--runs 60] [--against REV]

The figures are for comparing code on one machine on one day: this machine's speed varies
by 2x from day to day (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmarks.metrics_batch import ROOT, queries_for, servers, until_scraped


async def capture(rollouts: int, scrape_s: float, history_s: float) -> list[Any]:
    """One steady batch's answers for `rollouts` rollouts, in the order of its families."""
    from canary.metrics.batched import PrometheusBatcher

    exporter, prometheus = servers(rollouts, scrape_s, "apply-cost-")
    async with exporter, prometheus:
        await until_scraped(prometheus.url, 6 * rollouts)
        await asyncio.sleep(history_s)
        period = 2 * scrape_s
        batcher = PrometheusBatcher(prometheus.url, period_s=period, max_age_s=period)
        batcher.rollouts_per_read = rollouts  # one group: the answers of one read
        captured: list[list[Any]] = []
        count = batcher._count

        async def keep(read: Any, answers: list[Any], regs: Any) -> Any:
            captured.append(list(answers))
            return await count(read, answers, regs)

        batcher._count = keep  # type: ignore[method-assign]
        try:
            since = time.time() - history_s
            providers = [batcher.provider(queries_for(i)) for i in range(rollouts)]
            for _ in range(3):  # the first reads, then two batches
                await asyncio.gather(*(p.fetch(since=since, now=time.time()) for p in providers))
                await asyncio.sleep(period * 1.05)
        finally:
            await batcher.aclose()
    return captured[-1]


def load(source: str, name: str) -> ModuleType:
    path = Path(tempfile.mkdtemp(prefix="apply-cost-")) / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def steady(
    batched: ModuleType, answers: list[Any], rollouts: int
) -> tuple[Callable[[], float], list[Any], int]:
    """A run of one read's counting (CPU seconds), the selectors it counts into, the series."""
    families: dict[Any, Any] = {}
    regs = [
        batched._Registration.build(queries_for(i), time.time() - 3600, families)
        for i in range(rollouts)
    ]
    members: dict[Any, list[Any]] = {}
    for reg in regs:
        for sel in reg.selectors:
            members.setdefault(sel.family, []).append((reg, sel))
    read = batched._Read(time.time(), members, dict.fromkeys(members, 20))
    by_family = dict(zip(members, answers, strict=True))
    cache = batched._SeriesCache()
    batched._apply_answers(read, by_family, cache)  # the series counted once before
    selectors = [sel for reg in regs for sel in reg.selectors]

    def run() -> float:
        for sel in selectors:
            numbers = sel.numbers
            for i in range(3, len(numbers), 4):
                numbers[i] = -math.inf  # every sample new again
        began = time.process_time()
        batched._apply_answers(read, by_family, cache)
        return time.process_time() - began

    return run, selectors, sum(len(sel.slots) for sel in selectors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rollouts", type=int, default=200)
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--scrape-s", type=float, default=5.0)
    parser.add_argument("--history-s", type=float, default=30.0)
    parser.add_argument("--against", help="a commit whose canary/metrics/batched.py to compare")
    args = parser.parse_args()
    answers = asyncio.run(capture(args.rollouts, args.scrape_s, args.history_s))
    size = sum(len(a) for a in answers if isinstance(a, bytes))
    this = load((ROOT / "canary/metrics/batched.py").read_text(), "batched_this")
    run, selectors, series = steady(this, answers, args.rollouts)
    other = None
    if args.against:
        source = subprocess.run(
            ["git", "show", f"{args.against}:canary/metrics/batched.py"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        other = steady(load(source, "batched_other"), answers, args.rollouts)
    gc.disable()
    mine, theirs = [], []
    for _ in range(args.runs):
        mine.append(run())
        if other is not None:
            theirs.append(other[0]())
    gc.enable()
    print(
        f"{args.rollouts} rollouts, {series} counter series, {len(answers)} answers of "
        f"{size / 1e6:.1f} MB; {args.runs} runs"
    )
    print(
        f"this tree: median {1e3 * statistics.median(mine):.1f} ms a read "
        f"({1e6 * statistics.median(mine) / series:.2f} us a series), min {1e3 * min(mine):.1f} ms"
    )
    if other is not None:
        same = all(a.counted() == b.counted() for a, b in zip(selectors, other[1], strict=True))
        print(
            f"{args.against}: median {1e3 * statistics.median(theirs):.1f} ms a read "
            f"({1e6 * statistics.median(theirs) / series:.2f} us a series), "
            f"min {1e3 * min(theirs):.1f} ms"
        )
        ratio = statistics.median(m / t for m, t in zip(mine, theirs, strict=True))
        print(f"paired median ratio (this tree / {args.against}): {ratio:.3f}; same counts: {same}")


if __name__ == "__main__":
    main()
