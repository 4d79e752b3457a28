"""What resuming a moved rollout costs the controller, by phase (issue 13: after a shard
takeover, 1,042 rollouts took 90 s to be exported again and 193 s to all tick).

In-process, no control plane: N real RolloutRunners write their records (ConfigMapRecord,
the chunked format, into an in-memory ConfigMap store) for K ticks each, at tick_cost's A/A
traffic; then N fresh runners resume them from the saved status, one after another, and each
phase of a resume is timed (wall and process CPU, so the packing pool's threads count too):

- read: the head's and chunks' GETs, base64 + gunzip, JSON + pydantic parse of every entry
  (`read_record_configmap`), then the writer carrying on its tail (`ConfigMapRecordWriter.resume`):
  what a resume did before the analysis state was saved with the head, and still does when
  it refuses that state;
- prepare: what the runner does (since the analysis state is saved with the head: one GET of
  the head, the state unpacked and taken up; `ConfigMapRecord.read_head`);
- replay: the record's ticks fed to a fresh Analyzer (`RolloutRunner._replay_record`);
- rest of resume: the last data time, the "resumed" note, the weight read back;
- save: the first status save and record flush after a resume (API calls in Kubernetes);
- first tick: the first look after the resume (counts, analysis, record).

The ConfigMap GETs can be given a latency (`--get-latency-ms`) to see what the serial chunk
reads cost when the API answers in milliseconds rather than at once. The metric source is a
stand-in (no Prometheus): the batcher's first read of a resumed rollout is not measured here.

    PYTHONPATH=. python -m benchmarks.resume_cost [--rollouts 100] [--ticks 100]
        [--get-latency-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.report_load import SteadyRouter  # noqa: E402

from analysis import AnalysisConfig, Analyzer  # noqa: E402
from benchmarks.record_memory import MemoryConfigMaps  # noqa: E402
from benchmarks.tick_cost import DilatedClock, Metrics  # noqa: E402
from canary.core.rollout import RolloutSpec  # noqa: E402
from canary.kubernetes.record_store import (  # noqa: E402
    ConfigMapRecord,
    ConfigMapRecordWriter,
    _read_record,
)
from canary.runner import RolloutRunner, TickReport  # noqa: E402
from canary.runner.seams import SavedRollout  # noqa: E402

TICK_S = 10.0
NAMESPACE = "canary-system"


class MemoryStore:
    """The runner's StateStore in memory: what a resume loads is what was saved last."""

    def __init__(self, saved: SavedRollout | None = None) -> None:
        self.saved = saved

    async def acquire(self) -> None:
        return None

    async def release(self) -> None:
        return None

    async def load(self) -> SavedRollout | None:
        return self.saved

    async def save(self, saved: SavedRollout) -> None:
        self.saved = saved


def _runner(
    i: int,
    *,
    api: MemoryConfigMaps,
    store: MemoryStore,
    clock: Callable[[], float],
    tick_s: float,
    config: AnalysisConfig,
    observers: list[Callable[[TickReport], None]],
) -> RolloutRunner:
    namespace, name = f"team{i % 25}", f"app{i}"
    return RolloutRunner(
        name=f"{namespace}/{name}",
        spec=RolloutSpec(
            steps=(10, 50), min_step_s=3 * 3600, max_step_s=6 * 3600, no_data_deadline_s=600
        ),
        router=SteadyRouter(),
        metrics=Metrics(1.0 + (i % 7) / 10),
        tick_s=tick_s,
        analyzer_factory=lambda: Analyzer(config),
        analysis=config,
        expected_rps=22.0,
        revision=f"rev{i}",
        canary_version=f"rev{i}",
        records=lambda rollout_id, *, ref=None: ConfigMapRecord(
            api, namespace=NAMESPACE, rollout=rollout_id, ref=ref, flush_s=0.0
        ),
        store=store,
        labels={"namespace": namespace, "deployment": name},
        clock=clock,
        observers=observers,
        identity="survivor",
    )


async def write_records(
    rollouts: int, ticks: int, api: MemoryConfigMaps, config: AnalysisConfig
) -> tuple[list[MemoryStore], float]:
    """N rollouts run K ticks each (the runners' clock dilated: a 10 s tick every 10 ms of
    the loop's), then stop; their stores hold what a resume loads."""
    dilation = 1000.0
    clock = DilatedClock(dilation)
    done = [0] * rollouts
    finished = asyncio.Event()

    def counter(i: int) -> Callable[[TickReport], None]:
        def count(report: TickReport) -> None:
            done[i] += 1
            if done[i] == ticks:
                runners[i][1].cancel()
                if all(d >= ticks for d in done):
                    finished.set()

        return count

    stores = [MemoryStore() for _ in range(rollouts)]
    runners: list[tuple[RolloutRunner, asyncio.Task[Any]]] = []
    for i in range(rollouts):
        r = _runner(
            i,
            api=api,
            store=stores[i],
            clock=clock,
            tick_s=TICK_S / dilation,
            config=config,
            observers=[counter(i)],
        )
        runners.append((r, asyncio.create_task(r.run())))
    await finished.wait()
    await asyncio.gather(*(t for _, t in runners), return_exceptions=True)
    return stores, clock()


