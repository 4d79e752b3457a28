"""Hostile input (issue 11, point 8): every way a file, an annotation or a record crashed or
exploded the controller is refused with a short error that names where it came from.

Each test goes through the public entry point the controller itself uses (`load_config`,
`load_topology`, `parse_annotations`, `parse_command`, `read_record`, `unpack_record`), so it
failed before the bounds existed. Memory is measured with tracemalloc (no test times anything).
"""

from __future__ import annotations

import base64
import gzip
import json
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from canary.clusters.topology import load_topology, parse_topology
from canary.core.records import RecordError, StartEntry, dump_entry, read_record
from canary.core.rollout import RolloutSpec
from canary.kubernetes.operator import OperatorSettings, parse_command
from canary.kubernetes.record_store import RECORD_KEY, unpack_record
from canary.kubernetes.spec import SpecError, parse_annotations
from canary.static.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG_EXAMPLE = ROOT / "examples" / "rollout.yaml"
TOPOLOGY_EXAMPLE = ROOT / "examples" / "two-clusters.yaml"

# The billion laughs: nine levels of nine aliases, under a key the config reads.
BOMB = (
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    + "".join(
        f"{name}: &{name} [{','.join(['*' + previous] * 9)}]\n"
        for previous, name in zip("abcdefgh", "bcdefghi", strict=True)
    )
    + "steps: *i\n"
)
# An error line: the file name, a key and at most ~200 characters of the value.
MAX_LINE = 400


def config_text(**changes: Any) -> str:
    data = yaml.safe_load(CONFIG_EXAMPLE.read_text())
    data.update(changes)
    return yaml.safe_dump(data)


def topology_text(**service_changes: Any) -> str:
    data = yaml.safe_load(TOPOLOGY_EXAMPLE.read_text())
    data["services"][0].update(service_changes)
    return yaml.safe_dump(data)


@pytest.fixture
def peak_memory() -> Iterator[Callable[[], int]]:
    """The peak of Python allocations (bytes) since the test began."""
    tracemalloc.start()
    try:
        yield lambda: tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _lines_are_short(message: str, source: str = "") -> None:
    for line in message.splitlines():
        assert len(line.removeprefix(source)) <= MAX_LINE, line[:500]


# -- files: bombs, binary, invalid UTF-8, nesting -------------------------------------------


@pytest.mark.parametrize("loader", [load_config, load_topology])
def test_a_yaml_bomb_is_refused_with_little_memory(
    tmp_path: Path, loader: Callable[[Path], object], peak_memory: Callable[[], int]
) -> None:
    """The ~500-byte billion laughs (took 2.2 GB and a MemoryError) is refused naming the file,
    with under 10 MB allocated: its aliases are measured before anything is built."""
    assert len(BOMB) < 500
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    with pytest.raises(ConfigError) as caught:
        loader(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "aliases are expanded" in message
    _lines_are_short(message, source=str(path))
    assert peak_memory() < 10 * 2**20


def test_an_alias_that_contains_itself_is_refused(tmp_path: Path) -> None:
    """A recursive alias (`&a [*a]`) is refused, not followed forever."""
    path = tmp_path / "loop.yaml"
    path.write_text("steps: &a [1, *a]\n")
    with pytest.raises(ConfigError, match="an alias refers to a node that contains it"):
        load_config(path)


def test_anchors_and_merges_within_bounds_still_work(tmp_path: Path) -> None:
    """Aliases are bounded, not refused: sharing settings with an anchor and `<<:` works."""
    data = yaml.safe_load(TOPOLOGY_EXAMPLE.read_text())
    text = yaml.safe_dump(data)
    text = text.replace("health:\n", "health: &health\n", 1)
    path = tmp_path / "anchored.yaml"
    path.write_text(text)
    assert load_topology(path).services[0].health.timeout_s == 2


@pytest.mark.parametrize("loader", [load_config, load_topology])
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\x7fELF\x02\x01\x01\x00\x00\x00" + bytes(range(256)), "a binary file, not text"),
        (b"name: caf\xe9\n", "not UTF-8 text (invalid byte b'\\xe9' at offset 9)"),
        (b"\xff\xfe\x00n\x00a\x00m\x00e", "a binary file, not text"),  # UTF-16
    ],
)
def test_binary_and_invalid_utf8_files_are_refused_by_name(
    tmp_path: Path, loader: Callable[[Path], object], content: bytes, expected: str
) -> None:
    """A binary file or one in another encoding is a ConfigError naming the file, not a
    UnicodeDecodeError traceback."""
    path = tmp_path / "binary.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        loader(path)
    assert str(caught.value).startswith(f"{path}: ") and expected in str(caught.value)


