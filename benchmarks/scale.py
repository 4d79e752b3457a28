"""The whole controller at scale (issue 13, point 7): `canary kubernetes` on the real control
plane (tests/support/control_plane.py: etcd, kube-apiserver, controller-manager, scheduler,
kwok) with N annotated Deployments rolling out at once, a real Prometheus scraping one exporter
that publishes every rollout's series (benchmarks/metrics_batch.py's: 90 series per rollout,
the `app-histogram` preset), rollouts held at their first step (min-step-duration 3h) so that
every one of them keeps analysing for the whole window.

For each N in --sizes: start the cluster, the exporter and Prometheus; create the apps (25
namespaces, a Deployment and an Ingress each, one replica); start --replicas controller
processes (with `--shards` when asked) as the manifests' ServiceAccount (RBAC enforced); wait
until every app is initialized; give every app a new template; wait until every rollout is
Progressing; wait --settle-s (30 s: every rollout's first metrics read, which goes back to its
analysis' start, is done); then measure over --age-s seconds of rollout age:

- CPU: each controller process' utime+stime (/proc/PID/stat), as a share of one core, and
  per rollout-tick (ticks counted by the controller itself: canary_tick_seconds_count);
- RSS (/proc/PID/status VmRSS) at the window's start, end and max: flat means bounded;
- Prometheus queries per rollout-tick (Prometheus' own prometheus_http_requests_total for
  /api/v1/query and /api/v1/query_range);
- tick lateness p50/p95 against the fixed-rate schedule (canary_tick_lateness_seconds, as the
  upper bound of the bucket holding the quantile), and the share of ticks that started within
  10% of the period;
- a py-spy profile (--profile-s seconds in the window's middle): the top functions by own
  time and by total time.

With --kill-after-window (and --replicas >= 2), after the window: snapshot every rollout's
step, weight, step start time, rollout id and transitions from its status annotation, the
canary Ingress' canary-weight, and the start/transition entries of its record; SIGKILL
replica 0 by PID; poll the survivors' /metrics and report, from the kill, when they hold every
shard (canary_shard_held = 1 for all: the takeover, next to the Lease duration, renew deadline
and retry period in use, and the Lease's own acquireTime), when every rollout has its
canary_rollout_step and canary_rollout_weight_percent series there, when every moved rollout
has an analysis decision there, and when canary_tick_seconds_count has advanced by N more
ticks; then, 2 tick periods later (and at least 35 s: a record flush), compare again: steps,
weights (status and Ingress) and step starts changed, records with a new start or transition,
record ticks after the kill at another step or weight. A takeover can exceed the Lease
duration by up to about two retry periods: the survivor counts the duration from when it
*saw* the last renewal, read every retry period (canary.kubernetes.shards).

    PYTHONPATH=. python -m benchmarks.scale [--sizes 100 500 1000 2000] [--age-s 600]
        [--tick-s 10] [--replicas 1] [--shards 1] [--profile-s 30] [--json out.json]
        [--lease-s 15] [--kill-after-window]

The control-plane binaries come from `scripts/control-plane` (cached); py-spy from the venv
(`pip install py-spy`; without it the profile is skipped). Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from benchmarks.metrics_batch import names  # noqa: E402
from canary.kubernetes.operator import KubeState  # noqa: E402

LOOPBACK = "127.0.0.1"
NAMESPACES = 25
CLK_TCK = os.sysconf("SC_CLK_TCK")
Buckets = list[tuple[float, float]]


def annotations(app: str) -> dict[str, str]:
    return {
        "canary.dev/enabled": "true",
        "canary.dev/router": "ingress-nginx",
        "canary.dev/ingress": app,
        "canary.dev/steps": "10,20",
        # Held at the first step for the whole window: every rollout keeps analysing.
        "canary.dev/min-step-duration": "3h",
        "canary.dev/max-step-duration": "4h",
        "canary.dev/no-data-deadline": "30m",
        "canary.dev/metrics": "app-histogram",
    }


def app_objects(i: int, image: str) -> list[dict[str, Any]]:
    namespace, app = names(i)
    labels = {"app": app}
    backend = {"service": {"name": f"{app}-primary", "port": {"number": 80}}}
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": app, "namespace": namespace, "annotations": annotations(app)},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "app", "image": image}]},
                },
            },
        },
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "Ingress",
            "metadata": {"name": app, "namespace": namespace},
            "spec": {
                "ingressClassName": "nginx",
                "rules": [
                    {
                        "host": f"{app}.example.com",
                        "http": {
                            "paths": [{"path": "/", "pathType": "Prefix", "backend": backend}]
                        },
                    }
                ],
            },
        },
    ]


def apply(cluster: Any, objects: list[dict[str, Any]], chunk: int = 250) -> None:
    for start in range(0, len(objects), chunk):
        items = objects[start : start + chunk]
        cluster.kubectl(
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=benchmark",
            "-f",
            "-",
            stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
        )


def states(cluster: Any) -> collections.Counter[str]:
    """How many apps are in each state: uninitialized, initialized, or their rollout's phase."""
    out = cluster.kubectl("get", "deployments", "-A", "-o", "json", check=False)
    counts: collections.Counter[str] = collections.Counter()
    if out.returncode != 0:
        return counts
    for item in json.loads(out.stdout)["items"]:
        if item["metadata"]["name"].endswith("-primary"):
            continue
        raw = (item["metadata"].get("annotations") or {}).get("canary.dev/status")
        st = KubeState.from_annotation(raw)
        if st is not None and st.rollout is not None:
            counts[st.rollout.phase.value] += 1
        elif st is not None and st.primary_revision:
            counts["initialized"] += 1
        else:
            counts["uninitialized"] += 1
    return counts