Phase = dict[str, list[float]]


async def _timed(phases: Phase, name: str, work: Coroutine[Any, Any, Any]) -> Any:
    wall, cpu = time.perf_counter(), time.process_time()
    result = await work
    phases.setdefault(name, []).append(time.perf_counter() - wall)
    phases.setdefault(name + " (cpu)", []).append(time.process_time() - cpu)
    return result


async def resume_all(
    stores: list[MemoryStore], api: MemoryConfigMaps, config: AnalysisConfig, now: float
) -> Phase:
    """Resume every rollout, one after another, timing each phase."""
    phases: Phase = {}
    clock = lambda: now  # noqa: E731  (the resume's clock: right after the records end)
    for i, store in enumerate(stores):
        saved = store.saved
        assert saved is not None and saved.status.active, "nothing to resume"
        # the read alone, as the runner does it (its own sink reads it again below)
        namespace, _, name = saved.record.partition("/")
        head = await _timed(phases, "read: GET head", api.get_configmap(namespace, name))
        entries, size = await _timed(phases, "read: chunks, unpack, parse", _read_record(api, head))

        async def carry_on(head: Mapping[str, Any], entries: Any, size: Any, id: str) -> None:
            writer = ConfigMapRecordWriter(api, namespace=NAMESPACE, rollout=id)
            writer.resume(head, entries, record_bytes=size)

        await _timed(phases, "read: writer.resume", carry_on(head, entries, size, saved.rollout_id))
        runner = _runner(
            i,
            api=api,
            store=MemoryStore(saved),
            clock=clock,
            tick_s=TICK_S,
            config=config,
            observers=[],
        )
        await _timed(phases, "prepare (all of read)", runner.prepare())
        replay = runner._replay_record

        def timed_replay(entries: list[Any], replay: Any = replay) -> int:
            wall, cpu = time.perf_counter(), time.process_time()
            n: int = replay(entries)
            phases["replay"][-1] = time.perf_counter() - wall
            phases["replay (cpu)"][-1] = time.process_time() - cpu
            phases["ticks replayed"][-1] = float(n)
            return n

        # none when the analysis carries on from the state saved with the head
        for name in ("replay", "replay (cpu)", "ticks replayed"):
            phases.setdefault(name, []).append(0.0)
        runner._replay_record = timed_replay  # type: ignore[method-assign]
        await _timed(phases, "resume (with replay)", runner._resume())
        await _timed(phases, "first save + flush", _save_and_flush(runner))
        await _timed(phases, "first tick", runner._tick())
    for name in ("resume (with replay)", "resume (with replay) (cpu)"):
        phases[name.replace("(with replay)", "without replay")] = [
            a - b
            for a, b in zip(
                phases.pop(name),
                phases["replay" + name[len("resume (with replay)") :]],
                strict=True,
            )
        ]
    return phases


async def _save_and_flush(runner: RolloutRunner) -> None:
    await runner._save(force=True)
    await runner._flush_record(force=True)


async def run(rollouts: int, ticks: int, get_latency_ms: float) -> None:
    config = AnalysisConfig()
    api = MemoryConfigMaps()
    started = time.perf_counter()
    stores, now = await write_records(rollouts, ticks, api, config)
    print(
        f"records written in {time.perf_counter() - started:.1f} s ({len(api.objects)} ConfigMaps)",
        file=sys.stderr,
    )
    api.get_latency_s = get_latency_ms / 1000
    gets = api.gets
    wall, cpu = time.perf_counter(), time.process_time()
    phases = await resume_all(stores, api, config, now)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(
        f"{rollouts} resumes of {ticks} ticks, GET latency {get_latency_ms:g} ms: "
        f"{1000 * wall / rollouts:.2f} ms wall, {1000 * cpu / rollouts:.2f} ms CPU per "
        f"resume (all phases; the read done twice), "
        f"{(api.gets - gets) / rollouts / 2:.1f} GETs per read"
    )
    print(f"{'phase':34} {'mean ms':>8} {'p50 ms':>8} {'max ms':>8}")
    for name, values in phases.items():
        scale = 1.0 if name == "ticks replayed" else 1000.0
        print(
            f"{name:34} {scale * statistics.fmean(values):8.3f} "
            f"{scale * statistics.median(values):8.3f} {scale * max(values):8.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rollouts", type=int, default=100)
    parser.add_argument("--ticks", type=int, default=100)
    parser.add_argument("--get-latency-ms", type=float, default=0.0)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the resumed runners' first ticks set the weight again
    asyncio.run(run(args.rollouts, args.ticks, args.get_latency_ms))


if __name__ == "__main__":
    main()