@pytest.mark.parametrize(
    "text",
    [
        "steps: " + "[" * 10_000 + "]" * 10_000 + "\n",
        "steps:\n  " + "- " * 10_000 + "x\n",
        "steps: " + "{a: " * 10_000 + "1" + "}" * 10_000 + "\n",
        "steps: " + "[" * 10_000 + "\n",  # and never closed
    ],
    ids=["flow-lists", "block-lists", "flow-mappings", "unclosed"],
)
@pytest.mark.parametrize("loader", [load_config, load_topology])
def test_yaml_nested_ten_thousand_deep_is_refused(
    tmp_path: Path, loader: Callable[[Path], object], text: str
) -> None:
    """10,000 levels of nesting (a RecursionError traceback before) is a ConfigError that
    names the file and the line."""
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        loader(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "(line " in message
    _lines_are_short(message, source=str(path))


def test_a_file_over_a_megabyte_is_not_read(tmp_path: Path) -> None:
    """A config file is refused by its size before it is parsed."""
    path = tmp_path / "big.yaml"
    path.write_text(config_text() + "#" * (1 << 20))
    with pytest.raises(ConfigError, match=r"larger than 1048576 bytes"):
        load_config(path)


# -- errors quote an excerpt ---------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"name": "X" * 1_000_000},
        {"steps": ["x" * 1_000_000]},
        {"metrics": {"kind": "prometheus", "url": "ftp://" + "u" * 1_000_000}},
        {"x" * 100_000: 1},
    ],
    ids=["name", "steps", "url", "unknown-key"],
)
def test_a_huge_value_is_quoted_as_a_short_excerpt(tmp_path: Path, changes: dict[str, Any]) -> None:
    """An error about a megabyte value quotes at most ~200 characters of it (the exploded
    value was echoed whole: 312 MB of stderr)."""
    path = tmp_path / "huge.yaml"
    path.write_text(config_text(**changes))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    _lines_are_short(str(caught.value), source=str(path))
    assert len(str(caught.value)) < 2 * MAX_LINE + 2 * len(str(path))


def test_a_huge_value_given_as_data_is_quoted_as_an_excerpt() -> None:
    """parse_config on already-parsed data (no YAML bounds in the way) still quotes an
    excerpt: a list of a million items in `steps` gives a short message."""
    data = yaml.safe_load(config_text())
    data["steps"] = [[0] * 1_000_000]
    with pytest.raises(ConfigError) as caught:
        parse_config(data, source="data")
    _lines_are_short(str(caught.value))


def test_a_huge_annotation_is_refused_by_key_with_an_excerpt() -> None:
    """An annotation value of 100 KB is refused by its key without being parsed; bad values
    below the limit are quoted as an excerpt."""
    with pytest.raises(SpecError) as caught:
        parse_annotations({"canary.dev/enabled": "true", "canary.dev/steps": "1," * 50_000})
    assert "canary.dev/steps" in caught.value.problems
    assert "at most 4096" in caught.value.problems["canary.dev/steps"]
    with pytest.raises(SpecError) as caught:
        parse_annotations({"canary.dev/ingress": "X" * 4000})
    assert len(str(caught.value)) < MAX_LINE


