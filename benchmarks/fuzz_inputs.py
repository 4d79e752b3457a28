"""Fuzz every input canary parses, and count what happened (issue 11's fuzzing figures).

    python -m benchmarks.fuzz_inputs                    # 10,000 inputs per target
    python -m benchmarks.fuzz_inputs --examples 200     # quick
    python -m benchmarks.fuzz_inputs --write            # also update benchmarks/RESULTS.md

Four targets, each through the entry point the controller itself calls:

* annotations: `parse_annotations` (the operator's reconcile) and `parse_command` (its
  command annotation); documented errors SpecError and ValueError.
* rollout configs: `load_config` on a file (what `canary run` and `canary validate` call);
  documented error ConfigError.
* topologies: `load_topology` on a file (`canary clusters`); ConfigError.
* records: `read_record` on a file and `unpack_record` on the same record packed into a
  ConfigMap (the runner's resume and `canary report`); RecordError.

Inputs are Hypothesis-generated: valid documents mutated at random paths with hostile values
(inf, nan, huge numbers and strings, nested structures), byte-level mutations of the valid
text, and hostile snippets (alias bombs, 10,000-deep nesting, binary, invalid UTF-8, gzip
bombs). Some inputs carry exactly one value known to be invalid ("must fail"): those must be
refused. For every input the script records:

* a traceback: any exception that is not the target's documented error (must be 0);
* bad input accepted: a must-fail input that parsed, or an accepted result that breaks the
  bounds (a tick outside 0.05 s..1 h, an infinite deadline, an entry of another schema
  version) (must be 0). Traffic is only touched after a successful parse (see RESULTS.md),
  so 0 here means 0 traffic changes on bad input;
* memory: the peak of Python allocations while parsing it (tracemalloc, reset per input),
  and the process' peak RSS at the end.

Generation is derandomized: the same command gives the same inputs.
"""

from __future__ import annotations

import argparse
import base64
import copy
import functools
import json
import math
import multiprocessing
import platform
import re
import resource
import sys
import tempfile
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from analysis import AnalysisConfig, Analyzer, ArmCounts, Snapshot
from canary.clusters.topology import Topology, load_topology
from canary.core.inputs import MAX_DURATION_S, MAX_TIMEOUT_S, TICK_MAX_S, TICK_MIN_S
from canary.core.records import (
    SCHEMA_VERSION,
    EndEntry,
    ManualEntry,
    NoteEntry,
    RecordError,
    StartEntry,
    TickEntry,
    TransitionEntry,
    dump_entry,
    read_record,
)
from canary.kubernetes.operator import parse_command
from canary.kubernetes.record_store import RECORD_KEY, unpack_record
from canary.kubernetes.spec import ANNOTATIONS, PREFIX, CanarySpec, SpecError, parse_annotations
from canary.static.config import ConfigError, TargetConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG_EXAMPLE = ROOT / "examples" / "rollout.yaml"
TOPOLOGY_EXAMPLE = ROOT / "examples" / "two-clusters.yaml"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
BEGIN = "<!-- fuzz_inputs: begin (written by python -m benchmarks.fuzz_inputs --write) -->"
END = "<!-- fuzz_inputs: end -->"
MB = 2**20


# -- tallies -------------------------------------------------------------------------------


@dataclass
class Tally:
    """What happened to one target's inputs."""

    name: str
    tried: int = 0
    refused: int = 0  # the documented error
    accepted: int = 0
    must_fail: int = 0
    tracebacks: list[str] = field(default_factory=list)
    bad_accepted: list[str] = field(default_factory=list)
    peak_bytes: int = 0
    peak_input: str = ""
    seconds: float = 0.0

    def problem(self) -> str | None:
        if self.tracebacks:
            return f"{self.name}: {len(self.tracebacks)} tracebacks, first: {self.tracebacks[0]}"
        if self.bad_accepted:
            return (
                f"{self.name}: {len(self.bad_accepted)} bad inputs accepted: {self.bad_accepted[0]}"
            )
        return None


def _short(value: object, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} chars)"


