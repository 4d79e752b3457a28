"""Bounded input: every YAML and JSON document canary reads goes through here.

Why: config files, topology files, annotations, command annotations and records come from
people and from other programs, and a few hundred hostile bytes were enough to take
gigabytes (a YAML "billion laughs"), crash with a traceback (invalid UTF-8, 10,000 nested
brackets) or print a 300 MB error. So every document is bounded *before* it is built into
Python objects, and every error names its source and quotes at most a short excerpt.

The limits (all generous for real inputs, see the README's "Input limits"):

* size: a config or topology file at most `MAX_FILE_BYTES`; an annotation value at most
  `MAX_ANNOTATION_BYTES`; a record line at most `MAX_RECORD_LINE_BYTES`; a gzipped record
  at most `MAX_UNPACKED_RECORD_BYTES` once decompressed (a gzip bomb stops there).
* nesting: at most `MAX_DEPTH` levels of lists and mappings, aliases followed.
* YAML aliases are *allowed* (anchors and `<<:` merges are how people share settings
  between services), but the document is measured as if every alias were copied out:
  at most `MAX_YAML_NODES` nodes after expansion, and an alias that contains itself is
  refused. The measure is taken on the composed node graph, before any Python object is
  built, in time proportional to the distinct nodes: a billion-laughs file is refused
  after reading its few hundred bytes.
* text: UTF-8 only; a NUL byte means a binary file and is refused by name.

Pure apart from `read_text_file` (one bounded, blocking read); imports only the standard
library and PyYAML.

Exception tree::

    ValueError
    └── InputError     the document is too big, too deep, not text or not YAML/JSON
"""

from __future__ import annotations

import base64
import binascii
import gzip
import json
import math
import re
import reprlib
import zlib
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.nodes import MappingNode, Node, SequenceNode

__all__ = [
    "EXCERPT_CHARS",
    "MAX_ANNOTATION_BYTES",
    "MAX_DEPTH",
    "MAX_DURATION_S",
    "MAX_FILE_BYTES",
    "MAX_RECORD_BYTES",
    "MAX_RECORD_LINE_BYTES",
    "MAX_TIMEOUT_S",
    "MAX_UNPACKED_RECORD_BYTES",
    "MAX_YAML_NODES",
    "TICK_MAX_S",
    "TICK_MIN_S",
    "InputError",
    "check_tick",
    "clip",
    "decode_text",
    "excerpt",
    "gunzip_bounded",
    "load_json",
    "load_yaml",
    "read_text_file",
]

MAX_FILE_BYTES = 1 << 20  # a config or topology file: real ones are a few KB
MAX_ANNOTATION_BYTES = 4096  # one canary.dev/* annotation value (a URL, a selector)
MAX_DEPTH = 32  # nested lists/mappings; real documents use fewer than 10
MAX_YAML_NODES = 100_000  # scalars + collections, aliases expanded
MAX_RECORD_LINE_BYTES = 1 << 20  # one record entry; a tick is about 1-2 KB
MAX_RECORD_BYTES = 256 << 20  # a whole record file
# A packed record is at most 1 MB of base64 gzip; records compress about 8x.
MAX_UNPACKED_RECORD_BYTES = 32 << 20
EXCERPT_CHARS = 200

# Numbers that drive timers. A tick faster than 50 ms only fills the record (Prometheus
# scrapes every few seconds); slower than an hour is not a canary. Steps and deadlines are
# finite and at most a week (`max_step_s: null` is how to wait forever); I/O timeouts at
# most an hour.
TICK_MIN_S = 0.05
TICK_MAX_S = 3600.0
MAX_DURATION_S = 7 * 24 * 3600.0
MAX_TIMEOUT_S = 3600.0


class InputError(ValueError):
    """A document that cannot be read safely; the message names its source."""


# -- excerpts ------------------------------------------------------------------------------

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = EXCERPT_CHARS
_REPR.maxother = EXCERPT_CHARS
_REPR.maxlong = 60
for _attr in ("maxlist", "maxtuple", "maxdict", "maxset", "maxfrozenset", "maxdeque"):
    setattr(_REPR, _attr, 8)


