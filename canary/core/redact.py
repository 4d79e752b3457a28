"""Redaction: secrets (URL credentials, tokens, API keys) never reach records, reports, logs or
errors.

Why one module: a Prometheus URL like ``http://alice:s3cret@prom:9090`` is given once, in a
config, and then travels into the record's start entry, into "no data" reasons, the
``/rollouts`` state, the reports and the log. Redacting at each of those edges with the same
rules is the only way not to miss one; each edge calls these functions:

    redact_url(url)      userinfo becomes ``***@``; secret-looking query (and fragment)
                         parameters keep their names, lose their values
    redact_text(text)    the same for every URL inside free text (error messages, reasons),
                         plus ``Bearer <token>`` and ``password=...``-style pairs
    redact(data)         JSON-able data: values under secret-looking keys (password, token,
                         api_key, secret, authorization, ...) become ``***``; strings are
                         redacted as text
    RedactingFilter      a ``logging.Filter`` that redacts messages and exception texts;
                         ``install_log_redaction()`` puts it on the root logger's handlers

A key that names *where* a secret lives (``api_key_env``, ``password_file``, ``token_path``,
``secret_name``) is not a secret and stays readable. Pure: standard library only.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "MASK",
    "RedactingFilter",
    "install_log_redaction",
    "is_secret_key",
    "redact",
    "redact_text",
    "redact_url",
]

MASK = "***"

# Substrings of a key (lower case, '-' read as '_') that mark its value as secret.
_SECRET_WORDS = (
    "password",
    "passwd",
    "secret",
    "token",
    "api_key",
    "apikey",
    "access_key",
    "private_key",
    "authorization",
    "credential",
    "bearer",
    "cookie",
    "session_id",
)
# Whole keys (or query parameter names) that are secret though they hold none of the words.
_SECRET_NAMES = frozenset({"auth", "pass", "pwd", "key", "sig", "signature", "x_api_key"})
# Keys that say where a secret is kept, not what it is.
_REFERENCE_SUFFIXES = ("_env", "_file", "_path", "_name", "_ref", "_kind", "_type")

_URL = re.compile(r"""[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s<>"'`]+""")
# `Authorization: Basic abc=`, `authorization=Bearer xyz`: the scheme stays, the rest goes.
_AUTHORIZATION = re.compile(
    r"(?i)\b(authorization['\"]?\s*[=:]\s*['\"]?)(?:(bearer|basic|token)\s+)?[^\s'\",;}]+"
)
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=\-]+")
_PAIR = re.compile(
    r"(?i)\b([a-z0-9_\-]*(?:password|passwd|secret|token|api[_\-]?key|access[_\-]?key)"
    r"[a-z0-9_\-]*)(['\"]?\s*[=:]\s*)(['\"]?)([^\s&'\",;}]+)"
)
# A cheap first look: text without any of these cannot hold what the patterns above find.
_TRIGGER = re.compile(r"(?i)://|bearer|auth|token|pass|secret|key")


def is_secret_key(key: str) -> bool:
    """Whether a mapping key (or query parameter name) marks its value as a secret."""
    name = key.lower().replace("-", "_")
    if name.endswith(_REFERENCE_SUFFIXES):
        return False
    return name in _SECRET_NAMES or any(word in name for word in _SECRET_WORDS)


def _redact_params(text: str) -> str:
    """`a=1&token=xyz` -> `a=1&token=***`, keeping every other byte as it was."""
    parts = []
    for pair in text.split("&"):
        name, eq, value = pair.partition("=")
        parts.append(f"{name}={MASK}" if eq and value and is_secret_key(name) else pair)
    return "&".join(parts)


def redact_url(url: str, *, keep_path: bool = True) -> str:
    """`url` without credentials: userinfo becomes `***@`, secret query parameters `***`.

    With keep_path=False the path, query and fragment are dropped too (`https://host/…`), for
    URLs that carry their secret in the path (Slack-style webhooks)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unbalanced '[' in the host: never echo what we cannot read
        return _URL_USERINFO.sub(r"\1***@", url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rpartition('@')[2]}"
    if not keep_path:
        tail = "/…" if (parts.path not in ("", "/") or parts.query or parts.fragment) else ""
        return f"{parts.scheme}://{netloc}{tail}" if parts.scheme else MASK
    query = _redact_params(parts.query) if parts.query else parts.query
    fragment = _redact_params(parts.fragment) if "=" in parts.fragment else parts.fragment
    if (netloc, query, fragment) == (parts.netloc, parts.query, parts.fragment):
        return url  # nothing secret: exactly as given
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


_URL_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.\-]*://)[^\s/?#@]*@")


def redact_text(text: str) -> str:
    """Free text (an error message, a reason) with every secret it shows masked."""
    if not _TRIGGER.search(text):
        return text
    text = _URL.sub(lambda m: redact_url(m.group(0)), text)
    text = _AUTHORIZATION.sub(
        lambda m: f"{m.group(1)}{m.group(2) + ' ' if m.group(2) else ''}{MASK}", text
    )
    text = _BEARER.sub(lambda m: f"{m.group(1)}{MASK}", text)
    return _PAIR.sub(_masked_pair, text)


def _masked_pair(match: re.Match[str]) -> str:
    key, sep, quote, _ = match.groups()
    if not is_secret_key(key):  # api_key_env=PDNS_API_KEY names where the key is
        return match.group(0)
    return f"{key}{sep}{quote}{MASK}"


def redact(data: Any) -> Any:
    """A copy of JSON-able `data` with secrets masked (see the module docstring). Values that
    need no change are returned as they are, so redacting clean data costs no copies."""
    if isinstance(data, str):
        return redact_text(data)
    if isinstance(data, Mapping):
        out = {}
        changed = False
        for key, value in data.items():
            new = _mask(value) if isinstance(key, str) and is_secret_key(key) else redact(value)
            changed = changed or new is not value
            out[key] = new
        return out if changed or not isinstance(data, dict) else data
    if isinstance(data, list | tuple):
        items = [redact(value) for value in data]
        if isinstance(data, list) and all(a is b for a, b in zip(items, data, strict=True)):
            return data
        return items
    return data


def _mask(value: Any) -> Any:
    """Everything under a secret key: scalars masked, containers walked."""
    if value is None or value == "" or isinstance(value, bool):
        return value  # "no secret set" is worth seeing
    if isinstance(value, Mapping):
        return {key: _mask(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_mask(item) for item in value]
    return MASK


class RedactingFilter(logging.Filter):
    """Redacts a log record's message, exception text and stack before any handler sees them.
    Put it on handlers (a logger's own filters do not see records from its children)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: let the handler report it as usual
            return True
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Add a RedactingFilter to every handler of `logger` (default: the root logger), once.
    Call it after the handlers exist (after logging.basicConfig)."""
    target = logger if logger is not None else logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