class Probe:
    """Runs one parse, classifying its outcome and measuring its peak allocation."""

    def __init__(self, tally: Tally, *, strict: bool, measure: bool = True) -> None:
        self.tally = tally
        self.strict = strict  # raise at once (the pytest module) instead of counting
        self.measure = measure  # tracemalloc around each parse

    def run(
        self,
        parse: Callable[[], Any],
        documented: type[BaseException] | tuple[type[BaseException], ...],
        *,
        shown: object,
    ) -> tuple[bool, Any]:
        """(accepted, result). A traceback is recorded (or raised when strict)."""
        traced = self.measure
        if traced:  # traced only while parsing: Hypothesis' own allocations are not counted
            tracemalloc.start()
        try:
            result = parse()
        except documented:
            return False, None
        except Exception as exc:  # the finding: anything else is a traceback
            if self.strict:
                raise
            self.tally.tracebacks.append(
                f"{type(exc).__name__}: {str(exc)[:200]} <- {_short(shown)}"
            )
            return False, None
        finally:
            if traced:
                used = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                if used > self.tally.peak_bytes:
                    self.tally.peak_bytes = used
                    self.tally.peak_input = _short(shown, 100)
        return True, result

    def bad(self, why: str, shown: object) -> None:
        message = f"{why} <- {_short(shown)}"
        if self.strict:
            raise AssertionError(message)
        self.tally.bad_accepted.append(message)


# -- hostile values ------------------------------------------------------------------------

_BOMB = (
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    + "".join(
        f"{name}: &{name} [{','.join(['*' + previous] * 9)}]\n"
        for previous, name in zip("abcdefgh", "bcdefghi", strict=True)
    )
    + "steps: *i\n"
)
HOSTILE_SNIPPETS: tuple[bytes, ...] = (
    _BOMB.encode(),
    b"x: &a [*a]\n",
    b"[" * 10_000,
    b"[" * 5_000 + b"]" * 5_000,
    b"{a: " * 3_000 + b"1" + b"}" * 3_000,
    b"- " * 5_000 + b"x",
    b"!!python/object/apply:os.system ['true']",
    b"!!binary 'A@@A'",
    b"2024-13-45",
    b"9" * 5000,
    b".inf",
    b"-.inf",
    b".nan",
    b"1e-9",
    b"\x00\x01\x02",
    b"\xff\xfe\xfd",
    b"\xc3\x28",
    b"? [a]\n: b\n",
    b"<<: *nowhere\n",
    b"--- a\n--- b\n",
    b"%YAML 9.9\n---\n",
    b"&x",
    b"*x",
    b"!<tag:yaml.org,2002:int> zz",
    b"\t\t:\n",
    b"'" + b"x" * 100_000 + b"'",
)

_FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-9, 0.049, 0.05, 3600.0, 3600.1, 604800.0, 604801.0, 1e300]),
)
_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.sampled_from([10**30, -(10**30), 2**63, 10**4000]),
    _FLOATS,
    st.text(max_size=30),
    st.sampled_from(["", "x" * 5000, "\x00", "inf", "nan", "-1", "1e999", "🦆", "${HOME}"]),
)
HOSTILE_VALUES = st.recursive(
    _LEAF,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=8), children, max_size=4),
    ),
    max_leaves=12,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*prefix, index))


def _set(doc: Any, path: tuple[Any, ...], value: Any, *, delete: bool = False) -> Any:
    if not path:
        return value
    node = doc
    for part in path[:-1]:
        node = node[part]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


def _dump(doc: Any) -> bytes:
    try:
        return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False).encode(
            "utf-8", "surrogatepass"
        )
    except (yaml.YAMLError, RecursionError, ValueError):
        return json.dumps(doc, default=str).encode("utf-8", "surrogatepass")