def wait_for(what: str, probe: Any, timeout_s: float, every_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        ok, detail = probe()
        if detail != last:
            print(f"    {what}: {detail}", flush=True)
            last = detail
        if ok:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"not within {timeout_s:g}s: {what} ({detail})")
        time.sleep(every_s)


# ---- measuring ------------------------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu(pid: int) -> collections.Counter[str]:
    """CPU seconds by thread name (the executors name theirs: canary-prometheus_0, ...), so
    the batcher's share is measured, not inferred from a profile."""
    by_name: collections.Counter[str] = collections.Counter()
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # the thread ended
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        by_name[re.sub(r"_?\d+$", "", name)] += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return by_name


def cpu_segments(series: list[tuple[float, list[float]]], segment_s: float) -> list[dict[str, Any]]:
    """Each replica's CPU share of a core in consecutive segments of about `segment_s`,
    from (time, CPU seconds) samples: a segment ends at the first sample past its length."""
    out: list[dict[str, Any]] = []
    start = 0
    for i in range(1, len(series)):
        t0, c0 = series[start]
        t1, c1 = series[i]
        if t1 - t0 >= segment_s or i == len(series) - 1:
            out.append(
                {
                    "from_s": round(t0 - series[0][0]),
                    "to_s": round(t1 - series[0][0]),
                    "cpu": [round((b - a) / (t1 - t0), 3) for a, b in zip(c0, c1, strict=True)],
                }
            )
            start = i
    return out


def machine_cpu() -> list[int]:
    """The machine's CPU time so far, in ticks (/proc/stat's first line: user, nice, system,
    idle, iowait, irq, softirq, steal)."""
    return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]


def machine_shares(before: list[int], after: list[int]) -> dict[str, float]:
    """Between two machine_cpu() readings: the share of all CPUs' time that was busy, and
    that the hypervisor gave to others (steal). With steal the host was oversubscribed: the
    same code takes longer on the wall clock and often more CPU time (caches), so figures
    measured on different days compare only with this beside them."""
    delta = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(delta) or 1
    idle = delta[3] + delta[4]
    return {
        "busy": round((total - idle - delta[7]) / total, 3),
        "steal": round(delta[7] / total, 3),
    }


def machine_speed_ms() -> float:
    """A fixed single-threaded workload like the controller's (decoding a Prometheus-shaped
    JSON answer, then a pure-Python loop over its values), best of 5, in ms: the same
    machine type ran the same code 2-3x slower on some days (issue 13's 2,000-rollout
    windows), without steal to show it. Measured before the servers start."""
    values = [[1_700_000_000 + i * 5, str(i * 0.25)] for i in range(200)]
    answer = json.dumps(
        {"data": {"result": [{"metric": {"app": f"a{i}"}, "values": values} for i in range(200)]}}
    )
    best = math.inf
    for _ in range(5):
        began = time.perf_counter()
        total = 0.0
        for series in json.loads(answer)["data"]["result"]:
            for _, value in series["values"]:
                total += float(value)
        best = min(best, time.perf_counter() - began)
    return round(best * 1000, 1)


def proc_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        return str(response.read().decode())


def samples(text: str, name: str) -> dict[str, float]:
    """{labels text: value} of one metric's samples in an exposition page."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name):
            head, value = line.rsplit(" ", 1)
            if head == name or head.startswith(name + "{"):
                out[head[len(name) :]] = float(value)
    return out


def looks_by_rollout(texts: list[str]) -> dict[str, float]:
    """Each rollout's analysis looks so far (canary_analysis_decisions_total, every decision
    and no_data summed), from the replicas' /metrics pages."""
    out: collections.Counter[str] = collections.Counter()
    for text in texts:
        for labels, value in samples(text, "canary_analysis_decisions_total").items():
            rollout = re.search(r'rollout="([^"]*)"', labels)
            if rollout:
                out[rollout.group(1)] += value
    return dict(out)


def spread(values: list[float]) -> dict[str, float]:
    """min, p1, p5, p50 and max of `values`, and the share below 0.9."""
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {
        "min": round(ordered[0], 3),
        "p1": at(0.01),
        "p5": at(0.05),
        "p50": at(0.5),
        "max": round(ordered[-1], 3),
        "below_0.9": round(sum(v < 0.9 for v in ordered) / len(ordered), 4),
    }


def prometheus_queries(prom_url: str) -> float:
    rows = samples(scrape(f"{prom_url}/metrics"), "prometheus_http_requests_total")
    pattern = re.compile(r'handler="/api/v1/query(_range)?"')
    return sum(v for labels, v in rows.items() if pattern.search(labels))


def histogram(text: str, name: str) -> tuple[Buckets, float]:
    """([(upper bound, cumulative count)], count) of an unlabelled histogram."""
    buckets = []
    for labels, value in samples(text, name + "_bucket").items():
        le = re.search(r'le="([^"]+)"', labels)
        if le:
            buckets.append((float(le.group(1)), value))
    buckets.sort()
    return buckets, samples(text, name + "_count").get("", 0.0)


def window(before: Buckets, after: Buckets) -> Buckets:
    return [(le, a - b) for (le, a), (_, b) in zip(after, before, strict=True)]


