"""The controller's log: the classic text line, or one JSON object per line for log pipelines.

`--log-format json` (on `canary run`, `canary kubernetes`, `canary clusters` and `canary
demo`) writes each event as one line of JSON on stderr, as Flagger (zap) and Argo Rollouts
(logrus) do::

    {"timestamp": "2026-11-30T18:20:01.412Z", "level": "info", "logger": "canary.runner",
     "message": "app: Progressing -> Progressing at 25%: analysis passed at 10%: next step 25%",
     "rollout": "app", "phase": "Progressing", "step": 1, "weight": 25, "decision": "pass"}

Which rollout a line is about comes from the context, not from every call site: the runner
binds a function that returns its fields (`rollout`, `namespace`, `phase`, `step`, `weight`,
`decision`, `rollout_id`) for its own asyncio task (`bind_rollout`), so everything logged in
that task, by the runner or by the router, metric source or notifier it calls, and by tasks
it starts, names the rollout and its phase at the moment of the log call. Fields given with
`extra=` win over the context's.

Secrets never appear: the handler carries canary.core.redact's RedactingFilter (message,
exception and stack), and the JSON formatter redacts every field once more (an `extra=` value
under a secret-looking key becomes ``***``). Pure apart from configuring the root logger:
standard library and canary.core.redact only.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import IO, Any, Literal

from canary.core.redact import RedactingFilter, install_log_redaction, redact

__all__ = [
    "LOG_FORMATS",
    "TEXT_FORMAT",
    "JsonFormatter",
    "LogFormat",
    "bind_rollout",
    "configure_logging",
    "json_logging",
    "unbind_rollout",
]

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The fields of the rollout this task works on: a function, so each line gets the phase and
# decision of the moment it is logged.
_ROLLOUT: contextvars.ContextVar[Callable[[], Mapping[str, Any]] | None] = contextvars.ContextVar(
    "canary_log_rollout", default=None
)
# Attributes every LogRecord has; anything else on a record came in with `extra=`.
_STANDARD = frozenset(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
_json_enabled = False


def bind_rollout(fields: Callable[[], Mapping[str, Any]]) -> contextvars.Token[Any]:
    """From now on in this task (and the tasks it starts), log lines carry `fields()`.
    Give the token back to `unbind_rollout` when done."""
    return _ROLLOUT.set(fields)


def unbind_rollout(token: contextvars.Token[Any]) -> None:
    _ROLLOUT.reset(token)


def _context() -> Mapping[str, Any]:
    fields = _ROLLOUT.get()
    if fields is None:
        return {}
    try:
        return fields()
    except Exception:  # a log line must never fail because its context could not be read
        return {}


def _timestamp(created: float) -> str:
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{whole}.{int(created % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: timestamp, level, logger, message, the
    rollout's fields (from the context and `extra=`), and the exception, if any."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "timestamp": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _context().items():
            if value is not None:
                event[key] = value
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and value is not None:
                event[key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            event["error"] = record.exc_text
        if record.stack_info:
            event["stack"] = record.stack_info
        return json.dumps(redact(event), ensure_ascii=False, default=str)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The JSON handler configure_logging installs (found again to be replaced)."""


def configure_logging(
    level: str = "info", log_format: LogFormat = "text", *, stream: IO[str] | None = None
) -> None:
    """The process's log: `text` is logging.basicConfig's line (a no-op when the root logger
    already has handlers); `json` puts one JSON handler on the root logger, replacing one this
    function put there before. Either way every root handler redacts secrets."""
    global _json_enabled
    root = logging.getLogger()
    if log_format == "json":
        for old in [h for h in root.handlers if isinstance(h, _Handler)]:
            root.removeHandler(old)
        handler = _Handler(stream if stream is not None else sys.stderr)
        handler.setFormatter(JsonFormatter())
        handler.addFilter(RedactingFilter())
        root.addHandler(handler)
        root.setLevel(level.upper())
        # What Python itself would print on stderr goes through the log too: warnings, and an
        # exception nothing caught (a traceback on stderr would be a line no pipeline parses).
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught
    else:
        logging.basicConfig(
            level=level.upper(), format=TEXT_FORMAT, stream=stream if stream else sys.stderr
        )
    _json_enabled = log_format == "json"
    install_log_redaction()  # no URL credentials or tokens in the log, whoever logs them


def _log_uncaught(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    logging.getLogger("canary").critical("uncaught exception", exc_info=(kind, value, tb))


def json_logging() -> bool:
    """Whether the log is JSON: then what a command would print on stderr is logged instead,
    so that every stderr line is one JSON object."""
    return _json_enabled
