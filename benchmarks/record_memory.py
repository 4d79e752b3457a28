"""Memory held and bytes written per rollout by the ConfigMap record, by rollout age: the
whole format (before: the record held in memory and packed whole every 30 s) against the
chunked one (after: canary.kubernetes.record_store.ConfigMapRecordWriter).

The record is one simulated rollout that never decides (tests/support/report_records.py:
the real Analyzer's verdicts, about 4.7 KB of JSON a tick), 10 s ticks, saved every 30 s of
record time, for 1 h (360 ticks) and 6 h (2160 ticks).

* after: the writer runs against the API emulator (tests/support/kube_emulator.py, HTTP on
  127.0.0.1) with the real kubernetes-asyncio client. Bytes per save are the `data` of every
  create/update it sent; packing CPU is the thread time of its packing step (`_plan`) per
  save; memory is what tracemalloc sees the writer hold (a second pass against a sink that
  keeps nothing, so the emulator's objects are not counted).
* before: the old writer kept every Entry and called `pack_record` on all of them at every
  save; `pack_record` is unchanged, so it is timed and sized at the age asked (the save at
  that age), not replayed 720 times; memory is tracemalloc of the Entry list at that age.

    python -m benchmarks.record_memory [--hours 1 6] [--seal-bytes 262144]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.kube_emulator import KubeEmulator  # noqa: E402
from support.report_records import Scenario, simulate  # noqa: E402

from canary.core.records import Entry, parse_lines  # noqa: E402
from canary.kubernetes import record_store  # noqa: E402
from canary.kubernetes.client import Kube, NotFound  # noqa: E402
from canary.kubernetes.record_store import (  # noqa: E402
    MAX_CONFIGMAP_BYTES,
    SEAL_BYTES,
    ConfigMapRecordWriter,
    pack_record,
)

TICK_S = 10.0
NS = "canary-system"


def record_lines(ticks: int) -> list[str]:
    dicts = simulate(
        Scenario(
            seed=5, canary_error_rate=0.01, ticks_per_step=10**9, max_ticks=ticks, tick_s=TICK_S
        )
    )
    return [json.dumps(d, separators=(",", ":")) for d in dicts]


def before(lines: list[str], ticks: int) -> dict[str, float]:
    """The whole format at age `ticks`: its memory, and the save at that age."""
    gc.collect()
    tracemalloc.start()
    entries: list[Entry] = list(parse_lines(lines[: ticks + 1]))
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    cpu = time.thread_time()
    data = pack_record(entries, max_bytes=MAX_CONFIGMAP_BYTES)
    cpu = time.thread_time() - cpu
    written = sum(len(v) for v in data.values())
    return {"held_kib": held / 1024, "save_kib": written / 1024, "pack_ms": cpu * 1000}


class MemoryConfigMaps:
    """The ConfigMap calls of canary.kubernetes.client.Kube, on a dict, as the API server
    would keep them (a save reads the head back to seal its tail); GETs counted and
    optionally delayed, writes and their bytes counted. With keep_chunks=False chunks are
    only counted, not kept: what the benchmarks measure is the writer's memory, and `stored`
    is the bytes this keeps (in a cluster, etcd's) for them to take out of it.
    benchmarks/tick_cost.py and benchmarks/resume_cost.py use it too."""

    def __init__(self, *, keep_chunks: bool = True) -> None:
        self.keep_chunks = keep_chunks
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.gets = 0
        self.puts = 0
        self.bytes = 0
        self.get_latency_s = 0.0
        self._version = 0

    @property
    def writes(self) -> int:
        return self.puts

    @property
    def stored(self) -> int:
        return sum(len(v) + 49 for obj in self.objects.values() for v in obj["data"].values())

    async def get_configmap(self, namespace: str, name: str) -> dict[str, Any]:
        self.gets += 1
        if self.get_latency_s:
            await asyncio.sleep(self.get_latency_s)
        try:
            obj = self.objects[namespace, name]
        except KeyError:
            raise NotFound(f"configmaps {name!r} not found") from None
        return {"metadata": dict(obj["metadata"]), "data": dict(obj["data"])}  # as read

    def _stored(self, namespace: str, name: str, obj: dict[str, Any]) -> dict[str, Any]:
        self.puts += 1
        self._version += 1
        obj["metadata"]["resourceVersion"] = str(self._version)
        if self.keep_chunks or "--" not in name:  # a chunk's name has "--"; a head's not
            self.objects[namespace, name] = obj
        return obj

    async def put_configmap(
        self,
        namespace: str,
        name: str,
        data: dict[str, str],
        *,
        resource_version: str | None = None,
        labels: Mapping[str, str] | None = None,
        owner: Mapping[str, str] | None = None,
        keep: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        self.bytes += sum(len(v) for v in data.values())
        metadata = {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{name}",
            "labels": dict(labels or {}),
        }
        return self._stored(namespace, name, {"metadata": metadata, "data": dict(data)})

    async def patch_configmap(
        self,
        namespace: str,
        name: str,
        data: dict[str, str],
        *,
        resource_version: str | None = None,
    ) -> dict[str, Any]:
        """A merge patch of `data` (the head's new tail part)."""
        obj = self.objects.get((namespace, name))
        if obj is None:
            raise NotFound(f"configmaps {name!r} not found")
        self.bytes += sum(len(v) for v in data.values())
        patched = {"metadata": dict(obj["metadata"]), "data": {**obj["data"], **data}}
        return self._stored(namespace, name, patched)


async def after_memory(lines: list[str], ages: list[int], seal_bytes: int) -> dict[int, float]:
    """KiB the chunked writer holds at each age (tracemalloc, entries parsed one by one)."""
    held: dict[int, float] = {}
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    sink = MemoryConfigMaps(keep_chunks=False)
    writer = ConfigMapRecordWriter(sink, namespace=NS, rollout="bench/app@1", seal_bytes=seal_bytes)
    for index, line in enumerate(lines):
        (entry,) = parse_lines([line])
        assert await writer.append(entry) is None
        del entry
        if index in ages:
            gc.collect()
            held[index] = (tracemalloc.get_traced_memory()[0] - base - sink.stored) / 1024
    tracemalloc.stop()
    return held


async def after_writes(
    lines: list[str], ages: list[int], seal_bytes: int
) -> dict[int, dict[str, float]]:
    """Per age: the bytes and packing CPU of the saves in the 10 minutes before it, and
    the bytes written so far, against the emulator."""
    out: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        async with KubeEmulator(history=1) as emulator:
            config = emulator.write_kubeconfig(Path(tmp) / "kc", token="t", context="t")
            kube = await Kube.connect(kubeconfig=str(config), context="t")
            writer = ConfigMapRecordWriter(
                kube, namespace=NS, rollout="bench/app@1", seal_bytes=seal_bytes
            )
            pack_cpu: list[float] = []

            def timed(pack: Any) -> Any:
                def run(*args: Any) -> Any:
                    start = time.thread_time()
                    try:
                        return pack(*args)
                    finally:
                        pack_cpu.append(time.thread_time() - start)

                return run

            # A save packs its lines as a part (_pack_held), or rewrites the head (_plan).
            writer._plan = timed(writer._plan)  # type: ignore[method-assign]
            held = record_store._pack_held
            record_store._pack_held = timed(held)
            saves: list[tuple[int, int, float]] = []  # (tick index, bytes, cpu s)
            total = 0
            window = int(600 / TICK_S)
            for index, line in enumerate(lines):
                (entry,) = parse_lines([line])
                before_count = len(pack_cpu)
                assert await writer.append(entry) is None
                if len(pack_cpu) > before_count:
                    written = sum(
                        len(json.dumps(r.body["data"]))
                        for r in emulator.requests
                        if r.resource == "configmaps" and r.verb in ("create", "update", "patch")
                    )
                    emulator.requests.clear()
                    total += written
                    saves.append((index, written, pack_cpu[-1]))
                if index in ages:
                    recent = [s for s in saves if s[0] > index - window]
                    out[index] = {
                        "save_kib": statistics.mean(s[1] for s in recent) / 1024,
                        "save_max_kib": max(s[1] for s in recent) / 1024,
                        "pack_ms": statistics.mean(s[2] for s in recent) * 1000,
                        "total_mib": total / 2**20,
                        "chunks": writer.chunks,
                    }
            record_store._pack_held = held
            await kube.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hours", type=float, nargs="+", default=[1.0, 6.0])
    parser.add_argument("--seal-bytes", type=int, default=SEAL_BYTES)
    args = parser.parse_args()
    ages = [int(h * 3600 / TICK_S) for h in args.hours]
    started = time.monotonic()
    lines = record_lines(max(ages))
    print(f"simulated {len(lines) - 1} ticks in {time.monotonic() - started:.1f}s", flush=True)
    memory = asyncio.run(after_memory(lines, ages, args.seal_bytes))
    writes = asyncio.run(after_writes(lines, ages, args.seal_bytes))
    print(f"seal_bytes {args.seal_bytes}, a save every 30 s of 10 s ticks")
    print(
        "| age | format | memory held | bytes per save (mean / max) | per 10 s tick | "
        "packing CPU per save | written so far | chunks |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for hours, age in zip(args.hours, ages, strict=True):
        old = before(lines, age)
        new = writes[age]
        print(
            f"| {hours:g} h | whole (before) | {old['held_kib']:.0f} KiB | "
            f"{old['save_kib']:.1f} KiB | {old['save_kib'] / 3:.1f} KiB | "
            f"{old['pack_ms']:.0f} ms | - | - |"
        )
        print(
            f"| {hours:g} h | chunked (after) | {memory[age]:.0f} KiB | "
            f"{new['save_kib']:.1f} / {new['save_max_kib']:.1f} KiB | "
            f"{new['save_kib'] / 3:.1f} KiB | {new['pack_ms']:.1f} ms | "
            f"{new['total_mib']:.1f} MiB | {new['chunks']:.0f} |"
        )


if __name__ == "__main__":
    main()