def clip(text: str, limit: int = EXCERPT_CHARS) -> str:
    """`text` cut to about `limit` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more characters)"


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """A repr of `value` of at most about `limit` characters, built without ever making the
    whole repr (a list expanded from YAML aliases may hold a billion items)."""
    if isinstance(value, str):
        shown = repr(value[: limit + 1])
        if len(value) <= limit:
            return shown
        return f"{value[:limit]!r}… ({len(value)} characters)"
    if isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() > 200:  # str() of a huge int is slow, and refused past 4300 digits
            return f"<an integer of {value.bit_length()} bits>"
    return clip(_REPR.repr(value), limit)


# -- text ----------------------------------------------------------------------------------


def decode_text(data: bytes, *, source: str) -> str:
    """`data` as UTF-8 text. Raises InputError naming `source` for binary or invalid UTF-8."""
    nul = data.find(b"\x00")
    if nul >= 0:
        raise InputError(f"{source}: a binary file, not text (a NUL byte at offset {nul})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{source}: not UTF-8 text (invalid byte {data[exc.start : exc.start + 1]!r} "
            f"at offset {exc.start})"
        ) from None


def read_text_file(path: Path, *, max_bytes: int = MAX_FILE_BYTES, what: str = "file") -> str:
    """The text of `path`, refused past `max_bytes` before it is read whole. Raises InputError
    naming the file (missing, unreadable, too big, binary, not UTF-8)."""
    try:
        with path.open("rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise InputError(f"{path}: the {what} is larger than {max_bytes} bytes")
    return decode_text(data, source=str(path))


def gunzip_bounded(
    data: bytes, *, source: str, max_bytes: int = MAX_UNPACKED_RECORD_BYTES
) -> bytes:
    """Gunzip `data` (one or more members), refusing more than `max_bytes` of output: a
    1 MB gzip bomb would otherwise unpack to a gigabyte. Inflates 1 MiB at a time, so the
    refusal costs no more memory than the limit."""
    out = bytearray()
    rest = data
    while rest:
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        pending = rest
        while pending and not inflater.eof:
            try:
                out += inflater.decompress(pending, 1 << 20)
            except zlib.error as exc:
                raise InputError(f"{source}: not gzip data: {exc}") from None
            if len(out) > max_bytes:
                raise InputError(f"{source}: unpacks to more than {max_bytes} bytes (a gzip bomb?)")
            pending = inflater.unconsumed_tail
        if not inflater.eof:
            raise InputError(f"{source}: gzip data is cut short")
        rest = inflater.unused_data
    return bytes(out)


def pack_state(state: object, *, max_chars: int, level: int = 6) -> str | None:
    """`state` (JSON values) as compact text to save beside a record: base64 of gzipped
    JSON (floats as their shortest repr, which reads back exactly). None past `max_chars`.
    `level`: gzip's."""
    raw = json.dumps(state, separators=(",", ":")).encode("utf-8")
    packed = gzip.compress(raw, level, mtime=0)
    text = base64.b64encode(packed).decode("ascii")
    return text if len(text) <= max_chars else None


def unpack_state(text: object, *, max_chars: int, source: str) -> dict[str, Any]:
    """The object pack_state packed. Bounded: at most `max_chars` of text, unpacking to at
    most 16 times that. Raises InputError naming `source` and what is wrong."""
    if not isinstance(text, str) or len(text) > max_chars:
        raise InputError(f"{source}: not text of at most {max_chars} characters")
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise InputError(f"{source}: not base64: {exc}") from None
    try:
        state = json.loads(gunzip_bounded(raw, source=source, max_bytes=16 * max_chars))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"{source}: not JSON: {exc}") from None
    if not isinstance(state, dict):
        raise InputError(f"{source}: not an object")
    return state


# -- JSON ----------------------------------------------------------------------------------

_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def _json_depth_exceeds(text: str, max_depth: int) -> bool:
    if text.count("[") + text.count("{") <= max_depth:
        return False  # cannot be deeper than its opening brackets
    depth = 0
    for match in _JSON_BRACKET.finditer(_JSON_STRING.sub('""', text)):
        if match.group() in "[{":
            depth += 1
            if depth > max_depth:
                return True
        else:
            depth -= 1
    return False