@st.composite
def mutated_documents(
    draw: st.DrawFn, base: Any, base_text: bytes, known_bad: list[tuple[tuple[Any, ...], Any]]
) -> tuple[bytes, bool]:
    """(YAML bytes, must_fail) derived from `base` (a valid document)."""
    mode = draw(st.sampled_from(["paths", "paths", "bytes", "snippet", "known-bad"]))
    if mode == "known-bad":
        path, value = draw(st.sampled_from(known_bad))
        doc = copy.deepcopy(base)
        if value is _DELETE:
            _set(doc, path, None, delete=True)
        else:
            _set(doc, path, value)
        return _dump(doc), True
    if mode == "paths":
        doc = copy.deepcopy(base)
        for _ in range(draw(st.integers(1, 4))):
            paths = list(_paths(doc))
            path = draw(st.sampled_from(paths))
            action = draw(st.sampled_from(["set", "set", "delete", "add"]))
            if action == "delete" and path:
                _set(doc, path, None, delete=True)
            elif action == "add":
                parent = doc
                for part in path:
                    parent = parent[part]
                if isinstance(parent, dict):
                    parent[draw(st.text(max_size=12))] = draw(HOSTILE_VALUES)
                elif isinstance(parent, list):
                    parent.append(draw(HOSTILE_VALUES))
            else:
                doc = _set(doc, path, draw(HOSTILE_VALUES))
        return _dump(doc), False
    data = bytearray(base_text)
    if mode == "snippet":
        snippet = draw(st.sampled_from(HOSTILE_SNIPPETS))
        # replace one value (after a ': ') or append the snippet
        colons = [m.end() for m in re.finditer(rb": ", data)]
        replace: bool = draw(st.booleans())
        if colons and replace:
            start = draw(st.sampled_from(colons))
            end = data.find(b"\n", start)
            data[start : end if end >= 0 else len(data)] = snippet
        else:
            data += b"\n" + snippet
        return bytes(data), False
    for _ in range(draw(st.integers(1, 6))):
        position = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        payload = draw(
            st.one_of(st.binary(min_size=1, max_size=12), st.sampled_from(HOSTILE_SNIPPETS))
        )
        if op == "insert":
            data[position:position] = payload
        elif op == "delete":
            del data[position : position + draw(st.integers(1, 40))]
        else:
            data[position : position + len(payload)] = payload
    return bytes(data), False


class _Delete:
    def __repr__(self) -> str:
        return "<delete>"


_DELETE = _Delete()


def _finite(value: float | None, upper: float) -> bool:
    return value is None or (math.isfinite(value) and 0 <= value <= upper)


# -- target: rollout configs ---------------------------------------------------------------

CONFIG_BASE = yaml.safe_load(CONFIG_EXAMPLE.read_text())
# Byte-level mutations start from the example without its comments: mutating comments tests
# nothing, and a smaller text leaves time for more inputs.
CONFIG_TEXT = _dump(CONFIG_BASE)
CONFIG_BAD: list[tuple[tuple[Any, ...], Any]] = [
    *((("tick_s",), v) for v in (math.inf, math.nan, 1e-9, 0, -1, 7200, "fast", None)),
    *((("min_step_s",), v) for v in (math.inf, -1, 1e12, math.nan)),
    *((("max_step_s",), v) for v in (math.inf, 0, 1e12, -5)),
    *((("no_data_deadline_s",), v) for v in (math.inf, 0, math.nan)),
    *((("steps",), v) for v in ([], [0], [5, 5], "x", [[1]], [100], [True])),
    *((("name",), v) for v in ("X" * 1000, "", None, "UPPER")),
    (("router", "timeout_s"), math.inf),
    (("metrics", "timeout_s"), math.nan),
    (("metrics", "url"), "ftp://x"),
    (("metrics", "queries", "lookback_s"), math.inf),
    (("analysis", "alpha"), math.inf),
    (("analysis", "alpha"), 0.7),
    (("analysis", "min_samples"), math.inf),
    (("colour",), "red"),
    (("router",), _DELETE),
    (("router", "kind"), "nginx"),
]


def check_config(data: bytes, must_fail: bool, probe: Probe, path: Path) -> None:
    path.write_bytes(data)
    accepted, config = probe.run(lambda: load_config(path), ConfigError, shown=data)
    _count(probe.tally, accepted, must_fail)
    if not accepted:
        return
    assert isinstance(config, TargetConfig)
    if must_fail:
        probe.bad("a must-fail config was accepted", data)
    if not TICK_MIN_S <= config.tick_s <= TICK_MAX_S:
        probe.bad(f"tick_s {config.tick_s} accepted", data)
    for value in (config.min_step_s, config.max_step_s, config.no_data_deadline_s):
        if not _finite(value, MAX_DURATION_S):
            probe.bad(f"duration {value} accepted", data)
    if not _finite(config.router.timeout_s, MAX_TIMEOUT_S) or not _finite(
        config.metrics.timeout_s, MAX_TIMEOUT_S
    ):
        probe.bad("timeout accepted", data)
    config.rollout_spec()


# -- target: topologies --------------------------------------------------------------------

