"""The JSON log: one object per line, the rollout's fields from the task, no secrets."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

from canary.core.logs import (
    JsonFormatter,
    bind_rollout,
    configure_logging,
    json_logging,
    unbind_rollout,
)
from canary.core.redact import RedactingFilter


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """A JSON handler on the root logger for the test, writing into a string."""
    out = io.StringIO()
    root = logging.getLogger()
    level = root.level
    configure_logging("debug", "json", stream=out)
    hook = sys.excepthook
    try:
        yield out
    finally:
        sys.excepthook = hook
        logging.captureWarnings(False)
        for handler in [h for h in root.handlers if type(h).__name__ == "_Handler"]:
            root.removeHandler(handler)
        root.setLevel(level)
        configure_logging("info", "text")  # back to text mode (a no-op on pytest's handlers)


def _events(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_each_event_is_one_json_line_with_the_standard_fields(stream: io.StringIO) -> None:
    assert json_logging()
    logging.getLogger("canary.test").info('two\nlines and a "quote" %s', "ü", extra={"x": 1})
    (event,) = _events(stream)
    assert set(event) == {"timestamp", "level", "logger", "message", "x"}
    assert event["level"] == "info" and event["logger"] == "canary.test" and event["x"] == 1
    assert event["message"] == 'two\nlines and a "quote" ü'
    assert event["timestamp"].endswith("Z") and len(event["timestamp"]) == 24


async def test_a_rollouts_task_names_it_on_every_line(stream: io.StringIO) -> None:
    """Two rollouts in two tasks, and a task one of them starts: each line carries its own
    rollout's fields as they are when it is logged; `extra=` wins; outside, none."""
    log = logging.getLogger("canary.router")
    state = {"a": "Progressing", "b": "Paused"}

    async def rollout(name: str) -> None:
        token = bind_rollout(lambda: {"rollout": name, "namespace": "shop", "phase": state[name]})
        try:
            log.info("set weight")
            await asyncio.sleep(0)
            state[name] = "Succeeded"
            await asyncio.create_task(asyncio.to_thread(lambda: None))
            await asyncio.create_task(_child(log))
            log.info("override", extra={"phase": "Mine"})
        finally:
            unbind_rollout(token)

    await asyncio.gather(rollout("a"), rollout("b"))
    log.info("outside")
    events = [e for e in _events(stream) if e["logger"] == "canary.router"]  # not asyncio's
    fields = [(e.get("rollout"), e.get("phase"), e["message"]) for e in events]
    assert sorted(fields[:-1]) == sorted(
        [
            ("a", "Progressing", "set weight"),
            ("b", "Paused", "set weight"),
            ("a", "Succeeded", "child task"),
            ("b", "Succeeded", "child task"),
            ("a", "Mine", "override"),
            ("b", "Mine", "override"),
        ]
    )
    assert fields[-1] == (None, None, "outside")
    assert all(e.get("namespace") == "shop" for e in events[:-1])


async def _child(log: logging.Logger) -> None:
    log.info("child task")


def test_secrets_never_reach_the_json_log(stream: io.StringIO) -> None:
    """Messages, arguments, exceptions and extra fields are redacted."""
    log = logging.getLogger("canary.metrics")
    log.warning("query http://alice:s3cret@prom:9090/api?token=abc failed")
    log.info("header %s", "Authorization: Bearer eyJhbGciOi.payload.sig")
    try:
        raise ValueError("cannot reach https://bob:hunter2@hooks.example/x?api_key=k1")
    except ValueError:
        log.exception("webhook failed")
    log.info("configured", extra={"password": "pw1", "url": "http://u:pw2@h/"})
    text = stream.getvalue()
    for secret in ("s3cret", "abc", "eyJhbGciOi", "hunter2", "k1", "pw1", "pw2"):
        assert secret not in text, secret
    events = _events(stream)
    assert "***" in events[0]["message"] and "ValueError" in events[2]["error"]
    assert events[3]["password"] == "***"


def test_a_broken_context_does_not_break_the_log(stream: io.StringIO) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("no")

    token = bind_rollout(broken)
    try:
        logging.getLogger("canary.x").info("still logged")
    finally:
        unbind_rollout(token)
    assert _events(stream)[0]["message"] == "still logged"


def test_formatter_alone_with_the_filter() -> None:
    record = logging.LogRecord("canary.y", logging.ERROR, __file__, 1, "token=%s", ("zzz",), None)
    RedactingFilter().filter(record)
    event = json.loads(JsonFormatter().format(record))
    assert event["message"] == "token=***" and event["level"] == "error"


def test_warnings_and_uncaught_exceptions_are_json_too(stream: io.StringIO) -> None:
    """Python's own stderr output (a warning, an uncaught traceback) becomes JSON lines."""
    warnings.warn("old API with password=hunter2", DeprecationWarning, stacklevel=1)
    try:
        raise RuntimeError("boom at http://u:pw3@h/")
    except RuntimeError:
        sys.excepthook(*sys.exc_info())
    warned, crashed = _events(stream)[-2:]
    assert warned["logger"] == "py.warnings" and "old API" in warned["message"]
    assert crashed["level"] == "critical" and "RuntimeError: boom" in crashed["error"]
    assert "hunter2" not in stream.getvalue() and "pw3" not in stream.getvalue()