def test_many_bad_annotations_give_a_bounded_error() -> None:
    """Thousands of unknown canary.dev/ keys give a message and a spec-error of at most 20."""
    from canary.kubernetes.spec import dump_problems

    annotations = {f"canary.dev/unknown-{i}": "x" for i in range(5000)}
    with pytest.raises(SpecError) as caught:
        parse_annotations(annotations)
    assert "4980 more problems" in str(caught.value)
    assert len(json.loads(dump_problems(caught.value))) == 21


# -- numbers that drive timers -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (float("inf"), "finite number"),
        (float("nan"), "finite number"),
        (1e-9, "must be between 0.05 and 3600 seconds, got 1e-09"),
        (86400, "must be between 0.05 and 3600 seconds"),
    ],
)
def test_tick_s_must_be_finite_and_within_bounds(
    tmp_path: Path, value: float, expected: str
) -> None:
    """`tick_s: .inf` stopped ticking for good and `1e-9` wrote 851 KB of record in 10 s:
    both are refused, in config files, topology files and the operator's settings."""
    config = tmp_path / "rollout.yaml"
    config.write_text(config_text(tick_s=value))
    with pytest.raises(ConfigError, match=f"{config}: tick_s: .*{expected}"):
        load_config(config)
    topology = tmp_path / "two-clusters.yaml"
    topology.write_text(topology_text(tick_s=value))
    with pytest.raises(ConfigError, match=rf"services\[0\]\.tick_s: .*{expected}"):
        load_topology(topology)
    with pytest.raises(ValueError, match="tick_s"):
        OperatorSettings(prometheus_url="http://127.0.0.1:9090", record_namespace="x", tick_s=value)


def test_tick_s_bounds_are_inclusive(tmp_path: Path) -> None:
    """0.05 s and one hour are accepted."""
    for value in (0.05, 3600):
        path = tmp_path / "rollout.yaml"
        path.write_text(config_text(tick_s=value))
        assert load_config(path).tick_s == value


@pytest.mark.parametrize("key", ["min_step_s", "max_step_s", "no_data_deadline_s"])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e12])
def test_deadlines_must_be_finite_and_at_most_a_week(
    tmp_path: Path, key: str, value: float
) -> None:
    """`.inf` deadlines were accepted (a step that never ends): steps and deadlines are
    finite and at most a week in config files, topology files and the rollout spec."""
    config = tmp_path / "rollout.yaml"
    config.write_text(config_text(**{key: value}))
    with pytest.raises(ConfigError, match=f"{config}: {key}: "):
        load_config(config)
    topology = tmp_path / "two-clusters.yaml"
    topology.write_text(topology_text(**{key: value}))
    with pytest.raises(ConfigError, match=rf"services\[0\]\.{key}: "):
        load_topology(topology)
    with pytest.raises(ValueError, match=key):
        RolloutSpec.model_validate({key: value})


@pytest.mark.parametrize(
    ("where", "value"),
    [
        (("metrics", "timeout_s"), float("inf")),
        (("router", "timeout_s"), float("inf")),
        (("metrics", "queries", "lookback_s"), float("inf")),
        (("analysis", "min_samples"), float("inf")),
        (("analysis", "alpha"), float("nan")),
    ],
)
def test_timeouts_and_analysis_numbers_must_be_finite(
    tmp_path: Path, where: tuple[str, ...], value: float
) -> None:
    """Nested numbers (HTTP timeouts, the Prometheus lookback, analysis settings) refuse
    `.inf` and `.nan` too."""
    data = yaml.safe_load(config_text())
    node = data
    for key in where[:-1]:
        node = node.setdefault(key, {})
    node[where[-1]] = value
    with pytest.raises(ConfigError, match=".".join(where)):
        parse_config(data, source="rollout.yaml")