TOPOLOGY_BASE = yaml.safe_load(TOPOLOGY_EXAMPLE.read_text())
TOPOLOGY_TEXT = _dump(TOPOLOGY_BASE)
_S0 = ("services", 0)
TOPOLOGY_BAD: list[tuple[tuple[Any, ...], Any]] = [
    *(((*_S0, "tick_s"), v) for v in (math.inf, math.nan, 1e-9, 0, 7200)),
    *(((*_S0, key), math.inf) for key in ("min_step_s", "max_step_s", "no_data_deadline_s")),
    *(((*_S0, "rollout_timeout_s"), v) for v in (math.inf, 1e12)),
    ((*_S0, "health", "interval_s"), math.inf),
    ((*_S0, "health", "timeout_s"), math.nan),
    ((*_S0, "failover", "healthy_s_to_failback"), math.inf),
    ((*_S0, "steps"), [5]),
    ((*_S0, "steps"), [50, 25]),
    (("clusters", "primary", "prometheus", "timeout_s"), math.inf),
    (("clusters", "canary", "name"), "eu-1"),
    (("services",), []),
    (("clusters",), _DELETE),
    ((*_S0, "dns_name"), "x" * 300),
]


def check_topology(data: bytes, must_fail: bool, probe: Probe, path: Path) -> None:
    path.write_bytes(data)
    accepted, topology = probe.run(lambda: load_topology(path), ConfigError, shown=data)
    _count(probe.tally, accepted, must_fail)
    if not accepted:
        return
    assert isinstance(topology, Topology)
    if must_fail:
        probe.bad("a must-fail topology was accepted", data)
    for service in topology.services:
        if not TICK_MIN_S <= service.tick_s <= TICK_MAX_S:
            probe.bad(f"tick_s {service.tick_s} accepted", data)
        for value in (
            service.min_step_s,
            service.max_step_s,
            service.no_data_deadline_s,
            service.rollout_timeout_s,
            service.failover.healthy_s_to_failback,
        ):
            if not _finite(value, MAX_DURATION_S):
                probe.bad(f"duration {value} accepted", data)
        service.rollout_spec()


# -- target: annotations -------------------------------------------------------------------

GOOD_VALUES: dict[str, list[str]] = {
    "enabled": ["true", "false", "yes"],
    "steps": ["5,10,25,50", "10", "1,99", "5%,10%"],
    "min-step-duration": ["60s", "5m", "1h30m", "0", "90"],
    "max-step-duration": ["15m", "none", "168h"],
    "no-data-deadline": ["2m", "30s"],
    "analysis.alpha": ["0.01", "0.05"],
    "analysis.error-tolerance": ["0.1", "10%"],
    "analysis.latency-tolerance": ["0.5", "50%"],
    "analysis.quantiles": ["p50,p99", "0.5,0.99"],
    "analysis.critical": ["errors", "errors,latency", "latency"],
    "router": ["ingress-nginx", "gateway-api"],
    "ingress": ["web"],
    "httproute": ["web"],
    "port": ["80", "8080"],
    "metrics": ["app-histogram", "custom", "envoy", "ingress-nginx"],
    "metrics.histogram": ["http_request_duration_seconds"],
    "metrics.requests": ['http_requests_total{namespace="{namespace}",service="{arm}"}'],
    "metrics.errors": ['http_requests_total{service="{arm}",code=~"5.."}'],
    "metrics.latency-buckets": ['http_request_duration_seconds_bucket{service="{arm}"}'],
    "webhook.post-rollout": ["https://hooks.example.com/x"],
    "webhook.rollback": ["http://hooks.example.com/y"],
}
_KEYS = [a.key for a in ANNOTATIONS]
_DURATION_BAD = ["inf", "nan", "-5s", "1e300", "169h", "1e999", "8d", "∞", "10081m", "605000"]
ANNOTATION_BAD: list[tuple[str, str]] = [
    *((PREFIX + "min-step-duration", v) for v in _DURATION_BAD),
    *((PREFIX + "max-step-duration", v) for v in _DURATION_BAD),
    *((PREFIX + "no-data-deadline", v) for v in [*_DURATION_BAD, "0"]),
    *((PREFIX + "steps", v) for v in ("0", "100", "5,5", "10,5", "inf", "", "1e2")),
    *((PREFIX + "analysis.alpha", v) for v in ("0", "0.5", "nan", "inf", "-1")),
    *((PREFIX + "analysis.error-tolerance", v) for v in ("0", "inf", "nan", "101", "-1%")),
    *((PREFIX + "port", v) for v in ("0", "65536", "inf", "-1")),
    *((PREFIX + "enabled", v) for v in ("maybe", "")),
    *((key, "x" * 5000) for key in _KEYS),
    (PREFIX + "stepz", "5,10"),
    (PREFIX + "webhook.confirm-rollout", "https://x.example.com"),
]
_VALUE_TEXT = st.one_of(
    st.text(max_size=40),
    st.from_regex(r"[0-9.eE+-]{0,8}[hms%]?", fullmatch=True),
    st.sampled_from(["", "x" * 5000, "inf", "nan", "\x00", "none", "1e999", "p0,p100", ",,,"]),
)


