"""Records in chunk ConfigMaps on the real control plane, with the controller's own RBAC: a
long record is written incrementally by a writer process that is SIGKILLed twice and resumed
each time; after every kill the record reads back (a prefix of what was written), chunks are
created once and never updated (the apiserver's audit log), every write stays small, `canary
report` reads the whole record back, and deleting the head lets the garbage collector delete
its chunks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support.control_plane import ControlPlane
from support.report_records import Scenario, simulate

from canary.cli.report import main as report_main
from canary.core.records import Entry, TickEntry, parse_lines
from canary.kubernetes.record_store import RECORD_LABEL, chunk_name, configmap_name, unpack_record

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "canary-system"  # the controller's own: its Role grants ConfigMaps there only
ROLLOUT = "records-e2e/app@c0ffee"
SEAL = 32 << 10  # small chunks, so a short record makes many
TICKS = 150

# The writer process: appends the record's entries from argv[2] on, saving after each one
# (save_every_s=0: as many writes as possible, so a kill lands mid-write often), resuming
# the record the head names when argv[3] is "resume". One line per save: index, chunks, the
# bytes of that save's writes.
WRITER = """
import asyncio, json, sys
from canary.core.records import parse_lines
from canary.kubernetes.client import Kube
from canary.kubernetes.record_store import ConfigMapRecord

async def main() -> None:
    kubeconfig, start, mode, seal = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    entries = list(parse_lines(sys.stdin.read().splitlines()))
    kube = await Kube.connect(kubeconfig=kubeconfig)
    ns, rollout = "canary-system", entries[0].rollout
    ref = None
    sink = ConfigMapRecord(kube, namespace=ns, rollout=rollout, flush_s=0, seal_bytes=seal)
    if mode == "resume":
        sink = ConfigMapRecord(
            kube, namespace=ns, rollout=rollout, flush_s=0, seal_bytes=seal, ref=sink.ref
        )
        start = len(await sink.read())
        print(f"resumed {start} {sink.writer.chunks} {sink.writer.pending}", flush=True)
    for index in range(start, len(entries)):
        await sink.append(entries[index])
        await sink.flush(force=True)
        print(f"saved {index} {sink.writer.chunks} {sink.writer.last_write_bytes}", flush=True)
    await kube.close()

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def long_record() -> list[Entry]:
    dicts = simulate(
        Scenario(seed=7, canary_error_rate=0.01, ticks_per_step=10**9, max_ticks=TICKS, tick_s=10)
    )
    for d in dicts:
        d["rollout"] = ROLLOUT
    return list(parse_lines(json.dumps(d) for d in dicts))


def _text(entries: list[Entry]) -> str:
    return "".join(json.dumps(e.model_dump(mode="json", by_alias=True)) + "\n" for e in entries)


def _run_writer(
    kubeconfig: Path, entries: list[Entry], *, mode: str, kill_at_chunks: int | None
) -> list[str]:
    """Run the writer; SIGKILL it (by its PID) once its record has `kill_at_chunks` more
    chunks than it started with. Its output lines."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(kubeconfig), "0", mode, str(SEAL)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(_text(entries))
    process.stdin.close()
    lines: list[str] = []
    first_chunks: int | None = None
    try:
        for line in process.stdout:
            lines.append(line.strip())
            words = line.split()
            chunks = int(words[2])
            first_chunks = chunks if first_chunks is None else first_chunks
            if kill_at_chunks is not None and chunks - first_chunks >= kill_at_chunks:
                os.kill(process.pid, signal.SIGKILL)  # mid-run: the next save is under way
                break
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    stderr = process.stderr.read() if process.stderr else ""
    if kill_at_chunks is None:
        assert process.returncode == 0, stderr
    else:
        assert process.returncode == -signal.SIGKILL, (process.returncode, stderr)
    return lines


def _record_objects(cluster: ControlPlane, head: str) -> list[dict[str, Any]]:
    listed = cluster.get_json("configmaps", "-n", NAMESPACE, "-l", f"{RECORD_LABEL}={head}")
    return list(listed["items"])


def test_a_long_record_survives_kills_and_resumes_in_small_writes(
    cluster: ControlPlane,
    controller_kubeconfig: Path,
    long_record: list[Entry],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Killed twice mid-run and resumed, the writer leaves a readable record after each
    kill (a prefix of the rollout's entries), never updates a chunk, keeps each write
    small, and the record read back at the end is every entry, by `canary report` too."""
    head = configmap_name(ROLLOUT)
    runs = [("new", 3), ("resume", 3), ("resume", None)]
    output: list[str] = []
    for mode, kill_at in runs:
        output += _run_writer(controller_kubeconfig, long_record, mode=mode, kill_at_chunks=kill_at)
        stored = unpack_record({"kind": "List", "items": _record_objects(cluster, head)})
        assert stored == long_record[: len(stored)], f"after a {mode} run: not a prefix"
        assert len(stored) > 1
    assert stored == long_record

    resumed = [line for line in output if line.startswith("resumed")]
    assert len(resumed) == 2 and all(int(line.split()[2]) >= 3 for line in resumed), resumed
    objects = _record_objects(cluster, head)
    chunks = int(next(o for o in objects if o["metadata"]["name"] == head)["data"]["record.chunks"])
    raw = len(_text(long_record))
    # a chunk closes at SEAL of lines, plus at most one save's
    assert raw // SEAL >= chunks >= raw // SEAL * 3 // 4 >= 15, (chunks, raw)

    # Each save wrote at most one chunk and the head: small, and no bigger late than early.
    sizes = [int(line.split()[3]) for line in output if line.startswith("saved")]
    assert max(sizes) < SEAL // 2, max(sizes)
    assert max(sizes[-30:]) <= 2 * max(sizes[:30]), sizes
    for obj in objects:  # gzip members, one per save: SEAL of lines packs to under half
        assert len(json.dumps(obj["data"])) < SEAL // 2, obj["metadata"]["name"]

    # The apiserver saw chunks created, never updated: the history is not rewritten.
    names = {chunk_name(head, n) for n in range(1, chunks + 1)}
    updates = [
        e
        for e in cluster.audit_events()
        if e.get("verb") == "update"
        and (e.get("objectRef") or {}).get("resource") == "configmaps"
        and (e.get("objectRef") or {}).get("name") in names | {head}
    ]
    assert updates, "the audit log shows the head's updates"
    chunk_updates = [e for e in updates if e["objectRef"]["name"] != head]
    # A chunk a kill left unnamed is overwritten once by the resumed writer, at most.
    assert len(chunk_updates) <= 2, [e["objectRef"]["name"] for e in chunk_updates]

    # `canary report ROLLOUT -n canary-system` reassembles it from the cluster.
    code = report_main(
        [
            ROLLOUT,
            "-n",
            NAMESPACE,
            "--kubeconfig",
            str(controller_kubeconfig),
            "--format",
            "json",
            "-o",
            "-",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tick_count"] == sum(isinstance(e, TickEntry) for e in long_record)
    last = long_record[-1]
    assert isinstance(last, TickEntry) and last.canary is not None
    assert report["final_canary"]["requests"] == last.canary.requests

    # The chunks are owned by the head: deleting it lets the garbage collector take them.
    cluster.kubectl("delete", "configmap", head, "-n", NAMESPACE)
    deadline = time.monotonic() + 120
    while _record_objects(cluster, head):
        assert time.monotonic() < deadline, "the chunks outlived their head"
        time.sleep(1)