def quantile_bound(buckets: Buckets, q: float) -> float:
    """The upper bound of the bucket that holds quantile q (cumulative buckets)."""
    total = buckets[-1][1] if buckets else 0.0
    return next((le for le, count in buckets if total and count >= q * total), float("nan"))


def share_within(buckets: Buckets, bound: float) -> float:
    total = buckets[-1][1] if buckets else 0.0
    below = max((count for le, count in buckets if le <= bound), default=0.0)
    return below / total if total else float("nan")


def summed(histograms: list[Buckets]) -> Buckets:
    bounds = [le for le, _ in histograms[0]]
    return [(le, sum(h[i][1] for h in histograms)) for i, le in enumerate(bounds)]


def audit_size(cluster: Any) -> int:
    path = Path(cluster.audit_log)
    return path.stat().st_size if path.exists() else 0


def api_requests(cluster: Any, start: int, end: int) -> collections.Counter[str]:
    """The controller's API requests between two offsets of the apiserver's audit log
    (tests/support/control_plane.py's policy: the controller's ServiceAccount only)."""
    counts: collections.Counter[str] = collections.Counter()
    with Path(cluster.audit_log).open("rb") as log:
        log.seek(start)
        for line in log.read(max(0, end - start)).splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue  # the window's edge cut a line
            if event.get("stage") != "ResponseComplete":
                continue
            ref = event.get("objectRef") or {}
            counts[f"{event.get('verb')} {ref.get('resource', '?')}"] += 1
    return counts


def start_profile(
    pid: int, seconds: float, out: Path, *, gil: bool = True
) -> subprocess.Popen[bytes] | None:
    """py-spy recording the process for `seconds` (None without py-spy): read it with
    profile_of(out) once it has exited. `gil`: only samples holding the GIL (CPU), else
    every thread's, idle ones too."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return None
    return subprocess.Popen(
        [spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "50", "--nonblocking",
         *(["--gil"] if gil else []), "-f", "raw", "-o", str(out.with_suffix(".txt"))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def profile(pid: int, seconds: float, out: Path) -> dict[str, list[tuple[str, float]]]:
    """py-spy's samples of the process: the top frames by own time and by total time."""
    spy = start_profile(pid, seconds, out)
    if spy is None:
        return {}
    spy.wait()
    return profile_of(out)


def profile_of(out: Path) -> dict[str, list[tuple[str, float]]]:
    raw = out.with_suffix(".txt")
    if not raw.exists():
        return {}
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    n = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        n += count
        frames = [re.sub(r" \((?:.*/)?([^/]+\.py):\d+\)", r" (\1)", f) for f in stack.split(";")]
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    if not n:
        return {}
    return {
        "own": [(f, c / n) for f, c in own.most_common(12)],
        "total": [(f, c / n) for f, c in total.most_common(25)],
    }


# --heap: the controller runs under tracemalloc (slower: use it for where memory goes, not
# for the figures) and SIGUSR2 writes its top allocation sites to HEAP_DUMP.
_HEAP_WRAPPER = """
import os, runpy, signal, sys, tracemalloc
tracemalloc.start(int(os.environ.get("HEAP_FRAMES", "6")))
def dump(signum, frame):
    snap = tracemalloc.take_snapshot()
    with open(os.environ["HEAP_DUMP"], "w") as out:
        total = sum(s.size for s in snap.statistics("filename"))
        out.write(f"traced {total / 2**20:.1f} MiB\\n")
        for group in ("lineno", "traceback"):
            for stat in snap.statistics(group)[:40]:
                out.write(f"{stat.size / 2**20:8.2f} MiB {stat.count:9d} ")
                out.write(" <- ".join(str(f) for f in reversed(stat.traceback)) + "\\n")
signal.signal(signal.SIGUSR2, dump)
sys.argv = ["canary", *sys.argv[1:]]
runpy.run_module("canary", run_name="__main__")
"""


@dataclass
class Replica:
    """One `python -m canary kubernetes` process, started with sys.executable, stopped by PID."""

    name: str
    argv: list[str]
    log: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT), "HEAP_DUMP": str(self.log) + ".heap"},
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def metrics(self) -> str:
        return scrape(f"http://{LOOPBACK}:{self.port}/metrics")

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# ---- the kill phase (--kill-after-window) ---------------------------------------------------