@st.composite
def annotation_sets(draw: st.DrawFn) -> tuple[dict[str, Any], bool]:
    """(annotations, must_fail): a valid base of an enabled Deployment plus random keys and
    values; or that base with exactly one known-bad value."""
    base: dict[str, Any] = {
        PREFIX + "enabled": "true",
        PREFIX + "router": "ingress-nginx",
        PREFIX + "ingress": "web",
    }
    if draw(st.integers(0, 4)) == 0:
        key, bad = draw(st.sampled_from(ANNOTATION_BAD))
        if key == PREFIX + "httproute":  # would clash with the base's ingress, fine but noisy
            key = PREFIX + "ingress"
        return {**base, key: bad}, True
    if draw(st.booleans()):
        base = {}
    for _ in range(draw(st.integers(0, 8))):
        key = draw(
            st.one_of(
                st.sampled_from(_KEYS),
                st.sampled_from(_KEYS),
                st.text(max_size=20).map(lambda t: PREFIX + t),
                st.text(max_size=20),
            )
        )
        short = key.removeprefix(PREFIX)
        value: Any = draw(
            st.one_of(
                st.sampled_from(GOOD_VALUES.get(short, ["x"])),
                _VALUE_TEXT,
                st.sampled_from([None, 5, 1.5, ["a"], {"a": 1}]),
            )
        )
        base[key] = value
    return base, False


def check_annotations(annotations: dict[str, Any], must_fail: bool, probe: Probe) -> None:
    accepted, spec = probe.run(lambda: parse_annotations(annotations), SpecError, shown=annotations)
    _count(probe.tally, accepted, must_fail)
    if not accepted:
        return  # reconcile(): SpecError -> _bad_spec -> return; the router is never called
    assert isinstance(spec, CanarySpec)
    if must_fail:
        probe.bad("a must-fail annotation set was accepted", annotations)
    for value in (spec.min_step_s, spec.max_step_s, spec.no_data_deadline_s):
        if not _finite(value, MAX_DURATION_S):
            probe.bad(f"duration {value} accepted", annotations)
    spec.rollout_spec()


COMMANDS = st.one_of(
    st.text(max_size=60),
    st.builds(
        lambda d: json.dumps(d, default=str),
        st.dictionaries(
            st.sampled_from(["id", "command", "who", "reason", "at", "extra"]),
            HOSTILE_VALUES,
            max_size=6,
        ),
    ),
    st.sampled_from(
        [
            "[" * 2000 + "]" * 2000,
            "[" * 100_000,
            '{"id":"1","command":"promote","who":"' + "w" * 5000 + '"}',
            '{"id": 1e999999, "command": "abort"}',
            '{"id":"1","command":"promote","at":NaN}',
            '{"id":"' + "9" * 5000 + '","command":"pause"}',
        ]
    ),
)


def check_command(raw: str, probe: Probe) -> None:
    probe.run(lambda: parse_command(raw), ValueError, shown=raw)


# -- target: records -----------------------------------------------------------------------