def load_json(text: str, *, source: str, max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON text, refusing more than `max_depth` levels of nesting. Raises InputError
    naming `source`."""
    if _json_depth_exceeds(text, max_depth):
        raise InputError(f"{source}: nested more than {max_depth} levels deep")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{source}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}"
        ) from None
    except (RecursionError, ValueError) as exc:  # e.g. an integer past 4300 digits
        raise InputError(f"{source}: not valid JSON: {clip(str(exc))}") from None


# -- YAML ----------------------------------------------------------------------------------


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with a depth limit while composing. PyYAML's composer recurses
    once per level, so a 10,000-deep document would end in a RecursionError."""

    max_depth = MAX_DEPTH
    _depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        self._depth += 1
        try:
            if self._depth > self.max_depth + 1:  # scalars count as a level here
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {self.max_depth} levels deep", mark
                )
            return Composer.compose_node(self, parent, index)
        finally:
            self._depth -= 1


def _check_expansion(root: Node, *, max_nodes: int, max_depth: int) -> str | None:
    """Why the document is too big once its aliases are expanded, or None. Each distinct
    node is measured once (iteratively: an alias chain may be long)."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children: list[Node]
        if isinstance(node, SequenceNode):
            children = list(node.value)
        elif isinstance(node, MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        if done:
            on_path.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)
            depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
            if size[key] > max_nodes:
                return f"more than {max_nodes} values once its aliases are expanded"
            if depth[key] > max_depth + 1:  # scalars count as a level here
                return f"nested more than {max_depth} levels deep once its aliases are expanded"
            continue
        if key in size:
            continue
        if key in on_path:
            return "an alias refers to a node that contains it"
        on_path.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) in on_path:
                return "an alias refers to a node that contains it"
            if id(child) not in size:
                stack.append((child, False))
    return None


# libyaml (PyYAML's C parser) when it is there: parsing is then 5-10x faster. Its composer
# recurses in C without Python's recursion limit, so the depth is checked on its events first.
_CLoader: Any = getattr(yaml, "CSafeLoader", None)


def _check_depth(text: str, max_depth: int) -> None:
    """Raise a ComposerError when collections nest more than `max_depth` deep (libyaml's
    events only: nothing is built)."""
    depth = 0
    for event in yaml.parse(text, Loader=_CLoader):
        if isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
            depth += 1
            if depth > max_depth:
                mark: Any = event.start_mark  # libyaml's Mark: the same line and column
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {max_depth} levels deep", mark
                )
        elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
            depth -= 1


def _where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def _problem(exc: yaml.YAMLError) -> str:
    return clip(" ".join(str(getattr(exc, "problem", None) or exc).split()))


def load_yaml(
    text: str,
    *,
    source: str,
    max_nodes: int = MAX_YAML_NODES,
    max_depth: int = MAX_DEPTH,
) -> Any:
    """Parse one YAML document safely and within bounds (see the module docstring).
    Returns None for an empty document. Raises InputError naming `source` (and the line)."""
    if "\x00" in text:
        raise InputError(f"{source}: a binary file, not text (a NUL character)")
    try:
        if _CLoader is not None:
            _check_depth(text, max_depth)  # before libyaml's composer, which recurses in C
            loader: Any = _CLoader(text)
        else:
            loader = _BoundedLoader(text)  # the reader refuses control characters here
            loader.max_depth = max_depth
    except yaml.YAMLError as exc:
        raise InputError(f"{source}: not valid YAML{_where(exc)}: {_problem(exc)}") from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        problem = _check_expansion(node, max_nodes=max_nodes, max_depth=max_depth)
        if problem is not None:
            raise InputError(f"{source}: refused: {problem}")
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise InputError(f"{source}: not valid YAML{_where(exc)}: {_problem(exc)}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        if isinstance(exc, InputError):
            raise
        # a scalar PyYAML's constructors reject: a date like 2024-13-45, a 5000-digit int
        raise InputError(f"{source}: not valid YAML: {clip(str(exc))}") from None
    finally:
        loader.dispose()


# -- numbers -------------------------------------------------------------------------------


def check_tick(value: float) -> float:
    """A tick interval within TICK_MIN_S..TICK_MAX_S (a ValueError for pydantic otherwise)."""
    if not math.isfinite(value) or not TICK_MIN_S <= value <= TICK_MAX_S:
        raise ValueError(
            f"must be between {TICK_MIN_S:g} and {TICK_MAX_S:g} seconds, got {excerpt(value)}"
        )
    return value