class _Dump:
    """ConfigMaps fetched once, served to read_record_configmap as if from the API."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.by_name = {item["metadata"]["name"]: item for item in items}

    async def get_configmap(self, namespace: str, name: str) -> dict[str, Any]:
        return self.by_name[name]


def rollout_states(cluster: Any, record_namespace: str) -> dict[str, dict[str, Any]]:
    """Per rollout ("ns/name"): what the status annotation, the canary Ingress and the record
    say about its step and weight, for the before/after comparison of the kill phase."""
    import asyncio

    from canary.core.records import NoteEntry
    from canary.kubernetes.record_store import read_record_configmap
    from canary.routers.ingress_nginx import WEIGHT_ANNOTATION

    ingress_weight: dict[str, str | None] = {}
    for item in cluster.get_json("ingresses", "-A")["items"]:
        meta = item["metadata"]
        if meta["name"].endswith("-canary"):
            key = f"{meta['namespace']}/{meta['name'].removesuffix('-canary')}"
            ingress_weight[key] = (meta.get("annotations") or {}).get(WEIGHT_ANNOTATION)
    dump = _Dump(cluster.get_json("configmaps", "-n", record_namespace)["items"])
    out: dict[str, dict[str, Any]] = {}
    for item in cluster.get_json("deployments", "-A")["items"]:
        meta = item["metadata"]
        if meta["name"].endswith("-primary"):
            continue
        key = f"{meta['namespace']}/{meta['name']}"
        st = KubeState.from_annotation((meta.get("annotations") or {}).get("canary.dev/status"))
        ro = st.rollout if st is not None else None
        row: dict[str, Any] = {
            "rollout_id": st.rollout_id if st is not None else "",
            "stage": ro.stage if ro else None,
            "step": ro.step if ro else None,
            "weight": ro.weight if ro else None,
            "started_at": ro.started_at if ro else None,
            "step_started_at": ro.step_started_at if ro else None,
            "transitions": len(ro.history) if ro else 0,
            "ingress_weight": ingress_weight.get(key),
            "record_starts": None,
            "record_transitions": None,
            "record_ticks": [],
        }
        head = dump.by_name.get((st.record if st is not None else "").partition("/")[2])
        if head is not None:
            try:
                entries = asyncio.run(read_record_configmap(dump, head))
            except Exception as exc:  # a torn or missing chunk is a finding, not a crash
                row["record_error"] = str(exc)
            else:
                row["record_starts"] = sum(e.kind == "start" for e in entries)
                row["record_transitions"] = sum(e.kind == "transition" for e in entries)
                row["record_ticks"] = [
                    (e.at, e.step, e.weight_set) for e in entries if e.kind == "tick"
                ]
                row["record_resumed"] = [
                    e.message
                    for e in entries
                    if isinstance(e, NoteEntry) and e.message.startswith("resumed")
                ]
        out[key] = row
    return out


def shard_leases(cluster: Any, namespace: str, shards: int) -> dict[int, dict[str, Any]]:
    leases = cluster.get_json("leases", "-n", namespace)["items"]
    by_name = {lease["metadata"]["name"]: lease.get("spec") or {} for lease in leases}
    return {i: by_name.get(f"canary-shard-{i}-of-{shards}", {}) for i in range(shards)}


def wall(stamp: str | None) -> float:
    """Unix seconds of a Lease's MicroTime (2026-12-01T03:00:00.123456Z)."""
    if not stamp:
        return float("nan")
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def per_rollout(text: str, name: str) -> dict[str, float]:
    """{rollout: summed value} of a per-rollout family (summed over its other labels)."""
    out: dict[str, float] = collections.defaultdict(float)
    for labels, value in samples(text, name).items():
        found = re.search(r'rollout="([^"]+)"', labels)
        if found:
            out[found.group(1)] += value
    return dict(out)


KILL_POLL_S = 2.0  # how often the kill phase reads the survivors' /metrics


def quantiles(values: list[float]) -> dict[str, float] | None:
    """p10, p50, p90 and max of `values` (nearest rank), or None when there are none."""
    if not values:
        return None
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    return {"n": len(ordered), "p10": at(0.1), "p50": at(0.5), "p90": at(0.9), "max": at(1.0)}