def _base_record() -> list[str]:
    """A valid record: a start, ticks with real verdicts, a transition, a manual command,
    a note and an end."""
    rollout, t0 = "demo/app@1", 1_700_000_000.0
    entries: list[Any] = [
        StartEntry(
            at=t0,
            rollout=rollout,
            target="demo",
            steps=[10, 50],
            config={"analysis": AnalysisConfig().model_dump(mode="json")},
        )
    ]
    analyzer = Analyzer(AnalysisConfig())
    for i in range(1, 5):
        primary = ArmCounts(
            requests=900 * i,
            errors=9 * i,
            latency_buckets={0.05: 500 * i, 0.1: 800 * i, math.inf: 900 * i},
        )
        canary = ArmCounts(
            requests=100 * i,
            errors=i,
            latency_buckets={0.05: 55 * i, 0.1: 90 * i, math.inf: 100 * i},
        )
        verdict = analyzer.observe(Snapshot(elapsed_s=10.0 * i, primary=primary, canary=canary))
        entries.append(
            TickEntry(
                at=t0 + 10 * i,
                rollout=rollout,
                elapsed_s=10.0 * i,
                phase="Progressing",
                step=0,
                weight_set=10,
                weight_read=10,
                primary=primary,
                canary=canary,
                verdict=verdict,
            )
        )
    entries += [
        TransitionEntry(
            at=t0 + 50,
            rollout=rollout,
            from_phase="Progressing",
            to_phase="Progressing",
            step=1,
            weight=50,
            reason="step passed",
        ),
        ManualEntry(at=t0 + 55, rollout=rollout, command="pause", who="alice"),
        NoteEntry(at=t0 + 56, rollout=rollout, message="a note"),
        EndEntry(at=t0 + 60, rollout=rollout, outcome="promoted", reason="passed", duration_s=60.0),
    ]
    return [dump_entry(e) for e in entries]


RECORD_LINES = _base_record()


def _gzip_bomb(unpacked_mib: int) -> str:
    packer = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = b"\n" * MB
    packed = b"".join(packer.compress(chunk) for _ in range(unpacked_mib)) + packer.flush()
    return base64.b64encode(packed).decode()


@functools.cache
def gzip_bomb() -> str:
    """256 MiB of newlines (8 times the limit) in 350 KB of base64 (made once, when needed)."""
    return _gzip_bomb(256)


@st.composite
def record_texts(draw: st.DrawFn) -> tuple[bytes, bool]:
    """(record bytes, must_fail): the valid record with line-level, JSON-level and byte-level
    mutations; or with exactly one line of another schema version."""
    lines = [line.encode() for line in RECORD_LINES]
    mode = draw(st.sampled_from(["json", "json", "lines", "bytes", "schema"]))
    if mode == "schema":
        index = draw(st.integers(0, len(lines) - 1))
        data = json.loads(lines[index])
        data["schema"] = draw(
            st.one_of(
                st.integers().filter(lambda v: v != SCHEMA_VERSION),
                st.sampled_from(["2", 999, None, 1.5]),
            )
        )
        lines[index] = json.dumps(data).encode()
        return b"\n".join(lines) + b"\n", True
    if mode == "json":
        for _ in range(draw(st.integers(1, 3))):
            index = draw(st.integers(0, len(lines) - 1))
            data = json.loads(lines[index])
            # paths of the line as it is now: an earlier mutation may have replaced a subtree
            path = draw(st.sampled_from([p for p in _paths(data) if p] or [("kind",)]))
            _set(data, path, draw(HOSTILE_VALUES))
            lines[index] = json.dumps(data, default=str).encode("utf-8", "surrogatepass")
    elif mode == "lines":
        for _ in range(draw(st.integers(1, 4))):
            index = draw(st.integers(0, len(lines) - 1))
            op = draw(st.sampled_from(["drop", "dup", "swap", "cut", "junk", "deep", "huge"]))
            if op == "drop" and len(lines) > 1:
                del lines[index]
            elif op == "dup":
                lines.insert(index, lines[index])
            elif op == "swap":
                other = draw(st.integers(0, len(lines) - 1))
                lines[index], lines[other] = lines[other], lines[index]
            elif op == "cut":
                lines[index] = lines[index][: draw(st.integers(0, len(lines[index])))]
            elif op == "junk":
                lines[index] = draw(st.binary(max_size=40))
            elif op == "deep":
                lines[index] = b"[" * 20_000 + b"]" * 20_000
            else:
                lines[index] = b'{"kind":"note","message":"' + b"x" * (2 * MB) + b'"}'
    else:
        data = bytearray(b"\n".join(lines) + b"\n")
        for _ in range(draw(st.integers(1, 6))):
            position = draw(st.integers(0, len(data)))
            payload = draw(st.binary(min_size=1, max_size=8))
            if draw(st.booleans()):
                data[position:position] = payload
            else:
                data[position : position + len(payload)] = payload
        return bytes(data), False
    return b"\n".join(lines) + b"\n", False