def test_topology_timeouts_must_be_finite() -> None:
    """A topology's rollout timeout and health probe timings refuse `.inf`."""
    data = yaml.safe_load(TOPOLOGY_EXAMPLE.read_text())
    data["services"][0]["rollout_timeout_s"] = float("inf")
    data["services"][0]["health"]["interval_s"] = float("inf")
    data["services"][0]["failover"]["healthy_s_to_failback"] = float("inf")
    with pytest.raises(ConfigError) as caught:
        parse_topology(data, source="t.yaml")
    for key in ("rollout_timeout_s", "health.interval_s", "failover.healthy_s_to_failback"):
        assert f"services[0].{key}: " in str(caught.value)


@pytest.mark.parametrize("text", ["1e300", "8d", "169h", "10081m"])
def test_annotation_durations_are_at_most_a_week(text: str) -> None:
    """An annotation duration over a week is refused by its key."""
    with pytest.raises(SpecError) as caught:
        parse_annotations({"canary.dev/max-step-duration": text})
    assert "canary.dev/max-step-duration" in caught.value.problems


# -- command annotations -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("[" * 2000 + "]" * 2000, "nested more than 32 levels"),
        ('{"id": "1", "command": "promote", "who": "' + "w" * 5000 + '"}', "at most 4096"),
        ('{"id": "1", "command": "promote", "who": "' + "w" * 3000 + '"}', "who: "),
        ('{"id": "1", "command": "promote", "at": NaN}', "at: "),
        ('{"id": 1e999999, "command": "promote"}', "id: "),
        ("\udcff", "not valid JSON"),
    ],
)
def test_command_annotations_are_bounded(raw: str, expected: str) -> None:
    """The command annotation: deep, huge or odd JSON is a short ValueError (it was a
    RecursionError for deep JSON), which the operator answers as an invalid command."""
    with pytest.raises(ValueError) as caught:
        parse_command(raw)
    assert expected in str(caught.value)
    assert len(str(caught.value)) < MAX_LINE


# -- records -------------------------------------------------------------------------------


def _start_line(**changes: Any) -> str:
    start = StartEntry(at=1.0, rollout="demo/app@1", target="demo", steps=[10, 50])
    data = json.loads(dump_entry(start))
    data.update(changes)
    return json.dumps(data)


@pytest.mark.parametrize("position", ["only", "first", "last"])
def test_a_newer_record_schema_version_is_refused(tmp_path: Path, position: str) -> None:
    """Schema version 999 was read silently (and as a last line, skipped as if torn): it is
    refused wherever it is, naming the file, the line and the version."""
    good, newer = _start_line(), _start_line(schema=999)
    lines = {"only": [newer], "first": [newer, good], "last": [good, newer]}[position]
    path = tmp_path / "record.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    at = lines.index(newer) + 1
    with pytest.raises(RecordError, match=rf"{path}:{at}: record schema version 999 is not"):
        read_record(path)


def test_record_lines_that_are_not_utf8_or_too_deep_name_the_line(tmp_path: Path) -> None:
    """An invalid UTF-8 line or a 10,000-deep JSON line in the middle of a record is a
    RecordError naming the line (a UnicodeDecodeError or RecursionError before)."""
    path = tmp_path / "record.jsonl"
    path.write_bytes(_start_line().encode() + b"\n\xff\xfe\n" + _start_line().encode() + b"\n")
    with pytest.raises(RecordError, match=rf"{path}:2: not UTF-8 text"):
        read_record(path)
    path.write_text(_start_line() + "\n" + "[" * 10_000 + "]" * 10_000 + "\n" + _start_line())
    with pytest.raises(RecordError, match=rf"{path}:2: nested more than 32 levels"):
        read_record(path)


def _bomb_configmap(unpacked_mib: int) -> dict[str, Any]:
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = b"\n" * (1 << 20)
    packed = b"".join(packer.compress(chunk) for _ in range(unpacked_mib)) + packer.flush()
    return {
        "metadata": {"name": "canary-record-bomb"},
        "data": {RECORD_KEY: base64.b64encode(packed).decode()},
    }