def kill_phase(
    cluster: Any,
    replicas: list[Replica],
    n: int,
    args: argparse.Namespace,
    record_ns: str,
    workdir: Path,
    others: dict[str, int] | None = None,
) -> dict[str, Any]:
    """SIGKILL replica 0; time the survivors' takeover of its shards and the return of its
    rollouts' ticks; check that no rollout's step or weight moved and none restarted a step.
    `others`: processes (name -> pid) whose CPU from the kill until every moved rollout
    ticked is reported beside the survivors' (where the takeover's time goes)."""
    from canary.cli.kubernetes import lease_timings
    from canary.kubernetes.shards import shard_of

    timings = lease_timings(args.lease_s)
    shards = max(args.shards, 1)
    survivors = replicas[1:]
    leases = shard_leases(cluster, record_ns, shards)
    killed_shards = sorted(i for i, s in leases.items() if s.get("holderIdentity") == "replica-0")
    keys = [f"{ns}/{app}" for ns, app in (names(i) for i in range(n))]
    moved = {k for k in keys if shard_of(*k.split("/"), shards) in killed_shards}
    before = rollout_states(cluster, record_ns)
    # read again: the snapshot above takes about a minute at 2,000 rollouts
    leases = shard_leases(cluster, record_ns, shards)
    last_renewal = max((wall(leases[i].get("renewTime")) for i in killed_shards), default=0.0)
    print(
        f"    kill: replica-0 (pid {replicas[0].pid}) holds shards {killed_shards} "
        f"({len(moved)} rollouts); lease {timings}",
        flush=True,
    )
    watched = {**{r.name: r.pid for r in survivors}, **(others or {})}
    cpu_at_kill = {name: proc_cpu(pid) for name, pid in watched.items()}
    machine_at_kill = machine_cpu()
    machine_to_ticked: dict[str, float] = {}
    audit_at_kill = audit_size(cluster)
    cpu_to_ticked: dict[str, float] = {}
    api_to_ticked: collections.Counter[str] = collections.Counter()
    killed_at, killed_wall = time.monotonic(), time.time()
    os.kill(replicas[0].pid, signal.SIGKILL)
    spy = (
        start_profile(survivors[0].pid, args.profile_kill_s, workdir / "profile-kill")
        if args.profile_kill_s
        else None
    )
    assert replicas[0].process is not None
    replicas[0].process.wait()

    marks: dict[str, float] = {}
    ticks_at_takeover = 0.0
    # per moved rollout, when (from the kill, to a poll) its series were on a survivor (it
    # resumed) and when it had first decided there: where the time to "ticked" goes
    resumed_at: dict[str, float] = {}
    decided_at: dict[str, float] = {}
    deadline = killed_at + 3 * args.lease_s + 6 * args.tick_s + 120
    while len(marks) < 4 and time.monotonic() < deadline:
        now = time.monotonic() - killed_at
        texts = [r.metrics() for r in survivors]
        held = {
            labels
            for t in texts
            for labels, v in samples(t, "canary_shard_held").items()
            if v == 1.0
        }
        ticks = sum(histogram(t, "canary_tick_seconds")[1] for t in texts)
        steps = {k for t in texts for k in per_rollout(t, "canary_rollout_step")}
        weights = {k for t in texts for k in per_rollout(t, "canary_rollout_weight_percent")}
        decided = {
            k for t in texts for k, v in per_rollout(t, "canary_analysis_decisions_total").items()
            if v >= 1
        }  # fmt: skip
        for k in moved & steps & weights:
            resumed_at.setdefault(k, now)
        for k in moved & decided:
            decided_at.setdefault(k, now)
        if "takeover" not in marks and all(f'{{shard="{i}"}}' in held for i in range(shards)):
            marks["takeover"] = now
            ticks_at_takeover = ticks
        if "series" not in marks and set(keys) <= steps & weights:
            marks["series"] = now
        if "ticked" not in marks and moved <= decided:
            marks["ticked"] = now  # every moved rollout ticked (a decision) on a survivor
            cpu_to_ticked = {
                name: round(proc_cpu(pid) - cpu_at_kill[name], 1) for name, pid in watched.items()
            }
            api_to_ticked = api_requests(cluster, audit_at_kill, audit_size(cluster))
            machine_to_ticked = machine_shares(machine_at_kill, machine_cpu())
        if "takeover" in marks and "ticks_n" not in marks and ticks >= ticks_at_takeover + n:
            marks["ticks_n"] = now
        # Not faster: each poll renders the survivor's /metrics for every rollout, and at
        # 4 a second (as this was) that was 42% of the survivor's CPU during the takeover
        # (py-spy, --profile-kill-s): the measurement slowed what it measured.
        time.sleep(KILL_POLL_S)
    # Then ~2 tick periods, and at least a record flush (30 s) so that the survivors' ticks
    # are in the records compared below.
    time.sleep(max(2 * args.tick_s, 35.0))
    after = rollout_states(cluster, record_ns)
    leases_after = shard_leases(cluster, record_ns, shards)

    def changed(field: str) -> list[str]:
        return [k for k in keys if before.get(k, {}).get(field) != after.get(k, {}).get(field)]

    stray_ticks = [
        k
        for k in keys
        if any(
            at > killed_wall and (step, weight) != (before[k]["step"], before[k]["weight"])
            for at, step, weight in after.get(k, {}).get("record_ticks", [])
        )
    ]
    record_ticks_after = {
        k: sum(at > killed_wall for at, _, _ in after.get(k, {}).get("record_ticks", []))
        for k in keys
    }
    # Per moved rollout, the record's gap around the kill: from its last tick entry before the
    # kill to its first after (ticks not yet flushed when the process died are in it too).
    gaps = []
    for k in moved:
        ats = [at for at, _, _ in after.get(k, {}).get("record_ticks", [])]
        was = [at for at in ats if at <= killed_wall]
        now_ = [at for at in ats if at > killed_wall]
        if was and now_:
            gaps.append(min(now_) - max(was))
    gaps.sort()
    restarted = sorted(
        set(changed("step_started_at"))
        | set(changed("started_at"))
        | set(changed("rollout_id"))
        | set(changed("transitions"))
        | set(changed("record_starts"))
        | set(changed("record_transitions"))
    )
    acquired = {i: wall(leases_after[i].get("acquireTime")) for i in killed_shards}
    result = {
        "killed": "replica-0",
        "killed_shards": killed_shards,
        "moved_rollouts": len(moved),
        **timings,
        "kill_after_last_renewal_s": round(killed_wall - last_renewal, 2),
        "lease_acquired_after_kill_s": {
            str(i): round(at - killed_wall, 2) for i, at in acquired.items()
        },
        "new_holders": {str(i): leases_after[i].get("holderIdentity") for i in killed_shards},
        "takeover_s": round(marks["takeover"], 2) if "takeover" in marks else None,
        "all_series_on_survivor_s": round(marks["series"], 2) if "series" in marks else None,
        "moved_rollouts_ticked_s": round(marks["ticked"], 2) if "ticked" in marks else None,
        "n_more_ticks_s": round(marks["ticks_n"], 2) if "ticks_n" in marks else None,
        # quantiles over the moved rollouts, seconds from the kill (to a poll, KILL_POLL_S)
        "moved_resumed_s": quantiles(list(resumed_at.values())),
        "moved_first_decided_s": quantiles(list(decided_at.values())),
        "moved_resumed_to_decided_s": quantiles(
            [decided_at[k] - resumed_at[k] for k in decided_at if k in resumed_at]
        ),
        "rollouts_checked": len([k for k in keys if k in before and k in after]),
        "not_held_at_first_step": [
            k
            for k in keys
            if before.get(k, {}).get("stage") != "Progressing" or before.get(k, {}).get("step") != 0
        ],
        "steps_changed": changed("step"),
        "weights_changed": changed("weight"),
        "ingress_weights_changed": changed("ingress_weight"),
        "ingress_vs_status_mismatch": [
            k
            for k in keys
            if str(after.get(k, {}).get("weight")) != str(after.get(k, {}).get("ingress_weight"))
        ],
        "steps_restarted": restarted,
        "record_ticks_off_step": stray_ticks,
        "moved_with_record_ticks_after_kill": sum(record_ticks_after[k] > 0 for k in moved),
        "moved_record_tick_gap_s": {
            "min": round(gaps[0], 1),
            "median": round(gaps[len(gaps) // 2], 1),
            "max": round(gaps[-1], 1),
        }
        if gaps
        else None,
        "record_errors": [k for k in keys if "record_error" in after.get(k, {})],
        # CPU seconds of each process, and the survivors' API requests, from the kill until
        # every moved rollout had ticked on a survivor
        "cpu_s_to_ticked": cpu_to_ticked,
        "machine_cpu_to_ticked": machine_to_ticked,
        "api_to_ticked": dict(api_to_ticked.most_common(15)),
        # each moved rollout's resumed note says whether its counts carried on from the
        # state saved with its record or were read back (and why)
        "moved_counts_carried_on": sum(
            any("counts carried on" in m for m in after.get(k, {}).get("record_resumed", []))
            for k in moved
        ),
        # ... and whether its analysis carried on from the state saved with the record's
        # head (the record not read) or was replayed from the record (and why)
        "moved_analysis_carried_on": sum(
            any("the analysis carried on" in m for m in after.get(k, {}).get("record_resumed", []))
            for k in moved
        ),
        "moved_analysis_replayed": sorted(
            {
                m.partition("(the analysis state saved with the record: ")[2][:120]
                for k in moved
                for m in after.get(k, {}).get("record_resumed", [])
                if "evidence replayed" in m
            }
        )[:5],
        "moved_counts_read_back": sorted(
            {
                m.rpartition("; counts read back")[2]
                for k in moved
                for m in after.get(k, {}).get("record_resumed", [])
                if "counts read back" in m
            }
        )[:5],
    }
    verdict = (
        not result["steps_changed"] and not result["weights_changed"]
        and not result["ingress_weights_changed"] and not result["steps_restarted"]
        and not result["record_ticks_off_step"] and not result["ingress_vs_status_mismatch"]
    )  # fmt: skip
    result["no_step_repeated_no_weight_jump"] = verdict
    if spy is not None:
        spy.wait()
        result["profile_kill"] = profile_of(workdir / "profile-kill")
    result["takeover_within_lease"] = (
        result["takeover_s"] is not None and result["takeover_s"] <= args.lease_s
    )
    if not verdict:
        result["evidence"] = {
            k: {"before": {f: v for f, v in before.get(k, {}).items() if f != "record_ticks"},
                "after": {f: v for f, v in after.get(k, {}).items() if f != "record_ticks"}}
            for k in sorted(set(restarted) | set(changed("step")) | set(changed("weight"))
                            | set(changed("ingress_weight")) | set(stray_ticks))[:10]
        }  # fmt: skip
    return result


# ---- one size ----------------------------------------------------------------------------------


def run_size(n: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from support.control_plane import free_port, start_control_plane

    from canary.demo.procs import HttpReady, ManagedProcess, find_binary

    print(f"== {n} rollouts, {args.replicas} replica(s), {args.shards} shard(s)", flush=True)
    speed_ms = machine_speed_ms()
    started: list[Any] = []
    replicas: list[Replica] = []
    # The audit log counts the controller's requests: unrotated (the apiserver's default
    # rotates at 100 MB, which 2,000 rollouts write in ~15 minutes and the window lost).
    with start_control_plane(
        workdir / "cluster", apiserver_args=["--audit-log-maxsize=100000"]
    ) as cluster:
        try:
            exporter_port = free_port()
            exporter = ManagedProcess(
                [sys.executable, "-c",
                 f"from benchmarks.metrics_batch import serve_exporter; "
                 f"serve_exporter({exporter_port}, {n})"],
                log_path=workdir / "exporter.log",
                ready=HttpReady(f"http://{LOOPBACK}:{exporter_port}/"),
                ready_timeout=60, name="exporter", cwd=ROOT,
            )  # fmt: skip
            started.append(exporter.start_sync())
            prom_port = free_port()
            config = workdir / "prometheus.yml"
            config.write_text(
                f"global:\n  scrape_interval: {args.scrape_s:g}s\n"
                f"scrape_configs:\n  - job_name: apps\n    scrape_timeout: {args.scrape_s:g}s\n"
                f'    static_configs:\n      - targets: ["{LOOPBACK}:{exporter_port}"]\n'
            )
            prometheus = ManagedProcess(
                [find_binary("prometheus", fallbacks=("/usr/bin/prometheus",)),
                 f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                 f"--web.listen-address={LOOPBACK}:{prom_port}", "--log.level=warn"],
                log_path=workdir / "prometheus.log",
                ready=HttpReady(f"http://{LOOPBACK}:{prom_port}/-/ready"),
                ready_timeout=60, name="prometheus",
            )  # fmt: skip
            started.append(prometheus.start_sync())
            prom_url = f"http://{LOOPBACK}:{prom_port}"

            for t in range(min(NAMESPACES, n)):
                cluster.kubectl("create", "namespace", f"team{t}")
            apply(cluster, [o for i in range(n) for o in app_objects(i, "example/app:1")])
            for r in range(args.replicas):
                kubeconfig = cluster.service_account_kubeconfig(workdir / f"r{r}.kubeconfig")
                port = free_port()
                launch = ["-c", _HEAP_WRAPPER] if args.heap else ["-m", "canary"]
                argv = [
                    sys.executable, *launch, "kubernetes",
                    f"--kubeconfig={kubeconfig}", "--all-namespaces",
                    f"--identity=replica-{r}", f"--listen={LOOPBACK}:{port}",
                    f"--prometheus-url={prom_url}", "--record-namespace=canary-system",
                    f"--tick={args.tick_s:g}", "--log-format=json",
                    f"--lease-duration={args.lease_s}",
                ]  # fmt: skip
                if args.shards > 1:
                    argv.append(f"--shards={args.shards}")
                elif args.replicas > 1:
                    argv.append("--leader-elect")
                replica = Replica(f"replica-{r}", argv, workdir / f"replica-{r}.log", port)
                replica.start()
                replicas.append(replica)
            setup_s = 120 + n * 0.6

            def count(*wanted: str) -> tuple[bool, str]:
                c = states(cluster)
                return sum(c[w] for w in wanted) >= n, str(dict(c))

            wait_for("initialized", lambda: count("initialized", "Progressing"), setup_s)
            apply(cluster, [app_objects(i, "example/app:2")[0] for i in range(n)])
            began = time.monotonic()
            wait_for("progressing", lambda: count("Progressing"), setup_s)
            print(
                f"    all {n} progressing {time.monotonic() - began:.0f}s after the new templates"
            )

            # The other processes on the machine, whose CPU the controllers compete with
            others = {p.name: p.popen.pid for p in cluster.processes if p.popen is not None}
            for name, proc in (("prometheus", prometheus), ("exporter", exporter)):
                if proc.pid is not None:
                    others[name] = proc.pid

            def mark() -> dict[str, Any]:
                texts = [r.metrics() for r in replicas]
                return {
                    "t": time.monotonic(),
                    "cpu": [proc_cpu(r.pid) for r in replicas],
                    "servers": {name: proc_cpu(pid) for name, pid in others.items()},
                    "threads": thread_cpu(replicas[0].pid),
                    "rss": [proc_rss_mib(r.pid) for r in replicas],
                    "queries": prometheus_queries(prom_url),
                    "ticks": sum(histogram(t, "canary_tick_seconds")[1] for t in texts),
                    "late": summed(
                        [histogram(t, "canary_tick_lateness_seconds")[0] for t in texts]
                    ),
                    "took": summed([histogram(t, "canary_tick_seconds")[0] for t in texts]),
                    # the batched Prometheus reads' timings (canary.metrics.batched)
                    **{
                        what: summed(
                            [histogram(t, f"canary_metrics_{what}_seconds")[0] for t in texts]
                        )
                        for what in ("query", "batch", "wait")
                    },
                    "audit": audit_size(cluster),
                    "machine": machine_cpu(),
                    "gc": sum(sum(samples(t, "canary_gc_seconds_total").values()) for t in texts),
                    "by_rollout": looks_by_rollout(texts),
                }

            # Each rollout's first metrics read goes back to its analysis' start (a
            # registration: canary.metrics.batched): one-off, not the steady state measured.
            time.sleep(args.settle_s)
            first = mark()
            rss_series = [first["rss"]]
            # (time, each replica's CPU seconds) at every sample: the CPU by segment of age
            cpu_series = [(first["t"], first["cpu"])]
            prof: dict[str, Any] = {}
            end = first["t"] + args.age_s
            profile_at = first["t"] + (args.age_s - args.profile_s) / 2
            while time.monotonic() < end:
                time.sleep(min(30.0, max(0.0, end - time.monotonic())))
                if args.profile_s and not prof and time.monotonic() >= profile_at:
                    prof = profile(replicas[0].pid, args.profile_s, workdir / "profile")
                rss_series.append([proc_rss_mib(r.pid) for r in replicas])
                cpu_series.append((time.monotonic(), [proc_cpu(r.pid) for r in replicas]))
            last = mark()
            final = states(cluster)
            api = api_requests(cluster, first["audit"], last["audit"])
            if args.heap:
                os.kill(replicas[0].pid, signal.SIGUSR2)
                heap = Path(str(replicas[0].log) + ".heap")
                for _ in range(120):
                    time.sleep(1)
                    if heap.exists() and heap.stat().st_size > 0:
                        time.sleep(2)
                        print(heap.read_text(), flush=True)
                        break
            kill = (
                kill_phase(
                    cluster,
                    replicas,
                    n,
                    args,
                    "canary-system",
                    workdir,
                    {k: v for k, v in others.items() if k != "exporter"},
                )
                if args.kill_after_window and len(replicas) >= 2
                else None
            )
        finally:
            for replica in replicas:
                replica.stop()
            for process in reversed(started):
                process.stop_sync()

    wall = last["t"] - first["t"]
    ticks = last["ticks"] - first["ticks"]
    cpu = [b - a for a, b in zip(first["cpu"], last["cpu"], strict=True)]
    late = window(first["late"], last["late"])
    took = window(first["took"], last["took"])
    result = {
        "rollouts": n,
        "replicas": args.replicas,
        "shards": args.shards,
        "tick_s": args.tick_s,
        "window_s": round(wall),
        "settle_s": args.settle_s,
        "cpu_share_of_core": [round(c / wall, 3) for c in cpu],
        # the same in consecutive segments of the window (a trend with the rollouts' age)
        "cpu_share_of_core_by_segment": cpu_segments(cpu_series, args.segment_s),
        # the servers' (apiserver, etcd, Prometheus, kwok, ...): what the controllers' work
        # costs the rest of the machine, and what they compete with for its cores
        "servers_cpu_share_of_core": {
            name: round((last["servers"][name] - first["servers"][name]) / wall, 3)
            for name in sorted(first["servers"])
        },
        # the fixed workload's time before the run (lower: a faster machine that day)
        "machine_speed_ms": speed_ms,
        # the whole machine's in the window: busy, and stolen by the hypervisor
        "machine_cpu": machine_shares(first["machine"], last["machine"]),
        "cpu_ms_per_rollout_tick": round(1000 * sum(cpu) / ticks, 2) if ticks else None,
        # Python's cyclic garbage collections, timed by the controllers (canary.runtime)
        "gc_share_of_cpu": round((last["gc"] - first["gc"]) / sum(cpu), 4) if sum(cpu) else None,
        # the first replica's CPU by thread: the event loop (MainThread, named after the
        # process), the executors' pools (canary-prometheus: the batcher's decoding, ...)
        "cpu_ms_per_rollout_tick_by_thread": {
            name: round(
                1000
                * (last["threads"][name] - first["threads"].get(name, 0.0))
                * len(replicas)
                / ticks,
                3,
            )
            for name in sorted(last["threads"])
        }
        if ticks
        else {},
        "rss_mib_start": [round(x) for x in first["rss"]],
        "rss_mib_end": [round(x) for x in last["rss"]],
        "rss_mib_max": [round(max(row[i] for row in rss_series)) for i in range(len(replicas))],
        "rss_mib_series": [[round(x) for x in row] for row in rss_series],
        "rollout_ticks": ticks,
        "ticks_per_rollout_period": round(ticks / n / (wall / args.tick_s), 3),
        "queries_per_rollout_tick": (
            round((last["queries"] - first["queries"]) / ticks, 4) if ticks else None
        ),
        # whether the looks missing from ticks_per_rollout_period are every rollout's or a few
        "looks_per_period_by_rollout": spread(
            [
                (last["by_rollout"].get(key, 0.0) - first["by_rollout"].get(key, 0.0))
                / (wall / args.tick_s)
                for key in last["by_rollout"]
            ]
        ),
        "tick_lateness_p50_le_s": quantile_bound(late, 0.5),
        "tick_lateness_p95_le_s": quantile_bound(late, 0.95),
        "ticks_within_10pct": round(share_within(late, 0.1 * args.tick_s), 4),
        "tick_took_p95_le_s": quantile_bound(took, 0.95),
        # Prometheus' batched reads: a query, a batch of all rollouts, and a tick's fetch
        # waiting for its counts (ticks run long and are missed when batches outlast a period)
        **{
            f"metrics_{what}_p{q}_le_s": quantile_bound(window(first[what], last[what]), q / 100)
            for what in ("query", "batch", "wait")
            for q in (50, 95)
        },
        "fetches_waiting_over_1s": round(
            1 - share_within(window(first["wait"], last["wait"]), 1.0), 4
        ),
        # the controllers' requests to the API server in the window (its audit log), per
        # rollout-tick, by verb and resource: watches count once, when they end
        "api_requests_per_rollout_tick": round(sum(api.values()) / ticks, 4) if ticks else None,
        "api_requests_by_kind": {k: round(v / max(1, ticks), 4) for k, v in api.most_common(12)},
        "states_at_end": dict(final),
        "profile": prof,
    }
    if kill is not None:
        result["kill"] = kill
    shown = {k: v for k, v in result.items() if k != "profile"}
    if kill is not None:
        shown["kill"] = {k: v for k, v in kill.items() if k != "profile_kill"}
    print(json.dumps(shown), flush=True)
    for title, shares in (("window", prof), ("kill", (kill or {}).get("profile_kill") or {})):
        if shares:
            print(f"    profile ({title}):")
        for kind in ("own", "total"):
            for frame, share in shares.get(kind, [])[:12]:
                print(f"    {kind:5} {100 * share:5.1f}%  {frame}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 500, 1000, 2000])
    parser.add_argument("--age-s", type=float, default=600)
    parser.add_argument("--tick-s", type=float, default=10)
    parser.add_argument("--scrape-s", type=float, default=5)
    parser.add_argument(
        "--segment-s", type=float, default=600, help="CPU by segment of this many seconds"
    )
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument(
        "--lease-s", type=int, default=15, help="the controllers' --lease-duration (15)"
    )
    parser.add_argument(
        "--kill-after-window",
        action="store_true",
        help="with >= 2 replicas: SIGKILL replica 0 after the window, time the takeover and "
        "check that no rollout's step or weight moved",
    )
    parser.add_argument("--profile-s", type=float, default=30)
    parser.add_argument(
        "--profile-kill-s",
        type=float,
        default=0,
        help="with --kill-after-window: py-spy the survivor this long from the kill",
    )
    parser.add_argument(
        "--settle-s",
        type=float,
        default=30,
        help="wait this long after every rollout is Progressing before the window starts",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--heap",
        action="store_true",
        help="run the controller under tracemalloc and print its top allocation sites at the end",
    )
    args = parser.parse_args()
    results = []
    for n in args.sizes:
        workdir = Path(tempfile.mkdtemp(prefix=f"canary-scale-{n}-"))
        try:
            results.append(run_size(n, args, workdir))
        finally:
            if args.keep:
                print(f"    kept {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