def check_record(data: bytes, must_fail: bool, probe: Probe, path: Path, packing: str) -> None:
    path.write_bytes(data)
    accepted, entries = probe.run(lambda: read_record(path), RecordError, shown=data)
    if packing == "bomb":
        packed = gzip_bomb()
    else:
        packed = base64.b64encode(
            zlib.compress(data, 6) if packing == "zlib" else _gzip(data)
        ).decode()
        if packing == "mangled":
            packed = packed[: len(packed) // 2] + "!" + packed[len(packed) // 2 :]
    configmap = {"metadata": {"name": "canary-record-fuzz"}, "data": {RECORD_KEY: packed}}
    cm_accepted, cm_entries = probe.run(
        lambda: unpack_record(configmap), RecordError, shown=(packing, data)
    )
    _count(probe.tally, accepted or cm_accepted, must_fail)
    for ok, found in ((accepted, entries), (cm_accepted, cm_entries)):
        if not ok:
            continue
        if must_fail:
            probe.bad("a record with another schema version was read", data)
        if any(entry.schema_version != SCHEMA_VERSION for entry in found):
            probe.bad("an entry of another schema version was read", data)


def _gzip(data: bytes) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


# -- running -------------------------------------------------------------------------------


def _count(tally: Tally, accepted: bool, must_fail: bool) -> None:
    tally.tried += 1
    tally.must_fail += must_fail
    if accepted:
        tally.accepted += 1
    else:
        tally.refused += 1


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )


def run_target(name: str, examples: int, *, strict: bool = False, measure: bool = True) -> Tally:
    """Fuzz one target with `examples` inputs. strict: raise on the first problem; measure:
    the peak allocation of each parse (tracemalloc)."""
    tally = Tally(name)
    probe = Probe(tally, strict=strict, measure=measure)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="canary-fuzz-") as tmp:
        path = Path(tmp) / ("input.jsonl" if name == "records" else "input.yaml")
        if name == "configs":

            @_settings(examples)
            @given(mutated_documents(CONFIG_BASE, CONFIG_TEXT, CONFIG_BAD))
            def fuzz(case: tuple[bytes, bool]) -> None:
                check_config(case[0], case[1], probe, path)

        elif name == "topologies":

            @_settings(examples)
            @given(mutated_documents(TOPOLOGY_BASE, TOPOLOGY_TEXT, TOPOLOGY_BAD))
            def fuzz(case: tuple[bytes, bool]) -> None:
                check_topology(case[0], case[1], probe, path)

        elif name == "annotations":
            commands = Tally("command annotations")
            command_probe = Probe(commands, strict=strict, measure=measure)

            @_settings(examples)
            @given(annotation_sets(), COMMANDS)
            def fuzz(case: tuple[dict[str, Any], bool], command: str) -> None:
                check_annotations(case[0], case[1], probe)
                check_command(command, command_probe)
                commands.tried += 1

        elif name == "records":

            @_settings(examples)
            @given(record_texts(), st.sampled_from(["gzip"] * 8 + ["zlib", "mangled", "bomb"]))
            def fuzz(case: tuple[bytes, bool], packing: str) -> None:
                check_record(case[0], case[1], probe, path, packing)

        else:
            raise ValueError(f"unknown target {name!r}")
        fuzz()
    tally.seconds = time.perf_counter() - started
    if name == "annotations":
        tally.tracebacks += commands.tracebacks
        tally.peak_bytes = max(tally.peak_bytes, commands.peak_bytes)
        tally.name = f"annotations (+ {commands.tried} command annotations)"
    return tally


TARGETS = ("annotations", "configs", "topologies", "records")


def _run_job(name: str, examples: int, measure: bool) -> Tally:
    return run_target(name, examples, measure=measure)


def _run_job_args(job: tuple[str, int, bool]) -> Tally:
    return _run_job(*job)