def test_a_gzip_bomb_in_a_record_configmap_is_refused(peak_memory: Callable[[], int]) -> None:
    """A record ConfigMap whose 200 KB of gzip unpack to a gigabyte is refused once 32 MiB
    are unpacked, naming the ConfigMap, with well under 100 MB allocated."""
    configmap = _bomb_configmap(1024)
    assert len(configmap["data"][RECORD_KEY]) < 2_000_000
    with pytest.raises(RecordError, match=r"canary-record-bomb: .*a gzip bomb"):
        unpack_record(configmap)
    assert peak_memory() < 60 * 2**20


@pytest.mark.parametrize(
    "data",
    [
        {RECORD_KEY: 12},
        {RECORD_KEY: base64.b64encode(gzip.compress(b"\xff\xfe")).decode()},
        {RECORD_KEY: base64.b64encode(gzip.compress(b"{}")[:-4]).decode()},
    ],
    ids=["not-text", "not-utf8", "cut-short"],
)
def test_odd_record_configmaps_are_record_errors(data: dict[str, Any]) -> None:
    """A ConfigMap value that is not text, not UTF-8 or cut short is a RecordError."""
    with pytest.raises(RecordError):
        unpack_record({"metadata": {"name": "cm"}, "data": data})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (BOMB, "aliases are expanded"),
        ("steps: " + "[" * 10_000, "nested more than 32 levels deep"),
        ("steps:\n  " + "- " * 10_000 + "x\n", "nested more than 32 levels deep"),
        ("steps: &a [1, *a]\n", "an alias refers to a node that contains it"),
        ("name: a\x02b\n", "not valid YAML"),
    ],
)
def test_without_libyaml_the_same_bounds_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, expected: str
) -> None:
    """Where PyYAML has no libyaml, the pure-Python loader refuses the same inputs."""
    import canary.core.inputs

    monkeypatch.setattr(canary.core.inputs, "_CLoader", None)
    path = tmp_path / "rollout.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_config(path)
    path.write_text(config_text())
    assert load_config(path).name == "checkout"


def test_a_torn_multibyte_character_at_the_end_is_a_torn_line(tmp_path: Path) -> None:
    """A record whose last line stops in the middle of a UTF-8 character (a crash mid-write)
    is read up to its last whole line, as any other torn last line."""
    path = tmp_path / "record.jsonl"
    note = '{"schema":1,"kind":"note","at":2.0,"rollout":"demo/app@1","message":"café"}'
    path.write_bytes((_start_line() + "\n").encode() + note.encode()[:-3])  # ends in 0xc3
    assert [entry.kind for entry in read_record(path)] == ["start"]


def test_a_count_too_large_for_a_float_is_a_bad_line(tmp_path: Path) -> None:
    """A tick whose count has 400 digits (an OverflowError inside the counts' validator,
    found by fuzzing) is a RecordError naming the line, not a traceback."""
    tick = {
        "schema": 1,
        "kind": "tick",
        "at": 2.0,
        "rollout": "demo/app@1",
        "elapsed_s": 1.0,
        "phase": "Progressing",
        "step": 0,
        "weight_set": 10,
        "weight_read": 10,
        "primary": {"requests": 10**400, "errors": 0, "latency_buckets": {}},
        "canary": None,
    }
    path = tmp_path / "record.jsonl"
    path.write_text(_start_line() + "\n" + json.dumps(tick) + "\n" + _start_line() + "\n")
    with pytest.raises(RecordError, match=rf"{path}:2: OverflowError"):
        read_record(path)


def test_a_quantile_too_large_for_a_float_is_a_config_error() -> None:
    """A 4000-digit integer among the quantiles (an OverflowError before, found by fuzzing)
    is a ConfigError naming the key."""
    data = yaml.safe_load(config_text())
    data["analysis"]["quantiles"] = [10**4000]
    with pytest.raises(ConfigError, match=r"analysis\.quantiles"):
        parse_config(data, source="rollout.yaml")