def render(tallies: list[Tally], *, command: str, peak_rss: int) -> str:
    rows = [
        "| target | inputs | refused (documented error) | accepted | of which must-fail | "
        "tracebacks | bad input accepted | peak memory of one input | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in tallies:
        rows.append(
            f"| {t.name} | {t.tried:,} | {t.refused:,} | {t.accepted:,} | {t.must_fail:,} | "
            f"{len(t.tracebacks)} | {len(t.bad_accepted)} | {t.peak_bytes / MB:.2f} MB | "
            f"{t.seconds:.0f} |"
        )
    worst = max(tallies, key=lambda t: t.peak_bytes)
    return "\n".join(
        [
            BEGIN,
            "## Input fuzzing (issue 11, point 8)",
            "",
            f"Command: `{command}` (Python {platform.python_version()}, "
            "Hypothesis, derandomized: the same command gives the same inputs).",
            "",
            *rows,
            "",
            f"- Peak Python allocation while parsing any one input (tracemalloc, reset per input): "
            f"{worst.peak_bytes / MB:.1f} MB ({worst.name}: {worst.peak_input}); "
            f"peak RSS of the largest fuzzing process (Hypothesis included): {peak_rss / MB:.0f} MB. "
            "Limit: 100 MB per input.",
            "- Tracebacks: exceptions other than the documented error (SpecError, ValueError for "
            "command annotations, ConfigError, RecordError).",
            "- Bad input accepted: a must-fail input (one known-bad value: `.inf`/`.nan`/`1e-9` "
            "tick, infinite or over-a-week deadline, schema version other than 1, value over "
            "4 KiB, ...) that parsed, or an accepted result outside the bounds.",
            "- 0 traffic changes on bad input: traffic is only touched after a successful "
            "parse. Kubernetes: `DeploymentWorker.reconcile` returns through `_bad_spec` on "
            "SpecError before `_initialize` (`router.set_weight(0)`) or `_start_rollout`, and "
            "`_handle_command` answers a bad command without calling the runner. Static: "
            "`canary run` (`_cmd_run`) exits with status 2 on ConfigError before any runner "
            "or router exists; `canary clusters` likewise on a bad topology. Records: an "
            "unreadable record is a RecordError (reports, resume), never a half-read one.",
            END,
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000, help="inputs per target")
    parser.add_argument("--targets", nargs="*", default=list(TARGETS), choices=TARGETS)
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    parser.add_argument("--no-tracemalloc", action="store_true", help="faster, no per-input peak")
    parser.add_argument("--jobs", type=int, default=1, help="targets fuzzed in parallel")
    options = parser.parse_args(argv)
    jobs = [(name, options.examples, not options.no_tracemalloc) for name in options.targets]
    jobs.sort(key=lambda job: ("records", "topologies", "configs", "annotations").index(job[0]))
    if options.jobs > 1:  # each target's figures are printed as soon as it is done
        pool = multiprocessing.get_context("spawn").Pool(options.jobs)
        results: Iterator[Tally] = pool.imap_unordered(_run_job_args, jobs)
    else:
        results = (_run_job(*job) for job in jobs)
    done: dict[str, Tally] = {}
    for tally in results:
        done[tally.name] = tally
        print(
            f"{tally.name}: {tally.tried} inputs, {tally.refused} refused, "
            f"{len(tally.tracebacks)} tracebacks, {len(tally.bad_accepted)} bad accepted, "
            f"peak {tally.peak_bytes / MB:.2f} MB, {tally.seconds:.0f} s",
            file=sys.stderr,
        )
        for line in (tally.tracebacks + tally.bad_accepted)[:5]:
            print("   ", line, file=sys.stderr)
    tallies = sorted(done.values(), key=lambda t: TARGETS.index(t.name.split()[0]))
    peak_rss = 1024 * max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    )
    command = "python -m benchmarks.fuzz_inputs" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]) if a != "--write"
    )
    text = render(tallies, command=command, peak_rss=peak_rss)
    print(text)
    if options.write:
        current = RESULTS.read_text() if RESULTS.exists() else ""
        if BEGIN in current and END in current:
            head, _, rest = current.partition(BEGIN)
            _, _, tail = rest.partition(END)
            current = head.rstrip("\n") + "\n\n" + text + tail
        else:
            current = current.rstrip("\n") + "\n\n" + text + "\n"
        RESULTS.write_text(current)
        print(f"wrote {RESULTS}", file=sys.stderr)
    failed = any(t.problem() for t in tallies) or any(t.peak_bytes > 100 * MB for t in tallies)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
